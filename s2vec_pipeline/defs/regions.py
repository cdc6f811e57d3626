"""Regions in the UI: named sets of level-6 cells, and the partitions they become.

- ``materialize_region`` (job, launchpad config ``region`` and optional ``bbox``): registers
  the region when a box is given, then ``launch_region_runs`` starts one run per cell that
  needs work (``automation.assets_to_run``: the data layer, and the embeddings when a model
  exists), tagged ``s2vec/region``. Its output shows the region -> cell -> centre -> source
  table.
- ``register_source_partitions`` (sensor): partitions = the cells of the sources and regions;
  keys typed by hand that are not level-6 tokens covered by a source are deleted, so they never
  linger as failed partitions.
- ``materialize_new_regions`` (sensor): launches regions added with ``s2vec region add``.

Both region sensors request runs through ``region_run_requests``: a cell already up to date, or
with a run queued or running (the other sensor's, for a region registered from the UI, which
both see), gets none; so a region launched from the UI starts exactly one run per cell that
needs work.
"""

import json
from collections.abc import Iterable

import dagster as dg
from pydantic import Field

from s2vec_pipeline.cells import regions as rg
from s2vec_pipeline.defs.automation import (
    PARTITION_PIPELINE,
    Defs,
    partition_pipeline_job,
    partitions_in_progress,
    partitions_to_run,
)
from s2vec_pipeline.defs.partitions import (
    L6_PARTITIONS_NAME,
    add_partitions,
    invalid_partition_keys,
)
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.defs.sources import refresh_sources_job
from s2vec_pipeline.osm.coverage import source_cells
from s2vec_pipeline.service.k8s import in_run_executor
from s2vec_pipeline.settings import PipelineSettings

REGION_TAG = "s2vec/region"
__all__ = ["PARTITION_PIPELINE", "partition_pipeline_job"]  # their home: automation.py


class RegionRequest(dg.Config):
    region: str = Field(
        description="Name of a registered region (s2vec region list), or a new name with bbox"
    )
    bbox: str | None = Field(
        default=None,
        description="MIN_LAT,MIN_LNG,MAX_LAT,MAX_LNG: register (or replace) the region as the "
        "level-6 cells meeting this box before materializing it",
    )


@dg.op(
    description="Resolve a region to its level-6 cells (registering it from a box if given); "
    "launch_region_runs then materializes each cell.",
    tags={"s2vec/stage": "regions"},
)
def resolve_region(
    context: dg.OpExecutionContext, config: RegionRequest, s2vec: S2VecResource
) -> dg.Output[list[str]]:
    settings = s2vec.settings()
    registry = rg.RegionRegistry(settings.root)
    if config.bbox:
        region = rg.region_from_bbox(config.region, *rg.parse_bbox(config.bbox))
        registry.check_covered(region, source_cells(settings.sources))  # before anything is written
        registry.add(region, replace=True)
    region = registry.get(config.region)  # an unknown name lists the registered ones
    registry.check_covered(region, source_cells(settings.sources))
    add_partitions(context.instance, region.cells)
    context.log.info(f"region {region.name}: {len(region.cells)} cells {list(region.cells)}")
    return dg.Output(
        list(region.cells),
        metadata={
            "region": region.name,
            "cells": dg.MetadataValue.md(
                rg.regions_markdown([region], source_cells(settings.sources))
            ),
        },
    )


@dg.job(
    description="Materialize a registered region (or register one from a bounding box): one "
    "run per level-6 cell, tagged s2vec/region.",
    tags={"s2vec/stage": "regions"},
    executor_def=in_run_executor(),
)
def materialize_region() -> None:
    resolve_region()


def region_run_requests(
    instance: dg.DagsterInstance,
    defs: Defs,
    settings: PipelineSettings,
    region: str,
    cells: Iterable[str],
    key_prefix: str,
) -> list[dg.RunRequest]:
    """One run per cell that needs work, for the assets it needs (the shared rule:
    ``automation.assets_to_run``): the data layer, and the embeddings with the current model
    when there is one. Cells up to date or with a run in flight get none."""
    from s2vec_pipeline.defs.model import current_model_version

    assets = ["osm_features", "cell_features", "raster_tiles"]
    model = current_model_version(instance, settings.root)
    if model is not None:
        assets += ["cell_embeddings", "image_embeddings"]
    busy = partitions_in_progress(instance)
    from s2vec_pipeline.service.integrity import has_data

    todo = [c for c in cells if c not in busy]
    plan = partitions_to_run(instance, defs, todo, assets, model, has_data(instance, settings.root))
    return [
        dg.RunRequest(
            run_key=f"{key_prefix}:{cell}",
            job_name=PARTITION_PIPELINE,
            partition_key=cell,
            asset_selection=[dg.AssetKey(a) for a in todo],
            tags={REGION_TAG: region},
        )
        for cell, todo in plan.items()
    ]


