"""Incremental refresh: apply OSM change files, re-extract touched partitions, recompute only
what changed downstream.

Nightly, in Dagster (daemon running):

1. ``nightly_refresh`` (schedule, 02:00 UTC, ``S2VEC_REFRESH_CRON``) launches ``osm_sources``:
   new change files of each source are applied (``osm_changes.apply_changes``; the user's files
   are never modified) and its metadata lists the files applied and the level-6 cells touched.
2. ``reextract_touched_partitions`` (sensor on ``osm_sources``) launches ``osm_features`` for
   ``partitions_to_reextract``: materialized partitions that an applied change touched since
   their last extraction (every materialized partition when no change folder is configured:
   content-hash data versions then tell what changed).
3. ``s2vec_automation`` (automation sensor) recomputes cell_features -> raster_tiles ->
   embeddings partitions whose upstream data version changed (``automation.py``).

``refresh`` runs the same three steps in the foreground (``s2vec refresh``); for step 3 it asks
Dagster's records directly: a partition is stale when its latest materialization was computed
from another upstream data version (``INPUT_VERSION_TAG``) or by another code version, so a
refresh interrupted half-way is finished by the next one.
"""

import os
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from s2vec_pipeline import delta_store, osm_changes
from s2vec_pipeline.defs.data_assets import (
    CODE_VERSION_TAG,
    DATA_VERSION_TAG,
    INPUT_VERSION_TAG,
    SOURCE_BATCHES,
    latest_data_version,
    latest_tags,
    source_batches,
)
from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME, contiguous_ranges
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.versioning import config_hash

ENV_REFRESH_CRON = "S2VEC_REFRESH_CRON"
ENV_TRAIN_CRON = "S2VEC_TRAIN_CRON"
DEFAULT_REFRESH_CRON = "0 2 * * *"  # nightly, 02:00 UTC
DEFAULT_TRAIN_CRON = "0 3 * * 0"  # weekly, Sunday 03:00 UTC
# Derived assets in pipeline order, with the upstream whose data version they record.
DERIVED = [("cell_features", "osm_features"), ("raster_tiles", "cell_features")]
EMBEDDINGS = ["cell_embeddings", "image_embeddings"]


# ---------------------------------------------------------------------------------------------
# Step 1: the sources
# ---------------------------------------------------------------------------------------------
def apply_source_changes(settings: PipelineSettings) -> dict[str, dict[str, Any]]:
    """Apply the new change files of every source (nothing without a change folder).

    All files are checked before anything is written for a source; a bad file raises the
    osm_changes error naming it, and sources already brought up to date stay recorded in their
    ledgers (their touched cells are found again from the ledger, see partitions_to_reextract).
    """
    out: dict[str, dict[str, Any]] = {}
    for src in settings.sources:
        if settings.changes_dir is None:
            result = osm_changes.ChangeResult(
                extract=osm_changes.current_extract(settings.root, src)
            )
        else:
            result = osm_changes.apply_changes(settings.root, src, settings.changes_dir)
        out[src] = {
            "extract": str(result.extract),
            "applied": [osm_changes.change_file_name(p) for p in result.applied],
            "skipped": len(result.skipped),
            "touched_cells": result.touched_cells,
        }
    return out


@dg.asset(
    group_name="sources",
    kinds={"osm"},
    code_version="1",
    description="The OSM extracts as of the latest applied change files (one per source).",
)
def osm_sources(context: dg.AssetExecutionContext, s2vec: S2VecResource) -> dg.MaterializeResult:
    settings = s2vec.settings()
    summary = apply_source_changes(settings)
    batches = source_batches(settings.root, list(settings.sources))
    applied = {s: v["applied"] for s, v in summary.items() if v["applied"]}
    touched = sorted({c for v in summary.values() for c in v["touched_cells"]})
    context.log.info(f"applied {applied or 'no new change file'}; touched cells {touched}")
    from s2vec_pipeline.regions import RegionRegistry

    regions = {r.name: list(r.cells) for r in RegionRegistry(settings.root).list()}
    return dg.MaterializeResult(
        metadata={
            "changes_dir": settings.changes_dir or "(none: sources re-read as they are)",
            "applied": dg.MetadataValue.json(applied),
            "touched_cells": dg.MetadataValue.json(touched),
            "extracts": dg.MetadataValue.json({s: v["extract"] for s, v in summary.items()}),
            "change_batches": dg.MetadataValue.json(batches),
            "regions": dg.MetadataValue.json(regions),
        },
        data_version=dg.DataVersion(config_hash({"batches": batches, "sources": summary})),
    )


