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
import logging
import math
import os
import platform
import shutil
import signal
import time
import warnings
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from s2vec_pipeline.errors import MissingInputError, S2VecError, StorageUnavailableError
from s2vec_pipeline.model.config import TrainConfig
from s2vec_pipeline.model.data import (
    RASTER_TABLE,
    EpochSetter,
    RasterTileDataModule,
    raster_partition_keys,
    raster_partition_versions,
    raster_snapshot,
)
from s2vec_pipeline.model.mae import S2VecMAE
from s2vec_pipeline.model.registry import MODEL_CODE_VERSION, MODELS_DIR, ModelCard, models_dir
from s2vec_pipeline.storage import delta_store, fs
from s2vec_pipeline.storage.locks import LockHeldError, exclusive
from s2vec_pipeline.storage.versioning import config_hash

LOGS_DIR = "logs"


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
            # A device tensor: summed without a host sync; read once at the epoch's end.
            self._sum, self._n = self._sum + loss.detach(), self._n + 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val_loss")
        _progress.info(
            "epoch %d/%d  loss %.4f%s  (%.1f s)",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            float(self._sum) / max(self._n, 1),
            f"  val_loss {float(val):.4f}" if val is not None else "",
            time.perf_counter() - self._t0,
            extra={"transient": True},
        )


def _filter_known_warnings() -> None:
    """Targeted filters for warnings about Lightning's internals, not about our inputs."""
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


@contextlib.contextmanager
def _version_lock(root: str | os.PathLike, version: str) -> Iterator[None]:
    """Hold the lock of one model version; when another process trains it, wait for it (the
    caller then finds the finished model, or resumes from its checkpoint if that one died)."""
    # An OS lock, so a local file: on an object-store root it serializes trainings of one host.
    base = fs.local_cache(root, MODELS_DIR)
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
    config.check_image_side(int(contract["side"]))
    unknown = [c for c in config.held_out_channels if c not in contract["channels"]]
    if unknown:  # before any directory is made
        raise S2VecError(
            f"held_out_channels: {', '.join(unknown)} not among the raster channels "
            f"({', '.join(contract['channels'])})"
        )
    world_size = config.world_size()
    partition_versions = raster_partition_versions(root, partitions, snapshot)
    version = model_version(config, contract, partition_versions, world_size)
    final = fs.join(models_dir(root), version)
    if fs.is_file(fs.join(final, "model_card.json")):
        return ModelCard.load(final)

    # Only this process takes the lock: DDP workers are spawned by it and never get here.
    with _version_lock(root, version):
        if fs.is_file(fs.join(final, "model_card.json")):  # finished meanwhile
            return ModelCard.load(final)
        return _train(
            root, partitions, snapshot, config, contract, partition_versions, version, callbacks
        )


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded (truncated, a damaged member), else
    None. Torch checkpoints are zip archives: the CRC of every member is checked."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return str(e)
    return None if bad is None else f"member {bad} is damaged"


def _set_aside_if_torn(resume: Path) -> None:
    """A damaged ``last.ckpt`` (a disk that filled while it was written by an older version,
    a bad sector) is moved beside the work folder with a warning; training then starts over
    instead of failing on it forever."""
    for leftover in resume.parent.glob(f"{resume.name}.*.tmp"):  # a save that was killed
        leftover.unlink(missing_ok=True)
    if not resume.is_file():
        return
    problem = checkpoint_problem(resume)
    if problem is None:
        return
    aside = resume.parent.with_name(f"{resume.parent.name}.torn-last.ckpt")
    os.replace(resume, aside)
    logging.getLogger("s2vec_pipeline.progress").warning(
        "warning: the training checkpoint %s is damaged (%s): set aside as %s; training starts "
        "over",
        resume,
        problem,
        aside,
    )


