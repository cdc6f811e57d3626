"""Raster preview: legend panel, compass and scale checked against the official S2 library.

Oracle: s2geometry cell centres and areas, and the (row, col) positions the data layer wrote
to ``cell_features``: moving along the preview's north arrow must move north on the ground.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import s2geometry as s2g

from s2vec_pipeline.cells import preview
from s2vec_pipeline.cells.raster import tensor_array
from s2vec_pipeline.osm.taxonomy import load_taxonomy
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6

EARTH_RADIUS_M = 6_371_008.8


def _centre_m(token: str, lat0: float, lng0: float) -> np.ndarray:
    """(north, east) metres of a cell's centre from (lat0, lng0), small-distance approximation."""
    ll = s2g.S2LatLng(s2g.S2Cell(s2g.S2CellId.FromToken(token)).GetCenter())
    k = math.pi / 180 * EARTH_RADIUS_M
    return np.array(
        [
            (ll.lat().degrees() - lat0) * k,
            (ll.lng().degrees() - lng0) * k * math.cos(math.radians(lat0)),
        ]
    )


@pytest.mark.parametrize("partition", [HELSINKI_L6, MONACO_L6])
def test_compass_and_scale_match_the_ground(materialized_root: Path, partition: str) -> None:
    cells = delta_store.read_partitions(materialized_root, "cell_features", [partition])
    image = cells["image_token"].mode()[0]
    pixels = cells.filter(cells["image_token"] == image)
    raster = delta_store.read_partitions(materialized_root, "raster_tiles", [partition])
    image_id = int(raster.filter(raster["image_token"] == image)["image_id"][0])
    orient = preview.orientation(image_id, 16)
    # pixel size: the square root of the exact cell area
    area = s2g.S2Cell(s2g.S2CellId.FromToken(pixels["cell_token"][0])).ExactArea()
    assert orient.pixel_m == pytest.approx(math.sqrt(area) * EARTH_RADIUS_M, rel=0.03)
    assert orient.pixel_level == 17 and not orient.mirrored
    # Fit, from the ground, the linear map picture step (col, row) -> (north, east) metres over
    # the image's pixels; the picture direction that goes due north is its inverse at (1, 0).
    tokens = pixels["cell_token"].to_list()
    first = s2g.S2LatLng(s2g.S2Cell(s2g.S2CellId.FromToken(tokens[0])).GetCenter())
    lat0, lng0 = first.lat().degrees(), first.lng().degrees()
    steps = np.column_stack(
        [pixels["col"].to_numpy() - pixels["col"][0], pixels["row"].to_numpy() - pixels["row"][0]]
    ).astype(float)
    ground = np.array([_centre_m(t, lat0, lng0) for t in tokens])
    fit, *_ = np.linalg.lstsq(steps, ground, rcond=None)  # ground = steps @ fit
    inverse = np.linalg.inv(fit.T)
    for got, axis in ((orient.north, 0), (orient.east, 1)):
        want = inverse[:, axis] / np.linalg.norm(inverse[:, axis])
        angle = np.degrees(np.arccos(np.clip(np.dot(got, want), -1, 1)))
        assert angle < 3, (axis, got, want)


def test_preview_has_mosaic_and_legend_panel(materialized_root: Path) -> None:
    measures = [c.measure for c in load_taxonomy(None).channels]
    raster = delta_store.read_partitions(materialized_root, "raster_tiles", [MONACO_L6])
    tensors = tensor_array(raster, len(measures), 16)
    ids = raster["image_id"].to_numpy()
    plain = preview.partition_mosaic(ids, tensors, measures, annotate=False)
    full = preview.partition_mosaic(ids, tensors, measures)
    assert full.height == plain.height + preview.PANEL_HEIGHT
    assert full.width == max(plain.width, preview.PANEL_MIN_WIDTH)
    top = np.asarray(full)[: plain.height, : plain.width]
    np.testing.assert_array_equal(top, np.asarray(plain))
    panel = np.asarray(full)[plain.height :]
    for _, colour, _ in preview.BANDS:  # the three colour swatches are drawn
        assert (np.abs(panel.astype(int) - colour).max(axis=2) == 0).sum() > 50
    # Helsinki (face 2) and Monaco (face 0) point north differently in their pictures
    h = delta_store.read_partitions(materialized_root, "raster_tiles", [HELSINKI_L6])
    a = preview.orientation(int(h["image_id"][0]), 16).north
    b = preview.orientation(int(ids[0]), 16).north
    assert np.degrees(np.arccos(np.clip(np.dot(a, b), -1, 1))) > 30
    assert preview.png_bytes(full)[:8] == b"\x89PNG\r\n\x1a\n"
