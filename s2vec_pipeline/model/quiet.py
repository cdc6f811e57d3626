"""Lightning's chatter off during a training: its INFO lines and advertising tips, and the
warnings about its own internals; warnings and errors about our inputs still show.

Progress is ``callbacks.EpochProgress``'s line per epoch instead. ``quiet_lightning`` and
``known_warnings`` act in the calling process for the duration of a fit; ``QuietWorkers``
does the same in spawned DDP workers (fresh interpreters).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import lightning as L

#: Lightning's INFO lines ("GPU available: False, used: False", "TPU available", "`Trainer(
#: limit_val_batches=1.0)` was configured...", "Loading `train_dataloader`...", "`Trainer.fit`
#: stopped...") come through these loggers' children (``rank_zero_info``).
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... litlogger / litmodels"), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def silence_lightning_tips() -> None:
    """Lightning logs the tips through these loggers at INFO on every Trainer; the other INFO
    lines ("GPU available ...") stay unless ``quiet_lightning`` is on."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())


def _lightning_info_off() -> None:
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's INFO lines off while a Trainer is built and fits, in this process."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    _lightning_info_off()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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
def known_warnings() -> Iterator[None]:
    """``_filter_known_warnings`` for the duration of a fit, in the calling process."""
    with warnings.catch_warnings():
        _filter_known_warnings()
        yield


class QuietWorkers(L.Callback):
    """The same filters and log levels in spawned DDP workers (fresh interpreters)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # In the calling process this runs inside ``known_warnings``, which undoes it.
        _filter_known_warnings()
        _lightning_info_off()
