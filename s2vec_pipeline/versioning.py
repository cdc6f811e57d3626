"""Content hashes: data versions of table partitions and versions of configurations."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any

import polars as pl


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def frame_hash(df: pl.DataFrame, sort_by: Sequence[str], length: int = 16) -> str:
    """Hash of a frame's content, independent of row order (rows are sorted by ``sort_by``).

    Used as the data version of one partition of a table: the same rows give the same version.
    """
    sorted_df = df.sort(list(sort_by)) if df.height else df
    # Arrow IPC bytes carry schema and values (and nothing outside slices, unlike raw buffers).
    buf = io.BytesIO()
    sorted_df.rechunk().write_ipc_stream(buf, compression="uncompressed")
    return hashlib.sha256(buf.getvalue()).hexdigest()[:length]
