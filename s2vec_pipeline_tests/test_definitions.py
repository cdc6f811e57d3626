"""The Dagster code location: loads, shows the lineage, the launchpad config, the checks, the
owners; the partition sensor registers source cells and removes keys no source covers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from s2vec_pipeline.cells.regions import REGIONS_FILE
from s2vec_pipeline.definitions import build_definitions, defs
from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME
from s2vec_pipeline.defs.regions import register_source_partitions
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.service.status import TABLES
from s2vec_pipeline.settings import PipelineSettings

REPO = Path(__file__).resolve().parents[1]
key = dg.AssetKey


def test_lineage_and_one_partition_per_run() -> None:
    graph = defs.resolve_asset_graph()
    assert graph.get(key("osm_features")).parent_keys == {key("osm_sources")}
    assert graph.get(key("cell_features")).parent_keys == {key("osm_features")}
    assert graph.get(key("raster_tiles")).parent_keys == {key("cell_features")}
    assert graph.get(key("cell_embeddings")).parent_keys == {key("raster_tiles"), key("mae_model")}
    for name in ["osm_sources", "osm_features", "cell_features", "raster_tiles", "cell_embeddings"]:
        node = graph.get(key(name))
        assert node.partitions_def.name == L6_PARTITIONS_NAME
        # Dagster records one data version per run: so one partition per run.
        assert node.backfill_policy in (None, dg.BackfillPolicy.multi_run(1)), name
    assert graph.get(key("osm_sources")).is_observable
    for job in ["data_layer", "train_model", "embed", "refresh_sources", "materialize_region"]:
        assert defs.resolve_job_def(job) is not None


def _select(text: str) -> set[str]:
    """The assets a selection typed in the UI's asset catalog finds."""
    graph = defs.resolve_asset_graph()
    return {k.to_user_string() for k in dg.AssetSelection.from_string(text).resolve(graph)}


def test_ui_selections_find_the_teams_assets_and_its_delta_tables() -> None:
    assert set(TABLES) <= _select('owner:"team:s2vec"')
    assert {"mae_model", "evaluation"} <= _select('owner:"team:s2vec"')
    assert _select("kind:delta") == set(TABLES)  # the tables s2vec status and sql know


def test_code_location_loads_without_reading_data_files(tmp_path: Path) -> None:
    """Loading reads no extract and no regions.yaml: a missing source or a broken regions file
    fails the runs that need them (with their message), not the code location's load."""
    root = tmp_path / "root"
    root.mkdir()
    (root / REGIONS_FILE).write_text("regions: [unclosed\n")
    settings = PipelineSettings(root=str(root), sources=[str(tmp_path / "missing.osm.pbf")])
    loaded = build_definitions(settings)
    dg.Definitions.validate_loadable(loaded)
    assert loaded.resolve_job_def("partition_pipeline").name == "partition_pipeline"


def _fields(job: str, op: str) -> dict:
    schema = defs.resolve_job_def(job).run_config_schema.config_type.fields
    return schema["ops"].config_type.fields[op].config_type.fields["config"].config_type.fields


def test_launchpad_config_has_defaults_and_descriptions() -> None:
    train = _fields("train_model", "mae_model")
    assert {"epochs", "embed_dim", "depth", "num_heads", "mask_ratio", "partitions"} <= set(train)
    assert train["embed_dim"].default_value == 256 and train["mask_ratio"].default_value == 0.75
    assert all(f.description for f in train.values())
    embed = _fields("embed", "embeddings")
    assert embed["model_version"].description
    region = _fields("materialize_region", "resolve_region")
    assert region["region"].description and region["bbox"].description
    # The resource's fields are the settings' fields, described once.
    resource = (
        defs.resolve_job_def("data_layer")
        .run_config_schema.config_type.fields["resources"]
        .config_type.fields["s2vec"]
        .config_type.fields["config"]
        .config_type.fields
    )
    assert set(resource) == set(PipelineSettings.model_fields)
    assert all(f.description for f in resource.values())


@pytest.mark.slow
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


def test_sensor_registers_source_cells_and_removes_bad_keys(tmp_path: Path) -> None:
    settings = PipelineSettings(root=str(tmp_path / "root"))
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        ctx = dg.build_sensor_context(
            instance=instance, resources={"s2vec": S2VecResource.from_settings(settings)}
        )
        result = register_source_partitions(ctx)
        (request,) = result.dynamic_partitions_requests
        assert isinstance(request, dg.AddDynamicPartitionsRequest)
        assert list(request.partition_keys) == ["12cd", "4693"]
        # what a user may type in "Add a partition": a name, a finer cell, an uncovered cell
        instance.add_dynamic_partitions(
            L6_PARTITIONS_NAME, [*request.partition_keys, "helsinki", "12cd4", "12cf"]
        )
        again = register_source_partitions(ctx)
        (delete,) = again.dynamic_partitions_requests
        assert isinstance(delete, dg.DeleteDynamicPartitionsRequest)
        assert sorted(delete.partition_keys) == ["12cd4", "12cf", "helsinki"]


def test_settings_from_env(tmp_path: Path) -> None:
    env = {"S2VEC_ROOT": str(tmp_path), "S2VEC_PROFILE": "paper", "S2VEC_SOURCES": "/a.osm.pbf"}
    s = PipelineSettings.from_env(env)
    assert (s.root, s.profile.image_level, s.sources) == (str(tmp_path), 8, ["/a.osm.pbf"])
    d = build_definitions(s)
    resource = d.resources["s2vec"]
    assert (resource.root, resource.sources) == (str(tmp_path), ["/a.osm.pbf"])
