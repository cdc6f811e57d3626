"""Sources and refresh: the OSM data of each level-6 cell, brought up to date nightly.

``osm_sources`` is an observable source asset partitioned like the tables: observing it applies
the change files not applied yet (``osm_changes.apply_changes``; the user's files are never
modified) and records, per cell, a data version of what that cell's OSM data depends on
(``osm_changes.cell_source_version``). A change file therefore makes exactly the cells it
touches "Unsynced" downstream, and ``automation.py`` recomputes those.

Nightly: ``nightly_refresh`` runs ``refresh_sources`` (the observation); the
``refresh_stale_partitions`` sensor then recomputes what became stale, one run per partition
through every stage.
"""

from typing import Any

import dagster as dg

from s2vec_pipeline.defs.metadata import OWNERS
from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME, l6_partitions
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.osm import changes as osm_changes
from s2vec_pipeline.osm.coverage import source_cells
from s2vec_pipeline.settings import ENV_REFRESH_CRON, PipelineSettings, schedule_cron

DEFAULT_REFRESH_CRON = "0 2 * * *"  # nightly, 02:00 UTC


def apply_source_changes(settings: PipelineSettings) -> dict[str, dict[str, Any]]:
    """Apply the new change files of every source (nothing without a change folder).

    All files are checked before anything is written for a source; a bad file raises the
    osm_changes error naming it, and sources already brought up to date stay recorded in their
    ledgers.
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
            "touched_cells": result.touched_cells,
            "outside": [osm_changes.change_file_name(p) for p in result.outside],
        }
    return out


def source_versions(settings: PipelineSettings, cells: list[str]) -> dict[str, str]:
    """Data version of each covered cell's OSM data (cells no source covers are left out)."""
    covered = source_cells(settings.sources)
    return {
        c: osm_changes.cell_source_version(settings.root, covered[c], c)
        for c in cells
        if c in covered
    }


def observe_osm_sources(
    context: dg.OpExecutionContext, s2vec: S2VecResource
) -> dg.DataVersionsByPartition:
    settings = s2vec.settings()
    summary = apply_source_changes(settings)
    applied = {s: v["applied"] for s, v in summary.items() if v["applied"]}
    touched = sorted({c for v in summary.values() for c in v["touched_cells"]})
    context.log.info(f"applied {applied or 'no new change file'}; touched cells {touched}")
    outside = {s: v["outside"] for s, v in summary.items() if v["outside"]}
    if outside:
        context.log.info(f"change files outside a source's region, not applied to it: {outside}")
    keys = context.instance.get_dynamic_partitions(L6_PARTITIONS_NAME)
    return dg.DataVersionsByPartition(source_versions(settings, list(keys)))


def osm_sources_asset(metadata: dict[str, Any] | None = None) -> dg.SourceAsset:
    """The source asset; ``metadata`` (e.g. the registered regions) shows on its page."""
    return dg.observable_source_asset(
        name="osm_sources",
        partitions_def=l6_partitions,
        group_name="sources",
        owners=OWNERS,
        tags={"layer": "source"},
        metadata=metadata,
        description="The OSM data of each level-6 cell: the configured extracts with every "
        "applied change file. Observing it applies the change files of S2VEC_CHANGES not "
        "applied yet (to copies under ROOT/_sources/) and versions each cell by the change "
        "batches that touched it.",
    )(observe_osm_sources)


osm_sources = osm_sources_asset()


refresh_sources_job = dg.define_asset_job(
    "refresh_sources",
    selection=dg.AssetSelection.assets("osm_sources"),
    description="Apply new OSM change files and version every cell's OSM data (nightly).",
    tags={"s2vec/stage": "sources"},
)


def nightly_refresh_schedule(cron: str | None = None) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="nightly_refresh",
        cron_schedule=cron or schedule_cron(ENV_REFRESH_CRON, DEFAULT_REFRESH_CRON),
        execution_timezone="UTC",
        job=refresh_sources_job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Applies new OSM change files; refresh_stale_partitions then recomputes "
        "the partitions whose inputs changed.",
    )
