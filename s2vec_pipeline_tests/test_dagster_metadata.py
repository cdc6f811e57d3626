"""What the UI shows, asserted through Dagster's API on real runs: one materialization per
partition per run with Dagster's data-version tags, standard table metadata that agrees with the
Delta tables (read with deltalake and polars), per-partition checks, nothing "Unsynced" after a
clean run, and CLI runs that are re-executable runs of the code location's jobs."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from deltalake import DeltaTable

from s2vec_pipeline.cli import main
from s2vec_pipeline.definitions import build_definitions
from s2vec_pipeline.osm.extract import OSM_FEATURES_CODE_VERSION
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6
from s2vec_pipeline_tests.test_dagster_compat import ui_status

CODE_VERSIONS = {
    "osm_features": OSM_FEATURES_CODE_VERSION,
    "cell_features": "2",
    "raster_tiles": "2",
}
UPSTREAM = {
    "osm_features": "osm_sources",
    "cell_features": "osm_features",
    "raster_tiles": "cell_features",
}
PARTITIONS = [MONACO_L6, HELSINKI_L6]


@pytest.fixture(scope="module")
def recorded(materialized: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A copy of the session's materialized root and the Dagster records of its runs."""
    root = tmp_path_factory.mktemp("meta_root")
    home = tmp_path_factory.mktemp("meta_home")
    shutil.copytree(materialized[0], root, dirs_exist_ok=True)
    shutil.copytree(materialized[1], home, dirs_exist_ok=True)
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        yield root, instance


def _records(instance: dg.DagsterInstance, asset: str, partition: str) -> list:
    return instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
        limit=10,
    ).records


@pytest.mark.parametrize("asset", list(UPSTREAM))
def test_one_materialization_per_partition_with_dagster_versions(recorded, asset: str) -> None:
    root, instance = recorded
    for k in PARTITIONS:
        (record,) = _records(instance, asset, k)  # one run, one event: nothing doubled
        tags = record.asset_materialization.tags
        upstream = UPSTREAM[asset]
        assert len(tags["dagster/data_version"]) == 16
        assert tags["dagster/code_version"] == CODE_VERSIONS[asset]
        # Dagster's own provenance: the pointer is at or after the upstream partition's latest
        # event (for a partitioned dependency Dagster records the asset's latest event id).
        up = instance.get_latest_data_version_record(
            dg.AssetKey(upstream), upstream == "osm_sources", k
        )
        assert int(tags[f"dagster/input_event_pointer/{upstream}"]) >= up.storage_id
        assert f"dagster/input_data_version/{upstream}" in tags


@pytest.mark.parametrize("asset", list(UPSTREAM))
def test_table_metadata_agrees_with_delta(recorded, asset: str) -> None:
    root, instance = recorded
    table = DeltaTable(str(root / asset))
    stored_columns = [f.name for f in table.schema().fields]
    for k in PARTITIONS:
        (record,) = _records(instance, asset, k)
        meta = record.asset_materialization.metadata
        rows = pl.read_delta(str(root / asset)).filter(pl.col("parent_l6") == k).height
        assert meta["dagster/row_count"].value == rows > 0
        schema = meta["dagster/column_schema"].value
        assert [c.name for c in schema.columns] == stored_columns
        assert all(c.type for c in schema.columns)
        assert meta["dagster/table_name"].value == asset
        assert Path(meta["dagster/uri"].value).name == asset  # (the root was copied)
        # the commit this materialization's run wrote (named in the commit), not the latest
        (commit,) = [c for c in table.history() if c.get("dagster.run_id") == record.run_id]
        assert meta["delta_version"].value == commit["version"]
    first = _records(instance, "osm_features", MONACO_L6)[0].asset_materialization.metadata
    assert first["objects_read"].value > first["objects_matched"].value > 0
    assert "geometry_failures" in first
    raster = _records(instance, "raster_tiles", MONACO_L6)[0].asset_materialization.metadata
    assert raster["preview"].value.startswith("![raster of 12cd](data:image/png;base64,")


