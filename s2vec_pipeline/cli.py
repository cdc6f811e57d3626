"""``s2vec`` command line. Every materialization goes through Dagster, as in the UI."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.settings import DEFAULT_PROFILE, PipelineSettings, bundled_sources
from s2vec_pipeline.storage import fs


def _csv(value: str) -> list[str]:
    return [v for v in (s.strip() for s in value.split(",")) if v]


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: show Dagster's INFO logs; -vv: also the traceback of an error",
    )


def _cells_given(cells: list[str] | None) -> list[str] | None:
    """``--cells ,`` names no cell: an error, never 'every cell'."""
    if cells is not None and not cells:
        raise S2VecError("--cells names no cell: give level-6 tokens, e.g. --cells 12cd,4693")
    return cells


class _ProgressHandler(logging.StreamHandler):
    """Progress lines on stderr. A record with ``transient=True`` (training epochs) rewrites one
    line on a terminal; when stderr is not a terminal every record is a plain line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.tty = sys.stderr.isatty()
        self.open_line = False

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        if self.tty and getattr(record, "transient", False):
            self.stream.write(f"\r\x1b[K{msg}")
            self.open_line = True
        else:
            # A line after epochs ends the rewritten line: the last epoch's line stays.
            self.stream.write(("\n" if self.open_line else "") + msg + "\n")
            self.open_line = False
        self.flush()


@contextlib.contextmanager
def _console(verbosity: int) -> Iterator[None]:
    """While a command runs: progress lines on stderr and, at default verbosity, Dagster's own
    Python logger quiet. Undone after it, so library callers (and later tests) in the same
    process are unaffected."""
    from s2vec_pipeline.service.runner import PROGRESS_LOGGER

    progress, dagster_logger = logging.getLogger(PROGRESS_LOGGER), logging.getLogger("dagster")
    handler = _ProgressHandler()
    saved = (progress.level, progress.propagate, dagster_logger.level)
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    if verbosity <= 0:
        dagster_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        if handler.open_line:
            handler.stream.write("\n")
        progress.removeHandler(handler)
        progress.setLevel(saved[0])
        progress.propagate = saved[1]
        dagster_logger.setLevel(saved[2])


