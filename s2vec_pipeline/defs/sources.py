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

from pathlib import Path
from typing import Any

import dagster as dg

from s2vec_pipeline.cells import regions as rg
from s2vec_pipeline.defs.automation import DATA_VERSION_TAG
from s2vec_pipeline.defs.metadata import OWNERS
from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME, l6_partitions
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.osm import changes as osm_changes
from s2vec_pipeline.osm.coverage import source_cells
from s2vec_pipeline.service.k8s import in_run_executor
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


def observation_metadata(
    settings: PipelineSettings, summary: dict[str, dict[str, Any]], cells: list[str]
) -> dict[str, dict[str, Any]]:
    """What the UI shows on each cell's observation: the sources it is read from, the extract
    each is read as now (with its size), the change files applied to them so far and whether
    this observation changed the cell, and the regions holding the cell. (Objects are not
    counted: that would read every extract at every observation.)"""
    applied = {s: len(osm_changes.applied_changes(settings.root, s)) for s in summary}
    try:
        regions = rg.RegionRegistry(settings.root).list()
    except S2VecError:  # a broken regions.yaml must not stop the sources' refresh
        regions = []
    covered = source_cells(settings.sources)
    out = {}
    for cell in cells:
        sources = [s for s in covered.get(cell, ()) if s in summary]
        extracts = [Path(summary[s]["extract"]) for s in sources]
        out[cell] = {
            "sources": dg.MetadataValue.md("\n".join(f"- `{s}`" for s in sources)),
            "size_bytes": sum(p.stat().st_size for p in extracts if p.exists()),
            "changes_applied": sum(applied[s] for s in sources),
            "changed_now": any(cell in summary[s]["touched_cells"] for s in sources),
            "regions": ", ".join(r.name for r in regions if cell in r.cells) or "(none)",
        }
        if len(extracts) == 1:
            out[cell]["extract"] = dg.MetadataValue.path(str(extracts[0]))
    return out


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
    # One observation per cell, logged here rather than returned: Dagster records the
    # versions of a DataVersionsByPartition without metadata.
    versions = source_versions(settings, list(keys))
    metadata = observation_metadata(settings, summary, list(versions))
    for cell, version in versions.items():
        context.log_event(
            dg.AssetObservation(
                "osm_sources",
                partition=cell,
                tags={DATA_VERSION_TAG: version},
                metadata=metadata[cell],
            )
        )
    return dg.DataVersionsByPartition({})


osm_sources = dg.observable_source_asset(
    name="osm_sources",
    partitions_def=l6_partitions,
    group_name="sources",
    owners=OWNERS,
    tags={"layer": "source"},
    description="The OSM data of each level-6 cell: the configured extracts with every "
    "applied change file. Observing it applies the change files of S2VEC_CHANGES not "
    "applied yet (to copies under ROOT/_sources/) and versions each cell by the change "
    "batches that touched it; each cell's observation shows its sources, extract, size, "
    "applied change files and regions.",
)(observe_osm_sources)


refresh_sources_job = dg.define_asset_job(
    "refresh_sources",
    selection=dg.AssetSelection.assets("osm_sources"),
    description="Apply new OSM change files and version every cell's OSM data (nightly).",
    tags={"s2vec/stage": "sources"},
    executor_def=in_run_executor(),
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
