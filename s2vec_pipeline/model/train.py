"""Train the S2Vec MAE on ``raster_tiles`` into a versioned, atomically written model directory.

``<root>/models/<model_version>/`` holds ``model.ckpt`` (weights + hyperparameters +
normalization buffers), ``last.ckpt`` (full training state), ``model_card.json`` and
``loss_curve.png``. The version is a content hash of everything that determines the weights
(config incl. seed, taxonomy version, channels, side, training partitions and their data
versions), so the same inputs name the same model: a finished one is returned, not retrained.
Training runs in ``<root>/models/.<model_version>.partial/`` and is renamed into place at the
end; an interrupted run leaves that directory and the next call resumes from its
``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from s2vec_pipeline import delta_store
from s2vec_pipeline.errors import MissingInputError, S2VecError
from s2vec_pipeline.locks import LockHeldError, exclusive
from s2vec_pipeline.model.data import (
    RASTER_TABLE,
    EpochSetter,
    RasterTileDataModule,
    iter_raster_batches,
)
from s2vec_pipeline.model.mae import S2VecMAE
from s2vec_pipeline.versioning import config_hash

MODELS_DIR = "models"
#: Bump when the architecture or training code changes what a config produces.
MODEL_CODE_VERSION = "s2vec-mae-1"
_VERSION_RE = re.compile(r"^[0-9a-f]{8,64}$")


class ModelNotFoundError(S2VecError):
    """No finished model of that version under the root."""


class IncompatibleModelError(S2VecError):
    """A model was trained on tiles of another taxonomy, channel set or image side."""


class TrainingInProgressError(S2VecError):
    """Another process is training the same model version right now."""


# --- configuration and versions ----------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. Fields in ``RUNTIME_FIELDS`` do not enter the model version."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    seed: int = 0
    max_steps: int | None = None
    val_fraction: float = 0.1
    mask_ratio: float = 0.75
    patch_size: int = 1
    embed_dim: int = 256
    depth: int = 6
    num_heads: int = 8
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mlp_ratio: float = 4.0
    shuffle_buffer: int = 2048
    # runtime only
    num_workers: int = 0
    devices: int | str = "auto"
    read_batch_size: int = 256
    progress_bar: bool = False

    RUNTIME_FIELDS = ("num_workers", "devices", "read_batch_size", "progress_bar")

    @classmethod
    def for_profile(cls, profile: str, **overrides: Any) -> TrainConfig:
        """Defaults per resolution profile; ``overrides`` replace any field."""
        defaults: dict[str, Any] = {
            # A city extract gives a few hundred 16×16 images: small batches, more epochs.
            "city": {"epochs": 20, "batch_size": 32},
            # Paper-scale areas give many more images.
            "paper": {"epochs": 10, "batch_size": 256},
        }.get(profile, {})
        return cls(**{**defaults, **overrides})

    def version_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in self.RUNTIME_FIELDS}


def model_version(
    config: TrainConfig, contract: dict[str, Any], partition_versions: dict[str, str]
) -> str:
    """Content hash of what determines the weights (config, data contract, data versions)."""
    return config_hash(
        {
            "code": MODEL_CODE_VERSION,
            "config": config.version_dict(),
            "profile": contract.get("profile"),
            "image_level": contract.get("image_level"),
            "pixel_level": contract.get("pixel_level"),
            "side": contract["side"],
            "taxonomy_version": contract["taxonomy_version"],
            "channels": list(contract["channels"]),
            "partitions": dict(sorted(partition_versions.items())),
        }
    )


def partition_data_versions(
    root: str | os.PathLike, partitions: Sequence[str], read_batch_size: int = 256
) -> dict[str, str]:
    """Content hash per raster partition, streamed and independent of row order.

    Each row hashes (token, tensor bytes); a partition's version hashes the row count and the
    sum of row hashes mod 2^128. Pass Dagster's data versions to ``train_model`` instead to
    skip this pass.
    """
    sums = dict.fromkeys(partitions, 0)
    counts = dict.fromkeys(partitions, 0)
    for batch in iter_raster_batches(
        root, partitions, ["parent_l6", "image_token", "tensor"], read_batch_size
    ):
        if batch.num_rows == 0:
            continue
        col = batch.column("tensor")
        values = col.flatten().to_numpy(zero_copy_only=False)
        offsets = col.offsets.to_numpy() - col.offsets[0].as_py()
        parts = batch.column("parent_l6").to_pylist()
        tokens = batch.column("image_token").to_pylist()
        for i, (p, t) in enumerate(zip(parts, tokens, strict=True)):
            h = hashlib.blake2b(t.encode(), digest_size=16)
            h.update(values[offsets[i] : offsets[i + 1]].tobytes())
            sums[p] = (sums[p] + int.from_bytes(h.digest(), "big")) % 2**128
            counts[p] += 1
    return {p: config_hash([counts[p], str(sums[p])]) for p in partitions}


# --- the model card ----------------------------------------------------------------------


@dataclass
class ModelCard:
    """Everything about one trained model; saved as ``model_card.json``."""

    model_version: str
    config: dict[str, Any]
    profile: str | None
    image_level: int | None
    pixel_level: int | None
    side: int
    taxonomy_version: str
    channels: list[str]
    partitions: dict[str, str]
    normalization: dict[str, list[float]]
    n_train: int
    n_val: int
    train_loss: float | None
    val_loss: float | None
    loss_history: dict[str, list]
    hardware: dict[str, Any]
    duration_s: float
    images_seen: int
    images_per_s: float
    epochs_completed: int
    steps: int
    resumed_from: dict[str, int] | None
    created: str
    code_version: str = MODEL_CODE_VERSION
    directory: str = field(default="", compare=False)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("directory")
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ModelCard:
        d = json.loads((Path(directory) / "model_card.json").read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}, directory=str(directory))

    @property
    def checkpoint(self) -> Path:
        return Path(self.directory) / "model.ckpt"


def check_compatible(card: ModelCard, contract: dict[str, Any], table: str = RASTER_TABLE) -> None:
    """Refuse a model trained on tiles of another taxonomy, channel set or side."""
    problems = []
    if contract.get("taxonomy_version") != card.taxonomy_version:
        problems.append(
            f"taxonomy version {contract.get('taxonomy_version')!r} (model: "
            f"{card.taxonomy_version!r})"
        )
    channels = list(contract.get("channels", []))
    if len(channels) != len(card.channels):
        problems.append(f"{len(channels)} channels (model: {len(card.channels)})")
    elif channels != card.channels:
        problems.append("channels in another order or with other names than the model's")
    if contract.get("side") != card.side:
        problems.append(f"image side {contract.get('side')} (model: {card.side})")
    if problems:
        raise IncompatibleModelError(
            f"model {card.model_version} does not fit the {table} table: it has "
            + "; ".join(problems)
            + ". Train a model on this table (train_model) or use the root it was trained on."
        )


# --- training ----------------------------------------------------------------------------


class LossHistory(L.Callback):
    """Per-step train loss, per-epoch val loss, images seen and time; kept in checkpoints."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {
            "step": [],
            "train_loss": [],
            "epoch": [],
            "epoch_step": [],
            "val_loss": [],
            "epoch_train_loss": [],
            "images_seen": 0,
            "duration_s": 0.0,
        }
        self._pending: list[torch.Tensor] = []
        self._t0 = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._pending.append(outputs["loss"].detach())  # no GPU sync per step
        self.state["images_seen"] += int(batch.shape[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = self.state
        if self._pending:
            losses = torch.stack(self._pending).float().cpu().tolist()
            first = trainer.global_step - len(losses) + 1
            s["step"] += list(range(first, trainer.global_step + 1))
            s["train_loss"] += losses
            s["epoch_train_loss"].append(float(np.mean(losses)))
            self._pending = []
        val = trainer.callback_metrics.get("val_loss")
        s["epoch"].append(trainer.current_epoch)
        s["epoch_step"].append(trainer.global_step)
        s["val_loss"].append(float(val) if val is not None else None)
        now = time.perf_counter()
        s["duration_s"] += now - self._t0
        self._t0 = now

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = dict(state_dict)


class LastCheckpoint(L.Callback):
    """Saves ``last.ckpt`` (full training state) at each epoch end, atomically (tmp + rename).

    Put it after the callbacks whose state it should capture (callbacks run in list order).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier()


class _ResumeMarker(L.Callback):
    """Remembers the epoch/step a run resumed from (read after ``fit``)."""

    resumed_from: dict[str, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            self.resumed_from = {"epoch": trainer.current_epoch, "step": trainer.global_step}


def models_dir(root: str | os.PathLike) -> Path:
    return Path(root) / MODELS_DIR


def list_models(root: str | os.PathLike) -> list[str]:
    """Finished model versions under ``root``, oldest first."""
    base = models_dir(root)
    if not base.is_dir():
        return []
    done = [p for p in base.iterdir() if (p / "model_card.json").is_file()]
    return [p.name for p in sorted(done, key=lambda p: (p / "model_card.json").stat().st_mtime)]


@contextlib.contextmanager
def _version_lock(base: Path, version: str) -> Iterator[None]:
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive(base / f".{version}.lock", blocking=False))
        except LockHeldError as e:
            raise TrainingInProgressError(
                f"model {version} is being trained by another process under {base}: wait for "
                "it to finish (its result will be reused)"
            ) from e
        yield


def _hardware(trainer: L.Trainer) -> dict[str, Any]:
    if torch.cuda.is_available() and trainer.num_devices and trainer.root_device.type == "cuda":
        name = torch.cuda.get_device_name(trainer.root_device)
        return {
            "accelerator": "cuda",
            "device_name": name,
            "device_count": trainer.num_devices,
            "precision": trainer.precision,
        }
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "accelerator": "cpu",
        "device_name": cpu,
        "device_count": 1,
        "threads": torch.get_num_threads(),
        "precision": trainer.precision,
    }


def _trainer_kwargs(config: TrainConfig) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if cuda else 0
    devices = config.devices
    n_used = n_gpus if devices == "auto" else int(devices) if cuda else 1
    return {
        "accelerator": "auto",
        "devices": devices,
        "precision": "bf16-mixed" if cuda else "32-true",
        # DDP re-launches the calling command once per extra GPU (Lightning's subprocess
        # launcher): fine from a CLI; from a long-lived process set devices=1.
        "strategy": "ddp" if n_used > 1 else "auto",
        # Bitwise reproducible on CPU; on GPU bf16 / flash attention are not, so warn only.
        "deterministic": "warn" if cuda else True,
    }


def train_model(
    root: str | os.PathLike,
    partitions: Sequence[str] | None = None,
    config: TrainConfig | None = None,
    *,
    partition_versions: dict[str, str] | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> ModelCard:
    """Train (or resume, or reuse) the model for ``raster_tiles`` under ``root``.

    ``partitions``: training partitions (default: all with data). ``partition_versions``:
    their data versions if the caller knows them (e.g. Dagster's); otherwise they are hashed
    from the data. Returns the model card; the model lives in ``card.directory``.
    """
    contract = delta_store.table_contract(root, RASTER_TABLE)
    if contract is None:
        raise MissingInputError(
            f"no raster_tiles table under {root}: materialize raster_tiles first "
            "(the model trains on its tiles)"
        )
    available = delta_store.partition_keys(root, RASTER_TABLE)
    if partitions is None:
        partitions = available
    partitions = sorted(set(partitions))
    missing = [p for p in partitions if p not in available]
    if missing or not partitions:
        raise MissingInputError(
            f"raster_tiles under {root} has no tiles for partitions {missing or partitions}: "
            f"materialize raster_tiles for them first (partitions with tiles: {available})"
        )
    config = config or TrainConfig.for_profile(contract.get("profile", ""))
    if partition_versions is None:
        partition_versions = partition_data_versions(root, partitions, config.read_batch_size)
    elif set(partition_versions) != set(partitions):
        raise ValueError("partition_versions must have exactly one entry per training partition")
    version = model_version(config, contract, partition_versions)
    base = models_dir(root)
    final = base / version
    if (final / "model_card.json").is_file():
        return ModelCard.load(final)

    with _version_lock(base, version):
        if (final / "model_card.json").is_file():  # finished while we waited for the lock
            return ModelCard.load(final)
        return _train(root, partitions, config, contract, partition_versions, version, callbacks)


def _train(
    root: str | os.PathLike,
    partitions: list[str],
    config: TrainConfig,
    contract: dict[str, Any],
    partition_versions: dict[str, str],
    version: str,
    callbacks: Sequence[L.Callback],
) -> ModelCard:
    base = models_dir(root)
    final, work = base / version, base / f".{version}.partial"
    resume = work / "last.ckpt"
    if not resume.is_file():
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    L.seed_everything(config.seed, workers=True, verbose=False)
    dm = RasterTileDataModule(
        root,
        partitions,
        batch_size=config.batch_size,
        val_fraction=config.val_fraction,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer,
        read_batch_size=config.read_batch_size,
        num_workers=config.num_workers,
    )
    dm.setup("fit")
    model = S2VecMAE(
        in_chans=len(dm.channels),
        img_size=dm.side,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        decoder_embed_dim=config.decoder_embed_dim,
        decoder_depth=config.decoder_depth,
        decoder_num_heads=config.decoder_num_heads,
        mlp_ratio=config.mlp_ratio,
        mask_ratio=config.mask_ratio,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_fraction=config.warmup_fraction,
        mask_seed=config.seed,
        channels=dm.channels,
    )
    model.set_normalization(dm.channel_mean, dm.channel_std)

    history, marker = LossHistory(), _ResumeMarker()
    trainer = L.Trainer(
        **_trainer_kwargs(config),
        max_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        callbacks=[history, marker, EpochSetter(), *callbacks, LastCheckpoint(resume)],
        default_root_dir=str(work),
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if dm.n_val > 0 else 0,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        # The stream's __len__ is exact per rank and worker (see RasterTileStream).
        warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__`")
        trainer.fit(model, datamodule=dm, ckpt_path=str(resume) if resume.is_file() else None)
    if not trainer.is_global_zero:
        return ModelCard.load(final) if (final / "model_card.json").is_file() else None  # type: ignore[return-value]

    trainer.save_checkpoint(work / "model.ckpt", weights_only=True)
    h = history.state
    val_losses = [v for v in h["val_loss"] if v is not None]
    card = ModelCard(
        model_version=version,
        config=dataclasses.asdict(config),
        profile=contract.get("profile"),
        image_level=contract.get("image_level"),
        pixel_level=contract.get("pixel_level"),
        side=int(contract["side"]),
        taxonomy_version=contract["taxonomy_version"],
        channels=list(contract["channels"]),
        partitions=dict(sorted(partition_versions.items())),
        normalization=dm.normalization_stats(),
        n_train=dm.n_train,
        n_val=dm.n_val,
        train_loss=h["epoch_train_loss"][-1] if h["epoch_train_loss"] else None,
        val_loss=val_losses[-1] if val_losses else None,
        loss_history={
            k: h[k]
            for k in ("step", "train_loss", "epoch", "epoch_step", "epoch_train_loss", "val_loss")
        },
        hardware=_hardware(trainer),
        duration_s=round(h["duration_s"], 3),
        images_seen=h["images_seen"],
        images_per_s=round(h["images_seen"] / h["duration_s"], 1) if h["duration_s"] else 0.0,
        epochs_completed=trainer.current_epoch,
        steps=trainer.global_step,
        resumed_from=marker.resumed_from,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        directory=str(final),
    )
    (work / "model_card.json").write_text(card.to_json())
    draw_loss_curve(card.loss_history, work / "loss_curve.png", title=f"S2Vec MAE {version}")
    os.replace(work, final)  # atomic: the finished directory appears complete or not at all
    return card


def load_model(
    root: str | os.PathLike, version: str, table: str | None = RASTER_TABLE
) -> tuple[S2VecMAE, ModelCard]:
    """The trained model (eval mode, on CPU) and its card.

    With ``table`` (default ``raster_tiles``), refuse a model that does not fit that table's
    contract (taxonomy version, channels, side) when the table exists.
    """
    final = models_dir(root) / version
    if not _VERSION_RE.match(version) or not (final / "model_card.json").is_file():
        available = list_models(root)
        hint = f"available: {', '.join(available)}" if available else "none trained yet"
        partial = (models_dir(root) / f".{version}.partial").exists()
        raise ModelNotFoundError(
            f"no finished model {version!r} under {models_dir(root)} ({hint})"
            + (
                "; a partial training of it exists: rerun train_model to resume it"
                if partial
                else ". Train one with train_model first"
            )
        )
    card = ModelCard.load(final)
    if table is not None:
        contract = delta_store.table_contract(root, table)
        if contract is not None:
            check_compatible(card, contract, table)
    model = S2VecMAE.load_from_checkpoint(card.checkpoint, map_location="cpu", weights_only=True)
    model.eval()
    return model, card


# --- loss curve (Pillow only) -------------------------------------------------------------


def draw_loss_curve(
    history: dict[str, list], path: str | os.PathLike, title: str = "", size=(800, 480)
) -> None:
    """Train loss per step (blue line) and val loss per epoch (orange dots) as a PNG."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    steps, train = history.get("step", []), history.get("train_loss", [])
    val = [
        (s, v)
        for s, v in zip(history.get("epoch_step", []), history.get("val_loss", []), strict=False)
        if v is not None
    ]
    ys = [v for v in train if math.isfinite(v)] + [v for _, v in val if math.isfinite(v)]
    d.text((left, 12), title or "loss", fill="black")
    if not ys or not steps:
        d.text((left, h // 2), "no losses recorded", fill="black")
        img.save(path)
        return
    x0, x1 = 0, max(max(steps), 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom),
        )

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        _, yp = px(0, yv)
        d.line([left - 4, yp, left, yp], fill="black")
        d.text((4, yp - 6), f"{yv:.3g}", fill="black")
    for k in range(5):
        xv = x0 + (x1 - x0) * k / 4
        xp, _ = px(xv, y0)
        d.line([xp, h - bottom, xp, h - bottom + 4], fill="black")
        d.text((xp - 10, h - bottom + 8), f"{xv:.0f}", fill="black")
    d.text((w // 2 - 20, h - 20), "step", fill="black")
    pts = [px(s, v) for s, v in zip(steps, train, strict=False) if math.isfinite(v)]
    if len(pts) > 1:
        d.line(pts, fill=(31, 119, 180), width=2)
    for s, v in val:
        x, y = px(s, v)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 127, 14))
    d.text(
        (w - right - 230, top + 6), "line: train (per step)  dots: val (per epoch)", fill="black"
    )
    img.save(path)