def _add_materialize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "materialize",
        help="materialize pipeline assets for level-6 partitions through Dagster",
        description="Run the pipeline on OSM extracts. Defaults: the bundled Helsinki and "
        "Monaco extracts, the city profile, tables under ./s2vec_data.",
    )
    _add_source_options(p)
    p.add_argument(
        "--cells",
        type=_csv,
        default=None,
        metavar="TOKEN,...",
        help="level-6 cell tokens to materialize (default: all the sources cover)",
    )
    p.add_argument(
        "--region",
        default=None,
        metavar="NAME",
        help="materialize the cells of a registered region (s2vec region add)",
    )
    p.add_argument(
        "--stages",
        type=_csv,
        default=None,
        metavar="STAGE,...",
        help="stages to run, from extract,features,raster,train,embed (default: all)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="bound training to N epochs (default: profile's)"
    )
    p.add_argument(
        "--model-version", default=None, help="embed with this existing model instead of training"
    )
    p.add_argument(
        "--workers",
        default=None,
        metavar="N",
        help="partitions materialized at once, each run in its own process (default: "
        "$S2VEC_WORKERS, else one per core)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="train with DDP on N GPUs (N CPU processes without a GPU); default 1",
    )
    train = p.add_argument_group("training levers (docs/quality.md)")
    train.add_argument(
        "--augment",
        action="store_true",
        help="train on a random one of the 8 rotations/reflections of each image",
    )
    train.add_argument(
        "--empty-pixel-weight",
        type=float,
        default=None,
        metavar="W",
        help="loss weight of masked pixels without data, in [0, 1] (default 1)",
    )
    train.add_argument(
        "--input-norm",
        choices=("channel", "global"),
        default=None,
        help="standardize log1p inputs per channel (default) or with one global scale",
    )
    train.add_argument(
        "--held-out-channels",
        type=_csv,
        default=None,
        metavar="NAME,...",
        help="channels zeroed in the model's input (to evaluate them as labels)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="recompute partitions that are up to date (same inputs, code and settings)",
    )
    _add_verbose(p)
    p.set_defaults(func=_cmd_materialize)


def _cmd_materialize(args: argparse.Namespace) -> int:
    from s2vec_pipeline.osm.coverage import source_cells, sources_for
    from s2vec_pipeline.service.runner import (
        CLI_TAG,
        STAGES,
        check_instance_home,
        console_log_level,
        dagster_instance,
        materialize,
        parse_stages,
    )
    from s2vec_pipeline.settings import (
        check_root_writable,
        default_workers,
        parse_partition_tokens,
        parse_workers,
    )
    from s2vec_pipeline.storage import delta_store

    settings = _settings(args)
    profile, taxonomy = settings.profile, settings.taxonomy  # validate before any run
    workers = (
        default_workers() if args.workers is None else parse_workers(args.workers, "--workers")
    )
    stages = list(STAGES) if args.stages is None else args.stages  # "--stages ," is an error
    if args.model_version and args.stages is None:
        stages = [s for s in stages if s != "train"]  # embed with the given model
    assets = parse_stages(stages)
    levers = {
        k: v
        for k, v in (
            ("augment", True if args.augment else None),
            ("empty_pixel_weight", args.empty_pixel_weight),
            ("input_norm", args.input_norm),
            ("held_out_channels", args.held_out_channels),
        )
        if v is not None
    }
    unknown = [c for c in levers.get("held_out_channels", []) if c not in taxonomy.channel_names]
    if unknown:
        raise S2VecError(
            f"--held-out-channels: {', '.join(unknown)} not among the taxonomy's channels "
            f'(see `s2vec sql "DESCRIBE cell_features"` or the taxonomy YAML)'
        )
    from s2vec_pipeline.model.config import InvalidTrainConfigError, TrainConfig

    try:  # the training settings, checked by the one TrainConfig before any run
        TrainConfig.for_profile(profile.name, epochs=args.epochs, devices=args.devices, **levers)
    except InvalidTrainConfigError as e:
        raise S2VecError(e.describe(lambda f: "--" + f.replace("_", "-"))) from None
    op_config = {
        "mae_model": {
            **({"epochs": args.epochs} if args.epochs is not None else {}),
            **({"devices": args.devices} if args.devices is not None else {}),
            **levers,
        },
        "embeddings": {"model_version": args.model_version} if args.model_version else {},
    }
    if args.region and args.cells:
        raise S2VecError("give --cells or --region, not both")
    if args.region:
        from s2vec_pipeline.cells.regions import RegionRegistry

        registry = RegionRegistry(settings.root)
        region = registry.get(args.region)
        registry.check_covered(region, source_cells(settings.sources))
        cells = list(region.cells)
    elif _cells_given(args.cells) is not None:
        cells = parse_partition_tokens(args.cells)
    else:
        cells = list(source_cells(settings.sources))
    sources_for(settings.sources, cells)
    print(
        f"profile {profile.name}: images level {profile.image_level}, pixels level "
        f"{profile.pixel_level} ({profile.side}x{profile.side}); taxonomy {taxonomy.version} "
        f"({len(taxonomy.channels)} channels)\npartitions: {', '.join(cells)}"
    )
    check_instance_home(settings.root)  # before anything is written
    check_root_writable(settings.root)
    from s2vec_pipeline.storage.manifest import record_sources

    if args.model_version:  # an unknown model is refused before the data layer runs
        from s2vec_pipeline.model.registry import check_model_exists

        check_model_exists(settings.root, args.model_version)
    from s2vec_pipeline.service.status import TABLES

    t0 = time.perf_counter()
    tables_before = {t: delta_store.table_version_safe(settings.root, t) for t in TABLES}
    # The root remembers what it is built from (later commands need no --source), but only
    # once a run was not refused: a refused source or profile must not poison the root.
    record = functools.partial(
        record_sources, settings.root, list(settings.sources), profile.name, taxonomy.version
    )
    try:
        with dagster_instance(settings.root) as instance:
            report = materialize(
                settings,
                cells,
                assets,
                instance,
                log_level=console_log_level(args.verbose),
                op_config=op_config,
                tags={CLI_TAG: " ".join(["s2vec", *(args.argv or [])])[:1000]},
                workers=workers,
                force=args.force,
            )
    except S2VecError:
        raise  # refused (bad source, other profile...): the manifest stays as it was
    except BaseException:
        # interrupted or crashed after writing: the tables now hold these sources' data
        if tables_before != {t: delta_store.table_version_safe(settings.root, t) for t in TABLES}:
            record()
        raise
    record()
    seconds = time.perf_counter() - t0
    if any(a != "mae_model" for a in assets):
        print(f"\n{'table':<16} {'rows':>10}  {'delta version':>13}  path")
    for asset in assets:
        if asset == "mae_model":
            continue
        n = delta_store.read_partitions(settings.root, asset, cells, ["parent_l6"]).height
        print(
            f"{asset:<16} {n:>10}  {delta_store.table_version(settings.root, asset):>13}  "
            f"{delta_store.table_uri(settings.root, asset)}"
        )
    if report.model_version:
        model = report.model_version
        print(f"model            {model}  {fs.join(settings.root, 'models', model)}")
    for job, keys in report.up_to_date.items():
        if keys:
            print(f"up to date, skipped ({job}): {', '.join(keys)}  (--force recomputes)")
    print(f"\n{len(report.run_ids)} Dagster run(s) in {seconds:.1f} s")
    if report.warnings_raised:
        print(f"warning: asset checks {', '.join(report.warnings_raised)}", file=sys.stderr)
        for name in report.warnings_raised:
            if name in report.reasons:
                print(f"warning: {name}: {report.reasons[name]}", file=sys.stderr)
    if report.checks_failed:
        print(f"FAILED asset checks: {', '.join(report.checks_failed)}", file=sys.stderr)
        return 1
    return 0


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        action="append",
        dest="sources",
        metavar="PATH.osm.pbf",
        help="OSM extract to read (repeatable; default: the bundled extracts)",
    )
    p.add_argument("--root", default="s2vec_data", help="storage root of the Delta tables")
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help="resolution profile: paper (image 8, pixel 12), city (13, 17) or custom:IMAGE:PIXEL",
    )
    p.add_argument("--taxonomy", default=None, help="feature taxonomy YAML (default: packaged)")


