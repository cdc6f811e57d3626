"""The service's Dagster instance (docker/dagster.yaml) on a real PostgreSQL server started for
these tests: a CLI materialization recorded there, run monitoring failing a killed run so the
queue moves on (real daemon and code server on loopback), and the bad-input paths (server
unreachable, wrong password, unset variable, root not writable) exiting 2 with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from s2vec_pipeline.cli import main
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import MONACO_L6
from s2vec_pipeline_tests.pg_cluster import PostgresCluster, free_port, start_cluster, stop_cluster

REPO = Path(__file__).resolve().parents[1]
SERVICE_YAML = REPO / "docker" / "dagster.yaml"
SLEEPY_LOCATION = Path(__file__).parent / "deploy_location" / "sleepy.py"
STARTUP_S = 90  # code server / daemon answering; ~5 s on an idle machine
MONITOR_S = 90  # killed run -> FAILURE -> next run SUCCESS; ~10 s with a 5 s poll interval


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def _service_home(tmp_path: Path, run_launcher: dict | None = None) -> Path:
    """$DAGSTER_HOME holding docker/dagster.yaml with its Docker run_launcher removed (a local
    instance on the same PostgreSQL) or replaced."""
    config = yaml.safe_load(SERVICE_YAML.read_text())
    assert config["run_launcher"]["class"] == "DockerRunLauncher"
    del config["run_launcher"]
    if run_launcher:
        config["run_launcher"] = run_launcher
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def _use_instance(monkeypatch: pytest.MonkeyPatch, home: Path, env: dict[str, str]) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.slow
def test_materialize_records_its_run_in_postgres(
    pg: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = pg.create_database("materialize_history")
    _use_instance(monkeypatch, _service_home(tmp_path), pg.env(db))
    root = tmp_path / "root"
    args = ["materialize", "--cells", MONACO_L6, "--stages", "extract", "--root", str(root)]
    assert main(args) == 0

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_monitoring_enabled
        records = instance.get_run_records()
        assert sorted(r.dagster_run.job_name for r in records) == ["data_layer", "refresh_sources"]
        assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
        (run,) = [r.dagster_run for r in records if r.dagster_run.job_name == "data_layer"]
        assert run.tags["dagster/partition"] == MONACO_L6
        mats = instance.fetch_materializations(dg.AssetKey("osm_features"), limit=10).records
        assert mats and {(m.run_id, m.asset_materialization.partition) for m in mats} == {
            (run.run_id, MONACO_L6)
        }
        (rows_recorded,) = [
            m.asset_materialization.metadata["dagster/row_count"].value for m in mats
        ]

    # The same history read straight from PostgreSQL, not through Dagster.
    conn = pg.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_id, status FROM runs WHERE pipeline_name = 'data_layer'")
            assert cur.fetchall() == [(run.run_id, "SUCCESS")]
            cur.execute(
                "SELECT DISTINCT partition FROM event_logs WHERE run_id = %s AND asset_key = %s "
                "AND dagster_event_type = 'ASSET_MATERIALIZATION'",
                (run.run_id, dg.AssetKey("osm_features").to_string()),
            )
            assert cur.fetchall() == [(MONACO_L6,)]
    finally:
        conn.close()
    # ... and what it records is what the Delta table holds.
    table = delta_store.read_partitions(str(root), "osm_features", [MONACO_L6], ["parent_l6"])
    assert table.height == rows_recorded > 0


def _wait(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.slow
def test_run_monitoring_fails_a_killed_run_and_the_queue_moves_on(
    pg: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's failure: a run executing in a CLI process (as `s2vec materialize` does) is
    SIGKILLed and holds the only training slot (s2vec/stage=train, limit 1), so a run launched
    from the queue waits behind it. No code server owns that process, so only run monitoring
    can notice: the daemon marks the killed run FAILURE and the queued run then starts and
    succeeds. Code server started with the compose file's command, on loopback."""
    db = pg.create_database("run_monitoring")
    launcher = {"module": "s2vec_pipeline.service.instance", "class": "LocalProcessRunLauncher"}
    home = _service_home(tmp_path, run_launcher=launcher)
    env = {**os.environ, **pg.env(db), "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    _use_instance(monkeypatch, home, pg.env(db))
    port = free_port()
    workspace = yaml.safe_load((REPO / "docker" / "workspace.yaml").read_text())
    workspace["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=port)
    workspace_file = tmp_path / "workspace.yaml"
    workspace_file.write_text(yaml.safe_dump(workspace))
    dagster, daemon = (str(Path(sys.executable).parent / n) for n in ("dagster", "dagster-daemon"))
    log = tmp_path / "services.log"
    out = log.open("w")
    procs: list[subprocess.Popen] = []

    def spawn(*cmd: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    def healthy() -> bool:
        check = [dagster, "api", "grpc-health-check", "-h", "127.0.0.1", "-p", str(port)]
        return subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0

    def run_config(seconds: float, pid_file: Path) -> str:
        op = {"config": {"seconds": seconds, "pid_file": str(pid_file)}}
        return json.dumps({"ops": {"sleep_and_record_pid": op}})

    def launch(job: str, run_id: str, config: str) -> None:  # queued: the daemon starts it
        subprocess.run(
            [dagster, "job", "launch", "-w", str(workspace_file), "-j", job]
            + ["--run-id", run_id, "--config-json", config],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    first_pid, second_pid = tmp_path / "first.pid", tmp_path / "second.pid"
    third_pid = tmp_path / "third.pid"
    second = "22222222-2222-4222-8222-222222222222"
    third = "33333333-3333-4333-8333-333333333333"
    try:
        # The compose file's code-server command, on loopback, serving the test location.
        code_server = ["code-server", "start", "-h", "127.0.0.1", "-p", str(port)]
        spawn(dagster, *code_server, "-f", str(SLEEPY_LOCATION))
        _wait(healthy, STARTUP_S, "the code server's gRPC health check", log)
        spawn(daemon, "run", "-w", str(workspace_file))
        # The compose file's health check of the daemon (heartbeats, here in PostgreSQL): once
        # it passes, the run queue is being served.
        compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
        _cmd, exe, *args = compose["services"]["dagster_daemon"]["healthcheck"]["test"]
        liveness = [str(Path(sys.executable).parent / exe), *args]
        _wait(
            lambda: subprocess.run(liveness, env=env, capture_output=True, timeout=60).returncode
            == 0,
            STARTUP_S, "the daemon's liveness check", log,
        )  # fmt: skip
        # The first run executes inside this CLI process (no code server involved).
        (tmp_path / "first.json").write_text(run_config(600, first_pid))  # JSON is YAML
        cli_run = spawn(
            dagster, "job", "execute", "-f", str(SLEEPY_LOCATION), "-j", "sleepy_train",
            "-c", str(tmp_path / "first.json"),
        )  # fmt: skip
        _wait(
            lambda: first_pid.exists() or cli_run.poll() is not None,
            STARTUP_S, "the CLI run to start", log,
        )  # fmt: skip
        assert cli_run.poll() is None, log.read_text()[-4000:]
        launch("sleepy_train", second, run_config(0.1, second_pid))
        with dg.DagsterInstance.get() as instance:

            def status(run_id: str) -> dg.DagsterRunStatus:
                return instance.get_run_by_id(run_id).status

            (first,) = [r.run_id for r in instance.get_runs() if r.run_id != second]
            assert status(first) == dg.DagsterRunStatus.STARTED
            # The train limit holds the second run back. To see the daemon decide that (not
            # merely not get to it yet), queue a run without the tag behind it: each dequeue
            # pass walks the queue in order, so the pass that takes the later run has passed
            # over the second.
            launch("sleepy_untagged", third, run_config(0.1, third_pid))
            _wait(
                lambda: status(third) != dg.DagsterRunStatus.QUEUED,
                MONITOR_S, "the daemon to dequeue the run without the train tag", log,
            )  # fmt: skip
            assert status(second) == dg.DagsterRunStatus.QUEUED

            assert int(first_pid.read_text()) == cli_run.pid
            os.kill(cli_run.pid, signal.SIGKILL)  # a crash: no failure event is written
            cli_run.wait(10)
            _wait(
                lambda: status(first) == dg.DagsterRunStatus.FAILURE,
                MONITOR_S, "run monitoring to fail the killed run", log,
            )  # fmt: skip
            (failure,) = instance.all_logs(first, of_type=dg.DagsterEventType.RUN_FAILURE)
            assert f"run worker process {cli_run.pid} is gone" in failure.message
            _wait(
                lambda: status(second) == dg.DagsterRunStatus.SUCCESS,
                MONITOR_S, "the queued run to run once the first failed", log,
            )  # fmt: skip
            assert second_pid.exists()
            _wait(
                lambda: status(third) == dg.DagsterRunStatus.SUCCESS,
                MONITOR_S, "the run without the train tag to succeed", log,
            )  # fmt: skip
            assert third_pid.exists()
    finally:
        for proc in reversed(procs):
            _stop(proc)
        out.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "says"),
    [
        ("unreachable", ["Connection refused", "DAGSTER_POSTGRES_HOST", "DAGSTER_POSTGRES_PORT"]),
        ("wrong_password", ["password authentication failed", "DAGSTER_POSTGRES_PASSWORD"]),
        ("unset_password", ['"DAGSTER_POSTGRES_PASSWORD" which is not set', "dagster.yaml"]),
    ],
)
def test_materialize_without_a_usable_postgres_exits_2(
    pg: PostgresCluster, tmp_path: Path, fault: str, says: list[str]
) -> None:
    """Run as a user would (a separate process, real stderr): exit 2, one line naming the
    DAGSTER_POSTGRES_* variable to fix, and nothing written anywhere."""
    db = pg.create_database(f"bad_{fault}")
    env = {**os.environ, **pg.env(db), "DAGSTER_HOME": str(_service_home(tmp_path))}
    if fault == "unreachable":
        env["DAGSTER_POSTGRES_PORT"] = str(free_port())  # nothing listens there
    elif fault == "wrong_password":
        env["DAGSTER_POSTGRES_PASSWORD"] = "not-" + pg.password
    else:
        del env["DAGSTER_POSTGRES_PASSWORD"]
    root = tmp_path / "root"
    args = ["materialize", "--cells", MONACO_L6, "--stages", "extract", "--root", str(root)]
    proc = subprocess.run(
        [sys.executable, "-m", "s2vec_pipeline.cli", *args],
        env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for text in says:
        assert text in lines[0]
    assert not any(root.rglob("_delta_log")), "no table may be written"
    conn = pg.connect(db)
    try:
        with conn.cursor() as cur:  # Dagster never got to create its tables
            cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'")
            assert cur.fetchone() == (0,)
    finally:
        conn.close()


def test_materialize_into_a_root_that_is_not_writable_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    root = blocker / "root"  # cannot be created: its parent is a file (root or not)
    args = ["materialize", "--cells", MONACO_L6, "--stages", "extract", "--root", str(root)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0] and "--root" in err[0], err
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_instance_errors_name_the_variable_to_fix_and_leave_other_errors_alone(
    pg: PostgresCluster,
) -> None:
    import psycopg2

    from s2vec_pipeline.service.instance import describe_instance_error

    try:  # a real driver error: the database does not exist
        psycopg2.connect(
            host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname="no_such_db"
        )
    except psycopg2.OperationalError as e:
        message = describe_instance_error(e, "/home")
    assert message is not None and 'database "no_such_db" does not exist' in message
    assert "DAGSTER_POSTGRES_DB" in message and "\n" not in message
    # Not a configuration or database failure: not ours to rephrase (the CLI shows it as is).
    assert describe_instance_error(ValueError("a bug"), "/home") is None
