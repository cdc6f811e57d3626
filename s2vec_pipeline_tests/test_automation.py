"""The Dagster automation around the refresh: schedules evaluated as the daemon would, region
registration from the command line, the region and partition sensors."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from deltalake import DeltaTable

from s2vec_pipeline.cells.regions import REGIONS_FILE, RegionRegistry, region_from_bbox
from s2vec_pipeline.cli import main
from s2vec_pipeline.definitions import build_definitions
from s2vec_pipeline.defs.automation import DATA_VERSION_TAG, refresh_stale_partitions
from s2vec_pipeline.defs.model import weekly_training_schedule
from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME
from s2vec_pipeline.defs.regions import (
    REGION_TAG,
    launch_region_runs,
    materialize_new_regions,
    register_source_partitions,
)
from s2vec_pipeline.defs.resources import S2VecResource, resource_run_config
from s2vec_pipeline.defs.sources import nightly_refresh_schedule
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6

HELSINKI_BBOX = "60.15,24.90,60.20,25.00"
DATA_TABLES = ["osm_features", "cell_features", "raster_tiles"]


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


def test_stale_sensor_launches_one_run_for_the_changed_cell(
    materialized: tuple[Path, Path], tmp_path: Path
) -> None:
    """What the running daemon does once the nightly observation recorded a new version of
    Monaco's OSM data: one partition_pipeline run for Monaco, from osm_features through every
    asset Monaco has; nothing for Helsinki, nothing again while Monaco's run is in flight."""
    root, home = tmp_path / "root", tmp_path / "home"
    shutil.copytree(materialized[0], root)
    shutil.copytree(materialized[1], home)
    defs = build_definitions(PipelineSettings(root=str(root), profile_name="city"))
    sensor = defs.resolve_sensor_def("refresh_stale_partitions")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING  # on without a click
    with dg.DagsterInstance.local_temp(str(home)) as instance:

        def tick() -> dg.SensorResult:
            return refresh_stale_partitions(
                dg.build_sensor_context(instance=instance, definitions=defs)
            )

        assert not tick().run_requests  # a clean run: nothing stale
        instance.report_runless_asset_event(
            dg.AssetObservation(
                "osm_sources", partition=MONACO_L6, tags={DATA_VERSION_TAG: "changed"}
            )
        )
        (request,) = tick().run_requests
        assert (request.job_name, request.partition_key) == ("partition_pipeline", MONACO_L6)
        assert [k.to_user_string() for k in request.asset_selection] == DATA_TABLES
        assert request.tags["s2vec/trigger"] == "stale"
        pipeline = defs.resolve_job_def("partition_pipeline")
        instance.create_run_for_job(
            pipeline,
            tags={"dagster/partition": MONACO_L6},
            status=dg.DagsterRunStatus.NOT_STARTED,
        )
        assert not tick().run_requests  # its run is in flight: not requested twice


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
    settings = PipelineSettings(root=str(root), sources=[PipelineSettings().sources[0]])
    RegionRegistry(root).add(region_from_bbox("hki", 60.15, 24.90, 60.20, 25.00))
    resources = {"s2vec": S2VecResource.from_settings(settings)}
    repo = build_definitions(settings).get_repository_def()
    with dg.DagsterInstance.ephemeral() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources=resources, repository_def=repo)
        result = materialize_new_regions(ctx)
        (request,) = result.run_requests
        assert request.job_name == "partition_pipeline" and request.tags[REGION_TAG] == "hki"
        assert request.partition_key == HELSINKI_L6
        # no model yet: the data layer only
        assert [k.to_user_string() for k in request.asset_selection] == [
            "osm_features",
            "cell_features",
            "raster_tiles",
        ]
        (added,) = result.dynamic_partitions_requests
        assert list(added.partition_keys) == [HELSINKI_L6]
        assert json.loads(result.cursor) == {"hki": RegionRegistry(root).get("hki").created_at}
        instance.add_dynamic_partitions(L6_PARTITIONS_NAME, [HELSINKI_L6])
        again = materialize_new_regions(
            dg.build_sensor_context(
                instance=instance, resources=resources, cursor=result.cursor, repository_def=repo
            )
        )
        assert not again.run_requests
        # A region written into regions.yaml by hand outside every source never becomes a
        # partition (it could only fail), and its runs are not launched.
        RegionRegistry(root).add(region_from_bbox("mc", 43.72, 7.40, 43.75, 7.44))
        reg = register_source_partitions(
            dg.build_sensor_context(instance=instance, resources=resources, repository_def=repo)
        )
        assert not reg.dynamic_partitions_requests
        launched = materialize_new_regions(
            dg.build_sensor_context(
                instance=instance, resources=resources, cursor=again.cursor, repository_def=repo
            )
        )
        assert not launched.run_requests