@dg.run_status_sensor(
    name="launch_region_runs",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[materialize_region],
    request_jobs=[partition_pipeline_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=5,  # Dagster's 30 s default: up to 30 s lost per region launch
    description="After a materialize_region run, launches one run per cell of the region.",
)
def launch_region_runs(context: dg.RunStatusSensorContext, s2vec: S2VecResource) -> dg.SensorResult:
    run = context.dagster_run
    region = run.run_config["ops"]["resolve_region"]["config"]["region"]
    cells = rg.RegionRegistry(s2vec.root).get(region).cells
    requests = region_run_requests(
        context.instance,
        context.repository_def,
        s2vec.settings(),
        region,
        cells,
        run.run_id,
    )
    if not requests:
        return dg.SensorResult(skip_reason=f"region {region}: every cell up to date or running")
    return dg.SensorResult(run_requests=requests)


@dg.sensor(
    name="register_source_partitions",
    jobs=[refresh_sources_job],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Partitions = the level-6 cells covering the configured OSM sources and the "
    "registered regions; deletes keys that are not level-6 tokens covered by a source, and "
    "observes osm_sources when partitions appear (so extraction records what it read).",
)
def register_source_partitions(
    context: dg.SensorEvaluationContext, s2vec: S2VecResource
) -> dg.SensorResult:
    settings = s2vec.settings()
    covered = set(source_cells(settings.sources))
    wanted = covered | (set(rg.RegionRegistry(settings.root).all_cells()) & covered)
    known = context.instance.get_dynamic_partitions(L6_PARTITIONS_NAME)
    new = sorted(wanted - set(known))
    bad = invalid_partition_keys(known, covered)
    requests: list = []
    if new:
        requests.append(
            dg.AddDynamicPartitionsRequest(
                partitions_def_name=L6_PARTITIONS_NAME, partition_keys=new
            )
        )
    if bad:
        context.log.warning(f"deleting partition keys no source covers: {bad}")
        requests.append(
            dg.DeleteDynamicPartitionsRequest(
                partitions_def_name=L6_PARTITIONS_NAME, partition_keys=bad
            )
        )
    runs = []
    observed = context.instance.get_latest_data_version_record(dg.AssetKey("osm_sources"), True)
    if new or observed is None:
        runs.append(
            dg.RunRequest(job_name=refresh_sources_job.name, run_key=f"observe:{sorted(wanted)}")
        )
    if not requests and not runs:
        return dg.SensorResult(skip_reason="partitions match the sources and regions")
    return dg.SensorResult(dynamic_partitions_requests=requests, run_requests=runs)


@dg.sensor(
    name="materialize_new_regions",
    jobs=[partition_pipeline_job],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches the cells of each region newly added with s2vec region add (one run "
    "per cell, tagged s2vec/region).",
)
def materialize_new_regions(
    context: dg.SensorEvaluationContext, s2vec: S2VecResource
) -> dg.SensorResult:
    settings = s2vec.settings()
    regions = rg.RegionRegistry(settings.root).list()
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    new = [r for r in regions if seen.get(r.name) != r.created_at]
    cursor = json.dumps({r.name: r.created_at for r in regions})
    if not new:
        return dg.SensorResult(skip_reason="no new region", cursor=cursor)
    covered = [(r, [c for c in r.cells if c in source_cells(settings.sources)]) for r in new]
    missing = sorted(
        {c for _, cells in covered for c in cells}
        - set(context.instance.get_dynamic_partitions(L6_PARTITIONS_NAME))
    )
    requests: dict[str, dg.RunRequest] = {}  # a cell shared by two new regions: one run
    for r, cells in covered:
        todo = [c for c in cells if c not in requests]
        for req in region_run_requests(
            context.instance,
            context.repository_def,
            settings,
            r.name,
            todo,
            f"region:{r.name}:{r.created_at}",
        ):
            requests[str(req.partition_key)] = req
    return dg.SensorResult(
        run_requests=list(requests.values()),
        dynamic_partitions_requests=[
            dg.AddDynamicPartitionsRequest(
                partitions_def_name=L6_PARTITIONS_NAME, partition_keys=missing
            )
        ]
        if missing
        else [],
        cursor=cursor,
    )
