"""The Dagster code location: loads, shows the lineage, registers partitions from sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg

from s2vec_pipeline.definitions import build_definitions, defs
from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME, contiguous_ranges
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.defs.sensors import register_source_partitions
from s2vec_pipeline.settings import PipelineSettings

REPO = Path(__file__).resolve().parents[1]


def test_lineage() -> None:
    graph = defs.resolve_asset_graph()
    key = dg.AssetKey
    assert graph.get(key("cell_features")).parent_keys == {key("osm_features")}
    assert graph.get(key("raster_tiles")).parent_keys == {key("cell_features")}
    for name in ["osm_features", "cell_features", "raster_tiles"]:
        node = graph.get(key(name))
        assert node.partitions_def.name == L6_PARTITIONS_NAME
        assert node.backfill_policy == dg.BackfillPolicy.single_run()
    checks = (
        {c.name for c in graph.asset_check_keys if c.asset_key == key("raster_tiles")}
        if hasattr(graph, "asset_check_keys")
        else None
    )
    if checks is not None:
        assert checks == {"no_nan", "agrees_with_cell_features"}
    assert defs.resolve_job_def("data_layer") is not None


def test_workspace_loads_with_dagster_cli(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={"DAGSTER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr


def test_sensor_registers_source_cells(tmp_path: Path) -> None:
    settings = PipelineSettings(root=str(tmp_path / "root"))
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        ctx = dg.build_sensor_context(
            instance=instance, resources={"s2vec": S2VecResource.from_settings(settings)}
        )
        result = register_source_partitions(ctx)
        (request,) = result.dynamic_partitions_requests
        assert list(request.partition_keys) == ["12cd", "4693"]
        instance.add_dynamic_partitions(L6_PARTITIONS_NAME, list(request.partition_keys))
        again = register_source_partitions(ctx)
        assert not again.dynamic_partitions_requests


def test_settings_from_env(tmp_path: Path) -> None:
    env = {"S2VEC_ROOT": str(tmp_path), "S2VEC_PROFILE": "paper", "S2VEC_SOURCES": "/a.osm.pbf"}
    s = PipelineSettings.from_env(env)
    assert (s.root, s.profile.image_level, s.sources) == (str(tmp_path), 8, ("/a.osm.pbf",))
    d = build_definitions(s)
    assert d.resolve_job_def("data_layer") is not None


def test_contiguous_ranges() -> None:
    keys = ["a", "b", "c", "d", "e"]
    assert contiguous_ranges(keys, ["b", "c", "e"]) == [("b", "c"), ("e", "e")]
    assert contiguous_ranges(keys, ["e", "a", "b"]) == [("a", "b"), ("e", "e")]
    assert contiguous_ranges(keys, []) == []
