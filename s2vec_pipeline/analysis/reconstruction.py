"""Quality without outside labels: masked reconstruction on held-out images vs simple predictors.

``reconstruction_quality(root)`` masks the pixels of images the model never trained on (the
validation split of its training partitions, and every image of other partitions) exactly as
in training (random ``mask_ratio`` of the tokens, seeded), and compares the mean squared error
over the masked pixels, in the model's normalized units (per-channel mean 0, std 1 of the
training split's log1p values), of three predictors:

* ``model``: the MAE's reconstruction;
* ``neighbour_mean``: the mean of the pixel's visible (unmasked) 8 neighbours, channel by
  channel (the channel mean when no neighbour is visible);
* ``channel_mean``: the training split's channel mean (0 in normalized units).

``skill`` = 1 − MSE(model) / MSE(predictor): above 0 where the model beats it. Also given over
the masked pixels that hold data only (most pixels of a city image are empty, which the
neighbour mean predicts well).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from s2vec_pipeline.errors import MissingInputError, S2VecError
from s2vec_pipeline.storage import delta_store

PREDICTORS = ("model", "neighbour_mean", "channel_mean")


class NoHeldOutImagesError(S2VecError):
    """Every image under the root was used to train the model: nothing to score it on."""


@dataclass
class ReconstructionReport:
    model_version: str
    mask_ratio: float
    seed: int
    n_images: int
    n_masked_pixels: int
    n_masked_nonempty: int
    held_out: dict[str, int]  # partition -> held-out images scored
    mse: dict[str, float]  # predictor -> MSE over masked pixels (normalized units)
    mse_nonempty: dict[str, float]  # the same over masked pixels holding data

    def skill(self, baseline: str, nonempty: bool = False) -> float:
        mse = self.mse_nonempty if nonempty else self.mse
        return 1.0 - mse["model"] / mse[baseline] if mse[baseline] > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skill"] = {
            b: {"all": self.skill(b), "nonempty": self.skill(b, True)} for b in PREDICTORS[1:]
        }
        return d

    def to_markdown(self) -> str:
        lines = [
            f"Masked reconstruction (mask ratio {self.mask_ratio}, seed {self.seed}) on "
            f"{self.n_images} held-out images, {self.n_masked_pixels:,} masked pixels "
            f"({self.n_masked_nonempty:,} with data); MSE in normalized units.",
            "",
            "| predictor | MSE, all masked | MSE, masked with data |",
            "|---|---:|---:|",
        ]
        for p in PREDICTORS:
            lines.append(f"| {p} | {self.mse[p]:.4f} | {self.mse_nonempty[p]:.4f} |")
        lines.append("")
        lines.append(
            "Skill of the model (1 − MSE ratio): "
            + ", ".join(
                f"vs {b} {self.skill(b):+.3f} (with data {self.skill(b, True):+.3f})"
                for b in PREDICTORS[1:]
            )
        )
        return "\n".join(lines)


def neighbour_mean(x: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(B, C, S, S) mean of each pixel's visible 8 neighbours (0 where none is visible).

    ``visible`` is (B, S, S) boolean."""
    b, c, s, _ = x.shape
    vis = visible.astype(x.dtype)
    padded_x = np.zeros((b, c, s + 2, s + 2), x.dtype)
    padded_x[:, :, 1:-1, 1:-1] = x * vis[:, None]
    padded_v = np.zeros((b, s + 2, s + 2), x.dtype)
    padded_v[:, 1:-1, 1:-1] = vis
    total = np.zeros_like(x)
    count = np.zeros((b, s, s), x.dtype)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == 0 and dc == 0:
                continue
            total += padded_x[:, :, 1 + dr : 1 + dr + s, 1 + dc : 1 + dc + s]
            count += padded_v[:, 1 + dr : 1 + dr + s, 1 + dc : 1 + dc + s]
    return np.where(count[:, None] > 0, total / np.maximum(count[:, None], 1), 0.0)


