"""The ``s2vec`` parser and its entry point: every command takes ``-v``/``-vv``, and every
outcome ends in one exit code (``console`` says which)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

from s2vec_pipeline.cli import analysis, pipeline, roots
from s2vec_pipeline.cli.console import console, failure, quiet_closed_stdout, stdout_closed
from s2vec_pipeline.cli.options import add_verbose

DESCRIPTION = "s2vec command line. Every materialization goes through Dagster, as in the UI."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2vec", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline.add_materialize(sub)
    pipeline.add_refresh(sub)
    roots.add_region(sub)
    roots.add_status(sub)
    roots.add_sql(sub)
    roots.add_maintain(sub)
    analysis.add_evaluate(sub)
    analysis.add_pool(sub)
    analysis.add_map(sub)
    for command in _commands(parser):  # here, so that no command can miss it
        add_verbose(command)
    return parser


def _commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that run a command: those without subcommands of their own (argparse has
    no public way to list subparsers: ``_actions`` is the one it has had since Python 2.7)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield parser
    for group in groups:
        for child in dict.fromkeys(group.choices.values()):  # an alias maps to the same parser
            yield from _commands(child)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input or a state the user can fix (one ``error:`` line on
    stderr; ``-vv`` adds the traceback), 1 on an internal error, 130 when interrupted, 141
    (quietly) when the reader of stdout went away."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the tags of the Dagster runs it launches
    try:
        with console(args.verbose):
            code = args.func(args)
            sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
            return code
    except BaseException as e:  # noqa: BLE001 - one line, not Dagster's pages, for a bug too
        if stdout_closed(e):
            return quiet_closed_stdout()
        return failure(e, args.verbose)
