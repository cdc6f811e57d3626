"""cell_features aggregation and rasterization, checked against an independent S2 (i, j)
computation from the official library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import s2geometry as s2g

from s2vec_pipeline.cells.features import aggregate_cell_features, cell_features_schema
from s2vec_pipeline.cells.profiles import PROFILES
from s2vec_pipeline.cells.raster import iter_raster_batches, rasterize, tensor_array
from s2vec_pipeline.osm.extract import extract_features
from s2vec_pipeline.osm.taxonomy import load_taxonomy

CITY = PROFILES["city"]


def official_row_col(cell_id_signed: int, image_level: int, pixel_level: int) -> tuple[int, int]:
    """(row, col) of a pixel in its image from S2's own face (i, j)."""
    cid = s2g.S2CellId(cell_id_signed & ((1 << 64) - 1))
    _, i, j, _ = cid.ToFaceIJOrientation()
    _, ii, jj, _ = cid.parent(image_level).ToFaceIJOrientation()
    shift = 30 - pixel_level
    side = 1 << (pixel_level - image_level)
    return (i >> shift) - ((ii >> (30 - image_level)) * side), (j >> shift) - (
        (jj >> (30 - image_level)) * side
    )


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


@pytest.fixture(scope="module")
def monaco(monaco_pbf: Path, taxonomy):
    features, _ = extract_features([monaco_pbf], taxonomy, CITY)
    cells = aggregate_cell_features(features, taxonomy, CITY)
    return features, cells


def test_cell_features_schema_and_keys(monaco, taxonomy) -> None:
    _, cells = monaco
    assert dict(cells.schema) == cell_features_schema(taxonomy)
    assert cells["cell_id"].n_unique() == cells.height
    numeric = [c for c, t in cells.schema.items() if t.is_numeric()]
    assert numeric == ["cell_id", "row", "col", *taxonomy.channel_names]
    for cid, tok, img, row, col in (
        cells.sample(300, seed=2)
        .select("cell_id", "cell_token", "image_token", "row", "col")
        .iter_rows()
    ):
        official = s2g.S2CellId(cid & ((1 << 64) - 1))
        assert official.ToToken() == tok
        assert official.parent(CITY.image_level).ToToken() == img
        assert (row, col) == official_row_col(cid, CITY.image_level, CITY.pixel_level)
        assert 0 <= row < CITY.side and 0 <= col < CITY.side


def test_cell_values_equal_feature_sums(monaco, taxonomy) -> None:
    features, cells = monaco
    measure = {c.name: c.measure for c in taxonomy.channels}
    for channel in ["poi_food_restaurant", *[n for n, m in measure.items() if m != "count"][:6]]:
        rows = features.filter(pl.col("channel") == channel)
        col = {"count": None, "length_m": "length_m", "area_m2": "area_m2"}[measure[channel]]
        want = rows.height if col is None else rows[col].sum()
        assert cells[channel].sum() == pytest.approx(want, rel=1e-9)
    # one busy cell, channel by channel
    busiest = features.group_by("cell_id").len().sort("len", descending=True)["cell_id"][0]
    row = cells.filter(pl.col("cell_id") == busiest)
    counts = (
        features.filter(
            (pl.col("cell_id") == busiest)
            & pl.col("length_m").is_null()
            & pl.col("area_m2").is_null()
        )
        .group_by("channel")
        .len()
    )
    for channel, n in counts.iter_rows():
        assert row[channel].item() == n


def test_raster_positions_and_values(monaco, taxonomy) -> None:
    _, cells = monaco
    channels = list(taxonomy.channel_names)
    table = rasterize(cells, channels, CITY.side)
    assert table.num_rows == cells["image_token"].n_unique()
    tensors = tensor_array(table, len(channels), CITY.side)
    assert tensors.dtype == np.float32
    by_image = {tok: k for k, tok in enumerate(table.column("image_token").to_pylist())}
    # every non-empty pixel sits where S2 says, holding log1p of its values
    expected = np.zeros_like(tensors)
    for cid, tok, *vals in cells.select("cell_id", "image_token", *channels).iter_rows():
        r, c = official_row_col(cid, CITY.image_level, CITY.pixel_level)
        expected[by_image[tok], :, r, c] = np.log1p(vals)
    np.testing.assert_allclose(tensors, expected, rtol=1e-6, atol=1e-6)
    nonempty = table.column("nonempty_pixels").to_numpy()
    assert nonempty.sum() == cells.height
    assert ((tensors.sum(axis=1) > 0).sum(axis=(1, 2)) <= nonempty).all()


def test_raster_batches_bounded_and_equal(monaco, taxonomy) -> None:
    _, cells = monaco
    channels = list(taxonomy.channel_names)
    whole = rasterize(cells, channels, CITY.side)
    batches = list(iter_raster_batches(cells, channels, CITY.side, images_per_batch=7))
    assert max(b.num_rows for b in batches) <= 7
    assert sum(b.num_rows for b in batches) == whole.num_rows
    pieced = tensor_array(
        pl.from_arrow(batches[0]).vstack(pl.concat([pl.from_arrow(b) for b in batches[1:]])),
        len(channels),
        CITY.side,
    )
    np.testing.assert_array_equal(pieced, tensor_array(whole, len(channels), CITY.side))


def test_handmade_positions() -> None:
    """Four pixels of one image at known S2 positions: corners and an interior cell."""
    tax_channels = ["a", "b"]
    image = s2g.S2CellId(s2g.S2LatLng.FromDegrees(60.17, 24.94)).parent(CITY.image_level)
    kids = []
    child = image.child_begin(CITY.pixel_level)
    while child != image.child_end(CITY.pixel_level):
        kids.append(child)
        child = child.next()
    picks = [kids[0], kids[37], kids[128], kids[-1]]
    signed = [k.id() - (1 << 64) if k.id() >= 1 << 63 else k.id() for k in picks]
    positions = [official_row_col(s, CITY.image_level, CITY.pixel_level) for s in signed]
    cells = pl.DataFrame(
        {
            "parent_l6": [image.parent(6).ToToken()] * 4,
            "image_token": [image.ToToken()] * 4,
            "cell_token": [k.ToToken() for k in picks],
            "cell_id": signed,
            "row": [p[0] for p in positions],
            "col": [p[1] for p in positions],
            "a": [1.0, 2.0, 3.0, 4.0],
            "b": [0.0, 10.0, 0.0, 0.0],
            "taxonomy_version": ["t"] * 4,
        }
    )
    t = tensor_array(rasterize(cells, tax_channels, 16), 2, 16)[0]
    for (r, c), a, b in zip(positions, [1.0, 2.0, 3.0, 4.0], [0.0, 10.0, 0.0, 0.0], strict=True):
        assert t[0, r, c] == pytest.approx(np.log1p(a))
        assert t[1, r, c] == pytest.approx(np.log1p(b))
    assert (t > 0).sum() == 5
    # the Hilbert curve's first and last children of a cell lie in adjacent corners
    assert positions[0] in {(0, 0), (0, 15), (15, 0), (15, 15)}
    assert positions[3] in {(0, 0), (0, 15), (15, 0), (15, 15)}
