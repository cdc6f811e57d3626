"""Batch inference: one embedding per S2 cell (pixel) and per image, as Arrow tables.

Every pixel of every image with data gets a row, empty pixels included (their embedding still
depends on the image around them). Pixel ``k`` of an image's encoder output is the cell at
``(row, col) = divmod(k, S)``: ``s2.children_grid`` gives the cell ids in that same order.
The image embedding is the mean of its pixel embeddings.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from s2vec_pipeline import delta_store, s2
from s2vec_pipeline.errors import MissingInputError
from s2vec_pipeline.model.data import RASTER_TABLE, iter_raster_batches, tensors_to_numpy
from s2vec_pipeline.model.mae import S2VecMAE
from s2vec_pipeline.model.train import IncompatibleModelError, ModelCard, check_compatible

CELL_TABLE = "cell_embeddings"
IMAGE_TABLE = "image_embeddings"

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
            f"no raster_tiles table under {root}: materialize raster_tiles first"
        )
    check_compatible(card, contract)
    if model.in_chans != len(card.channels) or model.img_size != card.side:
        raise IncompatibleModelError(
            f"the model object ({model.in_chans} channels, side {model.img_size}) does not match "
            f"its card {card.model_version} ({len(card.channels)} channels, side {card.side}): "
            "load both with load_model"
        )


def _encode(model: S2VecMAE, x: np.ndarray) -> np.ndarray:
    device = next(model.parameters()).device
    xt = torch.from_numpy(np.require(x, requirements="W")).to(device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        z = model.encode(xt)
    return z.float().cpu().numpy()


def iter_embeddings(
    root: str | os.PathLike,
    model: S2VecMAE,
    card: ModelCard,
    partition: str,
    batch_size: int = 256,
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """(cell rows, image rows) per batch of images; memory bounded by ``batch_size`` images."""
    _check_model(model, card, root)
    side, level = card.side, card.pixel_level
    shape = (len(card.channels), side, side)
    # Eval mode stays on. Inference mode is entered per batch (in ``_encode``), never held
    # across a ``yield``: it is thread-local, and write_embeddings' consumer (deltalake)
    # resumes this generator from its own threads.
    model.eval()
    for batch in iter_raster_batches(
        root,
        [partition],
        ["parent_l6", "image_token", "image_id", "nonempty_pixels", "tensor"],
        batch_size,
    ):
        keep = np.flatnonzero(batch.column("nonempty_pixels").to_numpy() > 0)
        if keep.size == 0:
            continue
        if keep.size < batch.num_rows:
            batch = batch.take(pa.array(keep))
        yield _embed_batch(model, card, batch, shape, level)


def _embed_batch(
    model: S2VecMAE,
    card: ModelCard,
    batch: pa.RecordBatch,
    shape: tuple[int, int, int],
    level: int,
) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    n, pixels = batch.num_rows, shape[1] * shape[2]
    emb = _encode(model, tensors_to_numpy(batch.column("tensor"), shape))  # (n, S*S, D)
    image_ids = s2.from_signed(batch.column("image_id").to_numpy())
    cell_ids = s2.children_grid(image_ids, level).reshape(n * pixels)  # row-major = encode order
    parents = batch.column("parent_l6").to_numpy(zero_copy_only=False)
    image_tokens = batch.column("image_token").to_numpy(zero_copy_only=False)
    version = card.model_version
    cells = pa.RecordBatch.from_arrays(
        [
            pa.array(np.repeat(parents, pixels), pa.string()),
            pa.array(np.repeat(image_tokens, pixels), pa.string()),
            pa.array(s2.to_token(cell_ids), pa.string()),
            pa.array(s2.to_signed(cell_ids), pa.int64()),
            pa.array(np.full(n * pixels, level, np.int8)),
            pa.array(np.full(n * pixels, version, dtype=object), pa.string()),
            _list_column(emb.reshape(n * pixels, -1)),
        ],
        schema=EMBEDDING_SCHEMA,
    )
    images = pa.RecordBatch.from_arrays(
        [
            pa.array(parents, pa.string()),
            pa.array(image_tokens, pa.string()),
            pa.array(image_tokens, pa.string()),
            batch.column("image_id"),
            pa.array(np.full(n, card.image_level, np.int8)),
            pa.array(np.full(n, version, dtype=object), pa.string()),
            _list_column(emb.mean(axis=1, dtype=np.float64).astype(np.float32)),
        ],
        schema=EMBEDDING_SCHEMA,
    )
    return cells, images


def embed_partition(
    root: str | os.PathLike,
    model: S2VecMAE,
    card: ModelCard,
    partition: str,
    batch_size: int = 256,
) -> tuple[pa.Table, pa.Table]:
    """(cell_embeddings, image_embeddings) rows of one partition, held in memory.

    S·S cell rows per image with data. For large partitions prefer ``write_embeddings``,
    which streams the cell rows to Delta.
    """
    cells, images = [], []
    for c, i in iter_embeddings(root, model, card, partition, batch_size):
        cells.append(c)
        images.append(i)
    return (
        pa.Table.from_batches(cells, schema=EMBEDDING_SCHEMA),
        pa.Table.from_batches(images, schema=EMBEDDING_SCHEMA),
    )


def write_embeddings(
    root: str | os.PathLike,
    model: S2VecMAE,
    card: ModelCard,
    partitions: Sequence[str],
    batch_size: int = 256,
) -> dict[str, dict[str, int]]:
    """Embed and write each partition to ``cell_embeddings`` and ``image_embeddings``.

    Each table's partition is replaced in one atomic commit (cells first, then images;
    a crash between the two leaves cells of the new model and images of the old one, fixed
    by rerunning). Cell rows stream to Delta batch by batch. Returns per-partition row
    counts and the new table versions.
    """
    _check_model(model, card, root)
    out: dict[str, dict[str, int]] = {}
    for partition in partitions:
        images: list[pa.RecordBatch] = []
        # deltalake pulls the reader from inside its async runtime, where opening a Delta
        # table panics ("Cannot start a runtime from within a runtime"): open the raster
        # table and embed the first batch here, outside, before handing over the rest.
        stream = iter_embeddings(root, model, card, partition, batch_size)
        first = next(stream, None)

        def cell_batches(
            first: tuple[pa.RecordBatch, pa.RecordBatch] | None = first,
            stream: Iterator[tuple[pa.RecordBatch, pa.RecordBatch]] = stream,
            sink: list[pa.RecordBatch] = images,
        ) -> Iterator[pa.RecordBatch]:
            if first is None:
                return
            for c, i in itertools.chain([first], stream):
                sink.append(i)  # image rows are small: kept for the second write
                yield c

        reader = pa.RecordBatchReader.from_batches(EMBEDDING_SCHEMA, cell_batches())
        cell_version = delta_store.write_partitions(
            root,
            CELL_TABLE,
            reader,
            [partition],
            embedding_contract(card, CELL_TABLE),
            commit_metadata={"s2vec.model_version": card.model_version},
        )
        image_table = pa.Table.from_batches(images, schema=EMBEDDING_SCHEMA)
        image_version = delta_store.write_partitions(
            root,
            IMAGE_TABLE,
            image_table,
            [partition],
            embedding_contract(card, IMAGE_TABLE),
            commit_metadata={"s2vec.model_version": card.model_version},
        )
        out[partition] = {
            "images": image_table.num_rows,
            "cells": image_table.num_rows * card.side * card.side,
            "cell_table_version": cell_version,
            "image_table_version": image_version,
        }
    return out
