"""Content hashes: data versions of table partitions and versions of configurations."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import polars as pl
import pyarrow as pa


def file_sha256(path: str | os.PathLike[str]) -> tuple[str, int]:
    """SHA-256 hex digest and size of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def frame_hash(df: pl.DataFrame, sort_by: Sequence[str], length: int = 16) -> str:
    """Hash of a frame's content, independent of row order (rows are sorted by ``sort_by``).

    Used as the data version of one partition of a table: the same rows give the same version.
    """
    sorted_df = df.sort(list(sort_by)) if df.height else df
    # Canonical bytes: Arrow IPC of plain (non-view) arrays in one chunk. Polars' string views
    # can point into buffers shared with rows filtered away, so its own IPC output is not a
    # function of the content alone.
    table = sorted_df.to_arrow(compat_level=pl.CompatLevel.oldest()).combine_chunks()
    sink = _HashingSink()  # the stream's bytes go to the hash as written: no copy of them
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.sha256.hexdigest()[:length]


class _HashingSink:
    """A write-only file that feeds what is written to SHA-256 (for ``pa.ipc.new_stream``)."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.closed = False
        self._position = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        size = memoryview(data).nbytes
        self._position += size
        return size

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


# The columns that order a partition's rows before hashing (unique per row in each table). The
# one definition of a partition's data version: Dagster's tags, the refresh and the model
# version all use ``partition_data_version``.
PARTITION_SORT_KEYS: dict[str, list[str]] = {
    "osm_features": ["cell_id", "channel", "osm_type", "osm_id"],
    "cell_features": ["cell_id"],
    "raster_tiles": ["image_id"],
}


def partition_data_version(table: str, rows: pl.DataFrame) -> str:
    """Data version of one partition of ``table``: a hash of its rows, in any order."""
    return frame_hash(rows, PARTITION_SORT_KEYS[table])


MICRO = 1_000_000  # sums are exact in micro-units (µm, µm²): see exact_sum


def exact_sum(column: str) -> pl.Expr:
    """Sum float values in integer micro-units, so the result does not depend on the order or
    chunking in which rows arrive (float sums do, in the last bits, and a partition's data
    version is a hash of its values: it must not change when its content did not)."""
    return ((pl.col(column) * MICRO).round().cast(pl.Int64).sum() / MICRO).alias(column)
