"""The split cache: a backfill that runs ONE partition per run (the Dagster layer's design) cuts a
large source once per source version, not once per run, and every run still gets the rows the
single-process path gives (the oracle). Calls of osmium-tool are counted by a wrapper put first
on PATH that logs and then runs the real ``osmium``. Needs osmium-tool."""

from __future__ import annotations

import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from s2vec_pipeline.cells.profiles import PROFILES
from s2vec_pipeline.osm.coverage import cells_covering_source
from s2vec_pipeline.osm.extract import extract_features
from s2vec_pipeline.osm.osmium_tool import find_osmium_tool
from s2vec_pipeline.osm.split import extract_partitions, whole_groups
from s2vec_pipeline.osm.taxonomy import load_taxonomy
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline_tests.osm_tile import cell_center_offsets, tile_pbf

CITY = PROFILES["city"]


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


@pytest.fixture(scope="module")
def straddling(tmp_path_factory, helsinki_pbf) -> Path:
    """Three copies of Helsinki centred on level-6 cell vertices: rows in many partitions."""
    out = tmp_path_factory.mktemp("tiled") / "corners.osm.pbf"
    tile_pbf(helsinki_pbf, cell_center_offsets(helsinki_pbf, 3, at="corner"), out)
    return out


@pytest.fixture
def osmium_calls(tmp_path, monkeypatch) -> Path:
    """A log file with one line per ``osmium`` command run (the real tool does the work)."""
    real = find_osmium_tool()
    if real is None:
        pytest.skip("osmium-tool is not installed")
    bin_dir, log = tmp_path / "bin", tmp_path / "osmium-calls.log"
    bin_dir.mkdir()
    wrapper = bin_dir / "osmium"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    log.touch()
    return log


def extract_passes(log: Path) -> int:
    """``osmium extract`` runs (the tiler's ``osmium renumber`` does not count)."""
    return log.read_text().split().count("extract")


def one_partition(source: Path, taxonomy, token: str, cache: Path) -> pl.DataFrame:
    """What the osm_features asset does for one partition of a large source."""
    got: dict[str, pl.DataFrame] = {}
    result = extract_partitions(
        [source], taxonomy, CITY, [token], got.__setitem__, workers=1,
        in_process_max_bytes=0, split_cache=cache,
    )  # fmt: skip
    assert result.failed == {} and list(got) == [token]
    return got[token]


@pytest.mark.slow
def test_one_partition_per_run_reads_the_source_once(
    straddling, taxonomy, osmium_calls, tmp_path
) -> None:
    partitions = cells_covering_source(straddling)
    oracle, _ = extract_features([straddling], taxonomy, CITY, partitions)
    busy = oracle["parent_l6"].unique().sort().to_list()
    assert len(busy) >= 6
    cache = tmp_path / "split"
    for token in busy:
        assert one_partition(straddling, taxonomy, token, cache).equals(
            oracle.filter(pl.col("parent_l6") == token)
        ), token
    # one osmium-tool pass for all runs (the source's groups fit one pass): not one per run
    assert extract_passes(osmium_calls) == 1
    (version,) = [p for p in cache.glob("*/*") if p.is_dir()]
    groups = {g.partitions for g in whole_groups(partitions)}
    assert len(list(version.glob("*.osm.pbf"))) == len(groups)
    assert not list(cache.rglob("*.partial"))  # nothing half-published


@pytest.mark.slow
def test_new_source_version_is_cut_again(straddling, taxonomy, osmium_calls, tmp_path) -> None:
    source = tmp_path / "city.osm.pbf"
    shutil.copy(straddling, source)
    cache = tmp_path / "split"
    token = extract_features([source], taxonomy, CITY)[0]["parent_l6"][0]
    one_partition(source, taxonomy, token, cache)
    first = {p.name for p in cache.glob("*/*") if p.is_dir()}
    # the file is replaced by a different extract at the same path (a fresh download)
    tile_pbf(straddling, [(0.0, 0.0)], source)
    os.utime(source, ns=(1, 1))
    oracle, _ = extract_features([source], taxonomy, CITY, [token])
    assert one_partition(source, taxonomy, token, cache).equals(oracle)
    second = {p.name for p in cache.glob("*/*") if p.is_dir()}
    assert extract_passes(osmium_calls) == 2
    assert len(first) == len(second) == 1 and first != second  # the old version was removed


@pytest.mark.slow
def test_concurrent_runs_share_one_cut(straddling, taxonomy, osmium_calls, tmp_path) -> None:
    oracle, _ = extract_features([straddling], taxonomy, CITY)
    busy = oracle["parent_l6"].unique().sort().to_list()[:4]
    cache = tmp_path / "split"
    with ThreadPoolExecutor(max_workers=len(busy)) as pool:
        got = dict(zip(busy, pool.map(lambda t: one_partition(straddling, taxonomy, t, cache),
                                      busy), strict=True))  # fmt: skip
    assert extract_passes(osmium_calls) == 1
    for token in busy:
        assert got[token].equals(oracle.filter(pl.col("parent_l6") == token)), token


def test_cache_location(tmp_path, monkeypatch) -> None:
    local = PipelineSettings(root=str(tmp_path / "root"))
    assert local.split_cache_dir == tmp_path / "root" / "_split"
    monkeypatch.setenv("S2VEC_CACHE_DIR", str(tmp_path / "cache"))
    remote = PipelineSettings(root="s3://bucket/root")
    # local (osmium-tool writes files), under the cache folder of this root URI only
    assert remote.split_cache_dir.parent.parent == tmp_path / "cache"
    assert remote.split_cache_dir.name == "_split"
    other = PipelineSettings(root="s3://bucket/other")
    assert other.split_cache_dir != remote.split_cache_dir
