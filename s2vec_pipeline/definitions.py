"""Dagster entry point (``workspace.yaml`` loads this module): ``defs``.

``build_definitions`` is also what the CLI runs, so the UI and ``s2vec materialize`` share one
code path; only the resource's settings differ.
"""

from __future__ import annotations

import dagster as dg

from s2vec_pipeline.defs.data_assets import data_layer_assets
from s2vec_pipeline.defs.partitions import l6_partitions
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.defs.sensors import register_source_partitions
from s2vec_pipeline.settings import PipelineSettings

data_layer_job = dg.define_asset_job(
    "data_layer",
    selection=dg.AssetSelection.groups("data_layer"),
    partitions_def=l6_partitions,
    description="OSM extract -> osm_features -> cell_features -> raster_tiles",
)


def build_definitions(
    settings: PipelineSettings | None = None,
    jobs: list[dg.UnresolvedAssetJobDefinition] | None = None,
) -> dg.Definitions:
    settings = settings or PipelineSettings.from_env()
    return dg.Definitions(
        assets=[*data_layer_assets],
        resources={"s2vec": S2VecResource.from_settings(settings)},
        jobs=[data_layer_job, *(jobs or [])],
        sensors=[register_source_partitions],
    )


defs = build_definitions()
