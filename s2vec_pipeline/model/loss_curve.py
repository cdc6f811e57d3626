"""The losses of a training: read from Lightning's CSV logs and drawn as ``loss_curve.png``.

``read_loss_history`` merges the ``metrics.csv`` of every attempt (a resume adds one);
``draw_loss_curve`` plots the train loss per step and the validation loss per epoch with
matplotlib (Agg: no display needed), titled with the set sizes and a warning when the
validation set is too small to mean much.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path


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
    """Train loss per step (blue line) and val loss per epoch (orange dots) as a PNG of
    ``size`` pixels, titled with the training and validation set sizes (and a warning when
    validation is tiny)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot()
    steps, train = history.get("step", []), history.get("train_loss", [])
    val = [
        (s, v)
        for s, v in zip(history.get("epoch_step", []), history.get("val_loss", []), strict=False)
        if v is not None and math.isfinite(v)
    ]
    sizes, warning = loss_curve_caption(n_train, n_val)
    fig.suptitle(title or "loss", x=0.02, ha="left", fontsize=11)
    ax.set_title(sizes, loc="left", fontsize=9)
    if warning:
        fig.text(0.98, 0.955, warning, ha="right", va="top", fontsize=9, color="#c80000")
    points = [(s, v) for s, v in zip(steps, train, strict=False) if math.isfinite(v)]
    if not points and not val:
        ax.text(0.5, 0.5, "no losses recorded", ha="center", va="center", transform=ax.transAxes)
    if points:
        ax.plot(
            *zip(*points, strict=True), color="#1f77b4", linewidth=1.5, label="train (per step)"
        )
    if val:
        label = "val (per epoch)" if n_val is None else f"val (per epoch, {n_val} img)"
        ax.plot(*zip(*val, strict=True), "o", color="#ff7f0e", markersize=6, label=label)
        ax.legend(loc="upper right", fontsize=9)
    elif points:
        ax.legend(loc="upper right", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.84, bottom=0.12)
    fig.savefig(path, dpi=dpi, format="png")