def _root(args: argparse.Namespace) -> str:
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


def _settings(args: argparse.Namespace, changes_dir: str | None = None) -> PipelineSettings:
    from s2vec_pipeline.osm.extract import validate_source
    from s2vec_pipeline.storage.manifest import recorded_sources

    root = _root(args)
    # Without --source: what the root was built from (its manifest), else the bundled extracts.
    chosen = args.sources or recorded_sources(root) or bundled_sources()
    sources = tuple(str(validate_source(s).resolve()) for s in chosen)
    return PipelineSettings(
        root=root,
        profile_name=args.profile,
        sources=sources,
        taxonomy_path=args.taxonomy,
        changes_dir=changes_dir,
    )


def _add_refresh(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refresh",
        help="apply new OSM change files and recompute only the partitions that changed",
        description="Runs in the foreground what the nightly schedule runs: applies the change "
        "files not applied yet (--changes), re-extracts the touched partitions (all "
        "materialized ones without --changes), then recomputes cell_features, raster_tiles and "
        "embeddings only where an upstream data version changed. Uses $DAGSTER_HOME's instance, "
        "else one under ROOT/_dagster.",
    )
    _add_source_options(p)
    p.add_argument(
        "--changes", default=None, metavar="DIR", help="folder of .osc / .osc.gz change files"
    )
    _add_verbose(p)
    p.set_defaults(func=_cmd_refresh)


