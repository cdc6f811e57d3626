"""Training data: raster tiles of one Delta snapshot, decoded once, split and sampled by index.

Tiles are read from one Delta version of ``raster_tiles`` (a snapshot: a concurrent refresh
changes nothing here), one partition at a time in a content-determined order
(``stream_raster_tiles``), and decoded once into a memory-mapped float32 file keyed by the
snapshot (``TileCache``: Delta version, each partition's data version, channels, side).
Training then gathers batches by index from it (``IndexBatchSampler``: one seeded permutation
per epoch, sharded over DDP ranks), with no per-tile Python and no Delta read per epoch. The
train/val split is a pure function of each ``image_token`` (hash), so it is the same on every
run, rank and worker. Per-channel mean/std come from one pass over the training split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from s2vec_pipeline.cells.raster import tensor_array
from s2vec_pipeline.errors import DamagedTableError, MissingInputError
from s2vec_pipeline.model.registry import RASTER_TABLE
from s2vec_pipeline.storage import delta_store, fs
from s2vec_pipeline.storage.locks import exclusive
from s2vec_pipeline.storage.versioning import config_hash, partition_data_version


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
    rows = _read_version(root, [partition], cols, version).sort("image_id")
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


def _rule_from_hashes(
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
    rule, val = _rule_from_hashes(token_unit_hash(tokens), tokens, val_fraction)
    return rule, int((~val).sum()), int(val.sum())


def _replica() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --- the tile cache: a snapshot decoded once -------------------------------------------------

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
    dtype: str = "float32",
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
        cache = _open_cache(directory, key)
        if cache is not None:
            return cache
        if directory.exists():
            _log.warning("tile cache %s does not match its snapshot: rebuilding it", directory)
            shutil.rmtree(directory)
        work = base / f".{directory.name}.building"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        n, tokens = 0, []
        with open(work / "tiles.bin", "wb") as f:
            for p in sorted(partitions):
                rows = read_raster_partition(root, p, version, ["image_token", "tensor"])
                if rows.height == 0:
                    continue
                tiles = tensor_array(rows["tensor"].to_arrow(), len(channels), side)
                f.write(np.ascontiguousarray(tiles, dtype).tobytes())
                tokens += rows["image_token"].to_list()
                n += rows.height
            f.flush()
            os.fsync(f.fileno())
        np.save(work / "tokens.npy", np.array(tokens, dtype=str))
        (work / "key.json").write_text(json.dumps({**key, "n": n}, sort_keys=True))
        os.replace(work, directory)  # complete or absent
    _prune_caches(base)
    cache = _open_cache(directory, key)
    assert cache is not None
    return cache


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


class CachedTiles(Dataset):
    """Batches of a :class:`TileCache` by index: ``dataset[indices]`` → (B, C, S, S) tiles of
    the cache's dtype (the model computes in float32 whatever it receives).

    Pickles as the cache's location (the array is mapped again in each spawned worker).
    """

    def __init__(self, cache: TileCache) -> None:
        self.cache = cache
        self._tiles: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cache": self.cache, "_tiles": None}

    def __len__(self) -> int:
        return self.cache.n

    def __getitems__(self, indices: np.ndarray) -> torch.Tensor:
        if self._tiles is None:
            self._tiles = self.cache.tiles()
        # One gather (sorted indices: sequential reads of the mapped file).
        return torch.from_numpy(self._tiles[np.asarray(indices)])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__(np.array([index]))[0]


class TileIndices(Dataset):
    """``dataset[indices]`` → the indices themselves (int64): the tiles are gathered on the
    training device from a resident copy (``RasterTileDataModule(tiles_on_device=True)``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(indices, dtype=np.int64))

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__(np.array([index]))[0]


def _whole_batch(batch: torch.Tensor) -> torch.Tensor:
    """The DataLoader's collate: ``CachedTiles.__getitems__`` already built the batch."""
    return batch


class IndexBatchSampler(Sampler[np.ndarray]):
    """Batches of row indices (numpy arrays, no per-tile Python) of a cached split.

    The semantics of ``DistributedSampler`` + ``BatchSampler``: with ``shuffle`` a permutation
    seeded by (seed, epoch); under ``world`` ranks the tail is dropped so every rank gets the
    same number of tiles (DDP ranks step in lockstep) and rank ``r`` takes every ``world``-th
    one from ``r``. Indices within a batch are sorted (sequential reads of the mapped file).
    """

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _mine(self) -> np.ndarray:
        idx = self.indices
        if self.shuffle:
            idx = idx[np.random.default_rng([self.seed, self.epoch]).permutation(len(idx))]
        if self.world > 1:
            per = len(idx) // self.world
            idx = idx[: per * self.world][self.rank :: self.world]
        return idx

    def __len__(self) -> int:
        n = len(self.indices) // self.world if self.world > 1 else len(self.indices)
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        idx = self._mine()
        for i in range(0, len(idx), self.batch_size):
            yield np.sort(idx[i : i + self.batch_size])


