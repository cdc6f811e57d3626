"""regions: cells of boxes, GeoJSON areas and sources, checked against the official S2 library."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import s2geometry as s2g
import shapely
import yaml

from s2vec_pipeline.cells import regions as R
from s2vec_pipeline.cells import s2, s2_geometry
from s2vec_pipeline.errors import CellOutsideSourcesError, InvalidBoundingBoxError

HELSINKI_L6 = "4693"
MONACO_L6 = "12cd"


def _official_cells(geom: shapely.Geometry, candidates: np.ndarray) -> list[str]:
    """Oracle: s2geometry's exact S2Polygon/S2Cell intersection. GeoJSON edges are straight in
    lng/lat while S2 edges are geodesics, so the polygon's edges are first split every 0.001°
    (the two then differ by well under a metre)."""
    loops = []
    for poly in shapely.get_parts(geom):
        for ring in [poly.exterior, *poly.interiors]:
            coords = np.asarray(shapely.segmentize(ring, 0.001).coords)[:-1]
            pts = [s2g.S2LatLng.FromDegrees(lat, lng).ToPoint() for lng, lat in coords]
            loop = s2g.S2Loop(pts)
            loop.Normalize()
            loops.append(loop)
    polygon = s2g.S2Polygon()
    polygon.InitNested(loops)
    out = []
    for cid in candidates.tolist():
        if polygon.Intersects(s2g.S2Polygon(s2g.S2Cell(s2g.S2CellId(cid)))):
            out.append(str(s2.to_token(np.uint64(cid))))
    return sorted(out)


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_bbox_region_matches_official_coverer() -> None:
    box = (60.15, 24.93, 60.19, 24.97)  # around central Helsinki
    region = R.region_from_bbox("helsinki", *box)
    assert region.cells == (HELSINKI_L6,) and region.kind == "bbox"
    assert region.spec == {"min_lat": 60.15, "min_lng": 24.93, "max_lat": 60.19, "max_lng": 24.97}
    coverer = s2g.S2RegionCoverer()
    coverer.set_fixed_level(6)
    rect = s2g.S2LatLngRect(
        s2g.S2LatLng.FromDegrees(box[0], box[1]), s2g.S2LatLng.FromDegrees(box[2], box[3])
    )
    assert [c.ToToken() for c in coverer.GetCovering(rect)] == [HELSINKI_L6]

    wide = R.region_from_bbox("south-finland", 59.8, 22.0, 61.5, 27.0)
    assert len(wide.cells) > 4
    with pytest.raises(InvalidBoundingBoxError, match="min_lat"):
        R.region_from_bbox("bad", 61.0, 24.0, 60.0, 25.0)
    with pytest.raises(InvalidBoundingBoxError, match="outside"):
        R.region_from_bbox("bad", 60.0, 24.0, 95.0, 25.0)


def test_geojson_polygon_gives_exactly_the_cells_it_meets(tmp_path: Path) -> None:
    # A concave polygon with a hole over southern Finland, spanning several level-6 cells.
    outer = [[22.5, 59.7], [27.8, 59.9], [27.5, 61.9], [25.2, 60.6], [22.9, 61.6], [22.5, 59.7]]
    hole = [[24.3, 60.0], [25.6, 60.0], [25.6, 60.3], [24.3, 60.3], [24.3, 60.0]]
    poly = {"type": "Polygon", "coordinates": [outer, hole]}
    region = R.region_from_geojson("finland-south", _write(tmp_path / "p.geojson", poly))
    geom = shapely.geometry.shape(poly)
    min_lng, min_lat, max_lng, max_lat = geom.bounds
    candidates = s2_geometry.cover_bbox(min_lat, min_lng, max_lat, max_lng, 6)
    expected = _official_cells(geom, candidates)
    assert 5 <= len(expected) < len(candidates)  # the test has cells to drop
    assert list(region.cells) == expected
    assert region.kind == "geojson" and region.spec["path"] == str(tmp_path / "p.geojson")

    # Dense sampling agrees: every point of the polygon (boundary included) lies in a reported
    # cell, by the official point -> cell mapping.
    boundary = np.asarray(shapely.segmentize(geom.boundary, 0.005).geoms[0].coords)
    xs, ys = np.meshgrid(np.linspace(min_lng, max_lng, 80), np.linspace(min_lat, max_lat, 80))
    grid = np.column_stack([xs.ravel(), ys.ravel()])
    inside = grid[shapely.contains_xy(geom, grid[:, 0], grid[:, 1])]
    sampled = {
        s2g.S2CellId(s2g.S2LatLng.FromDegrees(lat, lng)).parent(6).ToToken()
        for lng, lat in np.concatenate([boundary, inside]).tolist()
    }
    assert sampled <= set(region.cells)

    # The same area as a Feature, a FeatureCollection, a MultiPolygon: the same cells.
    feature = {"type": "Feature", "properties": {}, "geometry": poly}
    collection = {"type": "FeatureCollection", "features": [feature]}
    multi = {"type": "MultiPolygon", "coordinates": [[outer, hole]]}
    for k, doc in enumerate([feature, collection, multi]):
        other = R.region_from_geojson(f"r{k}", _write(tmp_path / f"{k}.geojson", doc))
        assert other.cells == region.cells


def test_geojson_cells_follow_geodesic_cell_edges(tmp_path: Path) -> None:
    """A tiny triangle between the straight lng/lat chord of a cell edge and the real (geodesic)
    edge: drawn with straight edges the cell would miss it; densified edges get it right."""
    corners = s2_geometry.cell_corners_latlng(s2.from_token(np.array([HELSINKI_L6])))[0]
    a, b = corners[1], corners[2]  # the northern edge of 4693

    def xyz(p: np.ndarray) -> np.ndarray:
        lat, lng = np.radians(p)
        return np.array([np.cos(lat) * np.cos(lng), np.cos(lat) * np.sin(lng), np.sin(lat)])

    g = xyz(a) + xyz(b)
    g /= np.linalg.norm(g)
    geo_mid = np.array([np.degrees(np.arcsin(g[2])), np.degrees(np.arctan2(g[1], g[0]))])
    chord_mid = (a + b) / 2
    lat, lng = chord_mid + 0.6 * (geo_mid - chord_mid)  # ~300 m beyond the chord, inside
    d = 0.0003
    tri = {
        "type": "Polygon",
        "coordinates": [[[lng - d, lat], [lng + d, lat], [lng, lat + d], [lng - d, lat]]],
    }
    region = R.region_from_geojson("edge", _write(tmp_path / "t.geojson", tri))
    geom = shapely.geometry.shape(tri)
    candidates = s2_geometry.cover_bbox(lat - 1, lng - 1, lat + 1, lng + 1, 6)
    assert list(region.cells) == _official_cells(geom, candidates) == [HELSINKI_L6]
    straight = R.cell_outlines(s2.from_token(np.array([HELSINKI_L6])), edge_points=1)[0]
    assert not straight.intersects(geom)  # four straight edges would have missed it


def test_source_regions(helsinki_pbf: Path, monaco_pbf: Path) -> None:
    monaco = R.region_from_source("monaco", monaco_pbf)
    assert monaco.cells == (MONACO_L6,) and monaco.kind == "source"
    assert monaco.spec == {"path": str(monaco_pbf.resolve())}
    assert R.region_from_source("helsinki", helsinki_pbf).cells == (HELSINKI_L6,)


def test_registry_round_trip(tmp_path: Path, monaco_pbf: Path) -> None:
    root = tmp_path / "root"
    reg = R.RegionRegistry(root)
    assert reg.list() == [] and reg.all_cells() == []
    hel = reg.add(R.region_from_bbox("helsinki", 60.15, 24.93, 60.19, 24.97))
    mon = reg.add(R.region_from_source("monaco", monaco_pbf))
    wide = reg.add(R.region_from_bbox("south-finland", 59.8, 22.0, 61.5, 27.0))

    again = R.RegionRegistry(root)  # a fresh reader of the same file
    assert again.list() == [hel, mon, wide]  # by name
    assert again.get("monaco") == mon and again.get("helsinki") == hel
    assert "monaco" in again and "nope" not in again
    assert again.all_cells() == sorted({*hel.cells, *mon.cells, *wide.cells})

    text = (root / R.REGIONS_FILE).read_text()
    assert text.startswith("# S2Vec named regions")
    doc = yaml.safe_load(text)
    assert doc["regions"]["helsinki"]["cells"] == [HELSINKI_L6]  # a string, not the int 4693
    assert doc["regions"]["monaco"]["kind"] == "source"

    with pytest.raises(R.RegionError, match="'helsinki' already exists"):
        reg.add(R.region_from_bbox("helsinki", 60.0, 24.0, 60.1, 24.1))
    bigger = reg.add(R.region_from_bbox("helsinki", 59.8, 22.0, 61.5, 27.0), replace=True)
    assert reg.get("helsinki").cells == bigger.cells

    assert reg.remove("monaco") == mon
    assert [r.name for r in reg.list()] == ["helsinki", "south-finland"]
    with pytest.raises(R.RegionError, match="no region named 'monaco'.*helsinki, south-finland"):
        reg.get("monaco")
    with pytest.raises(R.RegionError, match="no region named 'monaco'"):
        reg.remove("monaco")
    assert not list(root.glob("*.tmp-*")) and not list(root.glob(".*.tmp-*"))


def test_registry_refuses_hand_edits_it_cannot_trust(tmp_path: Path) -> None:
    reg = R.RegionRegistry(tmp_path)
    reg.add(R.region_from_bbox("helsinki", 60.15, 24.93, 60.19, 24.97))
    path = tmp_path / R.REGIONS_FILE
    path.write_text(path.read_text().replace("'4693'", "4693"))  # unquoted: YAML reads an int
    with pytest.raises(R.RegionError, match="quotes"):
        reg.list()
    path.write_text(path.read_text().replace("4693", "'4692'"))  # not a level-6 token
    with pytest.raises(R.RegionError, match="helsinki"):
        reg.get("helsinki")
    path.write_text("regions: [1, 2]\n")
    with pytest.raises(R.RegionError, match="mapping"):
        reg.list()
    # an entry without cells, or with cells that are not a list: the region and field named
    path.write_text("format: 1\nregions:\n  helsinki: {kind: bbox}\n")
    with pytest.raises(R.RegionError, match=r"region 'helsinki': cells: field required"):
        reg.list()
    path.write_text("format: 1\nregions:\n  helsinki: {kind: bbox, cells: '4693'}\n")
    with pytest.raises(R.RegionError, match=r"region 'helsinki': cells: input should be a valid"):
        reg.list()
    path.write_text("format: 2\nregions: {}\n")
    with pytest.raises(R.RegionError, match="format 2; this version reads format 1"):
        reg.list()


@pytest.mark.parametrize("name", ["Helsinki", "", "-x", "_x", "a b", "a" * 65, "ä", None, 3])
def test_invalid_region_names(name: object) -> None:
    with pytest.raises(R.RegionError, match="region name .* is invalid"):
        R.region_from_bbox(name, 60.15, 24.93, 60.19, 24.97)  # type: ignore[arg-type]


def test_valid_region_names() -> None:
    for name in ["a", "0", "x_1-2", "a" * 64]:
        assert R.region_from_bbox(name, 60.15, 24.93, 60.19, 24.97).name == name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON: .* line 1, column 2"),
        ({"type": "Point", "coordinates": [24.9, 60.2]}, "is a Point; a region needs an area"),
        (
            {"type": "Polygon", "coordinates": [[[60.2, 24.9], [60.3, 95.0], [60.4, 24.9]]]},
            r"outside \[-180, 180\] x \[-90, 90\].*\[longitude, latitude\]",
        ),
        ({"type": "Polygon", "coordinates": [[[24.9, 60.2], [25.0]]]}, "malformed coordinates"),
        ({"type": "FeatureCollection", "features": []}, "holds no polygon"),
        ({"type": "Feature", "geometry": None}, "has no geometry"),
        (
            {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {}}]},
            "feature 0's geometry is not a GeoJSON object",
        ),
        ([1, 2], "the document is not a GeoJSON object"),
    ],
)
def test_bad_geojson(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(R.InvalidGeoJSONError, match=message) as info:
        R.region_from_geojson("bad", path)
    assert str(path) in str(info.value)  # the message names the file


def test_missing_geojson(tmp_path: Path) -> None:
    with pytest.raises(R.InvalidGeoJSONError, match="does not exist"):
        R.region_from_geojson("x", tmp_path / "nope.geojson")


def test_check_covered_names_the_missing_cells(tmp_path: Path) -> None:
    reg = R.RegionRegistry(tmp_path)
    wide = reg.add(R.region_from_bbox("south-finland", 59.8, 22.0, 61.5, 27.0))
    reg.check_covered(wide, wide.cells)  # fully covered: no error
    reg.check_covered("south-finland", [*wide.cells, MONACO_L6])
    covered = [HELSINKI_L6, MONACO_L6]
    missing = [c for c in wide.cells if c != HELSINKI_L6]
    with pytest.raises(CellOutsideSourcesError) as info:
        reg.check_covered("south-finland", covered)
    msg = str(info.value)
    assert "south-finland" in msg and ", ".join(missing) in msg and "[" not in msg
    assert f"{len(missing)} of its {len(wide.cells)} cells" in msg


def test_geojson_rectangles_match_exact_bbox_cover(tmp_path: Path) -> None:
    """A lng/lat rectangle is the same set as a GeoJSON polygon and as an S2LatLngRect, whose
    cells ``cover_bbox`` finds with the official exact test: the densified outlines must agree
    everywhere, poles and antimeridian included."""
    rng = np.random.default_rng(0)
    boxes = [
        (85.0, -180.0, 90.0, 180.0),
        (-90.0, -180.0, -86.0, 180.0),
        (80.0, 170.0, 84.0, -170.0),
    ]
    for _ in range(150):
        lat0, lng0 = rng.uniform(-89.5, 88.5), rng.uniform(-180, 179)
        lat1 = min(lat0 + rng.uniform(0.01, 3), 90.0)
        lng1 = min(lng0 + rng.uniform(0.01, 6), 180.0)
        boxes.append((lat0, lng0, lat1, lng1))
    for k, (lat0, lng0, lat1, lng1) in enumerate(boxes):
        spans = [(lng0, lng1)] if lng0 <= lng1 else [(lng0, 180.0), (-180.0, lng1)]
        rings = [[[[a, lat0], [b, lat0], [b, lat1], [a, lat1], [a, lat0]]] for a, b in spans]
        path = _write(tmp_path / f"{k}.geojson", {"type": "MultiPolygon", "coordinates": rings})
        got = R.region_from_geojson(f"r{k}", path).cells
        expected = tuple(
            sorted(s2.to_token(s2_geometry.cover_bbox(lat0, lng0, lat1, lng1, 6)).tolist())
        )
        assert got == expected, (lat0, lng0, lat1, lng1)


def test_self_intersecting_polygon_is_repaired(tmp_path: Path) -> None:
    bowtie = {
        "type": "Polygon",
        "coordinates": [[[24, 60], [25, 61], [25, 60], [24, 61], [24, 60]]],
    }
    region = R.region_from_geojson("bowtie", _write(tmp_path / "b.geojson", bowtie))
    geom = shapely.make_valid(shapely.geometry.shape(bowtie))
    assert list(region.cells) == _official_cells(geom, s2_geometry.cover_bbox(60, 24, 61, 25, 6))
