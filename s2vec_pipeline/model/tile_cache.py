"""The tiles of one ``raster_tiles`` snapshot decoded once into memory-mapped sparse arrays.

``tile_cache`` builds it on first use (one partition in memory at a time) under the root's
local cache and every run, rank and loader worker of that snapshot maps it afterwards: no
per-tile Python and no Delta read per epoch. Only the nonzero values are stored (CSR per
image, :class:`TileCache`): a batch moves ~3 % of the bytes of dense tiles on real data and
is densified where it lands (``datamodule``), on the GPU when training there. It is keyed
by what it was built from (Delta version, each partition's data version, channels, side,
dtype); the two most recently used caches of a root are kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from s2vec_pipeline.cells.raster import tensor_array
from s2vec_pipeline.model.data import read_raster_partition
from s2vec_pipeline.storage import fs
from s2vec_pipeline.storage.locks import exclusive
from s2vec_pipeline.storage.versioning import config_hash

TILE_CACHE_DIR = "_tile_cache"
#: Caches kept per root: the one just used and the one before (a training that started on
#: the previous snapshot may still map it); older ones are removed when a cache is built.
TILE_CACHES_KEPT = 2
#: 2: sparse (CSR of each image's nonzero values); 1 was a dense (n, C, S, S) array file.
_CACHE_FORMAT = 2
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileCache:
    """The tiles of one ``raster_tiles`` snapshot decoded once, stored sparse.

    Real tiles are mostly zeros (~2 % of the values of a city are nonzero, a planet fewer), so
    each image keeps only its nonzero values, in CSR form: ``indptr.npy`` (int64, n+1: image
    ``i``'s values are ``indptr[i]:indptr[i+1]``), ``positions.bin`` (each value's flat index
    ``c*S*S + i*S + j`` in its image, ascending; uint16 when C×S×S <= 65,536, else uint32),
    ``values.bin`` (float32, or float16 when asked: values rounded to 11 significant bits);
    ``tokens.npy``: each image's token; ``key.json``: what the files were built from (format,
    Delta version, each partition's data version, channels, side, dtype) and their sizes,
    written last. Images are in partition order (sorted), rows by ``image_id`` (the order
    ``stream_raster_tiles`` gives). The folder is named by a hash of the key; a folder whose
    key, sizes or token count do not match is rebuilt, never used.
    """

    directory: Path
    key: dict[str, Any]
    n: int
    nnz: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.key["dtype"])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        c, s = len(self.key["channels"]), int(self.key["side"])
        return (self.n, c, s, s)

    @property
    def image_size(self) -> int:
        """Values per image, C×S×S (zeros included)."""
        return math.prod(self.shape[1:])

    @property
    def position_dtype(self) -> np.dtype:
        return position_dtype(self.image_size)

    def indptr(self) -> np.ndarray:
        """(n+1,) int64: where each image's values start in ``positions``/``values``."""
        return np.load(self.directory / "indptr.npy", mmap_mode="r")

    def positions(self) -> np.ndarray:
        """(nnz,) each nonzero value's flat index in its image, memory-mapped read-only."""
        return _mapped(self.directory / "positions.bin", self.position_dtype, self.nnz)

    def values(self) -> np.ndarray:
        """(nnz,) the nonzero values, memory-mapped read-only."""
        return _mapped(self.directory / "values.bin", self.dtype, self.nnz)

    def tiles(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The (n, C, S, S) tiles (or those of ``indices``) densified in memory: for tests,
        statistics and small uses; training batches are gathered sparse."""
        rows = np.arange(self.n) if indices is None else np.asarray(indices, dtype=np.int64)
        position, value, lengths = gather_rows(self.indptr(), self.positions(), self.values(), rows)
        dense = np.zeros((len(rows), self.image_size), self.dtype)
        dense[np.repeat(np.arange(len(rows)), lengths), position] = value
        return dense.reshape(len(rows), *self.shape[1:])

    def tokens(self) -> np.ndarray:
        return np.load(self.directory / "tokens.npy")


def position_dtype(image_size: int) -> np.dtype:
    """The narrowest unsigned type of a flat index into an image of ``image_size`` values."""
    return np.dtype(np.uint16 if image_size <= 1 << 16 else np.uint32)


def _mapped(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    # np.memmap refuses an empty file: an all-zero snapshot has no values.
    return np.memmap(path, dtype, "r", shape=(n,)) if n else np.zeros(0, dtype)


def gather_rows(
    indptr: np.ndarray, positions: np.ndarray, values: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nonzero values of images ``rows`` (the CSR arrays of a :class:`TileCache`), rows
    in the order given: (``positions``: each value's flat index in its image, ``values``,
    ``lengths``: values per image). One vectorized segment gather, no per-image Python;
    sorted ``rows`` read the mapped files sequentially."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.asarray(indptr[rows])
    lengths = np.asarray(indptr[rows + 1]) - starts
    # Value k of the batch is element starts[i] + (k - first[i]) of image i, the one it is in.
    first = np.cumsum(lengths) - lengths
    element = np.repeat(starts - first, lengths)
    element += np.arange(len(element))
    return np.asarray(positions[element]), np.asarray(values[element]), lengths


def tile_cache_key(
    version: int,
    partition_versions: dict[str, str],
    channels: Sequence[str],
    side: int,
    dtype: str = "float32",
) -> dict[str, Any]:
    """What a cache is built from; its folder is named by this key's hash."""
    return {
        "format": _CACHE_FORMAT,
        "raster_tiles_version": int(version),
        "partitions": dict(sorted(partition_versions.items())),
        "channels": list(channels),
        "side": int(side),
        "dtype": dtype,
    }


def _open_cache(directory: Path, key: dict[str, Any]) -> TileCache | None:
    """The cache in ``directory`` when it is complete and built from ``key``, else None."""
    try:
        stored = json.loads((directory / "key.json").read_text())
        n, nnz = int(stored.pop("n")), int(stored.pop("nnz"))
        tokens = np.load(directory / "tokens.npy", mmap_mode="r")
        indptr = np.load(directory / "indptr.npy", mmap_mode="r")
        sizes = [(directory / f).stat().st_size for f in ("positions.bin", "values.bin")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stored != key:
        return None
    cache = TileCache(directory, key, n, nnz)
    if (
        tokens.shape != (n,)
        or indptr.shape != (n + 1,)
        or indptr[-1] != nnz
        or sizes != [nnz * cache.position_dtype.itemsize, nnz * cache.dtype.itemsize]
    ):
        return None
    return cache


def tile_cache(
    root: str | os.PathLike,
    partitions: Sequence[str],
    version: int,
    partition_versions: dict[str, str],
    channels: Sequence[str],
    side: int,
    dtype: Literal["float32", "float16"] = "float32",
) -> TileCache:
    """The decoded tiles of ``partitions`` at ``raster_tiles`` version ``version``: built on
    first use (one partition in memory at a time), then memory-mapped by every run, rank and
    loader worker of that snapshot. ``partition_versions``: the partitions' data versions at
    that version (``raster_partition_versions``), part of the cache's key; ``dtype``:
    ``float32`` (the stored values) or ``float16``."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"tile cache dtype must be float32 or float16, not {dtype!r}")
    versions = {p: partition_versions[p] for p in sorted(partitions)}
    key = tile_cache_key(version, versions, channels, side, dtype)
    base = fs.local_cache(root, TILE_CACHE_DIR)
    directory = base / config_hash(key)
    cache = _open_cache(directory, key)
    if cache is not None:
        os.utime(directory / "key.json")  # recently used: kept by _prune_caches
        return cache
    base.mkdir(parents=True, exist_ok=True)
    with exclusive(base / f".{directory.name}.lock"):  # one builder; the others wait, then use
        if _open_cache(directory, key) is None:
            if directory.exists():
                _log.warning("tile cache %s does not match its snapshot: rebuilding it", directory)
                shutil.rmtree(directory)
            _build(base / f".{directory.name}.building", root, key)
            os.replace(base / f".{directory.name}.building", directory)  # complete or absent
    _prune_caches(base)
    cache = _open_cache(directory, key)
    assert cache is not None
    return cache


def _build(work: Path, root: str | os.PathLike, key: dict[str, Any]) -> None:
    """Decode the snapshot named by ``key`` into ``work``, one partition in memory at a
    time: ``positions.bin``, ``values.bin``, ``indptr.npy``, ``tokens.npy``, then ``key.json``
    (last, with the image and value counts)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    channels, side, dtype = len(key["channels"]), key["side"], np.dtype(key["dtype"])
    size = channels * side * side
    counts, tokens = [np.zeros(1, np.int64)], []
    with open(work / "positions.bin", "wb") as pos, open(work / "values.bin", "wb") as val:
        for p in key["partitions"]:  # sorted
            rows = read_raster_partition(
                root, p, key["raster_tiles_version"], ["image_token", "tensor"]
            )
            if rows.height == 0:
                continue
            # Cast first: a value that float16 rounds to zero is not stored.
            tiles = tensor_array(rows["tensor"].to_arrow(), channels, side).reshape(-1, size)
            tiles = tiles.astype(dtype, copy=False)
            row, position = np.nonzero(tiles)  # row-major: by image, positions ascending
            pos.write(position.astype(position_dtype(size)).tobytes())
            val.write(tiles[row, position].tobytes())
            counts.append(np.bincount(row, minlength=rows.height))
            tokens += rows["image_token"].to_list()
        for f in (pos, val):
            f.flush()
            os.fsync(f.fileno())
    indptr = np.cumsum(np.concatenate(counts))
    np.save(work / "indptr.npy", indptr)
    np.save(work / "tokens.npy", np.array(tokens, dtype=str))
    n, nnz = len(tokens), int(indptr[-1])
    (work / "key.json").write_text(json.dumps({**key, "n": n, "nnz": nnz}, sort_keys=True))


def _prune_caches(base: Path) -> None:
    """Remove all but the ``TILE_CACHES_KEPT`` most recently used caches under ``base`` (a
    cache holds every tile of a snapshot: a planet's paper profile is ~15 GB)."""
    caches = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]

    def used(d: Path) -> float:
        try:
            return (d / "key.json").stat().st_mtime
        except OSError:
            return 0.0

    for old in sorted(caches, key=used, reverse=True)[TILE_CACHES_KEPT:]:
        shutil.rmtree(old, ignore_errors=True)
