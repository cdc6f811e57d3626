"""The Dagster automation around the refresh: schedules evaluated as the daemon would, region
registration from the command line, the region and partition sensors."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import pytest
from s2vec_pipeline.defs.refresh import nightly_refresh_schedule, weekly_training_schedule
from s2vec_pipeline.defs.sensors import (
    REGION_TAG,
    materialize_new_regions,
    register_source_partitions,
)

from s2vec_pipeline import delta_store
from s2vec_pipeline.cli import main
from s2vec_pipeline.definitions import build_definitions
from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.regions import REGIONS_FILE, RegionRegistry, region_from_bbox
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6

HELSINKI_BBOX = "60.15,24.90,60.20,25.00"


def test_nightly_schedule_tick_launches_the_source_refresh(tmp_path: Path, monkeypatch) -> None:
    defs = build_definitions(PipelineSettings(root=str(tmp_path)))
    schedule = defs.resolve_schedule_def("nightly_refresh")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 2 * * *", "UTC")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    tick = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)
    with dg.DagsterInstance.ephemeral() as instance:
        ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
        result = schedule.evaluate_tick(ctx)
    (request,) = result.run_requests  # one run of the schedule's job, no partitions
    assert schedule.job_name == "refresh_sources" and request.job_name in (None, schedule.job_name)
    assert request.partition_key is None and not request.run_config
    job = defs.resolve_job_def("refresh_sources")
    assert job.asset_layer.executable_asset_keys == {dg.AssetKey("osm_sources")}

    training = defs.resolve_schedule_def("weekly_training")
    assert training.cron_schedule == "0 3 * * 0" and training.job_name == "train_model"
    monkeypatch.setenv("S2VEC_REFRESH_CRON", "30 1 * * *")
    monkeypatch.setenv("S2VEC_TRAIN_CRON", "0 4 1 * *")
    assert nightly_refresh_schedule().cron_schedule == "30 1 * * *"
    assert weekly_training_schedule().cron_schedule == "0 4 1 * *"


def test_automation_wiring() -> None:
    defs = build_definitions(PipelineSettings())
    graph = defs.resolve_asset_graph()
    for name in ["cell_features", "raster_tiles", "cell_embeddings", "image_embeddings"]:
        assert graph.get(dg.AssetKey(name)).automation_condition is not None, name
    for name in ["osm_features", "mae_model"]:  # extraction and training are scheduled
        assert graph.get(dg.AssetKey(name)).automation_condition is None, name
    assert graph.get(dg.AssetKey("osm_features")).parent_keys == {dg.AssetKey("osm_sources")}
    sensor = defs.resolve_sensor_def("s2vec_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_region_cli_registers_partitions_and_refuses_outside(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    root, home = tmp_path / "root", tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("S2VEC_SOURCES", raising=False)
    assert main(["region", "add", "hki", "--bbox", HELSINKI_BBOX, "--root", str(root)]) == 0
    assert f"1 cells: {HELSINKI_L6}" in capsys.readouterr().out
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions(L6_PARTITIONS_NAME) == [HELSINKI_L6]
    before = (root / REGIONS_FILE).read_text()

    assert main(["region", "add", "sahara", "--bbox", "20,5,21,6", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "outside every configured source" in err and "sahara" in err
    assert main(["region", "add", "hki", "--bbox", HELSINKI_BBOX, "--root", str(root)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["region", "add", "x", "--bbox", "1,2,3", "--root", str(root)]) == 2
    assert "MIN_LAT,MIN_LNG,MAX_LAT,MAX_LNG" in capsys.readouterr().err
    assert (root / REGIONS_FILE).read_text() == before  # nothing written by the failures

    assert main(["region", "list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "hki" in out and HELSINKI_L6 in out and "sahara" not in out
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions(L6_PARTITIONS_NAME) == [HELSINKI_L6]


def test_materialize_region(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    root = tmp_path / "root"
    RegionRegistry(root).add(region_from_bbox("monaco", 43.72, 7.40, 43.75, 7.44))
    args = ["materialize", "--root", str(root), "--stages", "extract"]
    assert main([*args, "--region", "nowhere"]) == 2
    assert "no region named 'nowhere'" in capsys.readouterr().err
    assert main([*args, "--region", "monaco"]) == 0
    assert f"partitions: {MONACO_L6}" in capsys.readouterr().out
    assert delta_store.partition_keys(root, "osm_features") == [MONACO_L6]


def test_region_sensors_register_and_launch_new_regions(tmp_path: Path) -> None:
    root = tmp_path / "root"
    settings = PipelineSettings(root=str(root), sources=(PipelineSettings().sources[0],))
    RegionRegistry(root).add(region_from_bbox("hki", 60.15, 24.90, 60.20, 25.00))
    resources = {"s2vec": S2VecResource.from_settings(settings)}
    with dg.DagsterInstance.ephemeral() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources=resources)
        result = materialize_new_regions(ctx)
        (request,) = result.run_requests
        assert request.job_name == "data_layer" and request.tags[REGION_TAG] == "hki"
        assert request.tags["dagster/asset_partition_range_start"] == HELSINKI_L6
        assert request.tags["dagster/asset_partition_range_end"] == HELSINKI_L6
        (added,) = result.dynamic_partitions_requests
        assert list(added.partition_keys) == [HELSINKI_L6]
        assert json.loads(result.cursor) == {"hki": RegionRegistry(root).get("hki").created_at}
        instance.add_dynamic_partitions(L6_PARTITIONS_NAME, [HELSINKI_L6])
        again = materialize_new_regions(
            dg.build_sensor_context(instance=instance, resources=resources, cursor=result.cursor)
        )
        assert not again.run_requests and "hki (1 cells: 4693)" in str(
            again.skip_reason.skip_message
        )
        # A region registered by hand in another cell becomes a partition too.
        RegionRegistry(root).add(region_from_bbox("mc", 43.72, 7.40, 43.75, 7.44))
        reg = register_source_partitions(
            dg.build_sensor_context(instance=instance, resources=resources)
        )
        (request,) = reg.dynamic_partitions_requests
        assert list(request.partition_keys) == [MONACO_L6]


@pytest.mark.parametrize("bad", ["--source", "--geojson"])
def test_region_from_missing_file(tmp_path: Path, bad: str, capsys) -> None:
    args = ["region", "add", "r", bad, str(tmp_path / "missing"), "--root", str(tmp_path)]
    assert main(args) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / REGIONS_FILE).exists()
