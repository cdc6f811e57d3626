"""Table contracts: the Delta tables under a root, what each column means, and the checks the
rows of each table must pass (the Dagster asset checks report these results).

Where each part of a contract lives, and why there:

* names, column meanings and row checks: here (Dagster's ``dagster/column_schema`` and the
  asset checks come from these);
* column types: beside the code that writes the rows (``osm.extract.OSM_FEATURES_SCHEMA``,
  ``cells.features.cell_features_schema``, ``cells.raster.RASTER_SCHEMA``,
  ``model.embed.EMBEDDING_SCHEMA`` / ``EMPTY_SCHEMA``), since that code builds them column by
  column; ``schema_matches`` checks written rows against them;
* the settings a table was written under (profile, levels, taxonomy, channels, model), stored
  in the table's Delta description: written and compared by ``delta_store`` (a write under
  other settings is refused), built by ``settings.PipelineSettings.contract`` and
  ``model.embed.embedding_contract``.

Each check returns ``(passed, details)``: details are small JSON-able facts for the UI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl
from deltalake import ColumnProperties, WriterProperties

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.raster import tensor_array

OSM_FEATURES = "osm_features"
CELL_FEATURES = "cell_features"
RASTER_TILES = "raster_tiles"
CELL_EMBEDDINGS = "cell_embeddings"
IMAGE_EMBEDDINGS = "image_embeddings"
EMPTY_IMAGE_EMBEDDINGS = "empty_image_embeddings"

# --- what each column means ----------------------------------------------------------------

OSM_FEATURES_COLUMNS = {
    "parent_l6": "level-6 token of the pixel (the partition)",
    "osm_type": "node, way or relation",
    "osm_id": "OSM id",
    "channel": "taxonomy channel the object matched",
    "lat": "representative point: the node, a point of the piece in the cell, or (counts) inside",
    "lon": "representative point (longitude)",
    "length_m": "metres of this way inside this pixel (length channels)",
    "area_m2": "square metres of the polygon inside this pixel (area channels)",
    "cell_id": "pixel cell id: the 64 bits of the S2 id as signed int64",
    "image_id": "image cell id (signed int64)",
    "taxonomy_version": "content hash of the taxonomy",
}
#: ``cell_features``' key columns; each channel column is described by its measure.
CELL_COLUMNS = {
    "parent_l6": "level-6 token (the partition)",
    "image_token": "image cell token",
    "cell_token": "pixel cell token",
    "cell_id": "pixel cell id (signed int64 of the S2 id)",
    "row": "i - i0 inside the image (S2 face i axis)",
    "col": "j - j0 inside the image (S2 face j axis)",
    "taxonomy_version": "content hash of the taxonomy",
}
RASTER_COLUMNS = {
    "parent_l6": "level-6 token (the partition)",
    "image_token": "image cell token",
    "image_id": "image cell id (signed int64)",
    "nonempty_pixels": "pixels with at least one feature",
    "taxonomy_version": "content hash of the taxonomy",
    "tensor": "C*S*S float32, log1p of cell_features in (channel, row, col) order",
}
#: ``cell_embeddings`` and ``image_embeddings``.
EMBEDDING_COLUMNS = {
    "parent_l6": "level-6 token (the partition)",
    "image_token": "image cell token",
    "cell_token": "pixel cell token (image token for image_embeddings)",
    "cell_id": "cell id (signed int64 of the S2 id)",
    "level": "S2 level of the embedded cell",
    "model_version": "the model that computed the embedding",
    "embedding": "list<float32> of the model's width",
}

# --- how each table's Parquet files are written ---------------------------------------------

#: The columns of the embedding tables that keep their Parquet statistics, which queries and
#: Delta's file skipping use (``cell_token`` lookups, ``model_version`` filters), and whether
#: they keep a dictionary (values repeat) or not (one value per row: the dictionary would
#: always be abandoned). ``parent_l6`` is the partition: it is not in the files.
_EMBEDDING_KEY_COLUMNS = {
    "image_token": True,
    "cell_token": False,
    "cell_id": False,
    "level": True,
    "model_version": True,
    "row": True,  # empty_image_embeddings
    "col": True,
    "pixel": True,
}


#: Rows per Parquet row group of the embedding tables (16 MB at D=256). delta-rs keeps a row
#: group's pages in memory until the group ends: with its default (1M rows: one group per
#: ~100 MB file) they went to fresh memory each time, and page faults took ~30% of
#: ``write_embeddings``' CPU time; groups this small reuse their buffers (~40% fewer faults).
EMBEDDING_ROW_GROUP_ROWS = 16_384


def embedding_writer_properties() -> WriterProperties:
    """Parquet settings of the embedding tables: no dictionary, no statistics and no
    compression by default, so for the ``embedding`` list (random-looking float32: the
    dictionary is always abandoned, the min/max of a list's items serve no query, and it
    does not compress); the key columns keep theirs. Row groups of
    ``EMBEDDING_ROW_GROUP_ROWS`` rows.

    The default is how the list column is reached: delta-rs names a column's properties
    by one path part, which never matches a nested leaf (``embedding.list.element``).
    """
    return WriterProperties(
        max_row_group_size=EMBEDDING_ROW_GROUP_ROWS,
        compression="UNCOMPRESSED",
        default_column_properties=ColumnProperties(
            dictionary_enabled=False, statistics_enabled="NONE"
        ),
        column_properties={
            name: ColumnProperties(dictionary_enabled=dictionary, statistics_enabled="PAGE")
            for name, dictionary in _EMBEDDING_KEY_COLUMNS.items()
        },
    )


def writer_properties(name: str) -> WriterProperties | None:
    """The Parquet writer settings of table ``name`` (its writes and its compactions);
    None: delta-rs' defaults."""
    if name in (CELL_EMBEDDINGS, IMAGE_EMBEDDINGS, EMPTY_IMAGE_EMBEDDINGS):
        return embedding_writer_properties()
    return None


