"""osm_features on the real bundled extracts, checked against the OSM objects themselves
(read independently with a plain pyosmium handler) and the official S2 library: per pixel, the
length of a way and the area of a polygon inside the pixel's S2 cell (``S2Polygon(S2Cell)``,
``IntersectWithPolyline``, ``GetOverlapFractions``)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import osmium
import polars as pl
import pytest
import s2geometry as s2g

from s2vec_pipeline.cells.profiles import PROFILES
from s2vec_pipeline.errors import CellOutsideSourcesError, InvalidSourceError
from s2vec_pipeline.osm.extract import (
    EARTH_RADIUS_M,
    OSM_FEATURES_SCHEMA,
    extract_features,
    source_bbox,
)
from s2vec_pipeline.osm.taxonomy import load_taxonomy

CITY = PROFILES["city"]
OSMIUM_EARTH_RADIUS_M = 6372797.560856  # libosmium's haversine radius


def official_cell(lat: float, lng: float, level: int) -> int:
    u = s2g.S2CellId(s2g.S2LatLng.FromDegrees(lat, lng)).parent(level).id()
    return u - (1 << 64) if u >= 1 << 63 else u


class _Reference(osmium.SimpleHandler):
    """Independent read: every node and way with its tags and (for ways) node locations."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, tuple[dict[str, str], float, float]] = {}
        self.ways: dict[int, tuple[dict[str, str], list[tuple[float, float]] | None, bool]] = {}

    def node(self, n: osmium.osm.Node) -> None:
        if len(n.tags):
            self.nodes[n.id] = (dict(n.tags), n.location.lat, n.location.lon)

    def way(self, w: osmium.osm.Way) -> None:
        if not len(w.tags):
            return
        locs = [(nd.lat, nd.lon) for nd in w.nodes if nd.location.valid()]
        complete = len(locs) == len(w.nodes)
        self.ways[w.id] = (dict(w.tags), locs if complete else None, w.is_closed())


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


@pytest.fixture(scope="module")
def helsinki(helsinki_pbf: Path, taxonomy):
    df, stats = extract_features([helsinki_pbf], taxonomy, CITY)
    ref = _Reference()
    ref.apply_file(str(helsinki_pbf), locations=True)
    return df, stats, ref


def test_rows_partitions_and_ids(helsinki, taxonomy) -> None:
    df, stats, _ = helsinki
    assert df.height > 8_000  # Helsinki centre: thousands of POIs, roads and buildings
    assert df["parent_l6"].unique().to_list() == ["4693"]
    assert set(df["channel"].unique()) <= set(taxonomy.channel_names)
    assert df["taxonomy_version"].unique().to_list() == [taxonomy.version]
    assert stats.objects_matched > 5_000 and stats.objects_read >= stats.objects_matched
    # a sample of rows: cell ids equal the official S2 cell of the row's point
    sample = df.sample(500, seed=1)
    for lat, lon, cid, img in sample.select("lat", "lon", "cell_id", "image_id").iter_rows():
        assert cid == official_cell(lat, lon, CITY.pixel_level)
        assert img == official_cell(lat, lon, CITY.image_level)


def test_nodes_match_osm_objects_exactly(helsinki, taxonomy) -> None:
    df, _, ref = helsinki
    count_channels = set(taxonomy.indices("count").tolist())
    expected = {
        (nid, taxonomy.channel_names[c])
        for nid, (tags, _, _) in ref.nodes.items()
        for c in taxonomy.match(tags)
        if c in count_channels
    }
    nodes = df.filter(pl.col("osm_type") == "node")
    got = set(zip(nodes["osm_id"].to_list(), nodes["channel"].to_list(), strict=True))
    assert got == expected
    # exact location of a few restaurants
    restaurants = nodes.filter(pl.col("channel") == "poi_food_restaurant").head(20)
    assert restaurants.height == 20
    for nid, lat, lon in restaurants.select("osm_id", "lat", "lon").iter_rows():
        _, ref_lat, ref_lon = ref.nodes[nid]
        assert (lat, lon) == (ref_lat, ref_lon)
        assert ref.nodes[nid][0]["amenity"] == "restaurant"


def s2_cell_polygon(cell_id: int) -> s2g.S2Polygon:
    return s2g.S2Polygon(s2g.S2Cell(s2g.S2CellId(cell_id & (2**64 - 1))))


