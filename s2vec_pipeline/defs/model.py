"""Model layer: raster_tiles -> mae_model -> cell_embeddings + image_embeddings, its jobs,
checks and the weekly training schedule.

``mae_model`` is not partitioned: it trains on the raster tiles of the chosen partitions (all
materialized ones by default) and its data version is the model version, a content hash of
what determines the weights. The embedding tables are partitioned like the data layer; each
partition's data version is ``<model version>-<raster data version>``, so a new model or a
changed raster partition makes exactly the right partitions stale.

torch and Lightning are imported inside the functions: loading the code location and running
the data layer then cost no torch import.
"""

import math
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import dagster as dg
import numpy as np
from pydantic import Field

from s2vec_pipeline.cells.preview import markdown_image
from s2vec_pipeline.defs.data_layer import raster_tiles
from s2vec_pipeline.defs.metadata import OWNERS, table_metadata
from s2vec_pipeline.defs.partitions import l6_partitions
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.errors import MissingInputError, S2VecError
from s2vec_pipeline.settings import ENV_TRAIN_CRON, schedule_cron
from s2vec_pipeline.storage import delta_store, fs
from s2vec_pipeline.storage.tables import EMBEDDING_COLUMNS

if TYPE_CHECKING:
    from s2vec_pipeline.model.config import TrainConfig
    from s2vec_pipeline.model.registry import ModelCard

GROUP = "model_layer"
EMBEDDINGS_CODE_VERSION = "3"  # 3: empty_image_embeddings
DEFAULT_TRAIN_CRON = "0 3 * * 0"  # weekly, Sunday 03:00 UTC
MIN_VALIDATION_IMAGES = 8
#: What a failed validation check means and what fixes it, in the check and the CLI warning.
TOO_FEW_IMAGES = (
    "{n_val} of {n_images} images held out for validation: too few to validate a model (two "
    "small city extracts, such as the bundled Helsinki and Monaco, give only tens of images "
    "at the city profile); train on a larger extract (a region or country) so that at least "
    "{minimum}, better hundreds, are held out"
)


def too_few_images(n_val: int, n_images: int) -> str:
    """Why the validation checks cannot pass on this training set, and what would."""
    return TOO_FEW_IMAGES.format(n_val=n_val, n_images=n_images, minimum=MIN_VALIDATION_IMAGES)


#: Settings the launchpad offers: every TrainConfig field but these (no effect, or CLI only).
_NOT_IN_LAUNCHPAD = ("shuffle_buffer", "progress_bar")
#: Launchpad defaults that differ from TrainConfig's: the profile's epochs and batch size;
#: one device unless told (a multi-GPU DDP run is asked for, not implied).
_LAUNCHPAD_DEFAULTS: dict[str, Any] = {"epochs": None, "batch_size": None, "devices": 1}


def _dagster_type(annotation: Any) -> Any:
    """The Dagster config type of a TrainConfig field (ranges are checked by TrainConfig)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if annotation in (int, float, bool, str):
        return annotation
    if get_origin(annotation) is tuple:
        return [str]
    if get_origin(annotation) is Literal:
        return str
    if type(None) in get_args(annotation):  # X | None
        return dg.Noneable(_dagster_type(args[0]))
    if int in args:  # int | Literal["auto"]: devices, a count in the launchpad
        return int
    raise TypeError(f"no Dagster config type for {annotation!r}")


class _ValidatedShape(dg.Shape):
    """A Shape whose value is validated by ``TrainConfig`` when Dagster resolves a run config,
    i.e. when a run is launched (launchpad, schedule, CLI), before it is created: a bad value
    fails the launch with one line, not the run ~10 s in."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_ValidatedShape":
        # Shape memoizes instances of Shape itself by field hash: this subclass must not be
        # swapped for a plain Shape with the same fields.
        return object.__new__(cls)

    def __init__(self, fields: dict[str, dg.Field], description: str | None = None) -> None:
        self._initialized = False
        super().__init__(fields, description)

    def post_process(self, value: Any) -> Any:
        # Dagster's documented way to refuse a value in post_process (not re-exported at the
        # top level in 1.13).
        from s2vec_pipeline.model.config import TrainConfig
        from s2vec_pipeline.service.dagster_compat import PostProcessingError

        try:
            TrainConfig(**_overrides(value))
        except S2VecError as e:
            raise PostProcessingError(str(e)) from None
        return value


