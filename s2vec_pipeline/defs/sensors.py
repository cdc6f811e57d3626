"""Sensors: keep the partition set equal to the level-6 cells the configured sources cover."""

import dagster as dg

from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME
from s2vec_pipeline.defs.resources import S2VecResource


@dg.sensor(
    name="register_source_partitions",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds the level-6 cells covering the configured OSM sources as partitions.",
)
def register_source_partitions(
    context: dg.SensorEvaluationContext, s2vec: S2VecResource
) -> dg.SensorResult:
    wanted = set(s2vec.settings().source_cells)
    known = set(context.instance.get_dynamic_partitions(L6_PARTITIONS_NAME))
    new = sorted(wanted - known)
    if not new:
        return dg.SensorResult(skip_reason="every source cell is already a partition")
    return dg.SensorResult(
        dynamic_partitions_requests=[
            dg.AddDynamicPartitionsRequest(
                partitions_def_name=L6_PARTITIONS_NAME, partition_keys=new
            )
        ]
    )