class _AtomicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose file is whole or absent: written to a temporary file, flushed
    to disk (fsync), checked, then renamed over the previous one. A full disk keeps the
    previous checkpoint and fails with :class:`StorageUnavailableError` naming the folder."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        temporary = f"{filepath}.{os.getpid()}.tmp"
        try:
            super()._save_checkpoint(trainer, temporary)
            if trainer.is_global_zero:  # only rank 0 writes the file
                with open(temporary, "rb") as f:
                    os.fsync(f.fileno())
                problem = checkpoint_problem(Path(temporary))
                if problem is not None:
                    raise OSError(f"checkpoint {temporary} reads back damaged: {problem}")
                os.replace(temporary, filepath)
                directory = os.open(os.path.dirname(filepath) or ".", os.O_RDONLY)
                try:
                    os.fsync(directory)  # the rename itself survives a power cut
                finally:
                    os.close(directory)
        except Exception as e:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            folder = os.path.dirname(filepath)
            free = shutil.disk_usage(folder).free
            code = delta_store.storage_fault(e)
            if code is not None or "write failed" in str(e) or free < (64 << 20):
                raise StorageUnavailableError(
                    f"cannot write the training checkpoint in {folder}: "
                    f"{os.strerror(code) if code else 'the write failed'} "
                    f"({free / 2**20:.0f} MiB free on that disk). Free space there (or use "
                    f"another --root) and rerun: training resumes from the last whole epoch"
                ) from e
            raise
        self._last_checkpoint_saved = filepath


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
    # root for a local root, else under the root's local cache (fs.local_cache).
    final = fs.join(models_dir(root), version)
    work = fs.local_cache(root, MODELS_DIR, f".{version}.partial")
    resume = work / "last.ckpt"
    _set_aside_if_torn(resume)
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
        read_batch_size=config.read_batch_size,
        num_workers=config.num_workers,
        version=snapshot,
        pin_memory=config.pin_memory if config.pin_memory is not None else config.uses_cuda(),
        partition_versions=partition_versions,
        tiles_on_device=config.tiles_on_device,
        tile_dtype=config.tile_dtype,
    )
    dm.setup("fit")
    world = config.world_size()
    steps_per_epoch = math.ceil((dm.n_train // world if world > 1 else dm.n_train) / dm.batch_size)
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

    # last.ckpt at each epoch end, written atomically (_AtomicCheckpoint). Not
    # ``save_last=True``: since Lightning 2.6 that writes last.ckpt only as a second copy of a
    # top-k file.
    last = _AtomicCheckpoint(
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
            # Each logged step reads the loss back to the host (a device sync).
            log_every_n_steps=config.steps_between_logs(steps_per_epoch),
            # The datamodule shards the training split over ranks itself (IndexBatchSampler)
            # and gives every rank the whole validation split.
            use_distributed_sampler=False,
        )
    with _known_warnings(), _quiet_lightning():
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=str(resume) if resume.is_file() else None)
        except SystemExit:
            # Lightning answers Ctrl-C with sys.exit(1) and leaves SIGINT ignored: restore
            # both, so the caller sees the interruption (exit 130, one line)
            if not trainer.interrupted:
                raise
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
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
    if not fs.is_object_store(final):
        os.replace(work, final)  # atomic: the finished directory appears complete or not at all
        return card
    # On an object store the card is uploaded last: a model without its card is not finished
    # (list_models, load_model), so a half-uploaded model never looks finished.
    files = sorted(p for p in work.rglob("*") if p.is_file() and p.name != "model_card.json")
    for path in [*files, work / "model_card.json"]:
        fs.upload_file(path, fs.join(final, path.relative_to(work).as_posix()))
    shutil.rmtree(work, ignore_errors=True)
    return card


def read_loss_history(logs: Path) -> dict[str, list]:
    """Per-step train loss and per-epoch val loss from the CSV logs of every attempt.

    A later attempt (a resume) overrides the steps it re-ran: after a crash the steps between
    the last checkpoint and the crash were logged twice, with the same values on CPU.
    """
    train: dict[int, tuple[int, float]] = {}
    val: dict[int, tuple[int, float]] = {}
    epoch_mean: dict[int, float] = {}  # the mean over every step (logged steps are sampled)

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
                if row.get("epoch_train_loss"):
                    epoch_mean[epoch] = float(row["epoch_train_loss"])
    steps = sorted(train)
    epochs = sorted({e for e, _ in train.values()} | set(val) | set(epoch_mean))
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
            epoch_mean[e]
            if e in epoch_mean
            else (sum(per_epoch[e]) / len(per_epoch[e]) if per_epoch[e] else None)
            for e in epochs
        ],
        "val_loss": [val[e][1] if e in val else None for e in epochs],
    }


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