def test_every_check_ran_per_partition_with_its_description(recorded) -> None:
    """What a partition's checks tab shows after the data-layer runs: every check of the data
    layer's assets evaluated for that partition, each passed, each described."""
    _, instance = recorded
    evaluations = [
        entry.dagster_event.event_specific_data
        for run in instance.get_runs()
        for entry in instance.all_logs(
            run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        )
    ]
    seen = {(e.asset_key.to_user_string(), e.check_name, e.partition) for e in evaluations}
    assert all(e.passed for e in evaluations)
    defs = build_definitions()
    for asset in UPSTREAM:
        specs = list(defs.get_assets_def(asset).check_specs)
        assert len(specs) >= 2, asset
        for spec in specs:
            assert spec.description, spec.key
            for k in PARTITIONS:
                assert (asset, spec.name, k) in seen, (spec.key, k)


def test_source_observations_show_their_extract(recorded) -> None:
    """An osm_sources observation in the UI: the cell's source, its extract and size (against
    the file itself), the change files applied, the regions holding it."""
    _, instance = recorded
    for k, name in ((MONACO_L6, "monaco"), (HELSINKI_L6, "helsinki")):
        (record,) = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("osm_sources"), asset_partitions=[k]),
            limit=1,
        ).records
        meta = record.asset_observation.metadata
        extract = Path(meta["extract"].value)
        assert name in extract.name and name in meta["sources"].value
        assert meta["size_bytes"].value == extract.stat().st_size > 0
        assert meta["changes_applied"].value == 0 and meta["changed_now"].value is False
        assert meta["regions"].value == "(none)"
        assert record.asset_observation.tags["dagster/data_version"]


def test_nothing_unsynced_and_no_version_warning_after_a_clean_run(recorded) -> None:
    root, instance = recorded
    defs = build_definitions(PipelineSettings(root=str(root)))
    for asset in UPSTREAM:
        for k in PARTITIONS:
            assert ui_status(instance, defs, asset, k).value == "FRESH", (asset, k)
    for run in instance.get_runs():
        messages = [e.user_message for e in instance.all_logs(run.run_id)]
        assert not any("Data version mismatch" in m for m in messages), run.job_name


def _data_layer_job() -> dg.JobDefinition:
    return build_definitions().resolve_job_def("data_layer")


@pytest.mark.slow
def test_cli_runs_are_runs_of_the_code_location_jobs(tmp_path: Path, monkeypatch, capsys) -> None:
    home, root = tmp_path / "home", tmp_path / "root"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    args = ["materialize", "--root", str(root), "--cells", MONACO_L6, "--stages", "extract"]
    assert main(args) == 0
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert sorted(r.job_name for r in runs) == ["data_layer", "refresh_sources"]
        data_run = next(r for r in runs if r.job_name == "data_layer")
        assert data_run.tags["dagster/partition"] == MONACO_L6
        assert data_run.tags["s2vec/cli"] == "s2vec " + " ".join(args)
        assert data_run.run_config["resources"]["s2vec"]["config"]["root"] == str(root)
        # What "Re-execute" in the UI does: the code location's job with the parent run's
        # config and tags (the UI copies them; execute_job needs them passed), here while the
        # code location's own default root points elsewhere.
        monkeypatch.setenv("S2VEC_ROOT", str(tmp_path / "elsewhere"))
        result = dg.execute_job(
            dg.reconstructable(_data_layer_job),
            instance,
            tags={k: v for k, v in data_run.tags.items() if not k.startswith(".dagster")},
            reexecution_options=dg.ReexecutionOptions(parent_run_id=data_run.run_id),
        )
        assert result.success
        assert instance.get_run_by_id(result.run_id).tags["dagster/partition"] == MONACO_L6
        (latest, _) = _records(instance, "osm_features", MONACO_L6)
        assert latest.run_id == result.run_id
    assert not (tmp_path / "elsewhere").exists()  # the re-execution wrote to the run's root

    # `make demo` then `s2vec status` without DAGSTER_HOME: status names the instance to read
    monkeypatch.delenv("DAGSTER_HOME")
    capsys.readouterr()
    assert main(["status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "not recorded by Dagster here" in out
    assert f"run DAGSTER_HOME={home} s2vec status" in out
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert main(["status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "not recorded by Dagster here" not in out and "DAGSTER_HOME=" not in out