def _cmd_refresh(args: argparse.Namespace) -> int:
    from s2vec_pipeline.osm.coverage import sources_for
    from s2vec_pipeline.service.runner import (
        check_instance_home,
        console_log_level,
        dagster_instance,
        refresh,
    )
    from s2vec_pipeline.settings import check_root_writable

    changes = str(Path(args.changes).resolve()) if args.changes else None
    if changes is not None and not Path(changes).is_dir():
        raise S2VecError(f"--changes {args.changes} is not a folder of .osc/.osc.gz files")
    settings = _settings(args, changes)
    _ = (settings.profile, settings.taxonomy)  # validate before any run
    check_instance_home(settings.root)  # before anything is written
    check_root_writable(settings.root)
    from s2vec_pipeline.storage import delta_store

    if delta_store.table_exists(settings.root, "osm_features"):  # sources must cover the root
        sources_for(settings.sources, delta_store.partition_keys(settings.root, "osm_features"))
    t0 = time.perf_counter()
    with dagster_instance(settings.root) as instance:
        report = refresh(settings, instance, log_level=console_log_level(args.verbose))
    for src, files in report.applied.items():
        print(f"applied to {src}: {', '.join(files)}")
    if not report.applied:
        print("applied: no new change file")
    if report.outside:
        print(f"outside every source (not applied): {', '.join(report.outside)}")
    print(f"touched cells: {report.touched_cells}")
    print("recomputed:")
    for asset, parts in report.recomputed.items():
        print(f"  {asset}: {parts}")
    print(f"{len(report.run_ids)} Dagster run(s) in {time.perf_counter() - t0:.1f} s")
    return 0


def _add_region(sub: argparse._SubParsersAction) -> None:
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
    add.add_argument("--root", default="s2vec_data", help="storage root of the Delta tables")
    _add_verbose(add)
    add.set_defaults(func=_cmd_region_add)
    ls = rsub.add_parser("list", help="list the registered regions")
    ls.add_argument("--root", default="s2vec_data", help="storage root of the Delta tables")
    _add_verbose(ls)
    ls.set_defaults(func=_cmd_region_list)


def _cmd_region_add(args: argparse.Namespace) -> int:

    from s2vec_pipeline.cells import regions as rg
    from s2vec_pipeline.osm.coverage import source_cells

    root = _root(args)
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
    if os.environ.get("DAGSTER_HOME"):
        from s2vec_pipeline.defs.partitions import add_partitions
        from s2vec_pipeline.service.instance import open_dagster_instance

        with open_dagster_instance() as instance:
            new = add_partitions(instance, list(region.cells))
        print(f"added {len(new)} new partition(s) to the Dagster instance in $DAGSTER_HOME")
    return 0


def _cmd_region_list(args: argparse.Namespace) -> int:
    from s2vec_pipeline.cells.regions import RegionRegistry

    regions = RegionRegistry(_root(args)).list()
    if not regions:
        print("no region registered (s2vec region add NAME --bbox ...)")
    for r in regions:
        print(f"{r.name:<20} {r.kind:<8} {len(r.cells):>4} cells  {', '.join(r.cells)}")
    return 0


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="what a root holds: tables, partitions, versions, what is stale and why",
        description="Per table and partition: the Delta version, the data version Dagster "
        "recorded, and whether it is stale (and why: the UI's 'Unsynced'); the sources and "
        "their last applied change file, regions, models, and embeddings of several models. "
        "Uses $DAGSTER_HOME's instance, else ROOT/_dagster.",
    )
    _add_source_options(p)
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from s2vec_pipeline.service.runner import dagster_instance
    from s2vec_pipeline.service.status import root_status

    root = _root(args)
    if not fs.is_dir(root):
        raise S2VecError(f"--root {args.root} does not exist: give the root of a materialized run")
    from s2vec_pipeline.service.status import TABLES
    from s2vec_pipeline.storage import delta_store
    from s2vec_pipeline.storage.manifest import MANIFEST

    if not fs.exists(fs.join(root, MANIFEST)) and not any(
        delta_store.table_exists(root, t) for t in TABLES
    ):  # nothing to report, and no _dagster/ to create in someone's folder
        raise S2VecError(
            f"--root {args.root} is no s2vec root (no {MANIFEST}, no table): give the root of a "
            f"materialized run"
        )
    settings = _settings(args)
    with dagster_instance(settings.root) as instance:
        print(root_status(settings, instance).text())
    return 0


