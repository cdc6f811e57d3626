"""Partition runs through long-lived worker processes (issue 15): many partitions per worker,
a worker killed mid-run fails its partition only, the rest are written, a rerun completes it."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from s2vec_pipeline.cells.profiles import PROFILES
from s2vec_pipeline.cli import main
from s2vec_pipeline.osm.coverage import cells_covering_source
from s2vec_pipeline.osm.extract import extract_features
from s2vec_pipeline.osm.taxonomy import load_taxonomy
from s2vec_pipeline.service.partition_workers import ENV_KILL_PARTITION
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.osm_tile import cell_center_offsets, tile_pbf


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, helsinki_pbf) -> Path:
    out = tmp_path_factory.mktemp("tiled") / "three.osm.pbf"
    tile_pbf(helsinki_pbf, cell_center_offsets(helsinki_pbf, 3), out)
    return out


@pytest.mark.slow
def test_killed_worker_fails_its_partition_only(tiled, tmp_path, monkeypatch, capsys):
    cells = cells_covering_source(tiled)
    oracle, _ = extract_features([tiled], load_taxonomy(), PROFILES["city"], cells)
    full = sorted(set(oracle["parent_l6"]))
    assert len(full) >= 3
    victim = full[1]
    root = tmp_path / "root"
    args = ["materialize", "--root", str(root), "--source", str(tiled), "--profile", "city"]
    args += ["--stages", "extract", "--workers", "2"]
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv(ENV_KILL_PARTITION, victim)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"worker for partition {victim} died" in err
    written = set(delta_store.partition_keys(root, "osm_features"))
    assert victim not in written and set(full) - {victim} <= written
    for k in written:  # every written partition holds the single-process rows
        got = delta_store.read_partitions(root, "osm_features", [k]).sort(oracle.columns[:5])
        want = oracle.filter(pl.col("parent_l6") == k).sort(oracle.columns[:5])
        assert got.select(want.columns).equals(want), k
    # one Dagster run per partition: the runs of the workers that lived all succeeded
    with dg.DagsterInstance.from_config(str(root / "_dagster")) as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name="data_layer"))
        ok = [r for r in runs if r.status == dg.DagsterRunStatus.SUCCESS]
        assert len(ok) == len(cells) - 1
    monkeypatch.delenv(ENV_KILL_PARTITION)
    assert main(args) == 0  # the rerun computes the missing partition only
    assert victim in delta_store.partition_keys(root, "osm_features")
    assert "up to date, skipped" in capsys.readouterr().out
