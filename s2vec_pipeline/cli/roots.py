"""Commands about what a root holds and its upkeep: ``status``, ``sql``, ``maintain`` and
``region`` (the named sets of cells registered in it)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from s2vec_pipeline.cli.options import add_root, add_source_options, root_of, settings_of
from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.settings import PipelineSettings, dagster_home
from s2vec_pipeline.storage import fs

if TYPE_CHECKING:
    import polars as pl


def add_region(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "region",
        help="register named regions (sets of level-6 cells) and list them",
        description="Regions live in ROOT/regions.yaml. A new region must lie inside the "
        "configured sources ($S2VEC_SOURCES, default: the bundled extracts); its cells are "
        "added as Dagster partitions in $DAGSTER_HOME's instance when set, and the "
        "materialize_new_regions sensor launches them when the daemon runs.",
    )
    rsub = p.add_subparsers(dest="region_command", required=True)
    add = rsub.add_parser("add", help="register a region")
    add.add_argument("name", help="lowercase letters, digits, - and _")
    what = add.add_mutually_exclusive_group(required=True)
    what.add_argument("--bbox", metavar="MIN_LAT,MIN_LNG,MAX_LAT,MAX_LNG", help="lat/lng box")
    what.add_argument("--geojson", metavar="FILE", help="GeoJSON polygon(s)")
    what.add_argument("--source", metavar="PBF", help="the header box of an OSM extract")
    add_root(add)
    add.set_defaults(func=cmd_region_add)
    ls = rsub.add_parser("list", help="list the registered regions")
    add_root(ls)
    ls.set_defaults(func=cmd_region_list)


def cmd_region_add(args: argparse.Namespace) -> int:
    from s2vec_pipeline.cells import regions as rg
    from s2vec_pipeline.osm.coverage import source_cells

    root = root_of(args)
    if args.bbox:
        region = rg.region_from_bbox(args.name, *rg.parse_bbox(args.bbox))
    elif args.geojson:
        region = rg.region_from_geojson(args.name, args.geojson)
    else:
        region = rg.region_from_source(args.name, args.source)
    registry = rg.RegionRegistry(root)
    settings = PipelineSettings.from_env()
    registry.check_covered(region, source_cells(settings.sources))  # before anything is written
    registry.add(region)
    print(f"region {region.name}: {len(region.cells)} cells: {', '.join(region.cells)}")
    if dagster_home():
        from s2vec_pipeline.defs.partitions import add_partitions
        from s2vec_pipeline.service.instance import open_dagster_instance

        with open_dagster_instance() as instance:
            new = add_partitions(instance, list(region.cells))
        print(f"added {len(new)} new partition(s) to the Dagster instance in $DAGSTER_HOME")
    return 0


def cmd_region_list(args: argparse.Namespace) -> int:
    from s2vec_pipeline.cells.regions import RegionRegistry

    regions = RegionRegistry(root_of(args)).list()
    if not regions:
        print("no region registered (s2vec region add NAME --bbox ...)")
    for r in regions:
        print(f"{r.name:<20} {r.kind:<8} {len(r.cells):>4} cells  {', '.join(r.cells)}")
    return 0


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="what a root holds: tables, partitions, versions, what is stale and why",
        description="Per table and partition: the Delta version, the data version Dagster "
        "recorded, and whether it is stale (and why: the UI's 'Unsynced'); the sources and "
        "their last applied change file, regions, models, and embeddings of several models. "
        "Uses $DAGSTER_HOME's instance, else ROOT/_dagster.",
    )
    add_source_options(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from s2vec_pipeline.service.runner import dagster_instance
    from s2vec_pipeline.service.status import TABLES, root_status
    from s2vec_pipeline.storage import delta_store
    from s2vec_pipeline.storage.manifest import MANIFEST

    root = root_of(args)
    if not fs.is_dir(root):
        raise S2VecError(f"--root {args.root} does not exist: give the root of a materialized run")
    if not fs.exists(fs.join(root, MANIFEST)) and not any(
        delta_store.table_exists(root, t) for t in TABLES
    ):  # nothing to report, and no _dagster/ to create in someone's folder
        raise S2VecError(
            f"--root {args.root} is no s2vec root (no {MANIFEST}, no table): give the root of a "
            f"materialized run"
        )
    settings = settings_of(args)
    with dagster_instance(settings.root) as instance:
        print(root_status(settings, instance).text())
    return 0


def add_sql(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sql",
        help="run SQL over the Delta tables under a root (DuckDB)",
        description="Every Delta table under --root is a table of its directory name "
        "(cell_embeddings, image_embeddings, cell_features, raster_tiles, osm_features).",
    )
    p.add_argument("query", help='a SQL query, e.g. "SELECT count(*) FROM cell_embeddings"')
    add_root(p)
    p.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also register a Parquet or CSV file as a table (e.g. labels=labels.csv)",
    )
    p.add_argument("--out", default=None, help="write the result to a .parquet or .csv file")
    p.add_argument(
        "--allow-external",
        action="store_true",
        help="let the query read other files and URLs and write files (COPY TO, ATTACH); by "
        "default it reads only the root's tables (and --table files)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=50,
        metavar="N",
        help="rows to print (default 50); says 'showing N of M rows' when it cuts; --out "
        "writes every row",
    )
    p.set_defaults(func=cmd_sql)


def cmd_sql(args: argparse.Namespace) -> int:
    import polars as pl

    from s2vec_pipeline.analysis.sql import run_sql

    extra = {}
    for spec in args.table:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise S2VecError(f"--table expects NAME=PATH, got {spec!r}")
        extra[name] = path
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():  # before the query runs
        raise S2VecError(f"--out {args.out}: folder {out.parent} does not exist; create it first")
    result = run_sql(
        root_of(args), args.query, extra_tables=extra or None, allow_external=args.allow_external
    )
    df = pl.from_arrow(result)
    if out is not None:
        _write_result(df, out)
        print(f"{df.height} rows written to {out}")
        return 0
    if args.limit < 0:
        raise S2VecError(f"--limit must be 0 or more, got {args.limit}")
    with pl.Config(tbl_rows=args.limit, fmt_str_lengths=40, tbl_width_chars=160):
        print(df.head(args.limit))
    if df.height > args.limit:
        print(f"showing {args.limit} of {df.height} rows (--limit to change)")
    return 0


def _write_result(df: pl.DataFrame, out: Path) -> None:
    """A query's result as Parquet, or as CSV with list columns joined by spaces."""
    import polars as pl

    if out.suffix == ".parquet":
        df.write_parquet(out)
    elif out.suffix == ".csv":
        df.with_columns(
            [
                pl.col(c).cast(pl.List(pl.String)).list.join(" ")
                for c, t in df.schema.items()
                if isinstance(t, pl.List)
            ]
        ).write_csv(out)
    else:
        raise S2VecError(f"--out must end in .parquet or .csv, got {out.name}")


