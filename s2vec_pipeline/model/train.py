"""Train the S2Vec MAE on ``raster_tiles`` into a versioned, atomically written model directory.

``<root>/models/<model_version>/`` holds ``model.ckpt`` (weights + hyperparameters +
normalization buffers), ``last.ckpt`` (full training state, Lightning's
``ModelCheckpoint``), ``logs/version_*/metrics.csv`` (Lightning's
``CSVLogger``: one folder per attempt, a resumed run adds one), ``model_card.json`` and
``loss_curve.png``.

Training reads one Delta version of ``raster_tiles`` (the latest when it starts, or the one
given): a refresh writing the table meanwhile changes nothing in this run. The version is a
content hash of everything that determines the weights: config incl. seed, taxonomy version,
channels, side, the number of training processes when above one, and each training
partition's data version *at that snapshot* (``versioning.partition_data_version``, the very
hash Dagster records for ``raster_tiles``), so the same inputs name the same model from
Dagster or from Python, and a finished one is returned, not retrained. The card records the
Delta version read (``raster_tiles_version``).

Training runs in ``<root>/models/.<model_version>.partial/`` and is renamed into place at the
end; an interrupted run leaves that directory and the next call resumes from its
``last.ckpt``. Several devices train with DDP through ``ddp_spawn``: the calling process holds
the version lock and spawns one worker per device, so it works from a Dagster step, the CLI or
a notebook alike (Lightning's default ``ddp`` would re-run the calling command per device).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from s2vec_pipeline import delta_store, storage
from s2vec_pipeline.errors import MissingInputError, S2VecError
from s2vec_pipeline.locks import LockHeldError, exclusive
from s2vec_pipeline.model.data import (
    RASTER_TABLE,
    EpochSetter,
    RasterTileDataModule,
    raster_partition_keys,
    raster_partition_versions,
    raster_snapshot,
)
from s2vec_pipeline.model.mae import S2VecMAE
from s2vec_pipeline.versioning import config_hash

MODELS_DIR = "models"
#: Bump when the architecture or training code changes what a config produces.
#: 2: tiles stream in a content-determined order from one snapshot; one partition hash.
MODEL_CODE_VERSION = "s2vec-mae-2"
_VERSION_RE = re.compile(r"^[0-9a-f]{8,64}$")
LOGS_DIR = "logs"


class ModelNotFoundError(S2VecError):
    """No finished model of that version under the root."""


class IncompatibleModelError(S2VecError):
    """A model was trained on tiles of another taxonomy, channel set or image side."""


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... litlogger / litmodels"), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _silence_lightning_tips() -> None:
    # Lightning logs the tips through these loggers at INFO on every Trainer; the other INFO
    # lines ("GPU available ...") stay.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())


_silence_lightning_tips()

#: Lightning's INFO lines ("GPU available: False, used: False", "TPU available", "`Trainer(
#: limit_val_batches=1.0)` was configured...", "Loading `train_dataloader`...", "`Trainer.fit`
#: stopped...") come through these loggers' children (``rank_zero_info``); warnings and errors
#: still show. Progress is ``_EpochProgress``'s line per epoch instead.
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
#: Same name as ``runner.PROGRESS_LOGGER``: the CLI prints it, a library caller sees nothing.
_progress = logging.getLogger("s2vec_pipeline.progress")


def _lightning_info_off() -> None:
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's INFO lines off while a Trainer is built and fits, in this process."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    _lightning_info_off()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _EpochProgress(L.Callback):
    """One progress record per epoch: epoch, mean training loss, validation loss, seconds
    (``transient``: the CLI rewrites one line on a terminal, prints plain lines otherwise)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._sum, self._n = time.perf_counter(), 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._sum, self._n = self._sum + float(loss.detach()), self._n + 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val_loss")
        _progress.info(
            "epoch %d/%d  loss %.4f%s  (%.1f s)",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            self._sum / max(self._n, 1),
            f"  val_loss {float(val):.4f}" if val is not None else "",
            time.perf_counter() - self._t0,
            extra={"transient": True},
        )


