"""The Dagster instance as deployed: opening it with an actionable error, and a run launcher
whose crashed runs run monitoring can detect on a single host.

``open_dagster_instance`` is what the CLI calls: a PostgreSQL-backed instance
(``docker/dagster.yaml``) that cannot connect becomes one line naming the
``DAGSTER_POSTGRES_*`` variables to fix, instead of retry warnings and a traceback.

``LocalProcessRunLauncher`` is Dagster's ``DefaultRunLauncher`` (runs as processes of the code
server) plus a worker health check. Run monitoring only detects a crashed run worker when the
launcher can check its health; the default launcher cannot, so a run whose process was killed
stays STARTED forever and holds its place in the queue. Docker and Kubernetes launchers check
their containers and pods; this one checks the run worker's process id, which Dagster records
in the run's first engine event carrying a ``pid``. Processes are only visible on the host that
runs them: use it where the daemon and the runs share one host (``dagster dev``, ``make ui``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
import psutil
import pydantic
import sqlalchemy as sa

from s2vec_pipeline.errors import InstanceUnavailableError
from s2vec_pipeline.service.dagster_compat import (
    INDEX_SHARD_NAME,
    NO_COMPUTE_LOGS_YAML,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    CheckRunHealthResult,
    ConfigurableClassData,
    SqliteEventLogStorage,
    SqliteRunStorage,
    WorkerStatus,
)
from s2vec_pipeline.settings import dagster_home
from s2vec_pipeline.storage import fs

POSTGRES_ENV = (
    "DAGSTER_POSTGRES_HOST",
    "DAGSTER_POSTGRES_PORT",
    "DAGSTER_POSTGRES_USER",
    "DAGSTER_POSTGRES_PASSWORD",
    "DAGSTER_POSTGRES_DB",
)
_RETRY_WARNING = "Retrying failed database connection"


class _DropConnectionRetryWarnings(logging.Filter):
    """dagster-postgres logs each of its ~6 connection attempts as a multi-line warning on the
    root logger; the CLI reports the outcome once instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_RETRY_WARNING)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _postgres_target() -> str:
    env = os.environ
    return (
        f"PostgreSQL {env.get('DAGSTER_POSTGRES_USER', '?')}@"
        f"{env.get('DAGSTER_POSTGRES_HOST', '?')}:{env.get('DAGSTER_POSTGRES_PORT', '?')}/"
        f"{env.get('DAGSTER_POSTGRES_DB', '?')}"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is not None and all(e is not s for s in seen):
            seen.append(e)
            todo += [e.__cause__, e.__context__]
    return seen


def describe_instance_error(exc: BaseException, home: str) -> str | None:
    """One line saying why the instance under ``home`` did not open and what to set, or None
    when the failure is neither its configuration nor its database connection."""
    if isinstance(exc, dg.DagsterInvalidConfigError):
        # Config errors carry a stack trace in their message: keep the reason only.
        reasons = []
        for err in exc.errors or []:
            m = re.search(r"(?:PostProcessingError|Error): (.+?)(?:\n|$)", err.message)
            reasons.append(_one_line(m.group(1) if m else err.message.splitlines()[0]))
        reason = "; ".join(reasons) or _one_line(str(exc).splitlines()[0])
        hint = (
            f" (its PostgreSQL settings come from {', '.join(POSTGRES_ENV)})"
            if "DAGSTER_POSTGRES_" in reason
            else ""
        )
        return f"the instance config {home}/dagster.yaml cannot be loaded: {reason}{hint}"
    database = [
        e
        for e in _chain(exc)
        if type(e).__module__.split(".")[0] in ("psycopg2", "sqlalchemy")
        or type(e).__name__ == "DagsterPostgresException"
    ]
    if not database:
        return None
    # The driver's own message says what failed (refused, authentication, unknown database).
    cause = next((e for e in database if type(e).__module__.startswith("psycopg2")), database[-1])
    detail = _one_line(str(cause).split("(Background on")[0])
    if "password authentication failed" in detail or "role" in detail:
        what = "check DAGSTER_POSTGRES_USER and DAGSTER_POSTGRES_PASSWORD"
    elif "database" in detail and "does not exist" in detail:
        what = "check DAGSTER_POSTGRES_DB (create the database first)"
    else:
        what = (
            "check that PostgreSQL is running and that DAGSTER_POSTGRES_HOST and "
            "DAGSTER_POSTGRES_PORT point at it"
        )
    return (
        f"cannot open the Dagster instance (DAGSTER_HOME={home}) on {_postgres_target()}: "
        f"{detail.rstrip('.?')}; {what}"
    )


def open_dagster_instance() -> dg.DagsterInstance:
    """``DagsterInstance.get()`` ($DAGSTER_HOME must be set); a configuration or database
    connection failure raises ``InstanceUnavailableError`` with one actionable line (the CLI
    exits 2). Anything else propagates unchanged."""
    home = dagster_home() or ""
    root_logger = logging.getLogger()
    quiet = _DropConnectionRetryWarnings()
    root_logger.addFilter(quiet)
    try:
        return dg.DagsterInstance.get()
    except Exception as e:  # only instance creation is wrapped, never a run
        message = describe_instance_error(e, home)
        if message is None:
            raise
        raise InstanceUnavailableError(message) from e
    finally:
        root_logger.removeFilter(quiet)


#: Under a local root: the Dagster home whose instance recorded its materializations, so that
#: ``s2vec status`` run with another (or no) $DAGSTER_HOME can say where they are.
#: Beside ``_dagster/``, not in it: a root without its own instance stays without one.
RECORDED_HOME_FILE = "_dagster_home.json"


class RecordedHome(pydantic.BaseModel):
    dagster_home: str


def record_dagster_home(root: str, instance: dg.DagsterInstance) -> None:
    """Note in ``root`` which Dagster home records its runs (a local root and a persistent
    instance only; written when it changes). Best effort: a root that cannot take the note
    loses the hint, not the run."""
    if fs.is_object_store(root) or instance.is_ephemeral:
        return
    home = os.path.abspath(instance.root_directory)
    if recorded_dagster_home(root) == home:
        return
    with contextlib.suppress(OSError):
        text = RecordedHome(dagster_home=home).model_dump_json()
        fs.write_text(os.path.join(root, RECORDED_HOME_FILE), text + "\n")


def recorded_dagster_home(root: str) -> str | None:
    """The Dagster home ``record_dagster_home`` noted in ``root``; None if none or unreadable."""
    if fs.is_object_store(root):
        return None
    try:
        with open(os.path.join(root, RECORDED_HOME_FILE)) as f:
            return RecordedHome.model_validate_json(f.read()).dagster_home
    except (OSError, pydantic.ValidationError):
        return None


def process_alive(pid: int, not_started_after: float | None = None) -> bool:
    """Whether process ``pid`` runs (not a zombie) and, when ``not_started_after`` is given,
    started no later than that time (a newer process reusing the id is not the same one)."""
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False  # exited, not yet reaped by its parent
        started = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # exists, owned by another user
    # start times are kept in clock ticks: allow a second of rounding
    return not_started_after is None or started <= not_started_after + 1.0


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, time it was recorded) of a run's worker process: the first engine event with a
    pid ("Started process for run" from a code server, "Executing steps in process" from
    ``execute_in_process``); None while none is recorded."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = entry.dagster_event
        data = event.engine_event_data if event else None
        pid = data.metadata.get("pid") if data and data.metadata else None
        if pid is not None:
            return int(pid.value), entry.timestamp
    return None


