"""Masked-reconstruction quality on held-out images vs the neighbour-mean and channel-mean
predictors. Oracles: the model card's recorded split sizes, the MAE's own loss on the same
masks, and direct numpy computations of the masks and of both baselines."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from s2vec_pipeline.analysis.reconstruction import (
    NoHeldOutImagesError,
    held_out_images,
    neighbour_mean,
    reconstruction_quality,
)
from s2vec_pipeline.cells.raster import tensor_array
from s2vec_pipeline.model.config import TrainConfig
from s2vec_pipeline.model.registry import list_models, load_model
from s2vec_pipeline.model.train import train_model
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6, TINY_MODEL


def test_scores_against_direct_computations(embedded_root: Path) -> None:
    (version,) = list_models(embedded_root)
    model, card = load_model(embedded_root, version)
    report = reconstruction_quality(embedded_root, seed=5)
    held = held_out_images(embedded_root, card)
    assert sum(len(v) for v in held.values()) == card.n_val == report.n_images
    tokens = sorted(t for v in held.values() for t in v)
    tiles = (
        delta_store.read_partitions(embedded_root, "raster_tiles")
        .filter(pl.col("image_token").is_in(tokens))
        .sort("image_token")
    )
    x = tensor_array(tiles, len(card.channels), 16)
    # the same noise as the report draws; MAE keeps the (1 - ratio) lowest-noise tokens
    noise = torch.rand(len(x), 256, generator=torch.Generator().manual_seed(5))
    order = np.argsort(noise.numpy(), axis=1)
    masked = np.ones((len(x), 256), bool)
    np.put_along_axis(masked, order[:, : int(256 * (1 - 0.75))], False, axis=1)
    masked = masked.reshape(-1, 16, 16)
    mean = np.array(card.normalization["mean"])[None, :, None, None]
    std = np.array(card.normalization["std"])
    std = np.where(std > 1e-6, std, 1.0)[None, :, None, None]
    target = (x - mean) / std
    sq = (target**2).mean(axis=1)
    assert report.mse["channel_mean"] == pytest.approx(sq[masked].mean(), rel=1e-5)
    assert report.n_masked_pixels == masked.sum()
    # neighbour mean, pixel by pixel
    nb = np.zeros_like(target)
    for b, r, c in zip(*np.nonzero(masked), strict=True):
        vals = [
            target[b, :, rr, cc]
            for rr in range(r - 1, r + 2)
            for cc in range(c - 1, c + 2)
            if (rr, cc) != (r, c) and 0 <= rr < 16 and 0 <= cc < 16 and not masked[b, rr, cc]
        ]
        nb[b, :, r, c] = np.mean(vals, axis=0) if vals else 0.0
    nb_err = ((nb - target) ** 2).mean(axis=1)[masked].mean()
    assert report.mse["neighbour_mean"] == pytest.approx(nb_err, rel=1e-5)
    # the model's own masked loss on the same images and masks
    with torch.inference_mode():
        loss, _, _ = model(torch.from_numpy(np.array(x)), noise=noise)
    assert report.mse["model"] == pytest.approx(float(loss), rel=1e-4)
    assert "| neighbour_mean |" in report.to_markdown()


@pytest.mark.slow
def test_untrained_partition_is_held_out_whole(embedded_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(embedded_root, root)
    card = train_model(root, [HELSINKI_L6], TrainConfig(**TINY_MODEL))
    held = held_out_images(root, card)
    monaco = delta_store.read_partitions(root, "raster_tiles", [MONACO_L6])
    assert sorted(held[MONACO_L6]) == sorted(monaco["image_token"].to_list())
    assert len(held.get(HELSINKI_L6, [])) == card.n_val
    report = reconstruction_quality(root, card.model_version, partitions=[MONACO_L6])
    assert report.held_out == {MONACO_L6: monaco.height} and report.n_images == monaco.height


@pytest.mark.slow
def test_no_held_out_images(embedded_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(embedded_root, root)
    card = train_model(root, [MONACO_L6], TrainConfig(**{**TINY_MODEL, "val_fraction": 0.0}))
    with pytest.raises(NoHeldOutImagesError, match="trained on every image"):
        reconstruction_quality(root, card.model_version, partitions=[MONACO_L6])


def test_neighbour_mean_ignores_masked_pixels() -> None:
    x = np.arange(2 * 1 * 3 * 3, dtype=np.float64).reshape(2, 1, 3, 3)
    visible = np.ones((2, 3, 3), bool)
    visible[0, 0, 0] = False
    out = neighbour_mean(x, visible)
    # centre of image 0: neighbours 1..8 except the hidden 0 -> mean of 1,2,3,5,6,7,8
    assert out[0, 0, 1, 1] == pytest.approx(np.mean([1, 2, 3, 5, 6, 7, 8]))
    assert out[1, 0, 0, 0] == pytest.approx(np.mean([10, 12, 13]))