def s2_loop(latlngs: list[tuple[float, float]]) -> s2g.S2Polygon:
    """One closed ring of (lat, lng) as an S2 polygon (closing vertex dropped)."""
    if latlngs[0] == latlngs[-1]:
        latlngs = latlngs[:-1]
    loop = s2g.S2Loop([s2g.S2LatLng.FromDegrees(a, b).ToPoint() for a, b in latlngs])
    loop.Normalize()
    return s2g.S2Polygon(loop)


def overlap_m2(polygon: s2g.S2Polygon, cell_id: int) -> float:
    """Area of ``polygon`` inside the cell, by the official library."""
    cell = s2_cell_polygon(cell_id)
    return s2g.S2Polygon.GetOverlapFractions(polygon, cell)[1] * cell.GetArea() * EARTH_RADIUS_M**2


def cell_area_m2(cell_id: int) -> float:
    return s2g.S2Cell(s2g.S2CellId(cell_id & (2**64 - 1))).ExactArea() * EARTH_RADIUS_M**2


def test_way_lengths_split_per_cell(helsinki, taxonomy) -> None:
    df, _, ref = helsinki
    (primary,) = [
        taxonomy.channel_names[c]
        for c in taxonomy.match({"highway": "primary"})
        if taxonomy.channels[c].measure == "length_m"
    ]
    rows = df.filter(pl.col("channel") == primary)
    per_way = dict(rows.group_by("osm_id").agg(pl.col("length_m").sum()).iter_rows())
    complete = {
        wid: locs
        for wid, (tags, locs, _) in ref.ways.items()
        if tags.get("highway") == "primary" and locs is not None
    }
    assert len(complete) > 20
    multi_cell = 0
    for wid, locs in complete.items():
        # libosmium's haversine with its own radius, rescaled to ours
        ref_len = sum(
            osmium.geom.haversine_distance(
                osmium.osm.Location(a[1], a[0]), osmium.osm.Location(b[1], b[0])
            )
            for a, b in zip(locs[:-1], locs[1:], strict=True)
        ) * (EARTH_RADIUS_M / OSMIUM_EARTH_RADIUS_M)
        # per-cell lengths are exact sums in micrometres: allow a few µm per way
        assert per_way[wid] == pytest.approx(ref_len, rel=1e-9, abs=1e-4)
        # per pixel: the length of the way inside the pixel's S2 cell
        line = s2g.S2Polyline()
        line.InitFromS2LatLngs([s2g.S2LatLng.FromDegrees(a, b) for a, b in locs])
        way_rows = rows.filter(pl.col("osm_id") == wid)
        for cell, length in way_rows.select("cell_id", "length_m").iter_rows():
            inside = s2_cell_polygon(cell).IntersectWithPolyline(line)
            expected = sum(p.GetLength().radians() for p in inside) * EARTH_RADIUS_M
            assert length == pytest.approx(expected, rel=1e-6, abs=1e-5), (wid, cell)
        multi_cell += way_rows.height > 1
    assert multi_cell > 5  # long roads really are split over several cells


def test_building_areas_against_s2_polygons(helsinki, taxonomy) -> None:
    """Per closed way: its rows sum to its area on the sphere, and each row holds the area of
    the way inside that pixel's cell (both by the official library, edges as geodesics)."""
    df, _, ref = helsinki
    area_rows = df.filter(pl.col("area_m2").is_not_null() & (pl.col("osm_type") == "way"))
    per_way = area_rows.group_by("osm_id", "channel").agg(
        pl.col("cell_id"), pl.col("area_m2"), pl.col("area_m2").sum().alias("total")
    )
    assert per_way.height > 500
    multi = per_way.filter(pl.col("cell_id").list.len() > 1)
    assert multi.height > 100  # at ~70 m pixels many buildings straddle cell edges
    sample = pl.concat([per_way.sort("osm_id").head(150), multi.sort("osm_id").head(150)])
    for wid, _, cells, areas, total in sample.iter_rows():
        tags, locs, closed = ref.ways[wid]
        assert closed and locs is not None
        polygon = s2_loop(locs)
        assert total == pytest.approx(polygon.GetArea() * EARTH_RADIUS_M**2, rel=1e-6), tags
        for cell, area in zip(cells, areas, strict=True):
            expected = overlap_m2(polygon, cell)
            assert area == pytest.approx(expected, rel=1e-6, abs=1e-9 * cell_area_m2(cell))