def reap_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the runs still STARTED/STARTING (or NOT_STARTED, of the CLI) whose worker
    process on this host is gone
    (killed, Ctrl-C'd, the machine rebooted); returns their ids. Only for an instance whose
    runs all run on this host (the CLI's ``<root>/_dagster``): elsewhere run monitoring does
    it (``LocalProcessRunLauncher``)."""
    reaped = []
    # NOT_STARTED too: a CLI run killed between its creation and its start
    running = dg.RunsFilter(
        statuses=[
            dg.DagsterRunStatus.NOT_STARTED,
            dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.STARTED,
        ]
    )
    for run in instance.get_runs(filters=running):
        if run.status == dg.DagsterRunStatus.NOT_STARTED and "s2vec/pid" not in run.tags:
            continue  # queued by someone else: not ours to judge
        found = run_worker_pid(instance, run.run_id)
        if found is None and "s2vec/pid" in run.tags:  # killed before its first engine event
            record = instance.get_run_record_by_id(run.run_id)
            created = record.create_timestamp.timestamp() if record else None
            found = (int(run.tags["s2vec/pid"]), created)
        if found is None or process_alive(found[0], not_started_after=found[1]):
            continue
        instance.report_run_failed(
            run,
            message=f"interrupted: its process {found[0]} is gone (found by s2vec on "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}); tables stay at their last committed version",
        )
        reaped.append(run.run_id)
    return reaped


class LocalProcessRunLauncher(dg.DefaultRunLauncher):
    """``DefaultRunLauncher`` whose run workers run monitoring can health-check by process id.

    In ``dagster.yaml``::

        run_launcher:
          module: s2vec_pipeline.service.instance
          class: LocalProcessRunLauncher
        run_monitoring:
          enabled: true
    """

    def __init__(self, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(inst_data=inst_data)
        self._worker_pids: dict[str, tuple[int, float]] = {}

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> LocalProcessRunLauncher:
        return cls(inst_data=inst_data)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def _worker_pid(self, run_id: str) -> tuple[int, float] | None:
        """(pid, time it was recorded) of the run worker: the first engine event with a pid
        ("Started process for run" from a code server, "Executing steps in process" from
        ``execute_in_process``)."""
        if run_id in self._worker_pids:
            return self._worker_pids[run_id]
        found = run_worker_pid(self._instance, run_id)
        if found is not None:
            self._worker_pids[run_id] = found
        return found

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        found = self._worker_pid(run.run_id)
        if found is None:  # started, pid not recorded yet: nothing to conclude
            return CheckRunHealthResult(WorkerStatus.RUNNING, msg="run worker pid not recorded")
        pid, recorded_at = found
        if process_alive(pid, not_started_after=recorded_at):
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(pid))
        self._worker_pids.pop(run.run_id, None)
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            msg=f"run worker process {pid} is gone (checked {time.strftime('%H:%M:%S')})",
            run_worker_id=str(pid),
        )


# --------------------------------------------------------------------------- SQLite storage
#
# Dagster's SQLite storages open a new engine and connection for every statement (NullPool):
# ~260 connections per data-layer run, each closing connection checkpointing and fsyncing the
# WAL. Measured on 2 cores, that bookkeeping took ~2/3 of a partition run whose rows were
# already extracted. These subclasses keep one pooled engine per database file (the index and
# the runs database; the latest few per-run shards) with WAL and synchronous=NORMAL: commits
# survive a crash of the process (not of the machine's power, where the last run's records may
# be lost and the partition is recomputed). Same files and schemas as Dagster's defaults: a
# root's instance can switch back and forth.

_POOLED_RUN_SHARDS = 4


def _history() -> str:
    """Where Dagster keeps SQLite storage by default: ``$DAGSTER_HOME/history``."""
    home = dagster_home()
    if not home:
        raise InstanceUnavailableError(
            "the pooled SQLite storages need base_dir in dagster.yaml or DAGSTER_HOME set"
        )
    return os.path.join(home, "history")


def _pooled_engine(conn_string: str) -> Any:
    engine = sa.create_engine(
        conn_string,
        poolclass=sa.pool.QueuePool,
        pool_size=2,
        max_overflow=8,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
    )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's ``SqliteEventLogStorage`` with pooled engines (see above). In ``dagster.yaml``
    (``base_dir`` defaults to ``$DAGSTER_HOME/history/runs``, Dagster's own default)::

    event_log_storage:
      module: s2vec_pipeline.service.instance
      class: PooledSqliteEventLogStorage
    """

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines: OrderedDict[str, Any] = OrderedDict()
        self._tables: set[str] = set()
        self._index_probe: Any = None
        super().__init__(base_dir, inst_data)

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {"base_dir": dg.Field(dg.StringSource, is_required=False)}

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> PooledSqliteEventLogStorage:
        base_dir = config_value.get("base_dir") or os.path.join(_history(), "runs")
        return cls(base_dir, inst_data=inst_data)

    @contextlib.contextmanager
    def _connect(self, shard: str) -> Iterator[Any]:
        with self._db_lock:
            engine = self._engines.get(shard)
            if engine is None:
                if shard not in self._initialized_dbs and shard != INDEX_SHARD_NAME:
                    self._new_run_shard(shard)
                engine = self._engines[shard] = _pooled_engine(self.conn_string_for_shard(shard))
                if shard not in self._initialized_dbs:
                    self._initdb(engine)
                    self._initialized_dbs.add(shard)
                runs = [s for s in self._engines if s != INDEX_SHARD_NAME]
                for old in runs[: max(0, len(runs) - _POOLED_RUN_SHARDS)]:
                    self._engines.pop(old).dispose()  # finished runs' shards: free the files
            else:
                self._engines.move_to_end(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def _new_run_shard(self, shard: str) -> None:
        """A new run's database as a copy of an empty, initialized one (its schema created and
        stamped once per folder): creating the schema in every run took ~0.2-0.5 s per run.
        Copied under a temporary name, then linked to its name: an opener never sees a partial
        file, and a shard another process created meanwhile is never replaced."""
        path = self.path_for_shard(shard)
        if os.path.exists(path):
            return
        template = os.path.join(self._base_dir, ".empty-run-shard.db")  # no run id: hidden
        if not os.path.exists(template):
            tmp = f"{template}.{os.getpid()}.tmp"
            engine = sa.create_engine(f"sqlite:///{tmp}", poolclass=sa.pool.NullPool)
            self._initdb(engine)
            engine.dispose()
            os.replace(tmp, template)
        tmp = f"{path}.{os.getpid()}.tmp"
        shutil.copyfile(template, tmp)
        try:  # a hard link creates the name only if absent: another process's shard stays
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        self._initialized_dbs.add(shard)

    def has_table(self, table_name: str) -> bool:
        # asked before many queries; a table, once there, stays: cache the yes
        if table_name in self._tables:
            return True
        # its own engine, outside _connect's lock: it is asked from inside _connect blocks
        if self._index_probe is None:
            self._index_probe = _pooled_engine(self.conn_string_for_shard(INDEX_SHARD_NAME))
        with self._index_probe.connect() as conn:
            found = bool(conn.dialect.has_table(conn, table_name))
        if found:
            self._tables.add(table_name)
        return found

    def dispose(self) -> None:
        super().dispose()
        with self._db_lock:
            while self._engines:
                self._engines.popitem()[1].dispose()


class PooledSqliteRunStorage(SqliteRunStorage):
    """Dagster's ``SqliteRunStorage`` with one pooled engine (see above). In ``dagster.yaml``
    (``base_dir`` defaults to ``$DAGSTER_HOME/history``, Dagster's own default)::

    run_storage:
      module: s2vec_pipeline.service.instance
      class: PooledSqliteRunStorage
    """

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {"base_dir": dg.Field(dg.StringSource, is_required=False)}

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> PooledSqliteRunStorage:
        return cls.from_local(config_value.get("base_dir") or _history(), inst_data=inst_data)

    @functools.cached_property
    def _engine(self) -> Any:
        return _pooled_engine(self._conn_string)

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        super().dispose()
        if "_engine" in self.__dict__:
            self.__dict__.pop("_engine").dispose()


def pooled_sqlite_config(home: str) -> str:
    """The ``dagster.yaml`` lines selecting the pooled SQLite storages under ``home``."""
    history = os.path.join(home, "history")
    return (
        "run_storage:\n  module: s2vec_pipeline.service.instance\n  class: PooledSqliteRunStorage\n"
        f"  config:\n    base_dir: {json.dumps(history)}\n"
        "event_log_storage:\n  module: s2vec_pipeline.service.instance\n"
        "  class: PooledSqliteEventLogStorage\n"
        f"  config:\n    base_dir: {json.dumps(os.path.join(history, 'runs'))}\n"
    )


_TELEMETRY_OFF = "telemetry:\n  enabled: false\n"
#: What the CLI wrote into ``<root>/_dagster/dagster.yaml`` before: replaced by
#: ``cli_instance_config``.
PREVIOUS_CLI_CONFIGS = (_TELEMETRY_OFF, _TELEMETRY_OFF + NO_COMPUTE_LOGS_YAML)


def cli_instance_config(home: str) -> str:
    """The ``dagster.yaml`` the CLI keeps under ``<root>/_dagster``: no telemetry; no compute-log
    capture (it mirrors each step's output through a ``tail`` and a watcher process, which print
    a traceback on Ctrl-C and cost two processes per step); the pooled SQLite storages, which
    cut a run's bookkeeping (see above)."""
    return _TELEMETRY_OFF + NO_COMPUTE_LOGS_YAML + pooled_sqlite_config(home)