# ---------------------------------------------------------------------------------------------
# Step 2: which osm_features partitions to re-extract
# ---------------------------------------------------------------------------------------------
def _recorded_batches(instance: dg.DagsterInstance, partition: str) -> dict[str, int]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("osm_features"), asset_partitions=[partition]),
        limit=1,
    ).records
    if not records or records[0].asset_materialization is None:
        return {}
    meta = records[0].asset_materialization.metadata.get(SOURCE_BATCHES)
    return dict(meta.value) if meta is not None else {}  # type: ignore[arg-type]


def partitions_to_reextract(settings: PipelineSettings, instance: dg.DagsterInstance) -> list[str]:
    """Materialized osm_features partitions to extract again.

    Without a change folder: all of them (the source may have been replaced; data versions tell
    downstream what changed). With one: those covered by a change batch applied after the
    batch their latest extraction read (recorded in the partition's materialization), so a
    batch whose extraction failed is picked up by the next refresh.
    """
    existing = [
        k
        for k in delta_store.partition_keys(settings.root, "osm_features")
        if k in settings.source_cells
    ]
    if settings.changes_dir is None:
        return existing
    out = []
    for k in existing:
        seen = _recorded_batches(instance, k)
        for src in settings.source_cells[k]:
            entries = osm_changes.applied_changes(settings.root, src)
            if any(e.batch > int(seen.get(src, 0)) and k in e.cells for e in entries):
                out.append(k)
                break
    return out


def range_run_requests(
    instance: dg.DagsterInstance, partitions: list[str], job_name: str, key_prefix: str
) -> list[dg.RunRequest]:
    """One run per contiguous key range (each source is read once per run)."""
    keys = instance.get_dynamic_partitions(L6_PARTITIONS_NAME)
    return [
        dg.RunRequest(
            job_name=job_name,
            run_key=f"{key_prefix}:{start}-{end}",
            tags={
                "dagster/asset_partition_range_start": start,
                "dagster/asset_partition_range_end": end,
            },
        )
        for start, end in contiguous_ranges(keys, [p for p in partitions if p in set(keys)])
    ]


refresh_sources_job = dg.define_asset_job(
    "refresh_sources",
    selection=dg.AssetSelection.assets("osm_sources"),
    description="Apply new OSM change files to the sources (nightly)",
)
reextract_job = dg.define_asset_job(
    "reextract_osm_features",
    selection=dg.AssetSelection.assets("osm_features"),
    description="Re-extract osm_features partitions touched by applied change files",
)


@dg.sensor(
    name="reextract_touched_partitions",
    job_name="reextract_osm_features",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After each osm_sources materialization, re-extracts the osm_features "
    "partitions the applied change files touched (all materialized ones without a change "
    "folder).",
)
def reextract_touched_partitions(
    context: dg.SensorEvaluationContext, s2vec: S2VecResource
) -> dg.SensorResult:
    records = context.instance.fetch_materializations(osm_sources.key, limit=1).records
    last = int(context.cursor) if context.cursor else -1
    if not records or records[0].storage_id <= last:
        return dg.SensorResult(skip_reason="no new osm_sources materialization")
    event_id = records[0].storage_id
    partitions = partitions_to_reextract(s2vec.settings(), context.instance)
    requests = range_run_requests(
        context.instance, partitions, "reextract_osm_features", f"osm_sources:{event_id}"
    )
    if not requests:
        return dg.SensorResult(
            skip_reason="no materialized partition touched by the changes", cursor=str(event_id)
        )
    return dg.SensorResult(run_requests=requests, cursor=str(event_id))


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------
def nightly_refresh_schedule(cron: str | None = None) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="nightly_refresh",
        cron_schedule=cron or os.environ.get(ENV_REFRESH_CRON) or DEFAULT_REFRESH_CRON,
        execution_timezone="UTC",
        job_name="refresh_sources",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Applies new OSM change files; sensors then recompute what changed.",
    )


