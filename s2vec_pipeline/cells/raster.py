"""Rasterization: each image cell becomes a C×S×S float32 tensor of log1p(feature values).

Pixels sit at their true S2 (i, j) offsets inside the image (``row``, ``col`` of
``cell_features``), so neighbouring cells are neighbouring pixels. Tensors are stored flat in
(channel, row, col) order as ``list<float32>`` (Delta has no usable fixed-size lists).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from s2vec_pipeline.cells import s2
from s2vec_pipeline.errors import IncompatibleTableError

RASTER_SCHEMA = pa.schema(
    [
        pa.field("parent_l6", pa.string()),
        pa.field("image_token", pa.string()),
        pa.field("image_id", pa.int64()),
        pa.field("nonempty_pixels", pa.int32()),
        pa.field("taxonomy_version", pa.string()),
        pa.field("tensor", pa.list_(pa.float32())),
    ]
)


def tensors_from_cells(
    image_index: np.ndarray,
    n_images: int,
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    side: int,
) -> np.ndarray:
    """Scatter per-pixel values (n_pixels, C) into (n_images, C, S, S) float32 log1p tensors."""
    out = np.zeros((n_images, values.shape[1], side, side), dtype=np.float32)
    out[image_index, :, rows, cols] = np.log1p(values.astype(np.float64)).astype(np.float32)
    return out


def iter_raster_batches(
    cell_features: pl.DataFrame,
    channel_names: Sequence[str],
    side: int,
    images_per_batch: int = 1024,
) -> Iterator[pa.RecordBatch]:
    """Yield ``raster_tiles`` record batches; memory is bounded by ``images_per_batch``."""
    cf = cell_features.sort("image_token", "row", "col")
    images = cf.group_by("image_token", maintain_order=True).agg(
        pl.col("parent_l6").first(), pl.len().alias("nonempty_pixels")
    )
    starts = np.concatenate([[0], np.cumsum(images["nonempty_pixels"].to_numpy().astype(np.int64))])
    channel_values = cf.select(list(channel_names)).to_numpy()
    rows = cf["row"].to_numpy().astype(np.intp)
    cols = cf["col"].to_numpy().astype(np.intp)
    versions = cf["taxonomy_version"]
    for lo in range(0, images.height, images_per_batch):
        hi = min(lo + images_per_batch, images.height)
        a, b = starts[lo], starts[hi]
        counts = np.diff(starts[lo : hi + 1])
        image_index = np.repeat(np.arange(hi - lo), counts)
        tensors = tensors_from_cells(
            image_index, hi - lo, rows[a:b], cols[a:b], channel_values[a:b], side
        )
        flat = tensors.reshape(hi - lo, -1)
        offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
        tokens = images["image_token"][lo:hi]
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(images["parent_l6"][lo:hi].to_numpy(), pa.string()),
                pa.array(tokens.to_numpy(), pa.string()),
                pa.array(s2.to_signed(s2.from_token(tokens.to_numpy())), pa.int64()),
                pa.array(counts.astype(np.int32), pa.int32()),
                pa.array(versions.gather(starts[lo:hi]).to_numpy(), pa.string()),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.ravel())),
            ],
            schema=RASTER_SCHEMA,
        )


def rasterize(cell_features: pl.DataFrame, channel_names: Sequence[str], side: int) -> pa.Table:
    """All images at once (for tests and small partitions)."""
    return pa.Table.from_batches(
        list(iter_raster_batches(cell_features, channel_names, side)), schema=RASTER_SCHEMA
    )


def tensor_array(
    tiles: pl.DataFrame | pa.Table | pa.RecordBatch | pl.Series | pa.Array | pa.ChunkedArray,
    channels: int,
    side: int,
) -> np.ndarray:
    """The ``tensor`` column (or the column itself) as an (n, C, S, S) float32 array.

    The one decoder of raster tensors: no per-row loop, and every row's length is checked
    against C×S×S (a null or a wrong length raises ``IncompatibleTableError``).
    """
    col = tiles["tensor"] if isinstance(tiles, pl.DataFrame | pa.Table | pa.RecordBatch) else tiles
    arr = col.to_arrow() if isinstance(col, pl.Series) else col
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n, size = len(arr), channels * side * side
    if arr.null_count:
        raise IncompatibleTableError("raster_tiles has null tensors: rebuild the raster table")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if n and (lengths != size).any():
        bad = int(lengths[lengths != size][0])
        raise IncompatibleTableError(
            f"raster_tiles holds a tensor of {bad} values where its contract says "
            f"C×S×S = {channels}×{side}×{side} = {size}: rebuild the raster table"
        )
    # flatten() honours the array's offset (slices) and skips nothing: lengths are all equal.
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(n, channels, side, side)
