"""Partitioned extraction (osmium-tool split + spawned workers) against the single-process
path as the oracle: identical ``osm_features`` rows, row for row, on the real bundled extracts,
on tiled copies straddling level-6 borders, and on objects longer than a cell. Needs
osmium-tool (``apt-get install osmium-tool``), as production does for large sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import osmium
import polars as pl
import pytest

from s2vec_pipeline.cells import s2, s2_geometry
from s2vec_pipeline.cells.profiles import PROFILES
from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.osm.coverage import cells_covering_source
from s2vec_pipeline.osm.extract import extract_features
from s2vec_pipeline.osm.osmium_tool import OsmiumToolMissingError
from s2vec_pipeline.osm.split import (
    ENV_KILL_WORKER,
    PartitionedResult,
    extract_partitions,
    plan_groups,
)
from s2vec_pipeline.osm.taxonomy import load_taxonomy
from s2vec_pipeline_tests.osm_tile import cell_center_offsets, tile_pbf

CITY = PROFILES["city"]
PAPER = PROFILES["paper"]
COPIES = 5


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


def run_partitioned(
    sources: list[Path], taxonomy, partitions: list[str], **kw
) -> tuple[dict[str, pl.DataFrame], PartitionedResult]:
    got: dict[str, pl.DataFrame] = {}

    def keep(token: str, rows: pl.DataFrame) -> None:
        assert token not in got  # one call per partition
        got[token] = rows

    kw.setdefault("in_process_max_bytes", 0)  # force the split + workers path
    kw.setdefault("workers", 2)
    profile = kw.pop("profile", CITY)
    result = extract_partitions(sources, taxonomy, profile, partitions, keep, **kw)
    return got, result


def assert_same_rows(
    old: pl.DataFrame, got: dict[str, pl.DataFrame], partitions: list[str]
) -> None:
    assert sorted(got) == sorted(partitions)
    for token in partitions:
        expected = old.filter(pl.col("parent_l6") == token)
        assert got[token].equals(expected), token  # same rows, same order, same values


@pytest.mark.slow
def test_bundled_extracts_identical(helsinki_pbf, monaco_pbf, taxonomy) -> None:
    sources = [helsinki_pbf, monaco_pbf]
    partitions = sorted({c for s in sources for c in cells_covering_source(s)})
    old, old_stats = extract_features(sources, taxonomy, CITY, partitions)
    got, result = run_partitioned(sources, taxonomy, partitions, partitions_per_group=1)
    assert not result.in_process and result.failed == {}
    assert_same_rows(old, got, partitions)
    assert result.stats.objects_matched == old_stats.objects_matched
    assert result.stats.rows == old.height > 15_000


@pytest.fixture(scope="module")
def straddling(tmp_path_factory, helsinki_pbf) -> Path:
    """Five copies of Helsinki centred on level-6 cell vertices: each spans 3-4 cells."""
    out = tmp_path_factory.mktemp("tiled") / "corners.osm.pbf"
    tile_pbf(helsinki_pbf, cell_center_offsets(helsinki_pbf, COPIES, at="corner"), out)
    return out


def test_tiled_copies_are_shifted_originals(straddling, helsinki_pbf) -> None:
    """The tiler's output, read back with pyosmium: every copy is the original moved."""

    def tagged_nodes(path: Path) -> dict[tuple, list[tuple[float, float]]]:
        by_tags: dict[tuple, list[tuple[float, float]]] = {}
        for n in osmium.FileProcessor(str(path), osmium.osm.NODE):
            if len(n.tags):
                key = tuple(sorted(dict(n.tags).items()))
                by_tags.setdefault(key, []).append((n.location.lat, n.location.lon))
        return by_tags

    orig, tiled = tagged_nodes(helsinki_pbf), tagged_nodes(straddling)
    offsets = cell_center_offsets(helsinki_pbf, COPIES, at="corner")
    assert sum(map(len, tiled.values())) == COPIES * sum(map(len, orig.values()))
    fix = 10_000_000  # PBF coordinates are integers of 1e-7 degree; shifts are too
    for key, locs in list(orig.items())[:200]:
        want = sorted(
            (round(lat * fix) + round(dlat * fix), round(lon * fix) + round(dlon * fix))
            for dlat, dlon in offsets
            for lat, lon in locs
        )
        assert sorted((round(a * fix), round(b * fix)) for a, b in tiled[key]) == want
    ids = [o.id for o in osmium.FileProcessor(str(straddling), osmium.osm.WAY)]
    assert (
        len(set(ids))
        == len(ids)
        == COPIES * sum(1 for _ in osmium.FileProcessor(str(helsinki_pbf), osmium.osm.WAY))
    )


@pytest.mark.slow
@pytest.mark.parametrize(("per_group", "per_pass"), [(1, 8), (4, 32)])
def test_straddling_copies_identical(straddling, taxonomy, per_group, per_pass) -> None:
    partitions = cells_covering_source(straddling)
    old, _ = extract_features([straddling], taxonomy, CITY, partitions)
    # the copies really cross borders: rows in at least 8 partitions
    assert old["parent_l6"].n_unique() >= 8
    # (1, 8): more groups than extracts per pass, so the split goes through cluster files
    assert per_group > 1 or len(partitions) > per_pass
    got, result = run_partitioned(
        [straddling], taxonomy, partitions, partitions_per_group=per_group, margin_deg=0.0,
        max_extracts_per_pass=per_pass,
    )  # fmt: skip
    assert result.failed == {}
    assert_same_rows(old, got, partitions)


