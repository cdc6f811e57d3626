"""Lightning callbacks every training adds: a progress line per epoch (``EpochProgress``) and
the images seen and seconds trained, kept across resumes (``TrainingClock``)."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

#: Same name as ``runner.PROGRESS_LOGGER``: the CLI prints it, a library caller sees nothing.
progress = logging.getLogger("s2vec_pipeline.progress")


class EpochProgress(L.Callback):
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
        progress.info(
            "epoch %d/%d  loss %.4f%s  (%.1f s)",
            # 0-based, and counted as completed only after this hook
            trainer.current_epoch + 1,
            trainer.max_epochs,
            float(self._sum) / max(self._n, 1),
            f"  val_loss {float(val):.4f}" if val is not None else "",
            time.perf_counter() - self._t0,
            extra={"transient": True},
        )


class TrainingClock(L.Callback):
    """Images seen and training seconds, kept in ``last.ckpt`` so a resumed run adds up.

    At each epoch end it also flushes the CSV logger, so ``metrics.csv`` holds every step up
    to the checkpoint that ``ModelCheckpoint`` writes right after (it runs last).
    """

    #: What a checkpoint without this callback's state (none trained) reads as.
    EMPTY: dict[str, Any] = {"images_seen": 0, "duration_s": 0.0, "resumed_from": None}

    def __init__(self) -> None:
        self.state: dict[str, Any] = dict(self.EMPTY)
        self._t0 = time.perf_counter()

    @classmethod
    def saved_state(cls, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """This callback's state in a loaded Lightning ``checkpoint``."""
        return next(
            (v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith(cls.__name__)),
            dict(cls.EMPTY),
        )

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