def _add_sql(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sql",
        help="run SQL over the Delta tables under a root (DuckDB)",
        description="Every Delta table under --root is a table of its directory name "
        "(cell_embeddings, image_embeddings, cell_features, raster_tiles, osm_features).",
    )
    p.add_argument("query", help='a SQL query, e.g. "SELECT count(*) FROM cell_embeddings"')
    p.add_argument("--root", default="s2vec_data", help="storage root of the Delta tables")
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
    _add_verbose(p)
    p.set_defaults(func=_cmd_sql)


def _cmd_sql(args: argparse.Namespace) -> int:
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
        _root(args), args.query, extra_tables=extra or None, allow_external=args.allow_external
    )
    df = pl.from_arrow(result)
    if out is not None:
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
        print(f"{df.height} rows written to {out}")
        return 0
    if args.limit < 0:
        raise S2VecError(f"--limit must be 0 or more, got {args.limit}")
    with pl.Config(tbl_rows=args.limit, fmt_str_lengths=40, tbl_width_chars=160):
        print(df.head(args.limit))
    if df.height > args.limit:
        print(f"showing {args.limit} of {df.height} rows (--limit to change)")
    return 0


def _add_maintain(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--root", default="s2vec_data", help="storage root of the Delta tables")
    p.add_argument(
        "--retention-hours",
        type=float,
        default=DEFAULT_RETENTION_HOURS,
        help=f"keep unreferenced files younger than this (default {DEFAULT_RETENTION_HOURS})",
    )
    _add_verbose(p)
    p.set_defaults(func=_cmd_maintain)


def _cmd_maintain(args: argparse.Namespace) -> int:
    from s2vec_pipeline.storage.maintenance import format_report, maintain_root

    t0 = time.perf_counter()
    reports = maintain_root(_root(args), args.retention_hours)
    if not reports:
        print(f"no Delta table under {args.root}")
        return 0
    print(format_report(reports))
    print(f"\n{len(reports)} table(s) maintained in {time.perf_counter() - t0:.1f} s")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="linear probes of the embeddings on your labels, against raw-feature baselines",
        description="Ridge probes (alpha by inner cross-validation) predicting each numeric "
        "label column from S2Vec embeddings, raw log1p features, raw 3x3 neighbourhood, PCA of "
        "the raw features and fusions, in random k-fold and spatially blocked folds. Labels: "
        "Parquet or CSV with a cell_token (pixel level) or lat/lon column and numeric targets, "
        "or areas (GeoJSON or GeoParquet polygons with numeric columns): every feature is then "
        "the area-weighted mean over the pixel cells covering each area.",
    )
    p.add_argument(
        "--labels",
        required=True,
        metavar="FILE",
        help="labels: .parquet or .csv per cell, or .geojson / GeoParquet per area",
    )
    p.add_argument("--root", default="s2vec_data", help="storage root of the Delta tables")
    p.add_argument("--model-version", default=None, help="model whose embeddings to evaluate")
    p.add_argument(
        "--with",
        dest="with_file",
        default=None,
        metavar="OTHER.parquet",
        help="another embedding source keyed by cell_token (a list column or numeric columns)",
    )
    p.add_argument("--targets", type=_csv, default=None, metavar="COL,...", help="label columns")
    p.add_argument("--folds", type=int, default=5, help="folds per protocol (default 5)")
    p.add_argument(
        "--block-level",
        type=int,
        default=None,
        help="S2 level of the cells the spatial protocol holds out whole (default: image level)",
    )
    p.add_argument("--seed", type=int, default=0, help="fold seed (default 0)")
    p.add_argument(
        "--mlp", action="store_true", help="also a small MLP probe on embeddings and raw features"
    )
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the report as JSON")
    _add_verbose(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from s2vec_pipeline.analysis import evaluation

    if args.out and not args.out.endswith(".json"):
        raise S2VecError(f"--out must end in .json, got {args.out}")
    root = _root(args)
    if not fs.is_dir(root):
        raise S2VecError(f"--root {root} is not a folder: give the root of a materialized run")
    labels, areas = evaluation.read_labels(args.labels)
    other = evaluation.read_embedding_file(args.with_file) if args.with_file else None
    report = evaluation.evaluate(
        root,
        labels,
        model_version=args.model_version,
        with_embeddings=other,
        folds=args.folds,
        seed=args.seed,
        block_level=args.block_level,
        targets=args.targets,
        mlp=args.mlp,
        areas=areas,
    )
    print(report.table())
    if args.out:
        evaluation.write_report(report, args.out)
        print(f"\nreport written to {args.out}")
    return 0


def _add_pool(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pool",
        help="one embedding per area of yours: pixel embeddings pooled, area-weighted",
        description="For each polygon of a GeoJSON or GeoParquet file: the mean of the "
        "embeddings of the pixel cells it covers, each weighted by the square metres of the "
        "polygon inside the cell (images without data count with the empty image's "
        "embedding). Areas reaching a partition that is not embedded are refused.",
    )
    p.add_argument("--areas", required=True, metavar="FILE", help=".geojson or GeoParquet")
    p.add_argument("--root", default="s2vec_data", help="storage root of the Delta tables")
    p.add_argument("--model-version", default=None, help="embeddings of this model")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE.parquet",
        help="one row per area: its attributes, area_index, area_m2, cells, model_version, "
        "embedding",
    )
    p.add_argument(
        "--cells-out",
        default=None,
        metavar="FILE.parquet",
        help="also the (area_index, cell_token, area_m2) pieces, for the SQL pooling recipe",
    )
    _add_verbose(p)
    p.set_defaults(func=_cmd_pool)


