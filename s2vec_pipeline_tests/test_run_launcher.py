"""``WarmRunLauncher``: runs executed by long-lived workers, as the daemon launches them.

Real Dagster runs on a real SQLite instance: each run is created from its code origin (what
the daemon hands the launcher) and launched; the worker processes are real spawned processes.
The oracle for "executed in a warm worker" is the process id each run's op writes to a file,
compared with the pid Dagster's run monitoring reads from the run's events.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import psutil
import pytest

from s2vec_pipeline.service.dagster_compat import WorkerStatus
from s2vec_pipeline.service.instance import run_worker_pid
from s2vec_pipeline.service.run_launcher import WarmRunLauncher
from s2vec_pipeline_tests import warm_run_jobs

LAUNCHER_YAML = """telemetry: {enabled: false}
run_launcher:
  module: s2vec_pipeline.service.run_launcher
  class: WarmRunLauncher
  config: {max_runs_per_worker: 3, idle_timeout_s: 600}
"""


@pytest.fixture
def instance(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(LAUNCHER_YAML)
    with dg.DagsterInstance.from_config(str(home)) as inst:
        yield inst
        inst.run_launcher.dispose()


def _launch(instance: dg.DagsterInstance, folder: Path, wait_s: float = 0.0) -> str:
    recon = dg.reconstructable(warm_run_jobs.note_pid_job)
    run = instance.create_run_for_job(
        job_def=warm_run_jobs.note_pid_job,
        run_config={"ops": {"note_pid": {"config": {"folder": str(folder), "wait_s": wait_s}}}},
        job_code_origin=recon.get_python_origin(),
    )
    instance.run_launcher.launch_run(SimpleNamespace(dagster_run=run, workspace=None))
    return run.run_id


def _wait(instance: dg.DagsterInstance, run_id: str, timeout: float = 120) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout
    while not (run := instance.get_run_by_id(run_id)).is_finished:
        assert time.monotonic() < deadline, f"run {run_id} still {run.status}"
        time.sleep(0.2)
    return run


def test_runs_execute_in_warm_workers_reused_until_their_budget(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    assert isinstance(instance.run_launcher, WarmRunLauncher)
    pids = []
    for _ in range(4):  # one after the other: 3 in the first worker (its budget), then another
        run_id = _launch(instance, tmp_path)
        assert _wait(instance, run_id).status == dg.DagsterRunStatus.SUCCESS
        (written,) = [p for p in tmp_path.glob("*.pid") if p not in pids]
        pids.append(written)
        recorded = run_worker_pid(instance, run_id)
        assert recorded is not None and recorded[0] == int(written.read_text())
    workers = [int(p.read_text()) for p in pids]
    assert os.getpid() not in workers
    assert workers[0] == workers[1] == workers[2] != workers[3]


def test_a_killed_worker_fails_its_run_health_and_terminate_cancels(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    launcher = instance.run_launcher
    slow = _launch(instance, tmp_path, wait_s=120)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*.pid")):  # the op is running
        assert time.monotonic() < deadline
        time.sleep(0.2)
    run = instance.get_run_by_id(slow)
    assert launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
    # "Terminate" in the UI: the webserver's instance, whose launcher has no workers of its own
    with dg.DagsterInstance.from_config(str(instance.root_directory)) as webserver:
        assert webserver.run_launcher is not launcher
        assert webserver.run_launcher.terminate(slow)
    assert _wait(instance, slow, 30).status == dg.DagsterRunStatus.CANCELED
    pid = int(next(tmp_path.glob("*.pid")).read_text())
    assert launcher.check_run_worker_health(run).status == WorkerStatus.FAILED
    # killed: gone, or a zombie until the launcher (its parent) reaps it
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # the next run gets a live worker
    (tmp_path / "again").mkdir()
    again = _launch(instance, tmp_path / "again")
    assert _wait(instance, again).status == dg.DagsterRunStatus.SUCCESS


def test_runs_launched_together_run_at_once_in_separate_workers(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    first = _launch(instance, tmp_path, wait_s=4)
    second = _launch(instance, tmp_path, wait_s=4)  # the first worker is busy: the spare takes it
    t0 = time.monotonic()
    assert _wait(instance, first).status == dg.DagsterRunStatus.SUCCESS
    assert _wait(instance, second).status == dg.DagsterRunStatus.SUCCESS
    pids = {int(p.read_text()) for p in tmp_path.glob("*.pid")}
    assert len(pids) == 2
    starts = sorted(
        e.timestamp
        for r in (first, second)
        for e in instance.all_logs(r, of_type=dg.DagsterEventType.STEP_START)
    )
    ends = sorted(
        e.timestamp
        for r in (first, second)
        for e in instance.all_logs(r, of_type=dg.DagsterEventType.STEP_SUCCESS)
    )
    assert starts[1] < ends[0], "the two runs' steps did not overlap"
    assert time.monotonic() - t0 < 120
