"""The batches Lightning trains on: one snapshot's tile cache, split by token hash and
gathered by index.

``RasterTileDataModule`` decodes the snapshot once (``tile_cache``), splits it
(``data.split_by_hash``) and computes the per-channel mean/std of the training split;
``IndexBatchSampler`` gives one seeded permutation per epoch, sharded over DDP ranks, as
numpy index arrays (no per-tile Python). The loader gathers each batch sparse
(:class:`SparseTiles`: the nonzero values and where they go) and the batch is densified
where it lands, after Lightning moved it to the training device (``dense_tiles``). Its
settings are the training config's (``TrainConfig``: batch size, split, seed, workers, pinned
memory, tiles on the device, dtype).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from s2vec_pipeline.errors import MissingInputError
from s2vec_pipeline.model.config import TrainConfig
from s2vec_pipeline.model.data import (
    RASTER_TABLE,
    raster_partition_keys,
    raster_partition_versions,
    raster_snapshot,
    split_by_hash,
    token_unit_hash,
)
from s2vec_pipeline.model.tile_cache import TileCache, gather_rows, tile_cache
from s2vec_pipeline.storage import delta_store


def _replica() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SparseTiles(NamedTuple):
    """A batch of tiles as their nonzero values: image ``i``'s are the next ``lengths[i]``
    ``values``, each at flat index ``positions`` (c*S*S + i*S + j, uint16 or uint32) in its
    image. Tensors only: the DataLoader pins them, Lightning moves them to the device, and
    ``dense_tiles`` builds the batch there (~6 bytes a nonzero float32 value moved, not 4
    bytes a value)."""

    positions: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor


def dense_tiles(batch: SparseTiles, image_shape: Sequence[int]) -> torch.Tensor:
    """The (B, C, S, S) tiles of ``batch`` on its device, in its values' dtype."""
    if batch.values.device.type == "cpu":
        return _dense_on_host(batch, image_shape)
    return _dense_on_device(batch, image_shape)


def _dense_on_host(batch: SparseTiles, image_shape: Sequence[int]) -> torch.Tensor:
    # numpy, not torch, on the CPU: its zeros are pages the kernel zeroes on first touch
    # (huge pages where it can) and its scatter is faster on one thread: ~1.5x at 2 %
    # nonzero, ~4x dense, measured here.
    positions, values, lengths = (t.numpy() for t in batch)
    size = math.prod(image_shape)
    out = np.zeros(len(lengths) * size, values.dtype)
    index = np.repeat(np.arange(0, len(out), size), lengths)  # where each value's image starts
    index += positions
    out[index] = values
    return torch.from_numpy(out).view(len(lengths), *image_shape)


def _dense_on_device(batch: SparseTiles, image_shape: Sequence[int]) -> torch.Tensor:
    positions, values, lengths = batch
    rows, size = len(lengths), math.prod(image_shape)
    out = torch.zeros(rows * size, dtype=values.dtype, device=values.device)
    image = torch.arange(rows, device=values.device)
    row = torch.repeat_interleave(image, lengths, output_size=len(values))  # no host sync
    out.index_copy_(0, row * size + positions.long(), values)
    return out.view(rows, *image_shape)


class CachedTiles(Dataset):
    """Batches of a :class:`TileCache` by index: ``dataset[indices]`` → :class:`SparseTiles`
    of the cache's dtype (one vectorized segment gather of the mapped files); ``dataset[i]``
    → one dense (C, S, S) tile.

    Pickles as the cache's location (the files are mapped again in each spawned worker).
    """

    def __init__(self, cache: TileCache) -> None:
        self.cache = cache
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cache": self.cache, "_arrays": None}

    def __len__(self) -> int:
        return self.cache.n

    def __getitems__(self, indices: np.ndarray) -> SparseTiles:
        if self._arrays is None:
            cache = self.cache
            self._arrays = (np.array(cache.indptr()), cache.positions(), cache.values())
        positions, values, lengths = gather_rows(*self._arrays, np.asarray(indices))
        return SparseTiles(*map(torch.from_numpy, (positions, values, lengths)))

    def __getitem__(self, index: int) -> torch.Tensor:
        return dense_tiles(self.__getitems__(np.array([index])), self.cache.shape[1:])[0]


class ResidentTiles:
    """A :class:`TileCache`'s sparse arrays copied to one device (``tiles_on_device``):
    batches gathered there from row indices, the same :class:`SparseTiles` as
    :class:`CachedTiles` gives (the same segment gather, in torch)."""

    def __init__(self, cache: TileCache, device: torch.device) -> None:
        self.device = device
        self.indptr = torch.from_numpy(np.array(cache.indptr())).to(device)
        # int32: torch's unsigned types can be copied and cast on a GPU, not indexed.
        self.positions = torch.from_numpy(cache.positions().astype(np.int32)).to(device)
        self.values = torch.from_numpy(np.array(cache.values())).to(device)

    def gather(self, batch: TileRows) -> SparseTiles:
        rows = batch.rows
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        first = lengths.cumsum(0) - lengths
        # The count from the host: torch would wait for the device to size the output.
        element = torch.repeat_interleave(starts - first, lengths, output_size=batch.nonzero)
        element += torch.arange(batch.nonzero, device=rows.device)
        return SparseTiles(self.positions[element], self.values[element], lengths)


