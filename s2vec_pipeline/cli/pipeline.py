"""``s2vec materialize`` and ``s2vec refresh``: the commands that run the pipeline (through
Dagster, as the UI does). Everything a run could refuse is checked before the first run."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s2vec_pipeline.cli.options import add_source_options, cells_given, csv_list, settings_of
from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.storage import fs

if TYPE_CHECKING:
    from s2vec_pipeline.osm.taxonomy import Taxonomy
    from s2vec_pipeline.service.runner import RunReport


def add_materialize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "materialize",
        help="materialize pipeline assets for level-6 partitions through Dagster",
        description="Run the pipeline on OSM extracts. Defaults: the bundled Helsinki and "
        "Monaco extracts, the city profile, tables under $S2VEC_ROOT, else ./s2vec_data.",
    )
    add_source_options(p)
    p.add_argument(
        "--cells",
        type=csv_list,
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
        type=csv_list,
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
    _add_training_levers(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="recompute partitions that are up to date (same inputs, code and settings)",
    )
    p.set_defaults(func=cmd_materialize)


def _add_training_levers(p: argparse.ArgumentParser) -> None:
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
        type=csv_list,
        default=None,
        metavar="NAME,...",
        help="channels zeroed in the model's input (to evaluate them as labels)",
    )


def cmd_materialize(args: argparse.Namespace) -> int:
    """Check everything a run could refuse (settings, stages, training settings, partitions,
    root, model), say what will run, run it, then print the tables it wrote."""
    from s2vec_pipeline.service.runner import STAGES, parse_stages
    from s2vec_pipeline.settings import default_workers, parse_workers

    settings = settings_of(args)
    profile, taxonomy = settings.profile, settings.taxonomy  # validate before any run
    workers = (
        default_workers() if args.workers is None else parse_workers(args.workers, "--workers")
    )
    stages = list(STAGES) if args.stages is None else args.stages  # "--stages ," is an error
    if args.model_version and args.stages is None:
        stages = [s for s in stages if s != "train"]  # embed with the given model
    assets = parse_stages(stages)
    op_config = _op_config(args, _training_levers(args, taxonomy, profile.name))
    cells = _partitions(args, settings)
    print(
        f"profile {profile.name}: images level {profile.image_level}, pixels level "
        f"{profile.pixel_level} ({profile.side}x{profile.side}); taxonomy {taxonomy.version} "
        f"({len(taxonomy.channels)} channels)\npartitions: {', '.join(cells)}"
    )
    _check_before_writing(settings, args.model_version)
    t0 = time.perf_counter()
    report = _run_recording_sources(settings, cells, assets, args, op_config, workers)
    return _print_materialized(settings, cells, assets, report, time.perf_counter() - t0)


def _training_levers(args: argparse.Namespace, taxonomy: Taxonomy, profile: str) -> dict:
    """The training levers given, checked by the one ``TrainConfig`` (with ``--epochs`` and
    ``--devices``) before any run; errors name the options."""
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

    try:
        TrainConfig.for_profile(profile, epochs=args.epochs, devices=args.devices, **levers)
    except InvalidTrainConfigError as e:
        raise S2VecError(e.describe(lambda f: "--" + f.replace("_", "-"))) from None
    return levers


def _op_config(args: argparse.Namespace, levers: dict[str, Any]) -> dict[str, Any]:
    """The Dagster op config of the training and embedding steps."""
    return {
        "mae_model": {
            **({"epochs": args.epochs} if args.epochs is not None else {}),
            **({"devices": args.devices} if args.devices is not None else {}),
            **levers,
        },
        "embeddings": {"model_version": args.model_version} if args.model_version else {},
    }


def _partitions(args: argparse.Namespace, settings: PipelineSettings) -> list[str]:
    """The level-6 partitions to run: a region's, the ``--cells`` given, or every one the
    sources cover; each must be covered by a source."""
    from s2vec_pipeline.osm.coverage import source_cells, sources_for
    from s2vec_pipeline.settings import parse_partition_tokens

    if args.region and args.cells:
        raise S2VecError("give --cells or --region, not both")
    if args.region:
        from s2vec_pipeline.cells.regions import RegionRegistry

        registry = RegionRegistry(settings.root)
        region = registry.get(args.region)
        registry.check_covered(region, source_cells(settings.sources))
        cells = list(region.cells)
    elif cells_given(args.cells) is not None:
        cells = parse_partition_tokens(args.cells)
    else:
        cells = list(source_cells(settings.sources))
    sources_for(settings.sources, cells)
    return cells


def _check_before_writing(settings: PipelineSettings, model_version: str | None) -> None:
    """Refuse a root no run could write, or an unknown model, before anything is written."""
    from s2vec_pipeline.service.runner import check_instance_home
    from s2vec_pipeline.settings import check_root_writable

    check_instance_home(settings.root)
    check_root_writable(settings.root)
    if model_version:  # an unknown model is refused before the data layer runs
        from s2vec_pipeline.model.registry import check_model_exists

        check_model_exists(settings.root, model_version)


def _run_recording_sources(
    settings: PipelineSettings,
    cells: list[str],
    assets: list[str],
    args: argparse.Namespace,
    op_config: dict[str, Any],
    workers: int,
) -> RunReport:
    """The Dagster runs. The root remembers what it is built from (later commands need no
    --source), but only once a run was not refused: a refused source or profile must not
    poison the root; an interrupted or crashed run that wrote tables is recorded."""
    from s2vec_pipeline.service.runner import (
        CLI_TAG,
        console_log_level,
        dagster_instance,
        materialize,
    )
    from s2vec_pipeline.service.status import TABLES
    from s2vec_pipeline.storage import delta_store
    from s2vec_pipeline.storage.manifest import record_sources

    def versions() -> dict[str, int | None]:
        return {t: delta_store.table_version_safe(settings.root, t) for t in TABLES}

    before = versions()
    record = functools.partial(
        record_sources,
        settings.root,
        list(settings.sources),
        settings.profile.name,
        settings.taxonomy.version,
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
        if before != versions():  # the tables now hold these sources' data
            record()
        raise
    record()
    return report


def _print_materialized(
    settings: PipelineSettings,
    cells: list[str],
    assets: list[str],
    report: RunReport,
    seconds: float,
) -> int:
    """The tables and model written, what was up to date, and the asset checks' verdict
    (exit 1 when a check failed)."""
    from s2vec_pipeline.storage import delta_store

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


def add_refresh(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refresh",
        help="apply new OSM change files and recompute only the partitions that changed",
        description="Runs in the foreground what the nightly schedule runs: applies the change "
        "files not applied yet (--changes), re-extracts the touched partitions (all "
        "materialized ones without --changes), then recomputes cell_features, raster_tiles and "
        "embeddings only where an upstream data version changed. Uses $DAGSTER_HOME's instance, "
        "else one under ROOT/_dagster.",
    )
    add_source_options(p)
    p.add_argument(
        "--changes", default=None, metavar="DIR", help="folder of .osc / .osc.gz change files"
    )
    p.set_defaults(func=cmd_refresh)


def cmd_refresh(args: argparse.Namespace) -> int:
    from s2vec_pipeline.osm.coverage import sources_for
    from s2vec_pipeline.service.runner import (
        check_instance_home,
        console_log_level,
        dagster_instance,
        refresh,
    )
    from s2vec_pipeline.settings import check_root_writable
    from s2vec_pipeline.storage import delta_store

    changes = str(Path(args.changes).resolve()) if args.changes else None
    if changes is not None and not Path(changes).is_dir():
        raise S2VecError(f"--changes {args.changes} is not a folder of .osc/.osc.gz files")
    settings = settings_of(args, changes)
    _ = (settings.profile, settings.taxonomy)  # validate before any run
    check_instance_home(settings.root)  # before anything is written
    check_root_writable(settings.root)
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