class RasterTileDataModule(L.LightningDataModule):
    """Train/val tiles of ``raster_tiles`` at one Delta ``version`` (default: the latest when
    ``setup`` runs), all partitions with data or the given ones.

    ``setup`` decodes the snapshot once into a :class:`TileCache` (or reuses it), splits it
    by image-token hash and computes the per-channel mean/std of the training split (all
    pixels, empty ones included, float64 sums). Batches are gathered by index from the mapped
    cache: each epoch is one seeded permutation of the training split, sharded over DDP ranks.
    With ``tiles_on_device`` the whole cache is copied to the training device once (when it
    fits: 122×16×16 float32 tiles take 125 kB each, ~15 GB for 120,000) and the loader moves
    only indices; the batches, and so the weights, are the same.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        partitions: Sequence[str] | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        shuffle_buffer: int = 0,
        read_batch_size: int = 256,
        num_workers: int = 0,
        version: int | None = None,
        pin_memory: bool | None = None,
        partition_versions: dict[str, str] | None = None,
        tiles_on_device: bool = False,
        tile_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
        self.root = str(root)
        self.partitions = list(partitions) if partitions is not None else None
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.read_batch_size = read_batch_size  # unused since the cache; kept for callers
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.version = version
        self.partition_versions = partition_versions
        self.tiles_on_device = tiles_on_device
        self.tile_dtype = tile_dtype
        self._resident: torch.Tensor | None = None
        self._ready = False
        self._train_sampler: IndexBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        contract = delta_store.table_contract(self.root, RASTER_TABLE)
        if contract is None:
            raise MissingInputError(
                f"no raster_tiles table under {self.root}: run s2vec materialize --stages "
                "extract,features,raster first"
            )
        self.contract: dict[str, Any] = contract
        self.channels: list[str] = list(contract["channels"])
        self.side: int = int(contract["side"])
        self.shape = (len(self.channels), self.side, self.side)
        self.version = raster_snapshot(self.root, self.version)
        if self.partitions is None:
            self.partitions = raster_partition_keys(self.root, self.version)
        versions = self.partition_versions or raster_partition_versions(
            self.root, self.partitions, self.version
        )
        self.cache = tile_cache(
            self.root,
            self.partitions,
            self.version,
            versions,
            self.channels,
            self.side,
            self.tile_dtype,
        )
        tokens = self.cache.tokens().tolist()
        self.rule, val = _rule_from_hashes(token_unit_hash(tokens), tokens, self.val_fraction)
        self.train_indices = np.flatnonzero(~val)
        self.val_indices = np.flatnonzero(val)
        self.n_train, self.n_val = len(self.train_indices), len(self.val_indices)
        if self.n_train == 0:
            raise MissingInputError(
                f"raster_tiles under {self.root} has no tiles in partitions "
                f"{', '.join(self.partitions)}: run s2vec materialize --cells "
                f"{','.join(self.partitions)} --stages extract,features,raster first"
            )
        self.channel_mean, self.channel_std = self._channel_stats()
        self._ready = True

    def _channel_stats(self, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        c = self.shape[0]
        tiles = self.cache.tiles()
        total, total_sq = np.zeros(c), np.zeros(c)
        for i in range(0, self.n_train, chunk):
            x = tiles[self.train_indices[i : i + chunk]].astype(np.float64)
            total += x.sum(axis=(0, 2, 3))
            total_sq += np.einsum("bcij,bcij->c", x, x)
        count = self.n_train * self.side * self.side
        mean = total / count
        var = np.maximum(total_sq / count - mean**2, 0.0)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def normalization_stats(self) -> dict[str, list[float]]:
        """Per-channel mean/std of the training split, for the model buffers and the card."""
        return {"mean": self.channel_mean.tolist(), "std": self.channel_std.tolist()}

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DDP workers and loader workers load their own resident copy.
        return {**self.__dict__, "_resident": None}

    def _loader(self, sampler: IndexBatchSampler) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            TileIndices(self.cache.n) if self.tiles_on_device else CachedTiles(self.cache),
            batch_sampler=sampler,
            collate_fn=_whole_batch,
            num_workers=workers,
            # deltalake panics in forked children: workers are spawned.
            multiprocessing_context="spawn" if workers > 0 else None,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = _replica()
        self._train_sampler = IndexBatchSampler(
            self.train_indices, self.batch_size, True, self.seed, rank, world
        )
        if self.trainer is not None:  # also right when resuming from a checkpoint
            self._train_sampler.set_epoch(self.trainer.current_epoch)
        return self._loader(self._train_sampler)

    def val_dataloader(self) -> DataLoader:
        # Every rank validates on all of it (small by design): a validation set smaller than
        # the number of ranks is not silently lost.
        return self._loader(IndexBatchSampler(self.val_indices, self.batch_size))

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        """With ``tiles_on_device`` a batch arrives as row indices: gather its tiles from the
        copy of the whole cache on the batch's device (made on first use)."""
        if not self.tiles_on_device:
            return batch
        if self._resident is None or self._resident.device != batch.device:
            self._resident = torch.from_numpy(np.array(self.cache.tiles())).to(batch.device)
        return self._resident.index_select(0, batch)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle for ``epoch`` (called by ``EpochSetter`` at each epoch start)."""
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)


class EpochSetter(L.Callback):
    """Tells the datamodule the epoch, so each epoch shuffles differently and reproducibly."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if isinstance(dm, RasterTileDataModule):
            dm.set_epoch(trainer.current_epoch)


