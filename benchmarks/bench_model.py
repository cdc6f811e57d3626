"""CPU throughput of the model layer: training images/s and inference cells/s.

Rows: the bare training step and ``encode`` (``gpu_train.run`` / ``run_encode``) for the
paper-size model (C=100, 16×16, 5.2 M parameters) and the tiny test model; then the whole
path through ``train_model`` (Lightning + the tile cache) and ``embed_partition``
(Delta read, encode, cell ids, Arrow columns) on a synthetic ``raster_tiles`` table.

    python benchmarks/bench_model.py [--steps 6] [--images 64] [--channels 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_train import run, run_encode, synthetic_pool  # noqa: E402

from s2vec_pipeline.model.config import TrainConfig  # noqa: E402
from s2vec_pipeline.model.embed import embed_partition  # noqa: E402
from s2vec_pipeline.model.registry import load_model  # noqa: E402
from s2vec_pipeline.model.synthetic import synthetic_raster_tiles  # noqa: E402
from s2vec_pipeline.model.train import build_model, train_model  # noqa: E402

PAPER = {}  # TrainConfig's defaults: the paper's model
TINY = {
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 4,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=100)
    ap.add_argument("--images", type=int, default=64, help="images in the synthetic table")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    rows = []

    for name, hp, channels in (("paper", PAPER, args.channels), ("tiny (tests)", TINY, 8)):
        pool = synthetic_pool(512, channels, 16, cpu)
        names = [f"ch{c:03d}" for c in range(channels)]
        model = build_model(TrainConfig(**hp), names, 16)
        r = run(model, pool, args.steps, 1, args.batch_size, bf16=False)
        e = run_encode(model, pool, args.batch_size, bf16=False)
        rows.append((f"{name}, C={channels}: bare train step", f"{r['images_per_s']:,.1f}", "—"))
        rows.append((f"{name}, C={channels}: bare encode", "—", f"{e['cells_per_s']:,.0f}"))

    with tempfile.TemporaryDirectory() as root:
        synthetic_raster_tiles(root, {"4693": args.images}, channels=args.channels)
        for name, hp, epochs in (("paper", PAPER, 1), ("tiny (tests)", TINY, 3)):
            cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, **hp)
            card = train_model(root, config=cfg)
            rows.append(
                (
                    f"{name}, C={args.channels}: train_model ({card.images_seen} images, "
                    "Lightning + tile cache)",
                    f"{card.images_per_s:,.1f}",
                    "—",
                )
            )
            model, card = load_model(root, card.model_version)
            t0 = time.perf_counter()
            cells, _ = embed_partition(root, model, card, "4693")
            dt = time.perf_counter() - t0
            rows.append(
                (
                    f"{name}, C={args.channels}: embed_partition ({cells.num_rows:,} cells)",
                    "—",
                    f"{cells.num_rows / dt:,.0f}",
                )
            )

    print(
        f"\nCPU: {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, "
        f"batch {args.batch_size}, 16×16 tiles\n"
    )
    print("| what | train images/s | inference cells/s |")
    print("|---|---:|---:|")
    for what, train, infer in rows:
        print(f"| {what} | {train} | {infer} |")


if __name__ == "__main__":
    main()