def _filter_known_warnings() -> None:
    """Targeted filters for warnings about Lightning's internals, not about our inputs."""
    # The stream's __len__ is exact per rank and worker (see RasterTileStream).
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__`")
    # The model directory holds the CSV logs, and last.ckpt when resuming: expected.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning 2.6's utilities/_pytree.py builds torch's deprecated LeafSpec (torch 2.10+);
    # nothing for us to change.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )


@contextlib.contextmanager
def _known_warnings() -> Iterator[None]:
    """``_filter_known_warnings`` for the duration of a fit, in the calling process."""
    with warnings.catch_warnings():
        _filter_known_warnings()
        yield


class _QuietWorkers(L.Callback):
    """The same filters in spawned DDP workers (fresh interpreters)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # In the calling process this runs inside ``_known_warnings``, which undoes it.
        _filter_known_warnings()
        _lightning_info_off()


# --- configuration and versions ----------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. Fields in ``RUNTIME_FIELDS`` do not enter the model version
    (except through the resolved number of training processes, see ``world_size``)."""

    epochs: int = 20
    batch_size: int = 32  # per device
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
    # Levers of docs/quality.md; at their defaults they stay out of the model version.
    augment: bool = False  # a random rotation/reflection (D4) of each training image
    empty_pixel_weight: float = 1.0  # loss weight of masked pixels with all channels zero
    input_norm: str = "channel"  # z-score of log1p per "channel", or one for all ("global")
    held_out_channels: tuple[str, ...] = ()  # channels zeroed in the input (probe labels)
    # runtime only
    num_workers: int = 0
    devices: int | str = "auto"  # "auto": every GPU (one CPU process without a GPU), or N
    accelerator: str = "auto"  # "auto", "cpu", "gpu"/"cuda"
    read_batch_size: int = 256
    progress_bar: bool = False

    RUNTIME_FIELDS = (
        "num_workers",
        "devices",
        "accelerator",
        "read_batch_size",
        "progress_bar",
    )

    #: Fields added after models were trained: left out of the version at these values, so
    #: earlier models keep their versions.
    OPTIONAL_FIELDS = {
        "augment": False,
        "empty_pixel_weight": 1.0,
        "input_norm": "channel",
        "held_out_channels": (),
    }
    INPUT_NORMS = ("channel", "global")

    def __post_init__(self) -> None:
        if not 0.0 <= self.empty_pixel_weight <= 1.0:
            raise S2VecError(f"empty_pixel_weight must be in [0, 1], not {self.empty_pixel_weight}")
        if self.input_norm not in self.INPUT_NORMS:
            raise S2VecError(
                f"input_norm must be one of {', '.join(self.INPUT_NORMS)}, not {self.input_norm!r}"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise S2VecError(f"mask_ratio must be in [0, 1), not {self.mask_ratio}")
        # A list from JSON / Dagster config becomes a tuple (hashable, frozen).
        object.__setattr__(self, "held_out_channels", tuple(self.held_out_channels))

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

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-shaped (the held-out channels as a list)."""
        return {**dataclasses.asdict(self), "held_out_channels": list(self.held_out_channels)}

    def version_dict(self) -> dict[str, Any]:
        d = self.as_dict()
        return {
            k: v
            for k, v in d.items()
            if k not in self.RUNTIME_FIELDS
            and not (k in self.OPTIONAL_FIELDS and v == self.OPTIONAL_FIELDS[k])
            and not (k == "held_out_channels" and not v)
        }

    def uses_cuda(self) -> bool:
        return torch.cuda.is_available() and self.accelerator in ("auto", "gpu", "cuda")

    def world_size(self) -> int:
        """Training processes this config starts: one per device."""
        d = self.devices
        if isinstance(d, list | tuple):
            return len(d)
        cuda = self.uses_cuda()
        if d == "auto":
            return max(1, torch.cuda.device_count()) if cuda else 1
        n = int(d)
        if n == -1:
            return torch.cuda.device_count() if cuda else (os.cpu_count() or 1)
        if n < 1:
            raise S2VecError(f"devices must be 'auto', -1 or at least 1, not {d!r}")
        return n


def model_version(
    config: TrainConfig,
    contract: dict[str, Any],
    partition_versions: dict[str, str],
    world_size: int = 1,
) -> str:
    """Content hash of what determines the weights (config, data contract, data versions).

    ``partition_versions``: each training partition's data version at the snapshot read
    (``data.raster_partition_versions``). ``world_size`` enters only above one: several
    processes see other batches (and a single-process version stays what it always was).
    """
    key: dict[str, Any] = {
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
    if world_size > 1:
        key["world_size"] = world_size
    return config_hash(key)


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
    partitions: dict[str, str]  # training partition -> its data version at the snapshot
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
    #: the Delta version of raster_tiles the model was trained on (its snapshot)
    raster_tiles_version: int | None = None
    #: training processes (DDP ranks); the batch per step is world_size × batch_size
    world_size: int = 1
    code_version: str = MODEL_CODE_VERSION
    directory: str = field(default="", compare=False)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("directory")
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ModelCard:
        raw = storage.read_bytes(storage.join(directory, "model_card.json"))
        if raw is None:
            raise FileNotFoundError(f"no model_card.json in {directory}")
        d = json.loads(raw)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}, directory=str(directory))

    @property
    def checkpoint(self) -> Path | str:
        """The weights file: a local path, or a URI on an object-store root."""
        location = storage.join(self.directory, "model.ckpt")
        return location if storage.is_object_store(location) else Path(location)


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
            + ". Train a model on this table (s2vec materialize --stages train) or use the root "
            "it was trained on."
        )


# --- training ----------------------------------------------------------------------------


class TrainingClock(L.Callback):
    """Images seen and training seconds, kept in ``last.ckpt`` so a resumed run adds up.

    At each epoch end it also flushes the CSV logger, so ``metrics.csv`` holds every step up
    to the checkpoint that ``ModelCheckpoint`` writes right after (it runs last).
    """

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"images_seen": 0, "duration_s": 0.0, "resumed_from": None}
        self._t0 = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        if trainer.ckpt_path:
            self.state["resumed_from"] = {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.state["images_seen"] += int(batch.shape[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        self.state["duration_s"] += now - self._t0
        self._t0 = now
        for logger in trainer.loggers:
            logger.save()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = dict(state_dict)


def models_dir(root: str | os.PathLike) -> str:
    """``<root>/models`` (a local path or an object-store URI)."""
    return storage.join(root, MODELS_DIR)


def list_models(root: str | os.PathLike) -> list[str]:
    """Finished model versions under ``root`` (those with a model card), oldest first."""
    cards = [
        e
        for e in storage.list_files(models_dir(root))
        if e.relative.count("/") == 1
        and e.relative.endswith("/model_card.json")
        and not e.relative.startswith(".")  # a training's work folder
    ]
    return [e.relative.split("/")[0] for e in sorted(cards, key=lambda e: e.mtime)]


@contextlib.contextmanager
def _version_lock(root: str | os.PathLike, version: str) -> Iterator[None]:
    """Hold the lock of one model version; when another process trains it, wait for it (the
    caller then finds the finished model, or resumes from its checkpoint if that one died)."""
    # An OS lock, so a local file: on an object-store root it serializes trainings of one host.
    base = storage.local_cache(root, MODELS_DIR)
    path = base / f".{version}.lock"
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive(path, blocking=False))
        except LockHeldError:
            _progress.info("model %s is being trained by another process: waiting for it", version)
            held.enter_context(exclusive(path))
        yield


def _hardware(trainer: L.Trainer) -> dict[str, Any]:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return {
            "accelerator": "cuda",
            "device_name": torch.cuda.get_device_name(device),
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
        "device_count": trainer.num_devices,
        "threads": torch.get_num_threads(),
        "precision": trainer.precision,
    }


def _trainer_kwargs(config: TrainConfig) -> dict[str, Any]:
    cuda = config.uses_cuda()
    return {
        "accelerator": config.accelerator,
        "devices": config.devices,
        "precision": "bf16-mixed" if cuda else "32-true",
        # Several devices: DDP in spawned workers (NCCL on GPUs, gloo on CPUs). The default
        # "ddp" would re-run this process's command line once per extra device: a whole
        # `s2vec materialize` or Dagster step. Spawned workers receive the pickled module,
        # data module and callbacks instead; the caller keeps the lock and finishes the model
        # from the files the workers wrote.
        "strategy": "ddp_spawn" if config.world_size() > 1 else "auto",
        # Bitwise reproducible on CPU; on GPU bf16 / flash attention are not, so warn only.
        "deterministic": "warn" if cuda else True,
    }


def train_model(
    root: str | os.PathLike,
    partitions: Sequence[str] | None = None,
    config: TrainConfig | None = None,
    *,
    raster_version: int | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> ModelCard:
    """Train (or resume, or reuse) the model for ``raster_tiles`` under ``root``.

    ``partitions``: training partitions (default: all with data at the snapshot).
    ``raster_version``: the Delta version of ``raster_tiles`` to train on (default: the
    latest when this call starts). ``callbacks`` run where training runs: in this process
    with one device, in each spawned worker with several. Returns the model card; the model
    lives in ``card.directory``.
    """
    contract = delta_store.table_contract(root, RASTER_TABLE)
    if contract is None:
        raise MissingInputError(
            f"no raster_tiles table under {root}: run s2vec materialize --stages "
            "extract,features,raster first (the model trains on its tiles)"
        )
    snapshot = raster_snapshot(root, raster_version)
    available = raster_partition_keys(root, snapshot)
    if partitions is None:
        partitions = available
    partitions = sorted(set(partitions))
    missing = [p for p in partitions if p not in available]
    if missing or not partitions:
        raise MissingInputError(
            f"raster_tiles under {root} (version {snapshot}) has no tiles for partitions "
            f"{', '.join(missing or partitions) or '(none)'}: run s2vec materialize --stages "
            f"extract,features,raster --cells for them first (partitions with tiles: "
            f"{', '.join(map(str, available)) or 'none'})"
        )
    config = config or TrainConfig.for_profile(contract.get("profile", ""))
    unknown = [c for c in config.held_out_channels if c not in contract["channels"]]
    if unknown:  # before any directory is made
        raise S2VecError(
            f"held_out_channels: {', '.join(unknown)} not among the raster channels "
            f"({', '.join(contract['channels'])})"
        )
    world_size = config.world_size()
    partition_versions = raster_partition_versions(root, partitions, snapshot)
    version = model_version(config, contract, partition_versions, world_size)
    final = storage.join(models_dir(root), version)
    if storage.is_file(storage.join(final, "model_card.json")):
        return ModelCard.load(final)

    # Only this process takes the lock: DDP workers are spawned by it and never get here.
    with _version_lock(root, version):
        if storage.is_file(storage.join(final, "model_card.json")):  # finished meanwhile
            return ModelCard.load(final)
        return _train(
            root, partitions, snapshot, config, contract, partition_versions, version, callbacks
        )


def _train(
    root: str | os.PathLike,
    partitions: list[str],
    snapshot: int,
    config: TrainConfig,
    contract: dict[str, Any],
    partition_versions: dict[str, str],
    version: str,
    callbacks: Sequence[L.Callback],
) -> ModelCard:
    # Training works in a local folder (Lightning writes checkpoints and logs there): under the
    # root for a local root, else under the root's local cache (storage.local_cache).
    final = storage.join(models_dir(root), version)
    work = storage.local_cache(root, MODELS_DIR, f".{version}.partial")
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
        version=snapshot,
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
        augment=config.augment,
        empty_pixel_weight=config.empty_pixel_weight,
        held_out_channels=[dm.channels.index(c) for c in config.held_out_channels],
    )
    model.set_normalization(*input_normalization(dm.channel_mean, dm.channel_std, config))

    # last.ckpt at each epoch end, written atomically (Lightning saves through an fsspec
    # transaction: temporary file, then rename). Not ``save_last=True``: since Lightning 2.6
    # that writes last.ckpt only as a second copy of a top-k file.
    last = ModelCheckpoint(
        dirpath=work,
        filename="last",
        save_top_k=1,  # with no monitored metric: the latest epoch, replacing the previous
        every_n_epochs=1,
        # After the epoch's validation and after TrainingClock (checkpoint callbacks run
        # last), so last.ckpt holds the whole epoch.
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    with _quiet_lightning():
        trainer = L.Trainer(
            **_trainer_kwargs(config),
            max_epochs=config.epochs,
            max_steps=config.max_steps if config.max_steps is not None else -1,
            callbacks=[
                _QuietWorkers(),
                TrainingClock(),
                EpochSetter(),
                _EpochProgress(),
                *callbacks,
                last,
            ],
            default_root_dir=str(work),
            # One metrics.csv per attempt (version_0, version_1 after a resume...): CSVLogger
            # would delete an earlier attempt's file if pointed at the same folder.
            logger=CSVLogger(work, name=LOGS_DIR),
            num_sanity_val_steps=0,
            limit_val_batches=1.0 if dm.n_val > 0 else 0,
            enable_progress_bar=config.progress_bar,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
    with _known_warnings(), _quiet_lightning():
        trainer.fit(model, datamodule=dm, ckpt_path=str(resume) if resume.is_file() else None)
    # With ddp_spawn the workers trained; this (calling) process finishes from their files.
    return _finish(
        work,
        final,
        version,
        snapshot,
        config,
        contract,
        partition_versions,
        dm,
        _hardware(trainer),
        trainer.world_size,
    )


def input_normalization(
    channel_mean: np.ndarray, channel_std: np.ndarray, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) the model standardizes its log1p input with.

    ``channel``: each channel's own training statistics. ``global``: one mean and standard
    deviation over every value of every channel (from the per-channel moments), so the
    channels keep their log1p scales: a rare channel's few non-zero pixels are not blown up
    by its tiny standard deviation.
    """
    mean = np.asarray(channel_mean, dtype=np.float64)
    std = np.asarray(channel_std, dtype=np.float64)
    if config.input_norm == "channel":
        return mean.astype(np.float32), std.astype(np.float32)
    overall = mean.mean()
    var = float(np.mean(std**2 + mean**2) - overall**2)  # E[x²] − E[x]², equal pixel counts
    return (
        np.full(mean.shape, overall, np.float32),
        np.full(mean.shape, math.sqrt(max(var, 0.0)), np.float32),
    )


def _finish(
    work: Path,
    final: str,
    version: str,
    snapshot: int,
    config: TrainConfig,
    contract: dict[str, Any],
    partition_versions: dict[str, str],
    dm: RasterTileDataModule,
    hardware: dict[str, Any],
    world_size: int,
) -> ModelCard:
    """Model file, card and loss curve from ``last.ckpt`` and the CSV logs; then the rename."""
    state = torch.load(work / "last.ckpt", map_location="cpu", weights_only=False)
    # What Trainer.save_checkpoint(weights_only=True) writes: no optimizer or loop state.
    weights = {
        k: state[k]
        for k in (
            "epoch",
            "global_step",
            "pytorch-lightning_version",
            "state_dict",
            "hparams_name",
            "hyper_parameters",
        )
        if k in state
    }
    torch.save(weights, work / "model.ckpt")
    clock = next(
        (v for k, v in state.get("callbacks", {}).items() if k.startswith("TrainingClock")),
        {"images_seen": 0, "duration_s": 0.0, "resumed_from": None},
    )
    history = read_loss_history(work / LOGS_DIR)
    card = ModelCard(
        model_version=version,
        config=config.as_dict(),
        profile=contract.get("profile"),
        image_level=contract.get("image_level"),
        pixel_level=contract.get("pixel_level"),
        side=int(contract["side"]),
        taxonomy_version=contract["taxonomy_version"],
        channels=list(contract["channels"]),
        partitions=dict(sorted(partition_versions.items())),
        normalization=dict(
            zip(
                ("mean", "std"),
                (a.tolist() for a in input_normalization(dm.channel_mean, dm.channel_std, config)),
                strict=True,
            )
        ),
        n_train=dm.n_train,
        n_val=dm.n_val,
        train_loss=history["epoch_train_loss"][-1] if history["epoch_train_loss"] else None,
        val_loss=next((v for v in reversed(history["val_loss"]) if v is not None), None),
        loss_history=history,
        hardware=hardware,
        duration_s=round(clock["duration_s"], 3),
        images_seen=clock["images_seen"],
        images_per_s=(
            round(clock["images_seen"] / clock["duration_s"], 1) if clock["duration_s"] else 0.0
        ),
        epochs_completed=int(state["epoch"]),  # saved after the epoch counter moved on
        steps=int(state["global_step"]),
        resumed_from=clock["resumed_from"],
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        raster_tiles_version=snapshot,
        world_size=world_size,
        directory=str(final),
    )
    (work / "model_card.json").write_text(card.to_json())
    draw_loss_curve(
        card.loss_history,
        work / "loss_curve.png",
        title=f"S2Vec MAE {version}",
        n_train=card.n_train,
        n_val=card.n_val,
    )
    if not storage.is_object_store(final):
        os.replace(work, final)  # atomic: the finished directory appears complete or not at all
        return card
    # On an object store the card is uploaded last: a model without its card is not finished
    # (list_models, load_model), so a half-uploaded model never looks finished.
    files = sorted(p for p in work.rglob("*") if p.is_file() and p.name != "model_card.json")
    for path in [*files, work / "model_card.json"]:
        storage.upload_file(path, storage.join(final, path.relative_to(work).as_posix()))
    shutil.rmtree(work, ignore_errors=True)
    return card


def read_loss_history(logs: Path) -> dict[str, list]:
    """Per-step train loss and per-epoch val loss from the CSV logs of every attempt.

    A later attempt (a resume) overrides the steps it re-ran: after a crash the steps between
    the last checkpoint and the crash were logged twice, with the same values on CPU.
    """
    train: dict[int, tuple[int, float]] = {}
    val: dict[int, tuple[int, float]] = {}

    def attempt(p: Path) -> int:
        return int(p.parent.name.removeprefix("version_") or 0)

    for path in sorted(logs.glob("version_*/metrics.csv"), key=attempt):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step, epoch = int(row["step"]), int(float(row["epoch"]))
                if row.get("train_loss"):
                    train[step] = (epoch, float(row["train_loss"]))
                if row.get("val_loss"):
                    val[epoch] = (step, float(row["val_loss"]))
    steps = sorted(train)
    epochs = sorted({e for e, _ in train.values()} | set(val))
    per_epoch = {e: [loss for s, (ep, loss) in sorted(train.items()) if ep == e] for e in epochs}
    return {
        # Lightning logs the loss of optimizer step k at step k-1; +1 counts steps from 1.
        "step": [s + 1 for s in steps],
        "train_loss": [train[s][1] for s in steps],
        "epoch": epochs,
        "epoch_step": [
            max((s + 1 for s, (ep, _) in train.items() if ep == e), default=0) for e in epochs
        ],
        "epoch_train_loss": [
            sum(per_epoch[e]) / len(per_epoch[e]) if per_epoch[e] else None for e in epochs
        ],
        "val_loss": [val[e][1] if e in val else None for e in epochs],
    }


def load_model(
    root: str | os.PathLike, version: str, table: str | None = RASTER_TABLE
) -> tuple[S2VecMAE, ModelCard]:
    """The trained model (eval mode, on CPU: ``embed`` moves it to its device) and its card.

    With ``table`` (default ``raster_tiles``), refuse a model that does not fit that table's
    contract (taxonomy version, channels, side) when the table exists.
    """
    final = storage.join(models_dir(root), version)
    card_file = storage.join(final, "model_card.json")
    if not _VERSION_RE.match(version) or not storage.is_file(card_file):
        available = list_models(root)
        hint = f"available: {', '.join(available)}" if available else "none trained yet"
        partial = storage.local_cache(root, MODELS_DIR, f".{version}.partial").exists()
        raise ModelNotFoundError(
            f"no finished model {version!r} under {models_dir(root)} ({hint})"
            + (
                "; a partial training of it exists: rerun s2vec materialize --stages train "
                "to resume it"
                if partial
                else ". Train one first: s2vec materialize --stages train"
            )
        )
    card = ModelCard.load(final)
    if table is not None:
        contract = delta_store.table_contract(root, table)
        if contract is not None:
            check_compatible(card, contract, table)
    with storage.local_copy(storage.join(final, "model.ckpt")) as checkpoint:
        model = S2VecMAE.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    model.eval()
    return model, card


# --- loss curve (Pillow only) -------------------------------------------------------------


FEW_VAL_IMAGES = 5


def loss_curve_caption(n_train: int | None, n_val: int | None) -> tuple[str, str | None]:
    """(set sizes line, warning or None) written on the loss curve."""
    if n_train is None or n_val is None:
        return "", None
    plural = lambda n: "image" if n == 1 else "images"  # noqa: E731
    sizes = (
        f"training set: {n_train:,} {plural(n_train)}; validation set: {n_val:,} {plural(n_val)}"
    )
    if n_val == 0:
        return sizes, "no validation images: no validation loss"
    if n_val < FEW_VAL_IMAGES:
        return sizes, (
            f"validation loss from only {n_val} {plural(n_val)}: noisy, "
            "not a measure of generalization"
        )
    return sizes, None


def draw_loss_curve(
    history: dict[str, list],
    path: str | os.PathLike,
    title: str = "",
    size: tuple[int, int] = (800, 480),
    n_train: int | None = None,
    n_val: int | None = None,
) -> None:
    """Train loss per step (blue line) and val loss per epoch (orange dots) as a PNG, titled
    with the training and validation set sizes (and a warning when validation is tiny)."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 20, 64, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    steps, train = history.get("step", []), history.get("train_loss", [])
    val = [
        (s, v)
        for s, v in zip(history.get("epoch_step", []), history.get("val_loss", []), strict=False)
        if v is not None
    ]
    sizes, warning = loss_curve_caption(n_train, n_val)
    d.text((left, 8), title or "loss", fill="black")
    d.text((left, 24), sizes, fill="black")
    if warning:
        d.text((left, 40), warning, fill=(200, 0, 0))
    ys = [v for v in train if math.isfinite(v)] + [v for _, v in val if math.isfinite(v)]
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
    val_label = "val (per epoch)" if n_val is None else f"val (per epoch, {n_val} img)"
    d.text((w - right - 300, top + 6), f"line: train (per step)  dots: {val_label}", fill="black")
    img.save(path)