def _write_long_objects(path: Path) -> tuple[list[str], str]:
    """A 2-node road and a square forest whose only vertices lie ~3° from the cell holding the
    road's midpoint and the forest's inside point: that cell's worker never sees them."""
    lat, lng, d = 10.0, 10.0, 3.0
    mid_cell = str(s2.to_token(s2.latlng_to_cell_id(np.array([lat]), np.array([lng]), 6))[0])
    corners = [(lat - d, lng - d), (lat - d, lng + d), (lat + d, lng + d), (lat + d, lng - d)]
    road = [(lat, lng - d), (lat, lng + d)]
    with osmium.SimpleWriter(str(path)) as w:
        for i, (a, b) in enumerate(road + corners, start=1):
            w.add_node(osmium.osm.mutable.Node(id=i, location=(b, a), tags={}))
        w.add_way(osmium.osm.mutable.Way(id=1, nodes=[1, 2], tags={"highway": "primary"}))
        w.add_way(osmium.osm.mutable.Way(id=2, nodes=[3, 4, 5, 6, 3], tags={"landuse": "forest"}))
    pts = np.array(road + corners)
    vertex_cells = s2.to_token(s2.latlng_to_cell_id(pts[:, 0], pts[:, 1], 6))
    return sorted({mid_cell, *map(str, vertex_cells)}), mid_cell


def test_objects_longer_than_a_cell(tmp_path, taxonomy) -> None:
    pbf = tmp_path / "long.osm.pbf"
    partitions, mid_cell = _write_long_objects(pbf)
    # The paper profile: the forest covers the middle level-6 cell with 4,096 level-12 pixels
    # (4**11 level-17 ones with the city profile: too many rows for a test).
    old, _ = extract_features([pbf], taxonomy, PAPER, partitions)
    mid_rows = old.filter(pl.col("parent_l6") == mid_cell)
    assert set(mid_rows["channel"]) >= {"road_primary_m", "natural_wood_forest_m2"}
    assert mid_rows.filter(pl.col("channel") == "natural_wood_forest_m2").height == 4**6
    got, result = run_partitioned(
        [pbf], taxonomy, partitions, partitions_per_group=1, margin_deg=0.0, profile=PAPER
    )
    assert result.failed == {}
    assert_same_rows(old, got, partitions)


@pytest.mark.slow
def test_dead_worker_fails_only_its_partitions(straddling, taxonomy, monkeypatch) -> None:
    partitions = cells_covering_source(straddling)
    old, _ = extract_features([straddling], taxonomy, CITY, partitions)
    # group g00000 holds the first partition; its process is SIGKILLed on both attempts
    monkeypatch.setenv(ENV_KILL_WORKER, "s000-g00000")
    got, result = run_partitioned(
        [straddling], taxonomy, partitions, partitions_per_group=1, margin_deg=0.0
    )
    assert result.failed[partitions[0]].startswith("worker s000-g00000")
    assert "died" in result.failed[partitions[0]]
    assert set(result.failed) | set(got) == set(partitions)
    assert set(result.failed).isdisjoint(got)
    # besides its own partition, only cells meeting the dead worker's region fail (rows of
    # objects only it saw could land there); the others are delivered, and correct
    (dead,) = [g for g in plan_groups(partitions, 1, 0.0) if g.partitions == (partitions[0],)]
    x0, y0, x1, y1 = (c / 1e7 for c in dead.box)
    near = set(s2.to_token(s2_geometry.cover_bbox(y0, x0, y1, x1, 6)).tolist())
    assert set(result.failed) == {partitions[0]} | (near & set(partitions))
    assert len(got) >= 2
    for token, rows in got.items():
        assert rows.equals(old.filter(pl.col("parent_l6") == token))


def test_missing_osmium_tool(helsinki_pbf, taxonomy, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(OsmiumToolMissingError, match="apt-get install osmium-tool") as err:
        run_partitioned([helsinki_pbf], taxonomy, ["4693"])
    assert isinstance(err.value, S2VecError)  # the CLI exits 2 with this one line
    # small sources need no osmium-tool: they are extracted in-process
    got, result = run_partitioned([helsinki_pbf], taxonomy, ["4693"], in_process_max_bytes=10**9)
    assert result.in_process and got["4693"].height > 8_000


@pytest.mark.slow
def test_workers_setting_and_cli(tmp_path, monkeypatch, capsys) -> None:
    import os

    from s2vec_pipeline.cli import build_parser, main
    from s2vec_pipeline.settings import default_workers

    monkeypatch.delenv("S2VEC_WORKERS", raising=False)
    assert default_workers() == os.cpu_count()
    monkeypatch.setenv("S2VEC_WORKERS", "3")
    assert default_workers() == 3
    monkeypatch.setenv("S2VEC_WORKERS", "many")
    with pytest.raises(S2VecError, match="S2VEC_WORKERS"):
        default_workers()
    monkeypatch.delenv("S2VEC_WORKERS")
    args = build_parser().parse_args(["materialize", "--workers", "5"])
    assert args.workers == "5"
    # a bad value: exit 2 with one line naming the option, before any Dagster run
    assert main(["materialize", "--workers", "0", "--root", str(tmp_path)]) == 2
    assert "--workers must be" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
