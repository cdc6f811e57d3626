"""Dagster entry point (``workspace.yaml`` loads this module): ``defs``.

``build_definitions`` is also what the CLI runs, so the UI and ``s2vec materialize`` share one
code path; only the resource's settings differ.
"""

from __future__ import annotations

import dagster as dg

from s2vec_pipeline.defs.automation import automation_sensor
from s2vec_pipeline.defs.data_assets import data_layer_assets
from s2vec_pipeline.defs.model_assets import model_layer_assets
from s2vec_pipeline.defs.partitions import l6_partitions
from s2vec_pipeline.defs.refresh import (
    nightly_refresh_schedule,
    osm_sources,
    reextract_job,
    reextract_touched_partitions,
    refresh_sources_job,
    weekly_training_schedule,
)
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.defs.sensors import materialize_new_regions, register_source_partitions
from s2vec_pipeline.settings import PipelineSettings

data_layer_job = dg.define_asset_job(
    "data_layer",
    selection=dg.AssetSelection.groups("data_layer"),
    partitions_def=l6_partitions,
    description="OSM extract -> osm_features -> cell_features -> raster_tiles",
)
train_job = dg.define_asset_job(
    "train_model",
    selection=dg.AssetSelection.assets("mae_model"),
    description="Train the MAE on the raster tiles of every materialized partition",
)
embed_job = dg.define_asset_job(
    "embed",
    selection=dg.AssetSelection.assets("cell_embeddings", "image_embeddings"),
    partitions_def=l6_partitions,
    description="Embed partitions with the latest (or a configured) model",
)


def build_definitions(
    settings: PipelineSettings | None = None,
    jobs: list[dg.UnresolvedAssetJobDefinition] | None = None,
) -> dg.Definitions:
    settings = settings or PipelineSettings.from_env()
    return dg.Definitions(
        assets=[osm_sources, *data_layer_assets, *model_layer_assets],
        resources={"s2vec": S2VecResource.from_settings(settings)},
        jobs=[
            data_layer_job,
            train_job,
            embed_job,
            refresh_sources_job,
            reextract_job,
            *(jobs or []),
        ],
        sensors=[
            register_source_partitions,
            materialize_new_regions,
            reextract_touched_partitions,
            automation_sensor,
        ],
        schedules=[nightly_refresh_schedule(), weekly_training_schedule()],
    )


defs = build_definitions()
