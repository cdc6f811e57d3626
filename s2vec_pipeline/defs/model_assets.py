"""Model-layer assets: raster_tiles -> mae_model -> cell_embeddings + image_embeddings.

``mae_model`` is not partitioned: it trains on the raster tiles of the chosen partitions (all
materialized ones by default) and its data version is the model version, a content hash of
what determines the weights. The embedding tables are partitioned like the data layer and
written by ``model.embed.write_embeddings`` (one atomic commit per table and partition).
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING

import dagster as dg

from s2vec_pipeline import delta_store
from s2vec_pipeline.defs.automation import on_upstream_change
from s2vec_pipeline.defs.data_assets import (
    CODE_VERSION_TAG,
    DATA_VERSION_TAG,
    latest_data_version,
    raster_tiles,
)
from s2vec_pipeline.defs.partitions import l6_partitions
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.errors import MissingInputError

if TYPE_CHECKING:
    from s2vec_pipeline.model.train import TrainConfig

# torch and Lightning are imported inside the assets: loading the code location and running the
# data layer then cost no torch import (~3 s of a ~4 s cold data-layer run on 2 cores).
from s2vec_pipeline.preview import markdown_image

GROUP = "model_layer"
EMBEDDINGS_CODE_VERSION = "1"


class MAETrainingConfig(dg.Config):
    """Which partitions train the model, and overrides of the profile's training defaults."""

    partitions: list[str] = []  # empty: every partition with raster tiles
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    patch_size: int | None = None

    def train_config(self, profile: str) -> "TrainConfig":
        from s2vec_pipeline.model.train import TrainConfig

        overrides = {
            k: v for k, v in self.model_dump().items() if k != "partitions" and v is not None
        }
        # One process: DDP from inside a Dagster step would relaunch the step's command.
        return TrainConfig.for_profile(profile, devices=1, **overrides)


def _raster_data_versions(
    instance: dg.DagsterInstance, partitions: list[str]
) -> dict[str, str] | None:
    """Dagster's recorded data version of each training partition (None if any is unknown:
    the trainer then hashes the tiles itself)."""
    out = {p: latest_data_version(instance, raster_tiles.key, p) for p in partitions}
    return None if None in out.values() else out  # type: ignore[return-value]


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "lightning"},
    code_version="1",
    deps=[dg.AssetDep(raster_tiles, partition_mapping=dg.AllPartitionMapping())],
)
def mae_model(
    context: dg.AssetExecutionContext, config: MAETrainingConfig, s2vec: S2VecResource
) -> dg.MaterializeResult:
    """The S2Vec masked autoencoder trained on raster tiles (GPU when present, CPU otherwise)."""
    from s2vec_pipeline.model.train import train_model

    settings = s2vec.settings()
    partitions = sorted(config.partitions) or delta_store.partition_keys(
        settings.root, "raster_tiles"
    )
    versions = _raster_data_versions(context.instance, partitions) if partitions else None
    card = train_model(
        settings.root,
        partitions or None,
        config.train_config(settings.profile.name),
        partition_versions=versions,
    )
    with open(f"{card.directory}/loss_curve.png", "rb") as f:
        curve_md = markdown_image(f.read(), "loss curve")
    return dg.MaterializeResult(
        metadata={
            "model_version": card.model_version,
            "directory": dg.MetadataValue.path(card.directory),
            "training_partitions": dg.MetadataValue.json(card.partitions),
            "train_loss": card.train_loss,
            "val_loss": card.val_loss,
            "images_train_val": f"{card.n_train}/{card.n_val}",
            "epochs": card.epochs_completed,
            "images_per_second": round(card.images_per_s, 1),
            "hardware": dg.MetadataValue.json(card.hardware),
            "duration_s": round(card.duration_s, 2),
            "loss_curve": dg.MetadataValue.md(curve_md),
        },
        data_version=dg.DataVersion(card.model_version),
    )


class EmbeddingConfig(dg.Config):
    model_version: str | None = None  # None: the latest materialized mae_model


def current_model_version(instance: dg.DagsterInstance, root: str) -> str | None:
    """The latest materialized mae_model's version, else the newest model under the root."""
    from s2vec_pipeline.model.train import list_models

    event = instance.get_latest_materialization_event(mae_model.key)
    if event and event.asset_materialization:
        meta = event.asset_materialization.metadata.get("model_version")
        if meta is not None:
            return str(meta.value)
    available = list_models(root)
    return available[-1] if available else None


def _model_version(context: dg.AssetExecutionContext, config: EmbeddingConfig, root: str) -> str:
    if config.model_version:
        return config.model_version
    version = current_model_version(context.instance, root)
    if version is None:
        raise MissingInputError(
            f"no trained model under {root}: materialize mae_model first (s2vec materialize "
            f"--stages train) or pass a model_version"
        )
    return version


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            name,
            group_name=GROUP,
            kinds={"pytorch", "delta"},
            code_version=EMBEDDINGS_CODE_VERSION,
            partitions_def=l6_partitions,
            deps=[raster_tiles, mae_model],
            description=desc,
            automation_condition=on_upstream_change(),
        )
        for name, desc in [
            ("cell_embeddings", "One embedding per pixel cell of every image with data."),
            ("image_embeddings", "One embedding per image: the mean of its pixel tokens."),
        ]
    ],
    backfill_policy=dg.BackfillPolicy.single_run(),
)
def embeddings(
    context: dg.AssetExecutionContext, config: EmbeddingConfig, s2vec: S2VecResource
) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    from s2vec_pipeline.model.embed import write_embeddings
    from s2vec_pipeline.model.train import load_model

    settings = s2vec.settings()
    keys = sorted(context.partition_keys)
    version = _model_version(context, config, settings.root)
    model, card = load_model(settings.root, version)  # checks taxonomy, channels, side
    written = write_embeddings(settings.root, model, card, keys)
    for name in ("cell_embeddings", "image_embeddings"):
        yield dg.MaterializeResult(
            asset_key=name,
            metadata={"model_version": version, "partitions_in_run": len(keys)},
        )
    # Per partition: the data version is (model version, its raster tiles' version), so a new
    # model or a changed partition marks exactly the right partitions as changed.
    code = EMBEDDINGS_CODE_VERSION
    for k in keys:
        raster_version = latest_data_version(context.instance, raster_tiles.key, k) or ""
        for name, rows in (("cell_embeddings", "cells"), ("image_embeddings", "images")):
            yield dg.AssetMaterialization(
                asset_key=name,
                partition=k,
                metadata={"rows": written[k][rows], "model_version": version},
                tags={
                    DATA_VERSION_TAG: f"{version}-{raster_version}",
                    CODE_VERSION_TAG: code,
                },
            )


model_layer_assets = [mae_model, embeddings]
