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
import math
import os
import platform
import shutil
import signal
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger

from s2vec_pipeline.errors import MissingInputError
from s2vec_pipeline.model.callbacks import EpochProgress, TrainingClock, progress
from s2vec_pipeline.model.checkpoint import AtomicCheckpoint, set_aside_if_torn
from s2vec_pipeline.model.config import TrainConfig
from s2vec_pipeline.model.data import (
    RASTER_TABLE,
    raster_partition_keys,
    raster_partition_versions,
    raster_snapshot,
)
from s2vec_pipeline.model.datamodule import EpochSetter, RasterTileDataModule
from s2vec_pipeline.model.loss_curve import draw_loss_curve, read_loss_history
from s2vec_pipeline.model.mae import S2VecMAE
from s2vec_pipeline.model.quiet import (
    QuietWorkers,
    known_warnings,
    quiet_lightning,
    silence_lightning_tips,
)
from s2vec_pipeline.model.registry import (
    CARD_FILE,
    MODEL_CODE_VERSION,
    MODELS_DIR,
    ModelCard,
    models_dir,
)
from s2vec_pipeline.storage import delta_store, fs
from s2vec_pipeline.storage.locks import LockHeldError, exclusive
from s2vec_pipeline.storage.versioning import config_hash

LOGS_DIR = "logs"

silence_lightning_tips()  # for every Trainer of this process


# --- the model version -------------------------------------------------------------------


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


# --- training ----------------------------------------------------------------------------


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
    config.check_raster(contract)  # before any directory is made
    world_size = config.world_size()
    partition_versions = raster_partition_versions(root, partitions, snapshot)
    version = model_version(config, contract, partition_versions, world_size)
    final = fs.join(models_dir(root), version)
    if fs.is_file(fs.join(final, CARD_FILE)):
        return ModelCard.load(final)

    # Only this process takes the lock: DDP workers are spawned by it and never get here.
    with _version_lock(root, version):
        if fs.is_file(fs.join(final, CARD_FILE)):  # finished meanwhile
            return ModelCard.load(final)
        return _train(
            root, partitions, snapshot, config, contract, partition_versions, version, callbacks
        )


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
            progress.info("model %s is being trained by another process: waiting for it", version)
            held.enter_context(exclusive(path))
        yield


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
    """Fit in the version's work folder (resuming from its ``last.ckpt``), then finish."""
    # Training works in a local folder (Lightning writes checkpoints and logs there): under the
    # root for a local root, else under the root's local cache (fs.local_cache).
    work = fs.local_cache(root, MODELS_DIR, f".{version}.partial")
    resume = work / "last.ckpt"
    set_aside_if_torn(resume)
    if not resume.is_file():
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    L.seed_everything(config.seed, workers=True, verbose=False)
    dm = RasterTileDataModule(
        root, config, partitions, version=snapshot, partition_versions=partition_versions
    )
    dm.setup("fit")
    model = build_model(config, dm.channels, dm.side)
    model.set_normalization(*input_normalization(dm.channel_mean, dm.channel_std, config))
    trainer = _trainer(config, work, dm, callbacks)
    _fit(trainer, model, dm, resume)
    # With ddp_spawn the workers trained; this (calling) process finishes from their files.
    card = _card(
        work,
        version,
        snapshot,
        config,
        contract,
        partition_versions,
        dm,
        _hardware(trainer),
        trainer.world_size,
    )
    return _publish(card, work, fs.join(models_dir(root), version))


def build_model(config: TrainConfig, channels: Sequence[str], side: int) -> S2VecMAE:
    """A fresh MAE of ``config``'s size and training options for tiles of ``channels`` ×
    ``side`` × ``side``."""
    return S2VecMAE(
        in_chans=len(channels),
        img_size=side,
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
        channels=list(channels),
        augment=config.augment,
        empty_pixel_weight=config.empty_pixel_weight,
        held_out_channels=[list(channels).index(c) for c in config.held_out_channels],
    )


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


