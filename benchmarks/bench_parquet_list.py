"""CPU seconds to encode an embedding column (``list<float32>``, D values a row) into Parquet
with each writer the project could use, at the embedding tables' settings (no dictionary, no
statistics unless said, uncompressed, 16,384-row groups): why ``delta_store.replace_partition``
writes the embedding tables' files with polars.

    python benchmarks/bench_parquet_list.py [--rows 262144] [--dim 256] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import ColumnProperties, WriterProperties, write_deltalake

ROW_GROUP = 16_384


def best_cpu(reps: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n, d = args.rows, args.dim
    emb = np.random.default_rng(0).random((n, d), dtype=np.float32)
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    table = pa.table({"embedding": pa.ListArray.from_arrays(offsets, pa.array(emb.ravel()))})
    binary = pa.table(
        {
            "embedding": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(4 * d), n, [None, pa.py_buffer(emb)]
            )
        }
    )
    frame = pl.from_arrow(table)
    plain = {"use_dictionary": False, "write_statistics": False, "compression": "none"}
    delta_props = WriterProperties(
        max_row_group_size=ROW_GROUP,
        compression="UNCOMPRESSED",
        default_column_properties=ColumnProperties(
            dictionary_enabled=False, statistics_enabled="NONE"
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "f.parquet"

        def delta() -> None:
            shutil.rmtree(Path(tmp) / "t", ignore_errors=True)
            write_deltalake(str(Path(tmp) / "t"), table, writer_properties=delta_props)

        writers = {
            "pyarrow": lambda: pq.write_table(table, out, row_group_size=ROW_GROUP, **plain),
            "delta-rs write_deltalake (table not partitioned)": delta,
            "polars, no statistics": lambda: frame.write_parquet(
                out, compression="uncompressed", statistics=False, row_group_size=ROW_GROUP
            ),
            "polars, statistics on every column (as replace_partition writes)": lambda: (
                frame.write_parquet(
                    out, compression="uncompressed", statistics=True, row_group_size=ROW_GROUP
                )
            ),
            "pyarrow, fixed-size binary (a contract change)": lambda: pq.write_table(
                binary, out, row_group_size=ROW_GROUP, **plain
            ),
        }
        rows = [(name, best_cpu(args.reps, fn)) for name, fn in writers.items()]
    print(
        f"\n{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.2f}; "
        f"{n:,} rows of list<float32>[{d}], best of {args.reps}\n"
    )
    print("| writer | CPU-s | rows per CPU-second |")
    print("|---|---:|---:|")
    for name, cpu in rows:
        print(f"| {name} | {cpu:.3f} | {n / cpu:,.0f} |")


if __name__ == "__main__":
    main()