class TileRows(NamedTuple):
    """A batch as its row indices (int64) and its number of nonzero values, counted on the
    host: the device gathers it without waiting for a count (no per-step host sync)."""

    rows: torch.Tensor
    nonzero: int


class TileIndices(Dataset):
    """``dataset[indices]`` → :class:`TileRows`: the tiles are gathered on the training
    device from a resident copy (``TrainConfig.tiles_on_device``, :class:`ResidentTiles`).

    Pickles as the cache's location (each spawned worker loads the image offsets itself).
    """

    def __init__(self, cache: TileCache) -> None:
        self.cache = cache
        self._indptr: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cache": self.cache, "_indptr": None}

    def __len__(self) -> int:
        return self.cache.n

    def __getitems__(self, indices: np.ndarray) -> TileRows:
        if self._indptr is None:
            self._indptr = np.array(self.cache.indptr())
        rows = np.asarray(indices, dtype=np.int64)
        nonzero = int((self._indptr[rows + 1] - self._indptr[rows]).sum())
        return TileRows(torch.from_numpy(rows), nonzero)

    def __getitem__(self, index: int) -> TileRows:
        return self.__getitems__(np.array([index]))


def _whole_batch(batch: SparseTiles | TileRows) -> SparseTiles | TileRows:
    """The DataLoader's collate: ``__getitems__`` already built the batch."""
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
    ``setup`` runs), all partitions with data or the given ones, batched as ``config`` says.

    ``setup`` decodes the snapshot once into a sparse :class:`TileCache` (or reuses it), splits
    it by image-token hash and computes the per-channel mean/std of the training split (all
    pixels, empty ones included, float64 sums of the nonzero values). Batches are gathered
    sparse by index from the mapped cache (each epoch one seeded permutation of the training
    split, sharded over DDP ranks) and densified in ``on_after_batch_transfer``, after
    Lightning moved them to the training device. With ``config.tiles_on_device`` the cache's
    sparse arrays are copied to the training device once (8 bytes a nonzero float32 value: at
    2 % nonzero a 122×16×16 tile takes ~5 kB there, dense it would be 125 kB) and the loader
    moves only indices; the batches, and so the weights, are the same.
    ``partition_versions``: the partitions' data versions at ``version`` when the caller
    has them (else read here).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        config: TrainConfig | None = None,
        partitions: Sequence[str] | None = None,
        *,
        version: int | None = None,
        partition_versions: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        config = config or TrainConfig()
        self.root = str(root)
        self.partitions = list(partitions) if partitions is not None else None
        self.batch_size, self.val_fraction, self.seed = (
            config.batch_size,
            config.val_fraction,
            config.seed,
        )
        self.num_workers = config.num_workers
        self.pin_memory = config.pins_memory()
        self.version = version
        self.partition_versions = partition_versions
        self.tiles_on_device = config.tiles_on_device
        self.tile_dtype = config.tile_dtype
        self._resident: ResidentTiles | None = None
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
        self.rule, val = split_by_hash(token_unit_hash(tokens), tokens, self.val_fraction)
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

    def _channel_stats(self, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean/std of the training split from the nonzero values: float64 sums
        per channel (a value's channel is its position // S×S); the zeros count in the
        divisor, every pixel of every training tile."""
        c, pixels = self.shape[0], self.side * self.side
        arrays = (self.cache.indptr(), self.cache.positions(), self.cache.values())
        total, total_sq = np.zeros(c), np.zeros(c)
        for i in range(0, self.n_train, chunk):
            position, value, _ = gather_rows(*arrays, self.train_indices[i : i + chunk])
            channel, x = position // pixels, value.astype(np.float64)
            total += np.bincount(channel, weights=x, minlength=c)
            total_sq += np.bincount(channel, weights=x * x, minlength=c)
        count = self.n_train * pixels
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
            TileIndices(self.cache) if self.tiles_on_device else CachedTiles(self.cache),
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

    def on_after_batch_transfer(
        self, batch: SparseTiles | TileRows, dataloader_idx: int
    ) -> torch.Tensor:
        """The (B, C, S, S) tiles of a loader batch, built on the device it was moved to."""
        return self.dense_batch(batch)

    def dense_batch(self, batch: SparseTiles | TileRows) -> torch.Tensor:
        """The (B, C, S, S) tiles of a loader batch (:class:`SparseTiles`, or with
        ``tiles_on_device`` :class:`TileRows`: gathered from the copy of the cache on the
        batch's device, made on first use), on the batch's device."""
        if isinstance(batch, TileRows):
            device = batch.rows.device
            if self._resident is None or self._resident.device != device:
                self._resident = ResidentTiles(self.cache, device)
            batch = self._resident.gather(batch)
        return dense_tiles(batch, self.shape)

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