def _overrides(op_config: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields set in an ``mae_model`` op config (empty ones: the defaults)."""
    return {k: v for k, v in op_config.items() if k != "partitions" and v is not None}


def training_config_schema() -> dg.Field:
    """The launchpad config of ``mae_model``: the partitions, and TrainConfig's fields (their
    descriptions and defaults), validated by TrainConfig at launch."""
    from s2vec_pipeline.model.config import TrainConfig

    fields: dict[str, dg.Field] = {
        "partitions": dg.Field(
            [str],
            default_value=[],
            description="Level-6 cells whose raster tiles train the model (empty: all)",
        )
    }
    for name, info in TrainConfig.model_fields.items():
        if name in _NOT_IN_LAUNCHPAD:
            continue
        kind = _dagster_type(info.annotation)
        default = _LAUNCHPAD_DEFAULTS.get(name, info.default)
        if default is None and not isinstance(kind, dg.Noneable):
            kind = dg.Noneable(kind)
        if isinstance(default, tuple):
            default = list(default)
        fields[name] = dg.Field(
            kind, default_value=default, is_required=False, description=info.description
        )
    return dg.Field(
        _ValidatedShape(fields, "Which partitions train the MAE, its size and schedule"),
        description="Training settings (model.config.TrainConfig), checked when the run is "
        "launched",
    )


def train_config(op_config: dict[str, Any], profile: str) -> "TrainConfig":
    """The TrainConfig of an ``mae_model`` op config on a root of ``profile``."""
    from s2vec_pipeline.model.config import TrainConfig

    return TrainConfig.for_profile(profile, **_overrides(op_config))


def _card_checks(card: "ModelCard") -> list[dg.AssetCheckResult]:
    losses = {"train_loss": card.train_loss, "val_loss": card.val_loss}
    finite = all(v is not None and math.isfinite(v) for v in losses.values())
    return [
        dg.AssetCheckResult(check_name="finite_loss", passed=finite, metadata=losses),
        dg.AssetCheckResult(
            check_name="enough_validation_images",
            passed=card.n_val >= MIN_VALIDATION_IMAGES,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"validation_images": card.n_val, "minimum": MIN_VALIDATION_IMAGES},
            description=too_few_images(card.n_val, card.n_train + card.n_val)
            if card.n_val < MIN_VALIDATION_IMAGES
            else None,
        ),
    ]


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "lightning"},
    owners=OWNERS,
    tags={"layer": "model", "s2vec/stage": "train"},
    code_version="2",
    config_schema=training_config_schema(),
    deps=[dg.AssetDep(raster_tiles, partition_mapping=dg.AllPartitionMapping())],
    check_specs=[
        dg.AssetCheckSpec(
            "finite_loss",
            asset="mae_model",
            description="Training and validation losses are finite.",
        ),
        dg.AssetCheckSpec(
            "reconstruction_beats_channel_mean",
            asset="mae_model",
            description="On images the model did not train on, its masked reconstruction error "
            "is below that of predicting each channel's mean (skill > 0); the metadata also "
            "compares it with the mean of neighbouring visible pixels.",
        ),
        dg.AssetCheckSpec(
            "enough_validation_images",
            asset="mae_model",
            description=f"At least {MIN_VALIDATION_IMAGES} held-out images measure the "
            "validation loss (fewer: it describes a handful of images, not the model).",
        ),
    ],
)
def mae_model(
    context: dg.AssetExecutionContext, s2vec: S2VecResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """The S2Vec masked autoencoder trained on raster tiles (GPU when present, CPU otherwise)."""
    from s2vec_pipeline.model.train import train_model

    settings = s2vec.settings()
    if not delta_store.table_exists(settings.root, "raster_tiles"):
        raise MissingInputError(
            f"raster_tiles does not exist under {settings.root}: run s2vec materialize "
            f"--stages extract,features,raster first"
        )
    # One snapshot of raster_tiles: its partitions and their versions at the same Delta version.
    config = context.op_execution_context.op_config
    card = train_model(
        settings.root,
        sorted(config["partitions"]) or None,
        train_config(config, settings.profile.name),
    )
    context.log.info(f"model {card.model_version} in {card.directory}")
    curve = fs.read_bytes(fs.join(card.directory, "loss_curve.png")) or b""
    curve_md = markdown_image(curve, "loss curve")
    yield dg.MaterializeResult(
        metadata={
            "model_version": card.model_version,
            "directory": dg.MetadataValue.path(card.directory),
            "training_partitions": dg.MetadataValue.json(card.partitions),
            "raster_tiles_version": card.raster_tiles_version,
            "train_loss": card.train_loss,
            "val_loss": card.val_loss,
            "train_images": card.n_train,
            "validation_images": card.n_val,
            "epochs": card.epochs_completed,
            "images_per_second": round(card.images_per_s, 1),
            "hardware": dg.MetadataValue.json(card.hardware),
            "duration_s": round(card.duration_s, 2),
            "loss_curve": dg.MetadataValue.md(curve_md),
        },
        data_version=dg.DataVersion(card.model_version),
    )
    yield from _card_checks(card)
    yield _reconstruction_check(settings.root, card.model_version, card)


def _reconstruction_check(
    root: str, model_version: str, card: "ModelCard | None" = None
) -> dg.AssetCheckResult:
    from s2vec_pipeline.analysis.reconstruction import NoHeldOutImagesError, reconstruction_quality

    try:
        report = reconstruction_quality(root, model_version)
    except NoHeldOutImagesError as e:
        return dg.AssetCheckResult(
            check_name="reconstruction_beats_channel_mean",
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"not measured: {e}",
        )
    skill = report.skill("channel_mean")
    why = None
    if skill <= 0:
        why = (
            f"the masked reconstruction error on {report.n_images} held-out image(s) is not "
            f"below the channel mean's (skill {skill:.3f})"
        )
        if card is not None and card.n_val < MIN_VALIDATION_IMAGES:
            # The usual cause on small inputs: a model trained on a few dozen images.
            why += f"; {too_few_images(card.n_val, card.n_train + card.n_val)}"
    return dg.AssetCheckResult(
        check_name="reconstruction_beats_channel_mean",
        passed=bool(skill > 0),
        description=why,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "skill_vs_channel_mean": float(skill),
            "skill_vs_neighbour_mean": float(report.skill("neighbour_mean")),
            "report": dg.MetadataValue.md(report.to_markdown()),
        },
    )


class EmbeddingConfig(dg.Config):
    model_version: str | None = Field(
        default=None,
        description="Model to embed with (a folder name under ROOT/models; empty: the latest "
        "materialized mae_model)",
    )


def current_model_version(instance: dg.DagsterInstance, root: str) -> str | None:
    """The latest materialized mae_model's version, else the newest model under the root."""
    from s2vec_pipeline.model.registry import list_models

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
            f"no trained model under {root}: train one first (s2vec materialize --stages "
            f"train) or name one with --model-version"
        )
    return version


