"""Each source read once per version (issue 15): a source covering several partitions is
extracted once per group, its partitions' rows kept, and every partition's rows equal the
single-process extraction of the whole file (the oracle), with osmium-tool and without it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
import s2cell

from s2vec_pipeline.cells.profiles import PROFILES
from s2vec_pipeline.osm.coverage import cells_covering_source
from s2vec_pipeline.osm.extract import extract_features
from s2vec_pipeline.osm.extract_cache import extract_partition, interleave_groups
from s2vec_pipeline.osm.osmium_tool import find_osmium_tool
from s2vec_pipeline.osm.split import split_cache_dir
from s2vec_pipeline.osm.taxonomy import load_taxonomy
from s2vec_pipeline_tests.osm_tile import cell_center_offsets, tile_pbf

CITY = PROFILES["city"]


def group_of(token: str) -> str:
    """The extraction group of a partition: its level-5 parent (s2cell as the oracle)."""
    return s2cell.token_to_parent_token(token, 5)


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, helsinki_pbf) -> Path:
    """Four copies of Helsinki, one per level-6 cell: a source covering several groups."""
    out = tmp_path_factory.mktemp("tiled") / "four.osm.pbf"
    tile_pbf(helsinki_pbf, cell_center_offsets(helsinki_pbf, 4), out)
    return out


@pytest.fixture(scope="module")
def oracle(tiled, taxonomy) -> pl.DataFrame:
    """The whole file extracted in one process, every partition it covers."""
    df, _ = extract_features([tiled], taxonomy, CITY, cells_covering_source(tiled))
    return df


@pytest.fixture(params=["osmium-tool", "pyosmium only"])
def tool(request, monkeypatch, tmp_path) -> str:
    if request.param == "osmium-tool":
        if find_osmium_tool() is None:
            pytest.skip("osmium-tool is not installed")
    else:  # a PATH without osmium: the whole small source is extracted once in process
        monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    return request.param


def test_each_group_extracted_once_rows_equal_whole_file(tiled, oracle, taxonomy, tool, tmp_path):
    cells = cells_covering_source(tiled)
    assert len({group_of(t) for t in cells}) >= 2  # the source covers several groups
    extracted, rows = [], 0
    for token in interleave_groups(cells):
        got = extract_partition([tiled], taxonomy, CITY, token, tmp_path / "cache")
        expected = oracle.filter(pl.col("parent_l6") == token)
        assert got.rows.equals(expected), token
        how = got.how[str(tiled)]
        if how == "extracted":
            extracted.append(token)
            assert got.stats.objects_read > 0
        else:
            assert how == "cached" and got.stats.objects_read == 0
        rows += got.rows.height
    assert rows == oracle.height > 0
    groups = {group_of(t) for t in cells}
    if tool == "osmium-tool":  # one extraction per group
        assert len(extracted) == len(groups)
    else:  # the whole file once
        assert len(extracted) == 1


def test_interleave_takes_one_partition_of_each_group_in_turn(tiled):
    cells = cells_covering_source(tiled)
    order = interleave_groups(cells)
    assert sorted(order) == sorted(cells)
    first_round = order[: len({group_of(t) for t in cells})]
    assert len({group_of(t) for t in first_round}) == len(first_round)  # all different groups


@pytest.mark.slow
def test_replaced_source_is_extracted_again(tiled, helsinki_pbf, taxonomy, tmp_path):
    """A file replaced at the same path, even with the old mtime, is a new version: its rows
    are extracted from it, never mixed with the old file's."""
    src = tmp_path / "src.osm.pbf"
    shutil.copy(tiled, src)
    token = interleave_groups(cells_covering_source(tiled))[0]
    cache = tmp_path / "cache"
    first = extract_partition([src], taxonomy, CITY, token, cache)
    assert first.rows.height > 0
    mtime = src.stat().st_mtime_ns
    other = tmp_path / "other.osm.pbf"  # Helsinki moved by 0.3°: other rows in that cell
    lat_lng = cell_center_offsets(helsinki_pbf, 4)
    tile_pbf(helsinki_pbf, [(a + 0.3, b) for a, b in lat_lng], other)
    os.replace(other, src)
    os.utime(src, ns=(mtime, mtime))
    again = extract_partition([src], taxonomy, CITY, token, cache)
    assert again.how[str(src)] == "extracted"
    expected, _ = extract_features([src], taxonomy, CITY, [token])
    assert again.rows.equals(expected)
    assert not again.rows.equals(first.rows)


@pytest.mark.slow
def test_group_without_marker_is_extracted_again(tiled, oracle, taxonomy, tmp_path):
    """A run killed while keeping a group's rows leaves no marker: the next run extracts the
    group again instead of reading a partial file."""
    cache = tmp_path / "cache"
    token = interleave_groups(cells_covering_source(tiled))[0]
    extract_partition([tiled], taxonomy, CITY, token, cache)
    (marker,) = cache.glob("*/*/rows-*/*.done")
    marker.unlink()
    kept = marker.parent / f"{token}.parquet"
    kept.write_bytes(kept.read_bytes()[:100])  # a torn file
    again = extract_partition([tiled], taxonomy, CITY, token, cache)
    assert again.how[str(tiled)] == "extracted"
    assert again.rows.equals(oracle.filter(pl.col("parent_l6") == token))


def test_single_partition_source_is_read_in_the_run(monaco_pbf, taxonomy, tmp_path):
    """A source covering one partition is that partition's own share: read, nothing kept."""
    token = cells_covering_source(monaco_pbf)
    if len(token) != 1:
        pytest.skip("the bundled Monaco extract covers several level-6 cells")
    got = extract_partition([monaco_pbf], taxonomy, CITY, token[0], tmp_path / "cache")
    assert got.how == {str(monaco_pbf): "read"}
    expected, _ = extract_features([monaco_pbf], taxonomy, CITY, token)
    assert got.rows.equals(expected)
    assert not (tmp_path / "cache").exists()


def test_version_folder_changes_with_a_file_replaced_by_rename(tmp_path):
    """Same size, same mtime, other bytes, renamed over the path: another version folder, so
    neither the cut files nor the kept rows of the old file are used."""
    src = tmp_path / "a.osm.pbf"
    src.write_bytes(b"x" * 1000)
    before = split_cache_dir(tmp_path / "cache", src, 4, 0.05)
    mtime = src.stat().st_mtime_ns
    tmp = tmp_path / "b.tmp"
    tmp.write_bytes(b"y" * 1000)
    os.replace(tmp, src)
    os.utime(src, ns=(mtime, mtime))
    assert src.stat().st_size == 1000 and src.stat().st_mtime_ns == mtime
    assert split_cache_dir(tmp_path / "cache", src, 4, 0.05) != before


def test_split_cache_folders_keep_their_names(tmp_path):
    """Split caches made before the source identity had one home stay in use: a source's folder
    is ``<file name up to its first dot>-<12 hex digits of the sha256 of its resolved path>``
    (for names made of letters, digits, - and _), its version folder a hash of the format,
    size, mtime, inode and split parameters (the formula of the earlier code, restated)."""
    src = tmp_path / "city-latest_2.osm.pbf"
    src.write_bytes(b"x" * 10)
    st = src.stat()
    where = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
    version = [2, st.st_size, st.st_mtime_ns, st.st_ino, 4, 0.05, "pbf,pbf_compression=lz4"]
    what = hashlib.sha256(json.dumps(version).encode()).hexdigest()[:12]
    got = split_cache_dir(tmp_path / "cache", src, 4, 0.05)
    assert got == tmp_path / "cache" / f"city-latest_2-{where}" / what