def synthetic_raster_tiles(
    root: str | os.PathLike,
    images_per_partition: dict[str, int] | None = None,
    channels: int = 8,
    side: int = 16,
    taxonomy_version: str = "synthetic-1",
    seed: int = 0,
    empty_fraction: float = 0.2,
    image_level: int = 13,
) -> dict[str, Any]:
    """Write a ``raster_tiles`` table of structured fake tiles (tests, benchmarks, demos).

    Images are real level-``image_level`` S2 cells near Helsinki (partition 4693) and Monaco
    (12cd) by default; each channel is a smooth wave over the pixel grid with a per-image phase,
    plus noise, with ``empty_fraction`` of pixels empty (all channels 0). Returns the contract.
    """
    from s2vec_pipeline.cells import s2

    anchors = {"4693": (60.17, 24.94), "12cd": (43.73, 7.42)}
    images_per_partition = images_per_partition or {"4693": 24, "12cd": 16}
    rng = np.random.default_rng(seed)
    names = [f"ch{c:03d}" for c in range(channels)]
    pixel_level = image_level + int(math.log2(side))
    contract = {
        "table": RASTER_TABLE,
        "profile": "city"
        if (image_level, side) == (13, 16)
        else f"custom:{image_level}:{pixel_level}",
        "image_level": image_level,
        "pixel_level": pixel_level,
        "side": side,
        "taxonomy_version": taxonomy_version,
        "channels": names,
    }
    freq = rng.uniform(0.1, 0.6, size=(channels, 2))
    scale = rng.uniform(0.5, 3.0, size=channels)
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    batches = []
    for part, n in images_per_partition.items():
        lat, lng = anchors.get(part, (0.0, 0.0))
        anchor = s2.latlng_to_cell_id(np.array([lat]), np.array([lng]), image_level)
        if s2.to_token(s2.parent(anchor, 6))[0] != part:
            raise ValueError(f"no anchor point for partition {part!r}")
        # The image cells: descendants of a coarser ancestor, enough for n images.
        up = image_level - max(1, math.ceil(math.log(max(n, 2), 4)))
        ids = s2.children_grid(s2.parent(anchor, up), image_level).reshape(-1)[:n]
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, 1))
        wave = freq[None, :, 0, None, None] * rows + freq[None, :, 1, None, None] * cols
        x = scale[None, :, None, None] * (1.2 + np.sin(wave + phase))
        x = np.log1p(np.maximum(x + rng.normal(0, 0.05, x.shape), 0))
        empty = rng.random((n, 1, side, side)) < empty_fraction
        x = np.where(empty, 0.0, x).astype(np.float32)
        flat = x.reshape(n, -1)
        offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
        batches.append(
            pa.table(
                {
                    "parent_l6": pa.array([part] * n, pa.string()),
                    "image_token": pa.array(s2.to_token(ids), pa.string()),
                    "image_id": pa.array(s2.to_signed(ids), pa.int64()),
                    "nonempty_pixels": pa.array((~empty).reshape(n, -1).sum(1), pa.int32()),
                    "taxonomy_version": pa.array([taxonomy_version] * n, pa.string()),
                    "tensor": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.ravel())),
                }
            )
        )
    table = pa.concat_tables(batches)
    delta_store.write_partitions(root, RASTER_TABLE, table, list(images_per_partition), contract)
    return contract
