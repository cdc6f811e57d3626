"""Sensors: keep the partition set equal to the level-6 cells of the configured sources and
registered regions, and launch the data layer for newly registered regions."""

import json

import dagster as dg

from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME, contiguous_ranges
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.regions import RegionRegistry

REGION_TAG = "s2vec/region"


def _describe(regions: list) -> str:
    listed = "; ".join(f"{r.name} ({len(r.cells)} cells: {', '.join(r.cells)})" for r in regions)
    return f"registered regions: {listed or 'none'}"


@dg.sensor(
    name="register_source_partitions",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds the level-6 cells covering the configured OSM sources and the cells of "
    "the registered regions (<root>/regions.yaml) as partitions.",
)
def register_source_partitions(
    context: dg.SensorEvaluationContext, s2vec: S2VecResource
) -> dg.SensorResult:
    settings = s2vec.settings()
    wanted = set(settings.source_cells) | set(RegionRegistry(settings.root).all_cells())
    known = set(context.instance.get_dynamic_partitions(L6_PARTITIONS_NAME))
    new = sorted(wanted - known)
    if not new:
        return dg.SensorResult(skip_reason="every source and region cell is already a partition")
    return dg.SensorResult(
        dynamic_partitions_requests=[
            dg.AddDynamicPartitionsRequest(
                partitions_def_name=L6_PARTITIONS_NAME, partition_keys=new
            )
        ]
    )


@dg.sensor(
    name="materialize_new_regions",
    job_name="data_layer",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches the data layer (osm_features -> cell_features -> raster_tiles) for "
    "the cells of each region newly added to <root>/regions.yaml (s2vec region add), one run "
    "per contiguous key range, tagged s2vec/region. Its tick lists the registered regions; "
    "embeddings follow through the automation sensor when a model exists.",
)
def materialize_new_regions(
    context: dg.SensorEvaluationContext, s2vec: S2VecResource
) -> dg.SensorResult:
    settings = s2vec.settings()
    regions = RegionRegistry(settings.root).list()
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    new = [r for r in regions if seen.get(r.name) != r.created_at]
    if not new:
        return dg.SensorResult(skip_reason=f"no new region; {_describe(regions)}")
    known = set(context.instance.get_dynamic_partitions(L6_PARTITIONS_NAME))
    cells = sorted({c for r in new for c in r.cells if c in settings.source_cells})
    missing = sorted(set(cells) - known)
    keys = sorted(known | set(missing))
    requests = [
        dg.RunRequest(
            run_key=f"region:{r.name}:{r.created_at}:{start}-{end}",
            job_name="data_layer",
            tags={
                REGION_TAG: r.name,
                "dagster/asset_partition_range_start": start,
                "dagster/asset_partition_range_end": end,
            },
        )
        for r in new
        for start, end in contiguous_ranges(keys, [c for c in r.cells if c in set(cells)])
    ]
    context.log.info(f"launching {[r.name for r in new]}; {_describe(regions)}")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[
            dg.AddDynamicPartitionsRequest(
                partitions_def_name=L6_PARTITIONS_NAME, partition_keys=missing
            )
        ]
        if missing
        else [],
        cursor=json.dumps({r.name: r.created_at for r in regions}),
    )