def _cmd_pool(args: argparse.Namespace) -> int:
    from s2vec_pipeline.analysis import areas

    root = _root(args)
    if not fs.is_dir(root):
        raise S2VecError(f"--root {root} is not a folder: give the root of a materialized run")
    done = areas.write_pooled(root, args.areas, args.out, args.model_version, args.cells_out)
    print(
        f"{done['areas']} area(s) pooled over {done['cells']} (area, cell) pieces with model "
        f"{done['model_version']} (width {done['dim']}): written to {args.out}"
    )
    if args.cells_out:
        print(f"pieces written to {args.cells_out}")
    return 0


def _add_map(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map",
        help="draw embeddings (first 3 principal components as RGB) or a channel on a map",
        description="Cells drawn as their true S2 polygons, north up, with legend and "
        "coordinates. --out FILE.png (matplotlib) or FILE.html (self-contained: inline SVG, "
        "opens offline; hover shows the cell token and its top channels).",
    )
    p.add_argument("--root", default="s2vec_data", help="storage root of the Delta tables")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--cells",
        type=_csv,
        metavar="TOKEN,...",
        help="cells to draw: level-6 partitions, image cells or any cells down to pixels",
    )
    where.add_argument("--region", metavar="NAME", help="a registered region (s2vec region add)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--embedding", action="store_true", help="the cells' embeddings")
    what.add_argument("--channel", metavar="NAME", help="one raster channel, e.g. road_primary_m")
    what.add_argument(
        "--reconstruction",
        action="store_true",
        help="one image (--cells IMAGE_TOKEN): input, masked input and the model's "
        "reconstruction side by side (PNG only)",
    )
    p.add_argument("--model-version", default=None, help="embeddings of this model")
    p.add_argument("--out", required=True, metavar="FILE.png|FILE.html", help="output file")
    _add_verbose(p)
    p.set_defaults(func=_cmd_map)


