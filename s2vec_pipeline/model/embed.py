"""Batch inference: one embedding per S2 cell (pixel) and per image, as Arrow tables.

Every pixel of every image with data gets a row, empty pixels included (their embedding still
depends on the image around them). Pixel ``k`` of an image's encoder output is the cell at
``(row, col) = divmod(k, S)``: ``s2.children_grid`` gives the cell ids in that same order.
The image embedding is the mean of its pixel embeddings.

Images without data (no raster row) are not stored cell by cell: a level-6 partition holds
4^(pixel - 6) pixel cells (4^11 in the city profile). Their input is the all-zero tensor, so
their S·S pixel embeddings depend only on the model and the pixel's position: each embedded
partition gets those S·S rows once in ``empty_image_embeddings`` (keyed by ``parent_l6`` and
``pixel`` = row·S + col), which also records that the partition was embedded with that model.
``analysis.cell_matrices.embedding_matrix`` gives the embedding of any pixel cell of such a
partition.

Inference runs on the GPU when there is one (``device="auto"``): the model (loaded on the
CPU) is moved there, tiles go through page-locked host memory with asynchronous copies, the
encoder runs under bf16 autocast, and one batch is in flight while the previous one's rows
are built. On the CPU it runs in fp32. Tiles are read from one Delta version of
``raster_tiles``; the result and the commits record it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.raster import tensor_array
from s2vec_pipeline.errors import MissingInputError, S2VecError
from s2vec_pipeline.model.data import RASTER_TABLE, raster_snapshot, read_raster_partition
from s2vec_pipeline.model.mae import S2VecMAE
from s2vec_pipeline.model.registry import IncompatibleModelError, ModelCard, check_compatible
from s2vec_pipeline.storage import delta_store, tables
from s2vec_pipeline.storage.versioning import partition_data_version

CELL_TABLE = tables.CELL_EMBEDDINGS
IMAGE_TABLE = tables.IMAGE_EMBEDDINGS
EMPTY_TABLE = tables.EMPTY_IMAGE_EMBEDDINGS

EMBEDDING_SCHEMA = pa.schema(
    [
        pa.field("parent_l6", pa.string()),
        pa.field("image_token", pa.string()),
        pa.field("cell_token", pa.string()),
        pa.field("cell_id", pa.int64()),  # S2 id bit-cast to signed, as in raster_tiles
        pa.field("level", pa.int8()),
        pa.field("model_version", pa.string()),
        pa.field("embedding", pa.list_(pa.float32())),  # never fixed_size_list (Delta)
    ]
)


#: One row per pixel position of the all-zero image, per embedded partition and model.
EMPTY_SCHEMA = pa.schema(
    [
        pa.field("parent_l6", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("row", pa.int16()),
        pa.field("col", pa.int16()),
        pa.field("pixel", pa.int16()),  # row * S + col: the join key of cell positions
        pa.field("embedding", pa.list_(pa.float32())),
    ]
)


def embedding_contract(card: ModelCard, table: str) -> dict[str, Any]:
    """Contract for the embedding tables: embeddings of one resolution and taxonomy.

    The model version is a column, not part of the contract, so a retrained model can
    replace partitions one by one; queries compare only rows of the same version.
    """
    return {
        "table": table,
        "profile": card.profile,
        "image_level": card.image_level,
        "pixel_level": card.pixel_level,
        "side": card.side,
        "taxonomy_version": card.taxonomy_version,
    }


def _list_column(emb: np.ndarray) -> pa.ListArray:
    """(n, D) float32 → list<float32> without per-row Python."""
    n, d = emb.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(emb).ravel()))


def _check_model(model: S2VecMAE, card: ModelCard, root: str | os.PathLike) -> None:
    contract = delta_store.table_contract(root, RASTER_TABLE)
    if contract is None:
        raise MissingInputError(
            f"no raster_tiles table under {root}: run s2vec materialize --stages "
            "extract,features,raster first"
        )
    check_compatible(card, contract)
    if model.in_chans != len(card.channels) or model.img_size != card.side:
        raise IncompatibleModelError(
            f"the model object ({model.in_chans} channels, side {model.img_size}) does not match "
            f"its card {card.model_version} ({len(card.channels)} channels, side {card.side}): "
            "load both with load_model"
        )


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA GPU when there is one, else the CPU; ``"cpu"``; ``"cuda"``
    (or ``"cuda:N"``), refused with a clear error when no GPU is visible."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise S2VecError(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise S2VecError(f"device {device!r}: no CUDA GPU is visible here; use 'auto' or 'cpu'")
    return torch.device(device)


def default_batch_size(device: torch.device) -> int:
    """Images per inference batch: 1024 on a GPU (262,144 tokens at 16×16), 256 on the CPU."""
    return 1024 if device.type == "cuda" else 256


def _submit(
    model: S2VecMAE, x: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start encoding (n, C, S, S) tiles; on CUDA the result lands in page-locked host memory
    asynchronously and ``_collect`` waits for it."""
    cuda = device.type == "cuda"
    if cuda:
        # One copy, into page-locked memory, so the host-to-device copy runs asynchronously
        # (the caching host allocator keeps the block until that copy has finished).
        xt = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        xt.numpy()[...] = x
    else:
        xt = torch.from_numpy(np.require(x, np.float32, ["C", "W"]))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    # Inference mode per batch, never held across a ``yield``: it is thread-local, and
    # write_embeddings' consumer (deltalake) resumes these generators from its own threads.
    with torch.inference_mode(), autocast:
        z = model.encode(xt.to(device, non_blocking=cuda)).float()
        if not cuda:
            return z, None
        out = torch.empty(z.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(z, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return out, event


def _collect(key: Any, out: torch.Tensor, event: torch.cuda.Event | None) -> tuple[Any, np.ndarray]:
    if event is not None:
        event.synchronize()
    return key, out.numpy()


def encode_batches(
    model: S2VecMAE, batches: Iterator[tuple[Any, np.ndarray]], device: torch.device
) -> Iterator[tuple[Any, np.ndarray]]:
    """(key, (n, C, S, S) tiles) → (key, (n, S*S, D) float32 embeddings), in order.

    ``model`` must already be on ``device``. On CUDA one batch is in flight while the caller
    builds the previous one's rows on the CPU.
    """
    pending: tuple[Any, torch.Tensor, torch.cuda.Event | None] | None = None
    for key, x in batches:
        submitted = (key, *_submit(model, x, device))
        if pending is not None:
            yield _collect(*pending)
        pending = submitted
    if pending is not None:
        yield _collect(*pending)


_TILE_COLUMNS = ["parent_l6", "image_token", "image_id", "nonempty_pixels", "tensor"]


def read_tiles(root: str | os.PathLike, partition: str, version: int) -> tuple[pa.Table, str]:
    """A partition's tiles with data at ``raster_tiles`` version ``version`` (by image id),
    and the partition's data version there (the hash Dagster records for it)."""
    rows = read_raster_partition(root, partition, version)
    data_version = partition_data_version(RASTER_TABLE, rows)
    rows = rows.filter(pl.col("nonempty_pixels") > 0).select(_TILE_COLUMNS)
    return rows.to_arrow(compat_level=pl.CompatLevel.oldest()), data_version


def _embed_tiles(
    model: S2VecMAE, card: ModelCard, tiles: pa.Table, batch_size: int, device: torch.device
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    c, side = len(card.channels), card.side
    batches = ((b, tensor_array(b, c, side)) for b in tiles.to_batches(batch_size) if b.num_rows)
    for batch, emb in encode_batches(model, batches, device):
        yield _rows(card, batch, emb)


def _prepare(
    model: S2VecMAE, card: ModelCard, root: str | os.PathLike, device: str | torch.device
) -> torch.device:
    _check_model(model, card, root)
    dev = resolve_device(device)
    model.to(dev).eval()  # load_model loads on the CPU (map_location="cpu"); moved here
    return dev


def _token_strings(cell_ids: np.ndarray) -> pa.StringArray:
    """S2 tokens as an Arrow string array built from their bytes: no Python object per cell."""
    offsets, data = s2.to_token_utf8(cell_ids)
    return pa.StringArray.from_buffers(len(cell_ids), pa.py_buffer(offsets), pa.py_buffer(data))


def _string_column(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.cast(pa.string())


def _rows(
    card: ModelCard, batch: pa.RecordBatch, emb: np.ndarray
) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """Cell rows (S·S per image, encode order) and image rows of one batch; emb (n, S*S, D).

    Columnar throughout (Arrow take / repeat, vectorized tokens): no Python object per cell.
    """
    n, pixels, level = batch.num_rows, card.side * card.side, card.pixel_level
    image_ids = s2.from_signed(batch.column("image_id").to_numpy())
    cell_ids = s2.children_grid(image_ids, level).reshape(n * pixels)  # row-major = encode order
    parents = _string_column(batch.column("parent_l6"))
    image_tokens = _string_column(batch.column("image_token"))
    image_of_cell = pa.array(np.repeat(np.arange(n, dtype=np.int32), pixels))
    version = pa.scalar(card.model_version, pa.string())
    cells = pa.RecordBatch.from_arrays(
        [
            parents.take(image_of_cell),
            image_tokens.take(image_of_cell),
            _token_strings(cell_ids),
            pa.array(s2.to_signed(cell_ids), pa.int64()),
            pa.array(np.full(n * pixels, level, np.int8)),
            pa.repeat(version, n * pixels),
            _list_column(emb.reshape(n * pixels, -1)),
        ],
        schema=EMBEDDING_SCHEMA,
    )
    images = pa.RecordBatch.from_arrays(
        [
            parents,
            image_tokens,
            image_tokens,
            pa.array(batch.column("image_id").to_numpy(), pa.int64()),
            pa.array(np.full(n, card.image_level, np.int8)),
            pa.repeat(version, n),
            # torch's float32 mean sums in blocks (error ~1e-7 of the float64 mean), at the
            # speed of reading emb once: numpy's float64 mean cost a quarter of the row building
            _list_column(torch.from_numpy(emb).mean(dim=1).numpy()),
        ],
        schema=EMBEDDING_SCHEMA,
    )
    return cells, images


def empty_image_embedding(
    model: S2VecMAE, card: ModelCard, device: torch.device | None = None
) -> np.ndarray:
    """(S*S, D) pixel embeddings of an image without data (its all-zero raster tensor)."""
    dev = device or next(model.parameters()).device
    zeros = np.zeros((1, len(card.channels), card.side, card.side), np.float32)
    ((_, emb),) = encode_batches(model, iter([(None, zeros)]), dev)
    return emb[0]


def _empty_rows(card: ModelCard, partition: str, emb: np.ndarray) -> pa.Table:
    pixels = card.side * card.side
    row, col = np.divmod(np.arange(pixels, dtype=np.int16), np.int16(card.side))
    return pa.Table.from_arrays(
        [
            pa.array(np.full(pixels, partition, dtype=object), pa.string()),
            pa.array(np.full(pixels, card.model_version, dtype=object), pa.string()),
            pa.array(row, pa.int16()),
            pa.array(col, pa.int16()),
            pa.array(np.arange(pixels, dtype=np.int16), pa.int16()),
            _list_column(emb),
        ],
        schema=EMPTY_SCHEMA,
    )


def iter_embeddings(
    root: str | os.PathLike,
    model: S2VecMAE,
    card: ModelCard,
    partition: str,
    batch_size: int | None = None,
    *,
    device: str | torch.device = "auto",
    raster_version: int | None = None,
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """(cell rows, image rows) per batch of ``batch_size`` images of one partition, read at
    ``raster_tiles`` version ``raster_version`` (default: the latest). The partition's tiles
    are read whole (a partition fits in memory by design); its embeddings stream."""
    dev = _prepare(model, card, root, device)
    tiles, _ = read_tiles(root, partition, raster_snapshot(root, raster_version))
    yield from _embed_tiles(model, card, tiles, batch_size or default_batch_size(dev), dev)


def embed_partition(
    root: str | os.PathLike,
    model: S2VecMAE,
    card: ModelCard,
    partition: str,
    batch_size: int | None = None,
    *,
    device: str | torch.device = "auto",
    raster_version: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(cell_embeddings, image_embeddings) rows of one partition, held in memory.

    S·S cell rows per image with data. For large partitions prefer ``write_embeddings``,
    which streams the cell rows to Delta.
    """
    cells, images = [], []
    for c, i in iter_embeddings(
        root,
        model,
        card,
        partition,
        batch_size,
        device=device,
        raster_version=raster_version,
    ):
        cells.append(c)
        images.append(i)
    return (
        pa.Table.from_batches(cells, schema=EMBEDDING_SCHEMA),
        pa.Table.from_batches(images, schema=EMBEDDING_SCHEMA),
    )


def _holds_rows(root: str | os.PathLike, partition: str) -> bool:
    """Whether either embedding table holds rows of ``partition`` now."""
    return any(
        delta_store.table_exists(root, t)
        and delta_store.read_partitions(root, t, [partition], ["parent_l6"]).height > 0
        for t in (CELL_TABLE, IMAGE_TABLE)
    )


def write_embeddings(
    root: str | os.PathLike,
    model: S2VecMAE,
    card: ModelCard,
    partitions: Sequence[str],
    batch_size: int | None = None,
    *,
    device: str | torch.device = "auto",
    raster_version: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Embed and write each partition to ``cell_embeddings`` and ``image_embeddings``.

    Every partition is read at one ``raster_tiles`` version: ``raster_version``, default the
    latest when this call starts. Each table's partition is replaced in one atomic commit
    (cells first, then images; a crash between the two leaves cells of the new model and
    images of the old one, fixed by rerunning); both commits carry ``s2vec.model_version``,
    ``s2vec.raster_tiles_version`` and ``s2vec.raster_data_version`` in their commit info.
    Cell rows stream to Delta batch by batch (a retried commit embeds them again). Then the
    partition's rows of ``empty_image_embeddings`` (the S·S pixel embeddings of an image
    without data) are replaced, also when the partition has no image with data.

    Returns, per partition: ``images``, ``cells`` (rows written), ``cell_table_version``,
    ``image_table_version``, ``empty_table_version`` (the new Delta versions),
    ``raster_tiles_version`` (the raster snapshot read) and ``raster_data_version`` (that
    partition's data version there: the hash Dagster records for ``raster_tiles``).
    """
    dev = _prepare(model, card, root, device)
    snapshot = raster_snapshot(root, raster_version)
    size = batch_size or default_batch_size(dev)
    empty = empty_image_embedding(model, card, dev)
    return {
        partition: _write_partition(root, model, card, partition, snapshot, size, dev, empty)
        for partition in partitions
    }


def _write_partition(
    root: str | os.PathLike,
    model: S2VecMAE,
    card: ModelCard,
    partition: str,
    snapshot: int,
    size: int,
    dev: torch.device,
    empty: np.ndarray,
) -> dict[str, Any]:
    """``write_embeddings`` of one partition: its three commits and what they wrote."""
    tiles, raster_data_version = read_tiles(root, partition, snapshot)
    if tiles.num_rows == 0 and _holds_rows(root, partition):
        # an empty overwrite would delete embeddings and replace them with nothing
        raise MissingInputError(
            f"raster_tiles holds no image of partition {partition} (version {snapshot}), "
            f"but cell_embeddings does: its embeddings were kept. Recompute the raster "
            f"with a plain `s2vec materialize --root {root}` (it notices the lost "
            f"partition), then embed again"
        )
    images: list[pa.RecordBatch] = []  # image rows are small: kept for the second write

    def cell_batches() -> Iterator[pa.RecordBatch]:
        for c, i in _embed_tiles(model, card, tiles, size, dev):
            images.append(i)
            yield c

    metadata = {
        "s2vec.model_version": card.model_version,
        "s2vec.raster_tiles_version": str(snapshot),
        "s2vec.raster_data_version": raster_data_version,
    }

    def write(table: str, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> int:
        """Replace the partition's rows of one embedding table (its contract and layout)."""
        return delta_store.replace_partition(
            root,
            table,
            batches,
            schema,
            partition,
            embedding_contract(card, table),
            commit_metadata=metadata,
            row_group_rows=tables.EMBEDDING_ROW_GROUP_ROWS,
        )

    cell_version = write(CELL_TABLE, cell_batches(), EMBEDDING_SCHEMA)
    image_table = pa.Table.from_batches(images, schema=EMBEDDING_SCHEMA)
    image_version = write(IMAGE_TABLE, image_table.to_batches(), EMBEDDING_SCHEMA)
    empty_rows = _empty_rows(card, partition, empty)
    empty_version = write(EMPTY_TABLE, empty_rows.to_batches(), EMPTY_SCHEMA)
    return {
        "images": image_table.num_rows,
        "cells": image_table.num_rows * card.side * card.side,
        "cell_table_version": cell_version,
        "image_table_version": image_version,
        "empty_table_version": empty_version,
        "raster_tiles_version": snapshot,
        "raster_data_version": raster_data_version,
    }
