"""``s2vec`` command line. Every materialization goes through Dagster, as in the UI.

``main`` (the parser and exit codes), ``console`` (progress and error lines), ``options``
(shared options, defaults from ``settings``), and the commands: ``pipeline`` (materialize,
refresh), ``roots`` (status, sql, maintain, region), ``analysis`` (evaluate, pool, map).
"""

from s2vec_pipeline.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