def _cmd_map(args: argparse.Namespace) -> int:
    from s2vec_pipeline.analysis import maps

    root = _root(args)
    if not fs.is_dir(root):
        raise S2VecError(f"--root {root} is not a folder: give the root of a materialized run")
    if Path(args.out).suffix.lower() not in (".png", ".html", ".htm"):
        raise S2VecError(f"--out must end in .png or .html, got {args.out}")
    if args.region:
        from s2vec_pipeline.cells.regions import RegionRegistry

        cells = list(RegionRegistry(root).get(args.region).cells)
    else:
        cells = _cells_given(args.cells)
    if args.reconstruction:
        if len(cells) != 1 or not args.out.lower().endswith(".png"):
            raise S2VecError("--reconstruction draws one image: --cells IMAGE_TOKEN --out F.png")
        png = maps.reconstruction_png(root, cells[0], args.model_version)
        Path(args.out).write_bytes(png)
        print(f"reconstruction of image {cells[0]} written to {args.out}")
        return 0
    if args.embedding:
        layer = maps.embedding_layer(root, cells, args.model_version)
    else:
        layer = maps.channel_layer(root, cells, args.channel)
    out = maps.write_map(layer, args.out)
    print(f"{layer.title}\nwritten to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2vec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_materialize(sub)
    _add_refresh(sub)
    _add_region(sub)
    _add_status(sub)
    _add_sql(sub)
    _add_maintain(sub)
    _add_evaluate(sub)
    _add_pool(sub)
    _add_map(sub)
    return parser


#: OS errors the user fixes (space, permissions, a read-only disk): exit 2, like bad input.
_USER_OS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input or a state the user can fix (one ``error:`` line on
    stderr; ``-vv`` adds the traceback), 1 on an internal error, 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the tags of the Dagster runs it launches
    verbosity = getattr(args, "verbose", 0)
    try:
        with _console(verbosity):
            return args.func(args)
    except S2VecError as e:
        return _fail(e, str(e), 2, verbosity)
    except KeyboardInterrupt as e:
        return _fail(e, INTERRUPTED, 130, verbosity)
    except Exception as e:  # noqa: BLE001 - one line, not Dagster's pages, for a bug too
        if _interrupted(e):
            return _fail(e, INTERRUPTED, 130, verbosity)
        inner = _innermost(e)
        if isinstance(inner, OSError) and inner.errno in _USER_OS_ERRNOS:
            where = f" ({inner.filename})" if inner.filename else ""
            message = (
                f"{inner.strerror or inner}{where}: free space or fix the permissions, or use "
                f"another --root; nothing was committed"
            )
            return _fail(e, message, 2, verbosity)
        text = (str(inner).strip().splitlines() or [""])[0]
        message = f"{type(inner).__name__}: {text} (unexpected: rerun with -vv for the traceback)"
        return _fail(e, message, 1, verbosity)
    except BaseException as e:  # Dagster's DagsterExecutionInterruptedError is no Exception
        if _interrupted(e):
            return _fail(e, INTERRUPTED, 130, verbosity)
        raise


INTERRUPTED = "interrupted; tables stay at their last committed version"


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, however Dagster wrapped it (``DagsterExecutionInterruptedError``, a step
    failure around a ``KeyboardInterrupt``)."""
    from s2vec_pipeline.errors import exception_chain

    return any(
        isinstance(e, KeyboardInterrupt) or type(e).__name__ == "DagsterExecutionInterruptedError"
        for e in exception_chain(exc)
    )


def _innermost(exc: BaseException) -> BaseException:
    """The exception a Dagster step failure wraps (its ``user_exception`` or cause chain)."""
    inner, seen = exc, set()
    while id(inner) not in seen:
        seen.add(id(inner))
        nxt = getattr(inner, "user_exception", None) or inner.__cause__
        if nxt is None:
            break
        inner = nxt
    return inner


def _fail(exc: BaseException, message: str, code: int, verbosity: int) -> int:
    if verbosity >= 2:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
