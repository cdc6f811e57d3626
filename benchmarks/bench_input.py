"""Host side of the model layer, model compute excluded: images/s of the training input path
and cells/s of the inference host path, on one core.

1. Input path: ``RasterTileDataModule`` on synthetic ``raster_tiles`` tables (default
   122×16×16, the bundled taxonomy's channel count) at the measured density of real tiles
   (~2 % of values nonzero) and dense (the generator's default, ~80 %): the one-time decode
   into the sparse tile cache (``setup``), then whole epochs of training batches gathered by
   index (``num_workers=0``: the calling process only), images/s: the sparse gather alone
   (the host's work when training on a GPU, where batches are densified) and gather +
   densify on the CPU (a CPU run's work).
2. Inference host path: ``embed_partition`` (Delta read of one snapshot, tensor decoding,
   batching, cell ids and tokens, Arrow rows) and ``write_embeddings`` (plus both Delta
   commits) with a model whose ``encode`` returns a precomputed tensor (no compute), cells/s.

    python benchmarks/bench_input.py [--images 4000] [--channels 122] [--batch-size 256]
                                     [--inference-only] [--small-partitions 40]

3. ``write_embeddings`` of small partitions (16 images: a level-6 partition of the paper
   profile, level-8 images, holds at most 16), two partitions a call, after as many calls as
   ``--small-partitions`` (the tables' logs grow as in production): the fixed cost per
   partition (table loads, commits) rather than the rows.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2vec_pipeline.model.config import TrainConfig  # noqa: E402
from s2vec_pipeline.model.datamodule import RasterTileDataModule  # noqa: E402
from s2vec_pipeline.model.embed import embed_partition, write_embeddings  # noqa: E402
from s2vec_pipeline.model.mae import S2VecMAE  # noqa: E402
from s2vec_pipeline.model.registry import ModelCard  # noqa: E402
from s2vec_pipeline.model.synthetic import synthetic_raster_tiles  # noqa: E402


class NoComputeMAE(S2VecMAE):
    """``encode`` returns a slice of one precomputed (B, S*S, D) tensor: no model compute."""

    def __init__(self, in_chans: int, dim: int, max_batch: int) -> None:
        super().__init__(in_chans, embed_dim=dim, depth=1, num_heads=4, decoder_depth=1)
        self._out = torch.randn(max_batch, self.num_patches, dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._out[: x.shape[0]]


def card_for(contract: dict, dim: int) -> ModelCard:
    return ModelCard.untrained(contract, {"embed_dim": dim})


def best_of(reps: int, fn) -> tuple[float, float]:  # noqa: ANN001
    """(wall, CPU) seconds of the fastest of ``reps`` runs of ``fn``. CPU seconds are this
    process's, all threads: throughput per CPU-second is the per-core figure, and it holds on
    a machine shared with other load, where wall time does not."""
    best = (math.inf, math.inf)
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


def rate(n: int, seconds: tuple[float, float], unit: str) -> tuple[str, str]:
    return f"{n / seconds[0]:,.0f} {unit}", f"{n / seconds[1]:,.0f} {unit}"


#: The input path's tables: the measured density of real tiles (Helsinki + Monaco, city
#: profile: 29 % of pixels hold a feature, 1.97 % of all values are nonzero) and the
#: generator's default (~80 % nonzero), the worst case for a sparse cache.
DENSITIES = {
    "real-density": {"empty_fraction": 0.71, "value_fraction": 0.068},
    "dense": {},
}


def _input_rows(root: str, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The training input path per table density and tile dtype: the one-time decode, then
    whole epochs of sparse batches, alone and densified on the CPU."""
    rows = []
    for name, density in DENSITIES.items():
        table = Path(root) / name
        synthetic_raster_tiles(
            table, {"4693": args.images}, channels=args.channels, side=16, **density
        )
        for dtype in args.tile_dtype or ["float32", "float16"]:
            config = TrainConfig(batch_size=args.batch_size, pin_memory=False, tile_dtype=dtype)
            dm = RasterTileDataModule(table, config)
            t0, c0 = time.perf_counter(), time.process_time()
            dm.setup()
            decode = (time.perf_counter() - t0, time.process_time() - c0)
            cache = dm.cache
            cached = sum(
                (cache.directory / f).stat().st_size for f in ("positions.bin", "values.bin")
            )
            what = f"input, {cache.nnz / (cache.n * cache.image_size):.1%} nonzero, {dtype}"
            rows.append(
                (
                    f"{what}: one-time decode into the tile cache + split + stats "
                    f"({cache.n:,} tiles, {cached / cache.n / 1000:.1f} kB each cached)",
                    *rate(cache.n, decode, "images/s"),
                )
            )
            loader = dm.train_dataloader()
            for step, densify in (("sparse gather", False), ("gather + densify", True)):
                epoch = [0]

                def one_epoch(dm=dm, loader=loader, epoch=epoch, densify=densify) -> None:  # noqa: ANN001
                    dm.set_epoch(epoch[0])
                    epoch[0] += 1
                    for batch in loader:
                        if densify:
                            dm.dense_batch(batch)

                dt = best_of(args.reps, one_epoch)
                rows.append(
                    (
                        f"{what}: training batches by index, {step} ({dm.n_train:,} tiles "
                        f"an epoch, batch {args.batch_size})",
                        *rate(dm.n_train, dt, "images/s"),
                    )
                )
    return rows