def _trainer(
    config: TrainConfig, work: Path, dm: RasterTileDataModule, callbacks: Sequence[L.Callback]
) -> L.Trainer:
    """The Trainer: ``last.ckpt`` at each epoch end, a CSV log per attempt, quiet."""
    world = config.world_size()
    steps_per_epoch = math.ceil((dm.n_train // world if world > 1 else dm.n_train) / dm.batch_size)
    # last.ckpt at each epoch end, written atomically (AtomicCheckpoint). Not
    # ``save_last=True``: since Lightning 2.6 that writes last.ckpt only as a second copy of a
    # top-k file.
    last = AtomicCheckpoint(
        dirpath=work,
        filename="last",
        save_top_k=1,  # with no monitored metric: the latest epoch, replacing the previous
        every_n_epochs=1,
        # After the epoch's validation and after TrainingClock (checkpoint callbacks run
        # last), so last.ckpt holds the whole epoch.
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    with quiet_lightning():
        return L.Trainer(
            **_trainer_kwargs(config),
            max_epochs=config.epochs,
            max_steps=config.max_steps if config.max_steps is not None else -1,
            callbacks=[
                QuietWorkers(),
                TrainingClock(),
                EpochSetter(),
                EpochProgress(),
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


def _fit(trainer: L.Trainer, model: S2VecMAE, dm: RasterTileDataModule, resume: Path) -> None:
    """``trainer.fit``, from ``resume`` when it exists; Ctrl-C comes out as KeyboardInterrupt."""
    with known_warnings(), quiet_lightning():
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=str(resume) if resume.is_file() else None)
        except SystemExit:
            # Lightning answers Ctrl-C with sys.exit(1) and leaves SIGINT ignored: restore
            # both, so the caller sees the interruption (exit 130, one line)
            if not trainer.interrupted:
                raise
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None


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


def _card(
    work: Path,
    version: str,
    snapshot: int,
    config: TrainConfig,
    contract: dict[str, Any],
    partition_versions: dict[str, str],
    dm: RasterTileDataModule,
    hardware: dict[str, Any],
    world_size: int,
) -> ModelCard:
    """``model.ckpt`` (the weights of ``last.ckpt``) and the card, from the work folder."""
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
    clock = TrainingClock.saved_state(state)
    history = read_loss_history(work / LOGS_DIR)
    mean, std = input_normalization(dm.channel_mean, dm.channel_std, config)
    return ModelCard(
        model_version=version,
        config=config.as_dict(),
        profile=contract.get("profile"),
        image_level=contract.get("image_level"),
        pixel_level=contract.get("pixel_level"),
        side=int(contract["side"]),
        taxonomy_version=contract["taxonomy_version"],
        channels=list(contract["channels"]),
        partitions=dict(sorted(partition_versions.items())),
        normalization={"mean": mean.tolist(), "std": std.tolist()},
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
        # last.ckpt is saved in on_train_epoch_end, before Lightning counts the epoch as
        # completed: its 0-based "epoch" is the last epoch trained (one cut short by max_steps
        # included).
        epochs_completed=int(state["epoch"]) + 1,
        steps=int(state["global_step"]),
        resumed_from=clock["resumed_from"],
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        raster_tiles_version=snapshot,
        world_size=world_size,
    )


def _publish(card: ModelCard, work: Path, final: str) -> ModelCard:
    """Card and loss curve into ``work``, then ``work`` into place as ``final``: the model
    appears finished (its card present) only once every file is there."""
    card.save(work)
    draw_loss_curve(
        card.loss_history,
        work / "loss_curve.png",
        title=f"S2Vec MAE {card.model_version}",
        n_train=card.n_train,
        n_val=card.n_val,
    )
    card.directory = str(final)
    if not fs.is_object_store(final):
        os.replace(work, final)  # atomic: the finished directory appears complete or not at all
        return card
    # On an object store the card is uploaded last: a model without its card is not finished
    # (list_models, load_model), so a half-uploaded model never looks finished.
    files = sorted(p for p in work.rglob("*") if p.is_file() and p.name != CARD_FILE)
    for path in [*files, work / CARD_FILE]:
        fs.upload_file(path, fs.join(final, path.relative_to(work).as_posix()))
    shutil.rmtree(work, ignore_errors=True)
    return card
