"""The tiles of one ``raster_tiles`` snapshot decoded once into a memory-mapped array file.

``tile_cache`` builds it on first use (one partition in memory at a time) under the root's
local cache and every run, rank and loader worker of that snapshot maps it afterwards: no
per-tile Python and no Delta read per epoch. It is keyed by what it was built from (Delta
version, each partition's data version, channels, side, dtype); the two most recently used
caches of a root are kept.
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
_CACHE_FORMAT = 1
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileCache:
    """The tiles of one ``raster_tiles`` snapshot decoded once into an array file.

    ``tiles.bin``: (n, C, S, S) float32 (or float16 when asked: half the bytes to move, values
    rounded to 11 significant bits), partitions in sorted order, rows by ``image_id`` (the
    order ``stream_raster_tiles`` gives); ``tokens.npy``: each row's image token; ``key.json``:
    what the files were built from (format, Delta version, each partition's data version,
    channels, side, dtype), written last. The folder is named by a hash of the key;
    a folder whose key, sizes or token count do not match is rebuilt, never used.
    """

    directory: Path
    key: dict[str, Any]
    n: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.key["dtype"])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        c, s = len(self.key["channels"]), int(self.key["side"])
        return (self.n, c, s, s)

    def tiles(self) -> np.ndarray:
        """The (n, C, S, S) tiles, memory-mapped read-only."""
        return np.memmap(self.directory / "tiles.bin", self.dtype, "r", shape=self.shape)

    def tokens(self) -> np.ndarray:
        return np.load(self.directory / "tokens.npy")


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
        n = int(stored.pop("n"))
        tokens = np.load(directory / "tokens.npy", mmap_mode="r")
        size = (directory / "tiles.bin").stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    cache = TileCache(directory, key, n)
    if (
        stored != key
        or tokens.shape != (n,)
        or size != cache.dtype.itemsize * math.prod(cache.shape)
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
    """Decode the snapshot named by ``key`` into ``work``: ``tiles.bin``, ``tokens.npy``, then
    ``key.json`` (last, with the row count)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    channels, side, dtype = len(key["channels"]), key["side"], key["dtype"]
    n, tokens = 0, []
    with open(work / "tiles.bin", "wb") as f:
        for p in key["partitions"]:  # sorted
            rows = read_raster_partition(
                root, p, key["raster_tiles_version"], ["image_token", "tensor"]
            )
            if rows.height == 0:
                continue
            tiles = tensor_array(rows["tensor"].to_arrow(), channels, side)
            f.write(np.ascontiguousarray(tiles, dtype).tobytes())
            tokens += rows["image_token"].to_list()
            n += rows.height
        f.flush()
        os.fsync(f.fileno())
    np.save(work / "tokens.npy", np.array(tokens, dtype=str))
    (work / "key.json").write_text(json.dumps({**key, "n": n}, sort_keys=True))


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