def _small_partition_rows(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """``write_embeddings`` of two 16-image partitions a call, timed over the last 10 calls of
    ``args.small_partitions``."""
    with tempfile.TemporaryDirectory() as root:
        contract = synthetic_raster_tiles(
            root, {"4693": 16, "12cd": 16}, channels=args.channels, side=16
        )
        model = NoComputeMAE(args.channels, args.dim, args.batch_size).eval()
        card = card_for(contract, args.dim)
        timed = 10

        def write() -> None:
            write_embeddings(root, model, card, ["4693", "12cd"], args.batch_size, device="cpu")

        for _ in range(max(0, args.small_partitions - timed)):
            write()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(timed):
            write()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    cells = 2 * timed * 16 * 256
    return [
        (
            f"inference host path: write_embeddings, 16-image partitions ("
            f"{1000 * cpu / (2 * timed):.0f} CPU-ms a partition, tables after "
            f"{args.small_partitions} calls)",
            *rate(cells, (wall, cpu), "cells/s"),
        )
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--channels", type=int, default=122)
    ap.add_argument("--batch-size", type=int, default=256, help="training and inference batch")
    ap.add_argument("--dim", type=int, default=256, help="embedding width written")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--tile-dtype",
        action="append",
        choices=("float32", "float16"),
        help="tile cache dtype(s) of the input rows (repeatable; default float32 and float16)",
    )
    ap.add_argument(
        "--inference-only", action="store_true", help="only the inference host path's rows"
    )
    ap.add_argument(
        "--small-partitions",
        type=int,
        default=40,
        help="write_embeddings calls of two 16-image partitions (the last 10 timed; 0: none)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        contract = synthetic_raster_tiles(
            root, {"4693": args.images}, channels=args.channels, side=16
        )
        if not args.inference_only:
            rows += _input_rows(root, args)
        model = NoComputeMAE(args.channels, args.dim, args.batch_size).eval()
        card = card_for(contract, args.dim)
        cells = args.images * 256
        dt = best_of(
            args.reps,
            lambda: embed_partition(root, model, card, "4693", args.batch_size, device="cpu"),
        )
        rows.append(
            (
                f"inference host path: embed_partition ({cells:,} cells, D={args.dim})",
                *rate(cells, dt, "cells/s"),
            )
        )
        dt = best_of(
            args.reps,
            lambda: write_embeddings(root, model, card, ["4693"], args.batch_size, device="cpu"),
        )
        rows.append(
            (
                "inference host path: write_embeddings (+ both Delta commits)",
                *rate(cells, dt, "cells/s"),
            )
        )
    if args.small_partitions:
        rows += _small_partition_rows(args)
    cpu = platform.processor() or platform.machine()
    print(
        f"\n{cpu}, 1 torch thread, load {os.getloadavg()[0]:.2f}; {args.images:,} synthetic "
        f"{args.channels}x16x16 tiles; best of {args.reps}\n"
    )
    print("| what | per wall second | per CPU-second (one core) |")
    print("|---|---:|---:|")
    for what, wall, cpu_rate in rows:
        print(f"| {what} | {wall} | {cpu_rate} |")


if __name__ == "__main__":
    main()