def held_out_images(
    root: str | os.PathLike,
    card,
    partitions: Sequence[str] | None = None,  # noqa: ANN001
) -> dict[str, list[str]]:
    """Image tokens per partition that the model did not train on."""
    import pyarrow.compute as pc

    from s2vec_pipeline.model.data import plan_split, raster_snapshot, stream_raster_tiles

    available = delta_store.partition_keys(root, "raster_tiles")
    parts = sorted(set(partitions or available) & set(available))
    trained = sorted(set(card.partitions) & set(parts))
    rule = None
    if trained:
        # the split the model was trained with: same partitions, same raster_tiles version
        rule, _, _ = plan_split(
            root,
            sorted(card.partitions),
            card.config["val_fraction"],
            getattr(card, "raster_tiles_version", None),
        )
    out: dict[str, list[str]] = {}
    columns = ["parent_l6", "image_token", "nonempty_pixels"]
    for batch in stream_raster_tiles(root, parts, raster_snapshot(root), columns):
        keep = pc.greater(batch.column("nonempty_pixels"), 0)
        tokens = np.asarray(pc.filter(batch.column("image_token"), keep).to_pylist(), dtype=object)
        parents = np.asarray(pc.filter(batch.column("parent_l6"), keep).to_pylist(), dtype=object)
        if len(tokens) == 0:
            continue
        was_trained = np.isin(parents, trained)
        held = ~was_trained
        if rule is not None and was_trained.any():
            held |= was_trained & rule.is_val(tokens.tolist())
        for p, t in zip(parents[held], tokens[held], strict=True):
            out.setdefault(str(p), []).append(str(t))
    return out


def reconstruction_quality(
    root: str | os.PathLike,
    model_version: str | None = None,
    partitions: Sequence[str] | None = None,
    mask_ratio: float | None = None,
    seed: int = 0,
    max_images: int = 4096,
    batch_size: int = 64,
) -> ReconstructionReport:
    """Score the model's masked reconstruction against the simple predictors (see module)."""
    import polars as pl
    import torch

    from s2vec_pipeline.cells.raster import tensor_array
    from s2vec_pipeline.model.registry import list_models, load_model

    versions = list_models(root)
    if model_version is None:
        if not versions:
            raise MissingInputError(f"no trained model under {root}: train one first")
        model_version = versions[-1]
    model, card = load_model(root, model_version)
    ratio = float(card.config.get("mask_ratio", 0.75) if mask_ratio is None else mask_ratio)
    held = held_out_images(root, card, partitions)
    tokens = sorted(t for ts in held.values() for t in ts)[:max_images]
    if not tokens:
        raise NoHeldOutImagesError(
            f"model {model_version} trained on every image under {root}: materialize other "
            f"partitions, or train with a validation fraction > 0"
        )
    shape = (len(card.channels), card.side, card.side)
    tiles = (
        delta_store.scan_table(root, "raster_tiles")
        .filter(pl.col("parent_l6").is_in(sorted(held)) & pl.col("image_token").is_in(tokens))
        .select("image_token", "tensor")
        .sort("image_token")
        .collect()
    )
    x_all = tensor_array(tiles, shape[0], shape[1])
    generator = torch.Generator().manual_seed(seed)
    p, grid = model.patch_size, model.grid
    sums = {k: 0.0 for k in PREDICTORS}
    sums_nz = {k: 0.0 for k in PREDICTORS}
    n_masked = n_nonempty = 0
    for lo in range(0, len(x_all), batch_size):
        x = torch.from_numpy(np.array(x_all[lo : lo + batch_size]))  # a writable copy
        noise = torch.rand(x.shape[0], model.num_patches, generator=generator)
        with torch.inference_mode():
            _, pred, mask = model(x, mask_ratio=ratio, noise=noise)
            recon = model.unpatchify(pred).float().numpy()
            target = model.normalize(x).float().numpy()
        masked = mask.numpy().reshape(-1, grid, grid).repeat(p, axis=1).repeat(p, axis=2) > 0
        nonempty = (x.numpy() != 0).any(axis=1)
        guesses = {
            "model": recon,
            "neighbour_mean": neighbour_mean(target, ~masked),
            "channel_mean": np.zeros_like(target),
        }
        for name, guess in guesses.items():
            err = ((guess - target) ** 2).mean(axis=1)  # (B, S, S), mean over channels
            sums[name] += float(err[masked].sum())
            sums_nz[name] += float(err[masked & nonempty].sum())
        n_masked += int(masked.sum())
        n_nonempty += int((masked & nonempty).sum())
    return ReconstructionReport(
        model_version=model_version,
        mask_ratio=ratio,
        seed=seed,
        n_images=len(x_all),
        n_masked_pixels=n_masked,
        n_masked_nonempty=n_nonempty,
        held_out={k: len(v) for k, v in sorted(held.items())},
        mse={k: v / max(n_masked, 1) for k, v in sums.items()},
        mse_nonempty={k: v / max(n_nonempty, 1) for k, v in sums_nz.items()},
    )