def weekly_training_schedule(cron: str | None = None) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="weekly_training",
        cron_schedule=cron or os.environ.get(ENV_TRAIN_CRON) or DEFAULT_TRAIN_CRON,
        execution_timezone="UTC",
        job_name="train_model",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Retrains mae_model (not nightly); a new model version makes every "
        "embedding partition stale.",
    )


# ---------------------------------------------------------------------------------------------
# Step 3 in the foreground: staleness from Dagster's records
# ---------------------------------------------------------------------------------------------
def _code_version(asset: str) -> str:
    from s2vec_pipeline.defs.data_assets import data_layer_assets
    from s2vec_pipeline.defs.model_assets import model_layer_assets

    key = dg.AssetKey(asset)
    for a in [*data_layer_assets, *model_layer_assets]:
        if key in a.keys:
            return a.code_versions_by_key.get(key) or ""
    raise KeyError(asset)


def stale_partitions(
    instance: dg.DagsterInstance, asset: str, upstream: str, candidates: list[str]
) -> list[str]:
    """Candidates whose latest materialization was computed from another data version of the
    upstream partition than its latest, or by another code version (or never recorded)."""
    code = _code_version(asset)
    out = []
    for k in candidates:
        up = latest_data_version(instance, dg.AssetKey(upstream), k)
        if up is None:
            continue
        tags = latest_tags(instance, dg.AssetKey(asset), k)
        if (
            tags is None
            or tags.get(INPUT_VERSION_TAG + upstream) != up
            or tags.get(CODE_VERSION_TAG) != code
        ):
            out.append(k)
    return out


def stale_embeddings(
    instance: dg.DagsterInstance, model_version: str, candidates: list[str]
) -> list[str]:
    """Embedding partitions not computed by this model from their latest raster tiles."""
    code = _code_version("cell_embeddings")
    out = []
    for k in candidates:
        raster = latest_data_version(instance, dg.AssetKey("raster_tiles"), k)
        if raster is None:
            continue
        want = f"{model_version}-{raster}"
        for name in EMBEDDINGS:
            tags = latest_tags(instance, dg.AssetKey(name), k) or {}
            if tags.get(DATA_VERSION_TAG) != want or tags.get(CODE_VERSION_TAG) != code:
                out.append(k)
                break
    return out


@dataclass
class RefreshReport:
    applied: dict[str, list[str]] = field(default_factory=dict)  # source -> change files
    touched_cells: list[str] = field(default_factory=list)
    recomputed: dict[str, list[str]] = field(default_factory=dict)  # asset -> partitions
    run_ids: list[str] = field(default_factory=list)


def refresh(
    settings: PipelineSettings, instance: dg.DagsterInstance, log_level: str = "WARNING"
) -> RefreshReport:
    """What the nightly schedule and its sensors do, in the foreground, in the same order."""
    from s2vec_pipeline.defs.model_assets import current_model_version
    from s2vec_pipeline.defs.runner import materialize

    report = RefreshReport()
    run = materialize(settings, [], ["osm_sources"], instance, log_level=log_level)
    report.run_ids += run.run_ids
    event = instance.get_latest_materialization_event(osm_sources.key)
    meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
    report.applied = dict(meta["applied"].value) if "applied" in meta else {}  # type: ignore[arg-type]
    report.touched_cells = list(meta["touched_cells"].value) if "touched_cells" in meta else []  # type: ignore[arg-type]

    def run_assets(assets: list[str], partitions: list[str], op_config: dict | None = None) -> None:
        for a in assets:
            report.recomputed[a] = sorted(partitions)
        if partitions:
            r = materialize(
                settings, partitions, assets, instance, log_level=log_level, op_config=op_config
            )
            report.run_ids += r.run_ids

    run_assets(["osm_features"], partitions_to_reextract(settings, instance))
    for asset, upstream in DERIVED:
        candidates = delta_store.partition_keys(settings.root, asset)
        run_assets([asset], stale_partitions(instance, asset, upstream, candidates))
    model = current_model_version(instance, settings.root)
    if model is not None:
        candidates = delta_store.partition_keys(settings.root, "cell_embeddings")
        stale = stale_embeddings(instance, model, candidates)
        run_assets(EMBEDDINGS, stale, {"embeddings": {"model_version": model}})
    return report
