"""``raster_tiles`` at one Delta snapshot, as training and evaluation read it.

A snapshot is one Delta version of ``raster_tiles`` (the latest when a run starts, or the one
given): a concurrent refresh changes nothing for a reader of it. Partitions are read one at a
time with rows by ``image_id`` (``read_raster_partition``, ``stream_raster_tiles``), so the
order depends on the content only; each partition's data version at the snapshot is the hash
Dagster records for it (``raster_partition_versions``). The train/val split is a pure function
of each ``image_token`` (a hash, ``split_by_hash``), so it is the same on every run, rank and
worker, and the evaluation holds out exactly the images the training did (``plan_split``).

The decoded tiles of a snapshot: ``tile_cache``; the batches Lightning trains on:
``datamodule``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from s2vec_pipeline.errors import DamagedTableError, MissingInputError
from s2vec_pipeline.model.registry import RASTER_TABLE
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline.storage.versioning import partition_data_version


def raster_snapshot(root: str | os.PathLike, version: int | None = None) -> int:
    """The ``raster_tiles`` Delta version to read: ``version`` if it exists, else the latest."""
    latest = delta_store.table_version(root, RASTER_TABLE)
    if latest is None:
        raise MissingInputError(
            f"no raster_tiles table under {root}: run s2vec materialize --stages "
            "extract,features,raster first"
        )
    if version is None:
        return latest
    if not 0 <= version <= latest:
        raise MissingInputError(
            f"raster_tiles under {root} has no version {version} (versions 0..{latest}): "
            "pass an existing version, or none for the latest"
        )
    return version


def read_raster_partition(
    root: str | os.PathLike,
    partition: str,
    version: int,
    columns: Sequence[str] | None = None,
) -> pl.DataFrame:
    """One ``raster_tiles`` partition at Delta ``version``, rows sorted by ``image_id``.

    A partition fits in memory by design. The row order depends on the content only (not on
    how the rows are spread over files), so a stream built from it is the same in every root,
    after a compaction, on every rank and worker.
    """
    cols = None if columns is None else list(dict.fromkeys([*columns, "image_id"]))
    rows = _read_version(root, [partition], cols, version)
    if rows["image_id"].is_sorted():
        # the raster stage writes rows in image order: skip sort's copy of every tensor (and
        # flag the order, so the data version's sort is free too)
        rows = rows.with_columns(pl.col("image_id").set_sorted())
    else:
        rows = rows.sort("image_id")
    return rows if columns is None else rows.select(list(columns))


def stream_raster_tiles(
    root: str | os.PathLike,
    partitions: Sequence[str],
    version: int,
    columns: Sequence[str],
    batch_size: int = 256,
) -> Iterator[pa.RecordBatch]:
    """``raster_tiles`` record batches at Delta ``version``: partitions in sorted order, rows by
    ``image_id`` (``read_raster_partition``); memory is bounded by one partition."""
    for p in sorted(partitions):
        rows = read_raster_partition(root, p, version, columns)
        yield from rows.to_arrow(compat_level=pl.CompatLevel.oldest()).to_batches(batch_size)


def raster_partition_versions(
    root: str | os.PathLike, partitions: Sequence[str], version: int
) -> dict[str, str]:
    """Data version of each ``raster_tiles`` partition at Delta ``version``.

    The same hash as Dagster's ``raster_tiles`` data version
    (``versioning.partition_data_version`` over the partition's rows), so a model trained
    from Dagster or from Python on the same data has the same ``model_version``.
    """
    return {
        p: partition_data_version(RASTER_TABLE, _read_version(root, [p], None, version))
        for p in sorted(partitions)
    }


def raster_partition_keys(root: str | os.PathLike, version: int) -> list[str]:
    """The partitions with tiles at ``raster_tiles`` version ``version``."""
    try:
        return delta_store.partition_keys(root, RASTER_TABLE, version)
    except (FileNotFoundError, DamagedTableError) as e:
        if _is_damage(root, version, e):
            raise
        raise _vacuumed(root, version) from e


def _read_version(
    root: str | os.PathLike, partitions: list[str], columns: list[str] | None, version: int
) -> pl.DataFrame:
    try:
        return delta_store.read_partitions(root, RASTER_TABLE, partitions, columns, version)
    except (FileNotFoundError, DamagedTableError) as e:
        if _is_damage(root, version, e):
            raise
        raise _vacuumed(root, version) from e


def _is_damage(root: str | os.PathLike, version: int, error: Exception) -> bool:
    """A file of the LATEST version gone is damage (delta_store says so and how to repair);
    one of an older version was removed by a vacuum."""
    latest = delta_store.table_version(root, RASTER_TABLE) or 0
    return isinstance(error, DamagedTableError) and version >= latest


def _vacuumed(root: str | os.PathLike, version: int) -> MissingInputError:
    return MissingInputError(
        f"raster_tiles version {version} under {root} can no longer be read (a vacuum removed "
        "its files): use a later version, or none for the latest"
    )


def token_unit_hash(tokens: Sequence[str]) -> np.ndarray:
    """A stable number in [0, 1) per image token (blake2b), for the train/val split."""
    out = np.empty(len(tokens), dtype=np.float64)
    for i, t in enumerate(tokens):
        out[i] = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big")
    return out / 2.0**64


@dataclass(frozen=True)
class SplitRule:
    """Validation tiles: hash < val_fraction, plus/minus the forced ones (tiny tables)."""

    val_fraction: float
    forced_val: str | None = None
    forced_train: str | None = None

    def is_val(self, tokens: Sequence[str]) -> np.ndarray:
        val = token_unit_hash(tokens) < self.val_fraction
        if self.forced_val is not None or self.forced_train is not None:
            arr = np.asarray(tokens, dtype=object)
            val |= arr == self.forced_val
            val &= arr != self.forced_train
        return val


def split_by_hash(
    h: np.ndarray, tokens: Sequence[str], val_fraction: float
) -> tuple[SplitRule, np.ndarray]:
    """The split rule and each tile's validation flag from its token hash.

    At least one validation tile when there are two or more tiles and ``val_fraction`` > 0;
    at least one training tile whenever there is a tile (ties broken by token, as always).
    """
    n = len(h)
    val = h < val_fraction
    forced_val = forced_train = None
    if n >= 2 and val_fraction > 0 and not val.any():
        i = int(np.lexsort((np.asarray(tokens), h))[0])
        forced_val, val[i] = tokens[i], True
    if n >= 1 and val.all():
        j = int(np.lexsort((np.asarray(tokens), h))[-1])
        forced_train, val[j] = tokens[j], False
    return SplitRule(val_fraction, forced_val, forced_train), val


def plan_split(
    root: str | os.PathLike,
    partitions: Sequence[str],
    val_fraction: float,
    version: int | None = None,
    read_batch_size: int = 4096,
) -> tuple[SplitRule, int, int]:
    """One pass over ``image_token`` only: the split rule and the (train, val) tile counts."""
    version = raster_snapshot(root, version)
    tokens: list[str] = []
    for batch in stream_raster_tiles(root, partitions, version, ["image_token"], read_batch_size):
        tokens += batch.column("image_token").to_pylist()
    rule, val = split_by_hash(token_unit_hash(tokens), tokens, val_fraction)
    return rule, int((~val).sum()), int(val.sum())