@pytest.mark.parametrize("source", ["helsinki", "monaco"])
def test_every_way_length_sums_to_its_s2_polyline(source: str, request, taxonomy) -> None:
    """All ways with a length channel: their rows sum to the length of the polyline of their
    node locations (S2Polyline::GetLength), and no row is longer than the way."""
    pbf = request.getfixturevalue(f"{source}_pbf")
    df, _ = extract_features([pbf], taxonomy, CITY)
    per_way = (
        df.filter(pl.col("length_m").is_not_null())
        .group_by("osm_id", "channel")
        .agg(pl.col("length_m").sum().alias("total"), pl.col("length_m").max().alias("most"))
    )
    ref = _Reference()
    ref.apply_file(str(pbf), locations=True)
    checked = 0
    for wid, _, total, most in per_way.iter_rows():
        locs = ref.ways[wid][1]
        if locs is None:  # a node outside the extract: osmium skips it, so do we
            continue
        line = s2g.S2Polyline()
        line.InitFromS2LatLngs([s2g.S2LatLng.FromDegrees(a, b) for a, b in locs])
        expected = line.GetLength().radians() * EARTH_RADIUS_M
        assert total == pytest.approx(expected, rel=1e-9, abs=1e-4), wid
        assert most <= expected + 1e-4
        checked += 1
    assert checked > 2_000


class _Areas(osmium.SimpleHandler):
    """Multipolygon relations as osmium assembles them, rings as (lat, lng) lists: the
    geometry is osmium's, everything measured on it comes from the official S2 library."""

    def __init__(self) -> None:
        super().__init__()
        self.rings: dict[int, list[tuple[list, list[list]]]] = {}

    def area(self, a: osmium.osm.Area) -> None:
        if a.from_way() or not len(a.tags):
            return
        self.rings[a.orig_id()] = [
            (
                [(n.lat, n.lon) for n in outer],
                [[(n.lat, n.lon) for n in inner] for inner in a.inner_rings(outer)],
            )
            for outer in a.outer_rings()
        ]


@pytest.mark.parametrize("source", ["helsinki", "monaco"])
def test_relation_areas_against_s2(source: str, request, taxonomy) -> None:
    """Per multipolygon relation: rows sum to its area, every row holds the relation's area
    inside that pixel, and the largest relations are spread over the cells they cover."""
    pbf = request.getfixturevalue(f"{source}_pbf")
    df, _ = extract_features([pbf], taxonomy, CITY)
    rel = df.filter(pl.col("area_m2").is_not_null() & (pl.col("osm_type") == "relation"))
    per_rel = (
        rel.group_by("osm_id", "channel")
        .agg(pl.col("cell_id"), pl.col("area_m2"), pl.col("area_m2").sum().alias("total"))
        .sort("total", descending=True)
    )
    assert per_rel.height >= 5
    areas = _Areas()
    areas.apply_file(str(pbf), locations=True)
    for k, (rid, _, cells, values, total) in enumerate(per_rel.iter_rows()):
        outers = [(s2_loop(o), [s2_loop(i) for i in inners]) for o, inners in areas.rings[rid]]
        expected = sum(
            (o.GetArea() - sum(i.GetArea() for i in inners)) * EARTH_RADIUS_M**2
            for o, inners in outers
        )
        assert total == pytest.approx(expected, rel=1e-6), rid
        if k < 3:  # per cell, for the largest relations (hundreds of cells)
            assert len(cells) > expected / max(cell_area_m2(c) for c in cells)
            for cell, value in zip(cells, values, strict=True):
                inside = sum(
                    overlap_m2(o, cell) - sum(overlap_m2(i, cell) for i in inners)
                    for o, inners in outers
                )
                assert value == pytest.approx(inside, rel=1e-6, abs=1e-9 * cell_area_m2(cell))


@pytest.mark.parametrize("source", ["helsinki", "monaco"])
def test_no_area_row_exceeds_its_pixel(source: str, request, taxonomy) -> None:
    """Issue 9: a polygon's whole area once went into the one pixel holding its inner point
    (140,586 m² into a ~5,000 m² pixel). Each row now holds at most the cell's area."""
    pbf = request.getfixturevalue(f"{source}_pbf")
    df, stats = extract_features([pbf], taxonomy, CITY)
    rows = df.filter(pl.col("area_m2").is_not_null())
    cells = rows["cell_id"].to_list()
    limit = {c: cell_area_m2(c) for c in set(cells)}
    over = [(c, a) for c, a in zip(cells, rows["area_m2"], strict=True) if a > limit[c] * 1.0001]
    assert over == []
    assert stats.objects_clipped > 100


