"""Trials: N processes write different partitions of one Delta table at once, on a fresh root.

Per round: W spawned writer processes, released together by a barrier, each writing P
partitions in P commits through ``delta_store.write_partitions`` (odd writers stream record
batches, even ones pass tables). Afterwards the table is checked against the rows each partition
must hold. Prints one line per round and a summary: lost / duplicated partitions, processes that
failed, application-level retries (log lines of ``delta_store.retry_commit``) and delta-rs'
internal commit retries (``num_retries`` in the commit history).
``--replace-partition``: every writer goes through ``delta_store.replace_partition`` instead
(the embedding tables' path: polars files, then a strict commit that any concurrent commit
fails and that is made again with the same files: all its retries are application retries).

    PYTHONPATH=$PWD python benchmarks/bench_concurrent_writes.py --writers 8 --rounds 10
                                                                  [--replace-partition]

Runs with older versions of the package too (it only uses ``write_partitions`` and
``read_partitions``), to compare before and after a change.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import DeltaTable

CONTRACT = {"table": "t", "profile": "city", "taxonomy_version": "v1"}


def rows(key: str) -> pa.Table:
    seed = int.from_bytes(key.encode(), "little")
    n = 50 + seed % 50
    values = np.random.default_rng(seed).random(n)
    return pa.table({"parent_l6": pa.array([key] * n, pa.string()), "x": pa.array(values)})


def writer(
    root: str, w: int, parts: int, barrier: mp.synchronize.Barrier, logfile: str, replace: bool
) -> None:
    from s2vec_pipeline.storage import delta_store

    logging.basicConfig(filename=logfile, level=logging.INFO)
    barrier.wait(timeout=120)
    for j in range(parts):
        key = f"p{w:02d}{j}"
        data: pa.Table | pa.RecordBatchReader = rows(key)
        if replace:
            delta_store.replace_partition(
                root, "t", data.to_batches(), data.schema, key, CONTRACT, row_group_rows=16384
            )
            continue
        if w % 2:
            data = pa.RecordBatchReader.from_batches(data.schema, data.to_batches(17))
        delta_store.write_partitions(root, "t", data, [key], CONTRACT)


def one_round(base: Path, r: int, writers: int, parts: int, replace: bool) -> dict[str, int]:
    from s2vec_pipeline.storage import delta_store

    ctx = mp.get_context("spawn")
    root = base / f"round{r}"
    barrier = ctx.Barrier(writers)
    logs = [str(base / f"round{r}-w{w}.log") for w in range(writers)]
    procs = [
        ctx.Process(target=writer, args=(str(root), w, parts, barrier, logs[w], replace))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    keys = {f"p{w:02d}{j}" for w in range(writers) for j in range(parts)}
    got = (
        delta_store.read_partitions(root, "t")
        if DeltaTable.is_deltatable(str(root / "t"))
        else None
    )
    present = set(got["parent_l6"].unique().to_list()) if got is not None else set()
    duplicated = 0
    if got is not None:
        counts = dict(got.group_by("parent_l6").len().iter_rows())
        duplicated = sum(1 for k in present & keys if counts[k] != rows(k).num_rows)
    retries = sum(Path(f).read_text().count("commit conflict") for f in logs if Path(f).exists())
    internal = 0
    if got is not None:
        for h in DeltaTable(str(root / "t")).history():
            internal += int(h.get("operationMetrics", {}).get("num_retries", 0) or 0)
    return {
        "lost": len(keys - present),
        "wrong_rows": duplicated,
        "failed_procs": sum(1 for p in procs if p.exitcode != 0),
        "app_retries": retries,
        "delta_retries": internal,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--parts", type=int, default=2, help="partitions per writer")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--replace-partition", action="store_true", help="write through replace_partition"
    )
    args = ap.parse_args()
    totals: dict[str, int] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        head = ("round", "lost", "wrong", "failed", "app_retry", "delta_retry")
        print("{:>5} {:>5} {:>6} {:>7} {:>10} {:>12}".format(*head))
        for r in range(args.rounds):
            res = one_round(Path(tmp), r, args.writers, args.parts, args.replace_partition)
            for k, v in res.items():
                totals[k] = totals.get(k, 0) + v
            print(
                f"{r:>5} {res['lost']:>5} {res['wrong_rows']:>6} {res['failed_procs']:>7} "
                f"{res['app_retries']:>10} {res['delta_retries']:>12}"
            )
    print(
        f"{args.writers} writers x {args.parts} partitions, {args.rounds} rounds, "
        f"{time.perf_counter() - t0:.1f} s: {totals}"
    )


if __name__ == "__main__":
    main()
