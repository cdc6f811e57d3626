"""Throughput of the S2Vec MAE on one device: training images/s and embedding cells/s.

1. Training: the model's own training step (forward with random 75 % masking, masked MSE,
   AdamW) in a plain loop for a fixed number of steps, on synthetic tiles of the paper's size
   (C=100 channels, 16×16) kept on the device, or on up to ``--max-tiles`` tiles of a root's
   ``raster_tiles``; measured after ``--warmup`` steps. bf16 autocast on CUDA (SDPA picks flash
   attention), fused AdamW, optional ``torch.compile``.
2. Embedding, bare: ``encode`` (no masking) on tiles already on the device.
3. Embedding, the real path (``--pipeline-images N``, default 4096 on a GPU, 64 on the CPU):
   ``model.embed.encode_batches`` from host tiles (pinned memory, asynchronous copies, bf16
   autocast, one batch in flight), then ``embed_partition`` (Delta read of one snapshot, tensor
   decoding, cell ids and Arrow rows) and ``write_embeddings`` (plus both Delta commits), on a
   synthetic ``raster_tiles`` table in a temporary root; and the training input path alone
   (``RasterTileDataModule``: the sparse tile cache decoded once, batches gathered by index,
   moved to the device and densified there, one epoch, images/s). With
   ``--train-model-epochs E`` also ``train_model`` (Lightning, tile cache; on CUDA with
   ``tiles_on_device``: the cache's sparse arrays copied to the GPU once, batches gathered
   there) for E epochs on that table.

Goals on one H100-class GPU at paper size (16×16): training >= 50,000 images/s, inference
>= 5 M cells/s.

    python benchmarks/gpu_train.py                          # CUDA if present, else CPU
    python benchmarks/gpu_train.py --device cpu --steps 5 --batch-size 32
    python benchmarks/gpu_train.py --compile --batch-size 4096
    python benchmarks/gpu_train.py --root /data/s2vec       # real tiles
    python benchmarks/gpu_train.py --device cpu --smoke     # a quick check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2vec_pipeline.model.config import TrainConfig  # noqa: E402
from s2vec_pipeline.model.mae import S2VecMAE  # noqa: E402
from s2vec_pipeline.model.train import build_model  # noqa: E402


def synthetic_pool(n: int, channels: int, side: int, device: torch.device) -> torch.Tensor:
    """n structured tiles (smooth per-channel waves + noise, 20 % empty pixels), on device."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.arange(side).view(1, 1, side, 1).float()
    cols = torch.arange(side).view(1, 1, 1, side).float()
    freq = torch.rand(2, 1, channels, 1, 1, generator=g) * 0.5 + 0.1
    phase = torch.rand(n, 1, 1, 1, generator=g) * 6.28
    scale = torch.rand(1, channels, 1, 1, generator=g) * 2.5 + 0.5
    x = scale * (1.2 + torch.sin(freq[0] * rows + freq[1] * cols + phase))
    x = torch.log1p((x + 0.05 * torch.randn(x.shape, generator=g)).clamp_min(0))
    x = x * (torch.rand(n, 1, side, side, generator=g) > 0.2)
    return x.to(device)


def raster_pool(root: str, max_tiles: int, device: torch.device) -> torch.Tensor:
    """Up to max_tiles tiles of ``<root>/raster_tiles``, on device."""
    from s2vec_pipeline.cells.raster import tensor_array
    from s2vec_pipeline.model.data import RASTER_TABLE
    from s2vec_pipeline.storage import delta_store

    contract = delta_store.table_contract(root, RASTER_TABLE)
    if contract is None:
        sys.exit(f"no raster_tiles table under {root}")
    channels, side = len(contract["channels"]), contract["side"]
    parts, n = [], 0
    for batch in delta_store.iter_batches(root, RASTER_TABLE, columns=["tensor"]):
        parts.append(tensor_array(batch, channels, side))
        n += len(parts[-1])
        if n >= max_tiles:
            break
    return torch.from_numpy(np.concatenate(parts)[:max_tiles].copy()).to(device)


def run(
    model: S2VecMAE,
    pool: torch.Tensor,
    steps: int,
    warmup: int,
    batch_size: int,
    bf16: bool,
    compile_model: bool = False,
) -> dict[str, float]:
    """Train ``steps`` steps; returns images/s (after warm-up), first/last loss, peak memory."""
    device = pool.device
    flat = pool.transpose(0, 1).reshape(pool.shape[1], -1)
    model.set_normalization(flat.mean(1).cpu().numpy(), flat.std(1).cpu().numpy())
    model.to(device).train()
    step_fn = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=model.hparams.lr,
        betas=(0.9, 0.95),
        weight_decay=model.hparams.weight_decay,
        fused=device.type == "cuda",
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device=device).manual_seed(0)
    first = last = float("nan")
    t0 = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        idx = torch.randint(0, pool.shape[0], (batch_size,), device=device, generator=g)
        x = pool.index_select(0, idx)
        with autocast:
            loss, _, _ = step_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            first = loss.item()
    last = loss.item()  # synchronizes
    elapsed = time.perf_counter() - t0
    return {
        "images_per_s": steps * batch_size / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "first_loss": first,
        "last_loss": last,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
    }


