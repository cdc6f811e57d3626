"""Dagster entry point (``workspace.yaml`` loads this module): ``defs``.

``build_definitions`` is also what the CLI runs (``runner.py``), so the UI and
``s2vec materialize`` run the same jobs; a CLI run carries its settings in the run config.
"""

from __future__ import annotations

import dagster as dg

from s2vec_pipeline.defs.automation import refresh_stale_partitions
from s2vec_pipeline.defs.data_layer import data_layer_assets, data_layer_job
from s2vec_pipeline.defs.evaluation import evaluation, evaluation_job
from s2vec_pipeline.defs.maintenance import maintain_tables, weekly_maintenance_schedule
from s2vec_pipeline.defs.model import (
    embed_job,
    model_layer_assets,
    train_job,
    weekly_training_schedule,
)
from s2vec_pipeline.defs.regions import (
    launch_region_runs,
    materialize_new_regions,
    materialize_region,
    partition_pipeline_job,
    register_source_partitions,
)
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.defs.sources import (
    nightly_refresh_schedule,
    osm_sources,
    refresh_sources_job,
)
from s2vec_pipeline.service.k8s import executor_from_env
from s2vec_pipeline.settings import PipelineSettings


def build_definitions(settings: PipelineSettings | None = None) -> dg.Definitions:
    settings = settings or PipelineSettings.from_env()
    return dg.Definitions(
        assets=[osm_sources, *data_layer_assets, *model_layer_assets, evaluation],
        resources={"s2vec": S2VecResource.from_settings(settings)},
        jobs=[
            refresh_sources_job,
            data_layer_job,
            train_job,
            embed_job,
            partition_pipeline_job,
            materialize_region,
            maintain_tables,
            evaluation_job,
        ],
        sensors=[
            register_source_partitions,
            materialize_new_regions,
            launch_region_runs,
            refresh_stale_partitions,
        ],
        executor=executor_from_env(),  # Kubernetes pods per step when S2VEC_EXECUTOR=k8s
        schedules=[
            nightly_refresh_schedule(),
            weekly_training_schedule(),
            weekly_maintenance_schedule(),
        ],
    )


defs = build_definitions()