# --- checks of written rows ----------------------------------------------------------------

CheckOutcome = tuple[bool, dict[str, Any]]


def schema_matches(df: pl.DataFrame, expected: Mapping[str, pl.DataType]) -> CheckOutcome:
    """Columns, types and column order of ``df`` against the writer's schema."""
    got = {n: str(t) for n, t in df.schema.items()}
    want = {n: str(t) for n, t in expected.items()}
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    wrong = {n: f"{got[n]} != {want[n]}" for n in want if n in got and got[n] != want[n]}
    order_ok = [n for n in got if n in want] == [n for n in want if n in got]
    passed = not missing and not extra and not wrong and order_ok
    return passed, {"missing": missing, "extra": extra, "wrong_types": wrong, "order_ok": order_ok}


def no_nan(df: pl.DataFrame, columns: list[str]) -> CheckOutcome:
    """No NaN, infinite or negative values in numeric columns (nulls are allowed)."""
    if df.height == 0 or not columns:
        return True, {"bad_values": 0}
    bad = df.select(
        pl.sum_horizontal(
            [
                (pl.col(c).is_nan() | pl.col(c).is_infinite() | (pl.col(c) < 0)).sum()
                for c in columns
            ]
        ).alias("bad")
    ).item()
    return bad == 0, {"bad_values": int(bad)}


def cells_at_level(cell_ids_signed: np.ndarray, level: int) -> CheckOutcome:
    """Every id is a valid S2 cell at ``level``."""
    ids = s2.from_signed(np.asarray(cell_ids_signed, dtype=np.int64))
    ok = s2.is_valid(ids) & (s2.cell_level(ids) == level) if len(ids) else np.array([], bool)
    return bool(ok.all()), {"invalid_cells": int((~ok).sum()), "level": level}


def raster_agrees_with_cells(
    raster_tiles: pl.DataFrame, cell_features: pl.DataFrame, channels: list[str], side: int
) -> CheckOutcome:
    """Same images; nonempty_pixels = cell rows; tensors equal log1p(values) at (row, col)."""
    cf_images = set(cell_features["image_token"].unique().to_list())
    rt_images = set(raster_tiles["image_token"].to_list())
    details: dict[str, Any] = {
        "images_only_in_raster": len(rt_images - cf_images),
        "images_only_in_cell_features": len(cf_images - rt_images),
    }
    counts = cell_features.group_by("image_token").len()
    joined = raster_tiles.select("image_token", "nonempty_pixels").join(
        counts, on="image_token", how="inner"
    )
    details["pixel_count_mismatches"] = int((joined["nonempty_pixels"] != joined["len"]).sum())
    # Value agreement: rebuild every tensor from cell_features and compare.
    tensors = tensor_array(raster_tiles, len(channels), side)
    pos = {tok: k for k, tok in enumerate(raster_tiles["image_token"].to_list())}
    cf = cell_features.filter(pl.col("image_token").is_in(list(pos)))
    idx = cf["image_token"].replace_strict(pos, return_dtype=pl.Int64).to_numpy()
    want = np.zeros_like(tensors)
    want[idx, :, cf["row"].to_numpy(), cf["col"].to_numpy()] = np.log1p(
        cf.select(channels).to_numpy()
    )
    max_err = float(np.abs(want - tensors).max()) if tensors.size else 0.0
    details["max_abs_difference"] = max_err
    passed = (
        not details["images_only_in_raster"]
        and not details["images_only_in_cell_features"]
        and not details["pixel_count_mismatches"]
        and max_err <= 1e-4 * max(1.0, float(np.abs(want).max(initial=0.0)))
    )
    return passed, details