def add_maintain(sub: argparse._SubParsersAction) -> None:
    from s2vec_pipeline.storage.maintenance import DEFAULT_RETENTION_HOURS

    p = sub.add_parser(
        "maintain",
        help="compact small files and vacuum unreferenced files of every table under a root",
        description="For every Delta table under --root: compact small files, vacuum files no "
        "version within the retention uses (and files of failed or killed writes older than "
        "the retention), delete staging leftovers of killed writes; prints files and bytes "
        "before and after. The default retention (7 days) is safe beside running writers and "
        "readers of older versions; a shorter one is safe only on a quiet root.",
    )
    add_root(p)
    p.add_argument(
        "--retention-hours",
        type=float,
        default=DEFAULT_RETENTION_HOURS,
        help=f"keep unreferenced files younger than this (default {DEFAULT_RETENTION_HOURS})",
    )
    p.set_defaults(func=cmd_maintain)


def cmd_maintain(args: argparse.Namespace) -> int:
    from s2vec_pipeline.storage.maintenance import format_report, maintain_root

    t0 = time.perf_counter()
    reports = maintain_root(root_of(args), args.retention_hours)
    if not reports:
        print(f"no Delta table under {args.root}")
        return 0
    print(format_report(reports))
    print(f"\n{len(reports)} table(s) maintained in {time.perf_counter() - t0:.1f} s")
    return 0
