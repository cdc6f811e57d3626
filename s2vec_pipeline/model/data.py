"""Streaming training data: raster tiles from Delta, split, shuffled and normalized.

Tiles are read from one Delta version of ``raster_tiles`` (a snapshot: a concurrent refresh
changes nothing here), one partition at a time in a content-determined order
(``stream_raster_tiles``): memory is bounded by one partition, the shuffle buffer and the
training batch. The train/val split is a pure function of each ``image_token`` (hash), so it
is the same on every run, rank and worker. Per-channel mean/std come from one streaming pass
over the training split.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from s2vec_pipeline import delta_store
from s2vec_pipeline.errors import MissingInputError
from s2vec_pipeline.raster import tensor_array
from s2vec_pipeline.versioning import partition_data_version

RASTER_TABLE = "raster_tiles"


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
    except FileNotFoundError as e:
        raise _vacuumed(root, version) from e


def _read_version(
    root: str | os.PathLike, partitions: list[str], columns: list[str] | None, version: int
) -> pl.DataFrame:
    try:
        return delta_store.read_partitions(root, RASTER_TABLE, partitions, columns, version)
    except FileNotFoundError as e:
        raise _vacuumed(root, version) from e


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


def plan_split(
    root: str | os.PathLike,
    partitions: Sequence[str],
    val_fraction: float,
    version: int | None = None,
    read_batch_size: int = 4096,
) -> tuple[SplitRule, int, int]:
    """One pass over ``image_token`` only: the split rule and the (train, val) tile counts.

    At least one validation tile when there are two or more tiles and ``val_fraction`` > 0;
    at least one training tile whenever there is a tile.
    """
    n = n_val = 0
    lo: tuple[float, str] | None = None
    hi: tuple[float, str] | None = None
    version = raster_snapshot(root, version)
    for batch in stream_raster_tiles(root, partitions, version, ["image_token"], read_batch_size):
        tokens = batch.column("image_token").to_pylist()
        if not tokens:
            continue
        h = token_unit_hash(tokens)
        n += len(tokens)
        n_val += int((h < val_fraction).sum())
        i, j = int(h.argmin()), int(h.argmax())
        if lo is None or (h[i], tokens[i]) < lo:
            lo = (float(h[i]), tokens[i])
        if hi is None or (h[j], tokens[j]) > hi:
            hi = (float(h[j]), tokens[j])
    forced_val = forced_train = None
    if n >= 2 and val_fraction > 0 and n_val == 0 and lo is not None:
        forced_val, n_val = lo[1], 1
    if n >= 1 and n_val == n and hi is not None:
        forced_train, n_val = hi[1], n - 1
    return SplitRule(val_fraction, forced_val, forced_train), n - n_val, n_val


def _replica() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class RasterTileStream(IterableDataset):
    """Batches of (B, C, S, S) float32 tiles of one split, streamed from Delta.

    The training split is sharded over ranks and dataloader workers by position in the
    stream. Under several ranks every shard yields the same number of tiles (the remainder is
    dropped) so that DDP ranks step in lockstep. The validation split is sharded over workers
    only: every rank validates on all of it (small by design), so a validation set smaller
    than the number of ranks is not silently lost. Training shuffles within a bounded buffer
    seeded by (seed, epoch, shard).
    """

    def __init__(
        self,
        root: str,
        partitions: Sequence[str],
        version: int,
        rule: SplitRule,
        split: str,
        shape: tuple[int, int, int],
        n_tiles: int,
        batch_size: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
        read_batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.root, self.partitions, self.rule, self.split = root, list(partitions), rule, split
        self.version = version
        self.shape, self.n_tiles, self.batch_size = shape, n_tiles, batch_size
        self.shuffle_buffer, self.seed, self.read_batch_size = shuffle_buffer, seed, read_batch_size
        self.num_workers = max(1, num_workers)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_sizes(self, world: int) -> list[int]:
        shards = world * self.num_workers
        if world > 1:
            return [self.n_tiles // shards] * shards
        return [(self.n_tiles - s + shards - 1) // shards for s in range(shards)]

    def _replica(self) -> tuple[int, int]:
        return (0, 1) if self.split == "val" else _replica()

    def __len__(self) -> int:
        """Batches this rank yields per epoch (summed over its workers)."""
        rank, world = self._replica()
        sizes = self._shard_sizes(world)[rank * self.num_workers : (rank + 1) * self.num_workers]
        return sum(math.ceil(s / self.batch_size) for s in sizes)

    def _tiles(self, shard: int, shards: int, cap: int) -> Iterator[np.ndarray]:
        i = kept = 0
        for batch in stream_raster_tiles(
            self.root,
            self.partitions,
            self.version,
            ["image_token", "tensor"],
            self.read_batch_size,
        ):
            if batch.num_rows == 0:
                continue
            val = self.rule.is_val(batch.column("image_token").to_pylist())
            rows = np.flatnonzero(val if self.split == "val" else ~val)
            picked = [r for k, r in enumerate(rows) if (i + k) % shards == shard]
            i += len(rows)
            if not picked:
                continue
            tensors = tensor_array(batch.column("tensor").take(picked), *self.shape[:2])
            for t in tensors:
                if kept >= cap:
                    return
                kept += 1
                yield t.copy()  # a copy, so the buffer does not pin whole read batches

    def _shuffled(self, tiles: Iterator[np.ndarray], rng: np.random.Generator):
        buf: list[np.ndarray] = []
        for t in tiles:
            if len(buf) < self.shuffle_buffer:
                buf.append(t)
                continue
            j = int(rng.integers(len(buf)))
            yield buf[j]
            buf[j] = t
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[torch.Tensor]:
        rank, world = self._replica()
        info = get_worker_info()
        worker = info.id if info is not None else 0
        shard, shards = rank * self.num_workers + worker, world * self.num_workers
        cap = self._shard_sizes(world)[shard]
        tiles = self._tiles(shard, shards, cap)
        if self.shuffle_buffer > 1:
            tiles = self._shuffled(tiles, np.random.default_rng([self.seed, self.epoch, shard]))
        out: list[np.ndarray] = []
        for t in tiles:
            out.append(t)
            if len(out) == self.batch_size:
                yield torch.from_numpy(np.stack(out))
                out = []
        if out:
            yield torch.from_numpy(np.stack(out))


class RasterTileDataModule(L.LightningDataModule):
    """Train/val tiles of ``raster_tiles`` at one Delta ``version`` (default: the latest when
    ``setup`` runs), all partitions with data or the given ones.

    ``setup`` makes two cheap streaming passes: tokens (split) and training tensors
    (per-channel mean/std over all pixels, empty ones included, in float64 sums).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        partitions: Sequence[str] | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        shuffle_buffer: int = 2048,
        read_batch_size: int = 256,
        num_workers: int = 0,
        version: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
        self.root = str(root)
        self.partitions = list(partitions) if partitions is not None else None
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.shuffle_buffer, self.read_batch_size = shuffle_buffer, read_batch_size
        self.num_workers = num_workers
        self.version = version
        self._ready = False

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
        self.rule, self.n_train, self.n_val = plan_split(
            self.root, self.partitions, self.val_fraction, self.version
        )
        if self.n_train == 0:
            raise MissingInputError(
                f"raster_tiles under {self.root} has no tiles in partitions "
                f"{', '.join(self.partitions)}: run s2vec materialize --cells "
                f"{','.join(self.partitions)} --stages extract,features,raster first"
            )
        self.channel_mean, self.channel_std = self._channel_stats()
        self._ready = True

    def _channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.shape[0]
        total, total_sq, count = np.zeros(c), np.zeros(c), 0
        stream = RasterTileStream(
            self.root,
            self.partitions or [],
            self.version,
            self.rule,
            "train",
            self.shape,
            self.n_train,
            batch_size=self.read_batch_size,
            read_batch_size=self.read_batch_size,
        )
        for x in stream._tiles(0, 1, self.n_train):
            x64 = x.reshape(c, -1).astype(np.float64)
            total += x64.sum(axis=1)
            total_sq += (x64 * x64).sum(axis=1)
            count += x64.shape[1]
        mean = total / count
        var = np.maximum(total_sq / count - mean**2, 0.0)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def normalization_stats(self) -> dict[str, list[float]]:
        """Per-channel mean/std of the training split, for the model buffers and the card."""
        return {"mean": self.channel_mean.tolist(), "std": self.channel_std.tolist()}

    def _stream(self, split: str) -> RasterTileStream:
        train = split == "train"
        return RasterTileStream(
            self.root,
            self.partitions or [],
            self.version,
            self.rule,
            split,
            self.shape,
            self.n_train if train else self.n_val,
            self.batch_size,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
            read_batch_size=self.read_batch_size,
            num_workers=self.num_workers,
        )

    def _loader(self, dataset: RasterTileStream) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=None,  # the stream yields whole batches
            num_workers=workers,
            # deltalake panics in forked children: workers must be spawned.
            multiprocessing_context="spawn" if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        self._train = self._stream("train")
        if self.trainer is not None:  # also right when resuming from a checkpoint
            self._train.set_epoch(self.trainer.current_epoch)
        return self._loader(self._train)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._stream("val"))

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle for ``epoch`` (called by ``EpochSetter`` at each epoch start)."""
        if getattr(self, "_train", None) is not None:
            self._train.set_epoch(epoch)


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
    from s2vec_pipeline import s2

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