def test_areas_are_counted_once(helsinki) -> None:
    """A closed way yields its area rows from the area, never again as a way."""
    df, _, _ = helsinki
    dup = df.group_by("osm_type", "osm_id", "channel", "cell_id").len().filter(pl.col("len") > 1)
    assert dup.height == 0
    closed_lines = df.filter(pl.col("length_m").is_not_null() & pl.col("area_m2").is_not_null())
    assert closed_lines.height == 0


def test_partition_filter_and_two_sources(helsinki_pbf, monaco_pbf, taxonomy) -> None:
    both, _ = extract_features([helsinki_pbf, monaco_pbf], taxonomy, CITY)
    assert set(both["parent_l6"]) == {"4693", "12cd"}
    only_monaco, stats = extract_features(
        [helsinki_pbf, monaco_pbf], taxonomy, CITY, partitions=["12cd"]
    )
    assert set(only_monaco["parent_l6"]) == {"12cd"}
    assert only_monaco.height == both.filter(pl.col("parent_l6") == "12cd").height
    # the same source twice (overlapping extracts) keeps each object once
    twice, _ = extract_features([monaco_pbf, monaco_pbf], taxonomy, CITY)
    assert twice.height == only_monaco.height


def test_source_bbox(helsinki_pbf) -> None:
    min_lat, min_lng, max_lat, max_lng = source_bbox(helsinki_pbf)
    assert math.isclose(min_lat, 60.164155) and math.isclose(max_lng, 24.9534145)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        (b"", "not an OSM PBF"),
        (b"<?xml version='1.0'?><osm></osm>" * 4, "not an OSM PBF"),
    ],
)
def test_bad_sources(tmp_path: Path, taxonomy, content: bytes | None, match: str) -> None:
    path = tmp_path / "bad.osm.pbf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidSourceError, match=match):
        extract_features([path], taxonomy, CITY)


def test_truncated_source(tmp_path: Path, monaco_pbf: Path, taxonomy) -> None:
    data = monaco_pbf.read_bytes()
    path = tmp_path / "truncated.osm.pbf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidSourceError, match="truncated or corrupt"):
        extract_features([path], taxonomy, CITY)


def test_wrong_extension(tmp_path: Path, taxonomy) -> None:
    path = tmp_path / "city.osm"
    path.write_text("<osm/>")
    with pytest.raises(InvalidSourceError, match="not a .osm.pbf"):
        extract_features([path], taxonomy, CITY)


def test_empty_extract_gives_no_rows(tmp_path: Path, taxonomy) -> None:
    """A valid PBF holding nothing the taxonomy maps yields zero rows (the asset then errors)."""
    path = tmp_path / "empty.osm.pbf"
    with osmium.SimpleWriter(str(path)) as w:
        w.add_node(osmium.osm.mutable.Node(id=1, location=(24.94, 60.17), tags={"note": "x"}))
    df, stats = extract_features([path], taxonomy, CITY)
    assert df.height == 0 and stats.objects_matched == 0
    assert dict(df.schema) == OSM_FEATURES_SCHEMA


def test_bbox_from_nodes_when_header_has_none(tmp_path: Path) -> None:
    path = tmp_path / "nobox.osm.pbf"
    with osmium.SimpleWriter(str(path)) as w:
        w.add_node(osmium.osm.mutable.Node(id=1, location=(24.94, 60.17), tags={"shop": "bakery"}))
        w.add_node(osmium.osm.mutable.Node(id=2, location=(24.95, 60.18), tags={}))
    assert source_bbox(path) == pytest.approx((60.17, 24.94, 60.18, 24.95))


def test_source_cover_follows_a_replaced_file(tmp_path: Path, helsinki_pbf, monaco_pbf) -> None:
    """The cover of a source is computed once per version of the file: a file replaced at the
    same path (another inode, size and box) is read again."""
    from s2vec_pipeline.osm.coverage import cells_covering_source, source_cells, sources_for
    from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6

    src = tmp_path / "city.osm.pbf"
    shutil.copy(helsinki_pbf, src)
    assert cells_covering_source(src) == [HELSINKI_L6]
    assert source_cells([str(src), str(monaco_pbf)]) == {
        MONACO_L6: (str(monaco_pbf),),
        HELSINKI_L6: (str(src),),
    }
    other = tmp_path / "other.osm.pbf"
    shutil.copy(monaco_pbf, other)
    os.replace(other, src)
    assert cells_covering_source(src) == [MONACO_L6]
    assert sources_for([str(src)], [MONACO_L6]) == [str(src)]
    with pytest.raises(CellOutsideSourcesError, match=f"cells {HELSINKI_L6} are outside"):
        sources_for([str(src)], [HELSINKI_L6])