@pytest.mark.slow
def test_materialize_region_job_registers_a_box_and_launches_its_cells(tmp_path: Path) -> None:
    """The UI path: launch materialize_region with a name and a box; the run-status sensor then
    requests one run per cell of the region, which materializes it."""
    root = tmp_path / "root"
    settings = PipelineSettings(root=str(root))
    defs = build_definitions(settings)
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        job = defs.resolve_job_def("materialize_region")
        bad = job.execute_in_process(
            instance=instance,
            run_config={
                "resources": resource_run_config(settings),
                "ops": {"resolve_region": {"config": {"region": "nowhere"}}},
            },
            raise_on_error=False,
        )
        assert not bad.success and not (root / REGIONS_FILE).exists()
        run_config = {
            "resources": resource_run_config(settings),
            "ops": {
                "resolve_region": {"config": {"region": "mc", "bbox": "43.72,7.40,43.75,7.44"}}
            },
        }
        result = job.execute_in_process(instance=instance, run_config=run_config)
        assert result.output_for_node("resolve_region") == [MONACO_L6]
        assert RegionRegistry(root).get("mc").cells == (MONACO_L6,)
        assert MONACO_L6 in instance.get_dynamic_partitions(L6_PARTITIONS_NAME)
        (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
        table = event.event_specific_data.metadata["cells"].value
        assert "| mc | `12cd` |" in table and "monaco.osm.pbf" in table

        run = instance.get_run_by_id(result.run_id)
        success = next(
            e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_SUCCESS
        )
        ctx = dg.build_run_status_sensor_context(
            sensor_name="launch_region_runs",
            dagster_event=success,
            dagster_instance=instance,
            dagster_run=run,
            resources={"s2vec": S2VecResource.from_settings(settings)},
            repository_def=defs.get_repository_def(),
        )
        (request,) = launch_region_runs(ctx).run_requests
        assert (request.partition_key, request.tags[REGION_TAG]) == (MONACO_L6, "mc")
        pipeline = defs.resolve_job_def(request.job_name)
        done = pipeline.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            asset_selection=request.asset_selection,
            run_config={"resources": resource_run_config(settings)},
            tags=request.tags,
        )
        assert done.success
        assert delta_store.partition_keys(root, "raster_tiles") == [MONACO_L6]

        # The other region sensor sees "mc" registered (by the box) and the cell up to date:
        # no second run, from it nor from a relaunch of the region.
        versions = {t: delta_store.table_version(root, t) for t in DATA_TABLES}
        resources = {"s2vec": S2VecResource.from_settings(settings)}
        new = materialize_new_regions(
            dg.build_sensor_context(
                instance=instance, resources=resources, repository_def=defs.get_repository_def()
            )
        )
        assert not new.run_requests and json.loads(new.cursor) == {
            "mc": RegionRegistry(root).get("mc").created_at
        }
        relaunch = job.execute_in_process(instance=instance, run_config=run_config)
        ctx = dg.build_run_status_sensor_context(
            sensor_name="launch_region_runs",
            dagster_event=success,
            dagster_instance=instance,
            dagster_run=instance.get_run_by_id(relaunch.run_id),
            resources=resources,
            repository_def=defs.get_repository_def(),
        )
        assert not launch_region_runs(ctx).run_requests
        assert {t: delta_store.table_version(root, t) for t in DATA_TABLES} == versions


@pytest.mark.slow
def test_region_sensors_request_one_run_per_cell_needing_work(tmp_path: Path) -> None:
    """Both region sensors decide through the shared rule: a cell with a run in flight gets
    none from the other sensor; a cell whose rows are gone from a table (the has_data check)
    needs work again, from that table on."""
    from s2vec_pipeline.defs.automation import partitions_to_run

    root = tmp_path / "root"
    settings = PipelineSettings(root=str(root))
    defs = build_definitions(settings)
    resources = {"s2vec": S2VecResource.from_settings(settings)}
    RegionRegistry(root).add(region_from_bbox("mc", 43.72, 7.40, 43.75, 7.44))
    (tmp_path / "home").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions(L6_PARTITIONS_NAME, [MONACO_L6])
        # a run for the cell was created, not finished (launch_region_runs's): nothing more
        pipeline = defs.resolve_job_def("partition_pipeline")
        queued = instance.create_run_for_job(
            pipeline,
            run_config={"resources": resource_run_config(settings)},
            tags={"dagster/partition": MONACO_L6},
            status=dg.DagsterRunStatus.NOT_STARTED,
        )
        ctx = dg.build_sensor_context(
            instance=instance, resources=resources, repository_def=defs.get_repository_def()
        )
        assert not materialize_new_regions(ctx).run_requests
        instance.report_run_canceled(queued)
        # the cell materialized: up to date for the rule; its raster rows deleted: needs work
        done = pipeline.execute_in_process(
            instance=instance,
            partition_key=MONACO_L6,
            asset_selection=[dg.AssetKey(a) for a in DATA_TABLES],
            run_config={"resources": resource_run_config(settings)},
        )
        assert done.success
        assert partitions_to_run(instance, defs, [MONACO_L6], DATA_TABLES) == {}
        DeltaTable(str(root / "raster_tiles")).delete(f"parent_l6 = '{MONACO_L6}'")

        def has_data(table: str, k: str) -> bool:
            return k in delta_store.partition_keys(root, table)

        plan = partitions_to_run(instance, defs, [MONACO_L6], DATA_TABLES, has_data=has_data)
        assert plan == {MONACO_L6: ["raster_tiles"]}


@pytest.mark.parametrize("bad", ["--source", "--geojson"])
def test_region_from_missing_file(tmp_path: Path, bad: str, capsys) -> None:
    args = ["region", "add", "r", bad, str(tmp_path / "missing"), "--root", str(tmp_path)]
    assert main(args) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / REGIONS_FILE).exists()


def test_two_new_regions_sharing_a_cell_get_one_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    settings = PipelineSettings(root=str(root))
    for name in ("a", "b"):
        RegionRegistry(root).add(region_from_bbox(name, 43.72, 7.40, 43.75, 7.44))
    repo = build_definitions(settings).get_repository_def()
    resources = {"s2vec": S2VecResource.from_settings(settings)}
    with dg.DagsterInstance.ephemeral() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources=resources, repository_def=repo)
        (request,) = materialize_new_regions(ctx).run_requests
        assert (request.partition_key, request.tags[REGION_TAG]) == (MONACO_L6, "a")