_EMBEDDING_CHECKS = {
    "one_row_per_pixel": "One row per pixel of every image with data (S*S per raster row).",
    "no_nan": "Every embedding value is finite.",
    "width": "Every embedding has the model's width (embed_dim).",
}


def _embedding_check_results(
    root: str, table: str, key: str, expected_rows: int, width: int
) -> list[dg.AssetCheckResult]:
    df = delta_store.read_partitions(root, table, [key], ["embedding"])
    lengths = df["embedding"].list.len().to_numpy()
    values = df["embedding"].explode().to_numpy() if df.height else np.zeros(0, dtype=np.float32)
    return [
        dg.AssetCheckResult(
            asset_key=table,
            check_name="one_row_per_pixel",
            passed=df.height == expected_rows,
            metadata={"rows": df.height, "expected": expected_rows},
        ),
        dg.AssetCheckResult(
            asset_key=table,
            check_name="no_nan",
            passed=bool(np.isfinite(values).all()),
            metadata={"non_finite": int((~np.isfinite(values)).sum())},
        ),
        dg.AssetCheckResult(
            asset_key=table,
            check_name="width",
            passed=bool((lengths == width).all()),
            metadata={"width": width, "rows_of_other_width": int((lengths != width).sum())},
        ),
    ]


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            name,
            group_name=GROUP,
            kinds={"pytorch", "delta"},
            owners=OWNERS,
            tags={"layer": "embeddings", "storage": "delta"},
            code_version=EMBEDDINGS_CODE_VERSION,
            partitions_def=l6_partitions,
            deps=[raster_tiles, mae_model],
            description=desc,
            freshness_policy=dg.FreshnessPolicy.time_window(
                # warn: nothing re-embedded since the last nightly refresh; fail: not even the
                # weekly retraining re-embedded anything.
                fail_window=timedelta(days=8),
                warn_window=timedelta(hours=26),
            ),
        )
        for name, desc in [
            (
                "cell_embeddings",
                "One embedding per pixel cell of every image with data; cells of images "
                "without data: the partition's empty_image_embeddings (written by the same "
                "step).",
            ),
            ("image_embeddings", "One embedding per image: the mean of its pixel tokens."),
        ]
    ],
    check_specs=[
        dg.AssetCheckSpec(
            check,
            asset=table,
            description=desc.replace("pixel", "image")
            if table == "image_embeddings" and check == "one_row_per_pixel"
            else desc,
            partitions_def=l6_partitions,
        )
        for table in ("cell_embeddings", "image_embeddings")
        for check, desc in _EMBEDDING_CHECKS.items()
    ],
)
def embeddings(
    context: dg.AssetExecutionContext, config: EmbeddingConfig, s2vec: S2VecResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    from s2vec_pipeline.model.embed import write_embeddings
    from s2vec_pipeline.model.registry import load_model

    settings = s2vec.settings()
    key = context.partition_key
    version = _model_version(context, config, settings.root)
    model, card = load_model(settings.root, version)  # checks taxonomy, channels, side
    written = write_embeddings(settings.root, model, card, [key])[key]
    # (model version, the version of the raster partition it read): a new model or a changed
    # partition changes exactly the right partitions' versions.
    data_version = dg.DataVersion(f"{version}-{written['raster_data_version']}")
    width = int(card.config["embed_dim"])
    from s2vec_pipeline.analysis.maps import partition_embedding_png

    # First three principal components as RGB on the cells' true polygons.
    embedding_map = dg.MetadataValue.md(
        markdown_image(partition_embedding_png(settings.root, key, version), f"embeddings of {key}")
    )
    for table, rows, per_image, committed in (
        ("cell_embeddings", written["cells"], card.side * card.side, "cell_table_version"),
        ("image_embeddings", written["images"], 1, "image_table_version"),
    ):
        yield dg.MaterializeResult(
            asset_key=table,
            data_version=data_version,
            metadata={
                **table_metadata(
                    settings, table, rows, EMBEDDING_COLUMNS, version=written[committed]
                ),
                "model_version": version,
                "raster_tiles_version": written["raster_tiles_version"],
                "embedding_width": width,
                **(
                    {
                        "map": embedding_map,
                        "empty_image_embeddings_version": written["empty_table_version"],
                    }
                    if table == "cell_embeddings"
                    else {}
                ),
            },
        )
        yield from _embedding_check_results(
            settings.root, table, key, written["images"] * per_image, width
        )


model_layer_assets = [mae_model, embeddings]

train_job = dg.define_asset_job(
    "train_model",
    selection=dg.AssetSelection.assets(mae_model),
    description="Train the MAE on the raster tiles of every materialized partition (config: "
    "partitions, epochs, model size)",
    tags={"s2vec/stage": "train"},
)
embed_job = dg.define_asset_job(
    "embed",
    selection=dg.AssetSelection.assets("cell_embeddings", "image_embeddings"),
    description="Embed one partition per run with the latest (or a configured) model",
    tags={"s2vec/stage": "embed"},
)


def weekly_training_schedule(cron: str | None = None) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="weekly_training",
        cron_schedule=cron or schedule_cron(ENV_TRAIN_CRON, DEFAULT_TRAIN_CRON),
        execution_timezone="UTC",
        job=train_job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Retrains mae_model (not nightly); a new model version makes every "
        "embedding partition stale, and refresh_stale_partitions re-embeds them.",
    )
