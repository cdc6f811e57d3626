"""A ``raster_tiles`` table of structured fake tiles, for tests, benchmarks and demos without
an OSM extract."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pyarrow as pa

from s2vec_pipeline.model.registry import RASTER_TABLE
from s2vec_pipeline.storage import delta_store


def synthetic_raster_tiles(
    root: str | os.PathLike,
    images_per_partition: dict[str, int] | None = None,
    channels: int = 8,
    side: int = 16,
    taxonomy_version: str = "synthetic-1",
    seed: int = 0,
    empty_fraction: float = 0.2,
    image_level: int = 13,
    value_fraction: float = 1.0,
) -> dict[str, Any]:
    """Write a ``raster_tiles`` table of structured fake tiles (tests, benchmarks, demos).

    Images are real level-``image_level`` S2 cells near Helsinki (partition 4693) and Monaco
    (12cd) by default; each channel is a smooth wave over the pixel grid with a per-image phase,
    plus noise, with ``empty_fraction`` of pixels empty (all channels 0) and, in the others,
    each channel's value kept with probability ``value_fraction`` (else 0). Real tiles are
    sparse: on a city ~29 % of pixels hold a feature and ~2 % of all values are nonzero
    (``empty_fraction=0.71, value_fraction=0.068``); the defaults give ~80 % nonzero. Returns
    the contract.
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
        if value_fraction < 1:  # drawn only then: the default tables stay what they were
            x[rng.random(x.shape) >= value_fraction] = 0.0
            empty = ~(x != 0).any(axis=1, keepdims=True)  # a pixel may have lost every value
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