def run_encode(model: S2VecMAE, pool: torch.Tensor, batch_size: int, bf16: bool, reps: int = 5):
    """Inference throughput of ``encode`` (no masking): images/s and cells/s."""
    model.eval()
    device = pool.device
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    x = (
        pool[:batch_size]
        if pool.shape[0] >= batch_size
        else pool.repeat(-(-batch_size // pool.shape[0]), 1, 1, 1)[:batch_size]
    )
    with torch.inference_mode(), autocast:
        model.encode(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            z = model.encode(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    n = reps * x.shape[0]
    return {"images_per_s": n / elapsed, "cells_per_s": n * z.shape[1] / elapsed}


def run_pipeline(
    model: S2VecMAE,
    device: torch.device,
    images: int,
    channels: int,
    batch_size: int,
    train_epochs: int,
    train_batch: int,
    hparams: dict,
) -> dict[str, float]:
    """The real embedding path (and optionally train_model) on a synthetic raster table."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from s2vec_pipeline.model.datamodule import RasterTileDataModule
    from s2vec_pipeline.model.embed import embed_partition, encode_batches, write_embeddings
    from s2vec_pipeline.model.registry import ModelCard
    from s2vec_pipeline.model.synthetic import synthetic_raster_tiles
    from s2vec_pipeline.model.train import train_model

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root:
        contract = synthetic_raster_tiles(root, {"4693": images}, channels=channels, side=16)
        # A card for this (untrained) model: what load_model would return for it.
        card = ModelCard.untrained(contract, {})
        model.to(device).eval()
        host = synthetic_pool(images, channels, 16, torch.device("cpu")).numpy()
        tiles = [(i, host[i : i + batch_size]) for i in range(0, images, batch_size)]
        for _ in encode_batches(model, iter(tiles[:1]), device):  # warm-up
            pass
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
        sync(device)
        t0 = time.perf_counter()
        for _ in encode_batches(model, iter(tiles), device):
            pass
        out["host_encode_cells_per_s"] = images * 256 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        cells, _ = embed_partition(root, model, card, "4693", batch_size, device=device)
        out["embed_partition_cells_per_s"] = cells.num_rows / (time.perf_counter() - t0)
        del cells
        t0 = time.perf_counter()
        written = write_embeddings(root, model, card, ["4693"], batch_size, device=device)
        out["write_embeddings_cells_per_s"] = written["4693"]["cells"] / (time.perf_counter() - t0)
        dm = RasterTileDataModule(
            root, TrainConfig(batch_size=train_batch, pin_memory=device.type == "cuda")
        )
        dm.setup()  # the one-time decode into the tile cache
        t0 = time.perf_counter()
        for batch in dm.train_dataloader():  # sparse batches, densified on the device
            dm.dense_batch(move_data_to_device(batch, device))
        sync(device)
        out["input_images_per_s"] = dm.n_train / (time.perf_counter() - t0)
        if train_epochs:
            cfg = TrainConfig(
                epochs=train_epochs,
                batch_size=train_batch,
                devices=1,
                accelerator="gpu" if device.type == "cuda" else "cpu",
                tiles_on_device=device.type == "cuda",
                **hparams,
            )
            trained = train_model(root, config=cfg)
            out["train_model_images_per_s"] = trained.images_per_s
    return out


TRAIN_GOAL, INFER_GOAL = 50_000, 5_000_000
#: TrainConfig fields of the model's size that the command line sets.
MODEL_SIZE = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
)


def _args() -> argparse.Namespace:
    """The command line; ``--smoke`` shrinks everything to a quick check."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None, help="default 2048 GPU, 64 CPU")
    ap.add_argument("--embed-batch-size", type=int, default=None, help="default 1024 GPU, 256 CPU")
    ap.add_argument("--channels", type=int, default=100)
    ap.add_argument("--side", type=int, default=16)
    ap.add_argument("--pool", type=int, default=8192, help="distinct synthetic tiles")
    ap.add_argument("--root", default=None, help="use <root>/raster_tiles instead")
    ap.add_argument("--max-tiles", type=int, default=8192)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument(
        "--pipeline-images",
        type=int,
        default=None,
        help="images for the real embedding path (0: skip); default 4096 GPU, 64 CPU",
    )
    ap.add_argument(
        "--train-model-epochs",
        type=int,
        default=0,
        help="also run train_model (Lightning + Delta) for E epochs on that table",
    )
    for name in MODEL_SIZE:  # default: TrainConfig's (the paper's model)
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check that every row runs: tiny model, a few steps, small tables",
    )
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.pool = 2, 1, 64
        args.batch_size, args.embed_batch_size = args.batch_size or 16, args.embed_batch_size or 32
        args.pipeline_images = 32 if args.pipeline_images is None else args.pipeline_images
        args.train_model_epochs = args.train_model_epochs or 1
        args.embed_dim, args.depth, args.num_heads = 32, 1, 4
        args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads = 32, 1, 4

    return args


def _pipeline_rows(
    model: S2VecMAE,
    device: torch.device,
    pipeline_images: int,
    ebs: int,
    bs: int,
    hparams: dict,
    args: argparse.Namespace,
) -> list[tuple[str, str, bool]]:
    """(what, rate, goal met) of the real embedding and training paths (``run_pipeline``)."""
    cuda = device.type == "cuda"
    p = run_pipeline(
        model,
        device,
        pipeline_images,
        args.channels,
        ebs,
        args.train_model_epochs,
        bs,
        hparams,
    )
    rows = [
        (
            "encode_batches (host tiles: pinned, async copies)",
            f"{p['host_encode_cells_per_s']:,.0f} cells/s",
            p["host_encode_cells_per_s"] >= INFER_GOAL,
        ),
        (
            f"embed_partition ({pipeline_images} images: Delta read + Arrow rows)",
            f"{p['embed_partition_cells_per_s']:,.0f} cells/s",
            p["embed_partition_cells_per_s"] >= INFER_GOAL,
        ),
        (
            "write_embeddings (+ both Delta commits)",
            f"{p['write_embeddings_cells_per_s']:,.0f} cells/s",
            p["write_embeddings_cells_per_s"] >= INFER_GOAL,
        ),
        (
            "training input path alone (sparse tile cache, batches by index, densified on "
            "the device, 1 epoch)",
            f"{p['input_images_per_s']:,.0f} images/s",
            p["input_images_per_s"] >= TRAIN_GOAL,
        ),
    ]
    if "train_model_images_per_s" in p:
        rows.append(
            (
                f"train_model ({args.train_model_epochs} epochs, Lightning + tile cache"
                f"{', tiles on the GPU' if cuda else ''})",
                f"{p['train_model_images_per_s']:,.0f} images/s",
                p["train_model_images_per_s"] >= TRAIN_GOAL,
            )
        )
    return rows


def main() -> None:
    args = _args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bs = args.batch_size or (2048 if cuda else 64)
    ebs = args.embed_batch_size or (1024 if cuda else 256)
    pipeline_images = (
        args.pipeline_images if args.pipeline_images is not None else (4096 if cuda else 64)
    )
    bf16 = cuda and not args.fp32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    pool = (
        raster_pool(args.root, args.max_tiles, device)
        if args.root
        else synthetic_pool(args.pool, args.channels, args.side, device)
    )
    hparams = {k: getattr(args, k) for k in MODEL_SIZE if getattr(args, k) is not None}
    names = [f"ch{c:03d}" for c in range(pool.shape[1])]
    model = build_model(TrainConfig(**hparams), names, pool.shape[-1])
    name = (
        torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    )
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"device: {name}; torch {torch.__version__}; model {params:.2f} M params; "
        f"tiles {tuple(pool.shape[1:])}; train batch {bs}; embed batch {ebs}; "
        f"{'bf16' if bf16 else 'fp32'}{'; compiled' if args.compile else ''}"
    )
    r = run(model, pool, args.steps, args.warmup, bs, bf16, args.compile)
    e = run_encode(model, pool, ebs, bf16)
    rows = [
        (
            "train step (bare loop, tiles on device)",
            f"{r['images_per_s']:,.0f} images/s",
            r["images_per_s"] >= TRAIN_GOAL,
        ),
        (
            "encode (bare, tiles on device)",
            f"{e['cells_per_s']:,.0f} cells/s",
            e["cells_per_s"] >= INFER_GOAL,
        ),
    ]
    if pipeline_images and not args.root and args.side == 16:
        rows += _pipeline_rows(model, device, pipeline_images, ebs, bs, hparams, args)
    print(
        f"\nloss {r['first_loss']:.3f} → {r['last_loss']:.3f} over {args.warmup + args.steps} "
        f"steps; step {r['step_ms']:.1f} ms; peak GPU memory {r['peak_mem_gib']:.2f} GiB\n"
    )
    print(f"| what | {name} | goal (H100-class GPU) met |")
    print("|---|---:|---|")
    for what, value, met in rows:
        goal = (
            f">= {TRAIN_GOAL:,} images/s" if "images/s" in value else f">= {INFER_GOAL:,} cells/s"
        )
        print(f"| {what} | {value} | {'yes' if met else 'no'} ({goal}) |")


if __name__ == "__main__":
    main()
