"""Evaluation: the embeddings' worth on a user's labels, as an asset beside the tables.

``evaluation`` runs ``evaluation.evaluate_files`` (ridge probes of S2Vec against raw-feature
baselines and fusions, random and spatially blocked folds) on the label file named in its
launch config, and shows the table in its metadata. It is not automated: labels are the user's.
"""

import json

import dagster as dg
from pydantic import Field

from s2vec_pipeline.defs.metadata import OWNERS
from s2vec_pipeline.defs.resources import S2VecResource


class EvaluationConfig(dg.Config):
    labels: str = Field(
        description="Labels file (.parquet or .csv): a cell_token (pixel level) or lat/lon "
        "column and one or more numeric targets; or areas (.geojson or GeoParquet polygons "
        "with numeric columns), every feature pooled over each area's pixel cells"
    )
    with_embeddings: str | None = Field(
        default=None,
        description="Another embedding source keyed by cell_token (.parquet), fused with S2Vec",
    )
    model_version: str | None = Field(
        default=None, description="Embeddings of this model (empty: the latest embedded)"
    )
    folds: int = Field(default=5, description="Folds per protocol")
    seed: int = Field(default=0, description="Fold seed")


@dg.asset(
    group_name="evaluation",
    kinds={"scikitlearn"},
    owners=OWNERS,
    tags={"layer": "evaluation"},
    deps=[
        dg.AssetDep("cell_embeddings", partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep("cell_features", partition_mapping=dg.AllPartitionMapping()),
    ],
)
def evaluation(
    context: dg.AssetExecutionContext, config: EvaluationConfig, s2vec: S2VecResource
) -> dg.MaterializeResult:
    """Linear probes of the embeddings on the configured labels, against raw-feature baselines
    on the same folds (random k-fold and spatially blocked folds, as in the paper): R², MAE and
    RMSE per target, protocol and method."""
    from s2vec_pipeline.analysis import evaluation as ev

    report = ev.evaluate_files(
        s2vec.root,
        config.labels,
        config.with_embeddings,
        model_version=config.model_version,
        folds=config.folds,
        seed=config.seed,
    )
    context.log.info(report.table())
    return dg.MaterializeResult(
        metadata={
            "model_version": report.model_version,
            "labelled_cells": report.n_rows,
            "labels": dg.MetadataValue.path(config.labels),
            "results": dg.MetadataValue.md(report.to_markdown()),
            "report": dg.MetadataValue.json(json.loads(report.to_json())),
        }
    )


evaluation_job = dg.define_asset_job(
    "evaluate",
    selection=dg.AssetSelection.assets(evaluation),
    description="Probe the embeddings on a labels file (config: labels, with_embeddings).",
    tags={"s2vec/stage": "evaluate"},
)
