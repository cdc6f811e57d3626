"""Training throughput of the S2Vec MAE: images/s, peak GPU memory, loss.

Runs the model's own training step (forward with random 75 % masking, masked MSE, AdamW)
in a plain loop for a fixed number of steps, on synthetic tiles of the paper's size (C=100
channels, 16×16) kept on the device, or on up to ``--max-tiles`` tiles of a root's
``raster_tiles``. Throughput is measured after ``--warmup`` steps. bf16 autocast on CUDA
(SDPA picks flash attention), fused AdamW, optional ``torch.compile``.

    python benchmarks/gpu_train.py                          # CUDA if present, else CPU
    python benchmarks/gpu_train.py --device cpu --steps 20 --batch-size 64
    python benchmarks/gpu_train.py --compile --batch-size 4096
    python benchmarks/gpu_train.py --root /data/s2vec       # real tiles
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2vec_pipeline.model.mae import S2VecMAE  # noqa: E402


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
    from s2vec_pipeline import delta_store
    from s2vec_pipeline.model.data import RASTER_TABLE, tensors_to_numpy

    contract = delta_store.table_contract(root, RASTER_TABLE)
    if contract is None:
        sys.exit(f"no raster_tiles table under {root}")
    shape = (len(contract["channels"]), contract["side"], contract["side"])
    parts, n = [], 0
    for batch in delta_store.iter_batches(root, RASTER_TABLE, columns=["tensor"]):
        parts.append(tensors_to_numpy(batch.column("tensor"), shape))
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
        lr=1e-3,
        betas=(0.9, 0.95),
        weight_decay=0.05,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None, help="default 2048 GPU, 64 CPU")
    ap.add_argument("--channels", type=int, default=100)
    ap.add_argument("--side", type=int, default=16)
    ap.add_argument("--pool", type=int, default=8192, help="distinct synthetic tiles")
    ap.add_argument("--root", default=None, help="use <root>/raster_tiles instead")
    ap.add_argument("--max-tiles", type=int, default=8192)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument("--patch-size", type=int, default=1)
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--num-heads", type=int, default=8)
    ap.add_argument("--decoder-embed-dim", type=int, default=128)
    ap.add_argument("--decoder-depth", type=int, default=2)
    ap.add_argument("--decoder-num-heads", type=int, default=4)
    args = ap.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bs = args.batch_size or (2048 if cuda else 64)
    bf16 = cuda and not args.fp32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    pool = (
        raster_pool(args.root, args.max_tiles, device)
        if args.root
        else synthetic_pool(args.pool, args.channels, args.side, device)
    )
    model = S2VecMAE(
        in_chans=pool.shape[1],
        img_size=pool.shape[-1],
        patch_size=args.patch_size,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.num_heads,
        decoder_embed_dim=args.decoder_embed_dim,
        decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
    )
    name = (
        torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    )
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"device: {name}; torch {torch.__version__}; model {params:.2f} M params; "
        f"tiles {tuple(pool.shape[1:])}; batch {bs}; {'bf16' if bf16 else 'fp32'}"
        f"{'; compiled' if args.compile else ''}"
    )
    r = run(model, pool, args.steps, args.warmup, bs, bf16, args.compile)
    e = run_encode(model, pool, bs, bf16)
    print(
        "\n| device | batch | precision | compile | train images/s | step ms | peak GPU GiB "
        "| loss first → last | encode cells/s |"
    )
    print("|---|---:|---|---|---:|---:|---:|---|---:|")
    print(
        f"| {name} | {bs} | {'bf16' if bf16 else 'fp32'} | {args.compile} "
        f"| {r['images_per_s']:,.0f} | {r['step_ms']:.1f} | {r['peak_mem_gib']:.2f} "
        f"| {r['first_loss']:.3f} → {r['last_loss']:.3f} | {e['cells_per_s']:,.0f} |"
    )


if __name__ == "__main__":
    main()
