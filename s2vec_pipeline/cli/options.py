"""Options several commands share, and turning them into a root and settings.

Defaults come from ``settings`` (the one configuration surface): ``--root`` defaults to
``$S2VEC_ROOT``, else ``./s2vec_data``, read when the parser is built.
"""

from __future__ import annotations

import argparse

from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.settings import (
    DEFAULT_PROFILE,
    DEFAULT_ROOT,
    ENV_ROOT,
    PipelineSettings,
    bundled_sources,
    default_root,
)
from s2vec_pipeline.storage import fs

VERBOSE_HELP = "-v: show Dagster's INFO logs; -vv: also the traceback of an error"


def csv_list(value: str) -> list[str]:
    """``a, b,,c`` -> ``["a", "b", "c"]`` (an argparse ``type``)."""
    return [v for v in (s.strip() for s in value.split(",")) if v]


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        default=default_root(),
        help=f"storage root of the Delta tables (default: ${ENV_ROOT}, else {DEFAULT_ROOT})",
    )


def add_source_options(p: argparse.ArgumentParser) -> None:
    """``--source``, ``--root``, ``--profile``, ``--taxonomy``: what a run builds, and where."""
    p.add_argument(
        "--source",
        action="append",
        dest="sources",
        metavar="PATH.osm.pbf",
        help="OSM extract to read (repeatable; default: the bundled extracts)",
    )
    add_root(p)
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help="resolution profile: paper (image 8, pixel 12), city (13, 17) or custom:IMAGE:PIXEL",
    )
    p.add_argument("--taxonomy", default=None, help="feature taxonomy YAML (default: packaged)")


def cells_given(cells: list[str] | None) -> list[str] | None:
    """``--cells ,`` names no cell: an error, never 'every cell'."""
    if cells is not None and not cells:
        raise S2VecError("--cells names no cell: give level-6 tokens, e.g. --cells 12cd,4693")
    return cells


def root_of(args: argparse.Namespace) -> str:
    """``--root`` as the pipeline addresses it (an absolute path, or an object-store URI whose
    bucket was checked: a missing bucket is one clear line, before anything is read)."""
    root = fs.normalize_root(args.root)
    if fs.is_object_store(root):
        fs.check_bucket(root)
    elif "%" in root:
        # delta-rs reads a local path as a URL ("%20" becomes a space) and Dagster's SQLite
        # URL breaks on it: refused before anything is written
        raise S2VecError(
            f"--root {root}: a '%' in a local root is not supported; rename the folder"
        )
    return root


def existing_root(args: argparse.Namespace) -> str:
    """``root_of``, which must be a folder: commands that read a materialized run."""
    root = root_of(args)
    if not fs.is_dir(root):
        raise S2VecError(f"--root {root} is not a folder: give the root of a materialized run")
    return root


def settings_of(args: argparse.Namespace, changes_dir: str | None = None) -> PipelineSettings:
    """The settings of a run: the root, profile and taxonomy given, and the sources given, else
    the ones the root was built from (its manifest), else the bundled extracts."""
    from s2vec_pipeline.osm.extract import validate_source
    from s2vec_pipeline.storage.manifest import recorded_sources

    root = root_of(args)
    chosen = args.sources or recorded_sources(root) or bundled_sources()
    sources = tuple(str(validate_source(s).resolve()) for s in chosen)
    return PipelineSettings(
        root=root,
        profile_name=args.profile,
        sources=sources,
        taxonomy_path=args.taxonomy,
        changes_dir=changes_dir,
    )
