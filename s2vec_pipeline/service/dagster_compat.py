"""Every name the package takes from Dagster's internal modules (``dagster._*``), in one place.

Dagster exports no public API for these; each is pinned by a contract test
(``s2vec_pipeline_tests/test_dagster_compat.py``) that fails first, with the reason, when a
Dagster upgrade moves or changes one. Everything else uses the public ``dagster`` namespace
(the staleness rule included: ``defs/automation.py`` reads the public provenance and event-log
API).

- ``SqliteEventLogStorage``, ``SqliteRunStorage``, ``INDEX_SHARD_NAME``,
  ``SQLITE_BUSY_TIMEOUT_SECONDS``: Dagster's default SQLite storages, which
  ``service/instance.py`` subclasses to keep pooled connections (its ``Pooled*`` classes
  override their ``_connect``/``connect`` and call ``_initdb``, ``path_for_shard``,
  ``conn_string_for_shard``, ``from_local``; the index shard's name and the busy timeout are
  Dagster's own values).
- ``ConfigurableClassData``: what Dagster hands a class it loads from ``dagster.yaml``
  (``inst_data``), passed through by those storages and the run launcher.
- ``CheckRunHealthResult``, ``WorkerStatus``: the answer of a run launcher's
  ``check_run_worker_health`` (``instance.LocalProcessRunLauncher``).
- ``NO_COMPUTE_LOGS_YAML``: the ``dagster.yaml`` lines selecting Dagster's no-op compute-log
  manager (the CLI's instance captures no step output), naming the class where it lives.
- ``recon_job_from_origin``, ``core_execute_run``, ``EngineEventData``: what ``dagster api
  execute_run`` does with a run (``execute_existing_run`` below), for the warm run workers of
  ``service/run_launcher.py``.
- ``PostProcessingError``: Dagster's documented way to refuse a config value in a config
  type's ``post_process`` (``defs/model.py``); not re-exported at the top level.

The tests use a few more as oracles, loaded only when asked for (``__getattr__``): Dagster's
own stale-status resolver (``CachingStaleStatusResolver``, ``StaleStatus``, ``AssetGraphView``,
``TemporalContext``: the UI's "Unsynced" badge, which ``test_dagster_compat`` compares the
staleness rule with), its workspace loader (``WorkspaceProcessContext``,
``WorkspaceFileTarget``: the deployment's code server as the webserver loads it) and its config
validation (``process_config``, ``dagster_instance_config``, ``dagster_instance_config_schema``:
the deployment's ``dagster.yaml`` and Helm values checked with the schema Dagster reads them with).
"""

import importlib

from dagster import DagsterInstance, DagsterRun
from dagster._config import PostProcessingError
from dagster._core.events import EngineEventData
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.event_log import SqliteEventLogStorage
from dagster._core.storage.event_log.sqlite.sqlite_event_log import INDEX_SHARD_NAME
from dagster._core.storage.noop_compute_log_manager import NoOpComputeLogManager
from dagster._core.storage.runs import SqliteRunStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._grpc.impl import core_execute_run
from dagster._serdes.config_class import ConfigurableClassData
from dagster._utils.hosted_user_process import recon_job_from_origin

NO_COMPUTE_LOGS_YAML = (
    f"compute_logs:\n  module: {NoOpComputeLogManager.__module__}\n"
    f"  class: {NoOpComputeLogManager.__name__}\n"
)


def execute_existing_run(instance: DagsterInstance, run: DagsterRun, pid: int) -> None:
    """Execute a created (launched) run in this process, as ``dagster api execute_run`` does
    (dagster/_cli/api.py ``_execute_run_command_body``): the engine event that records the run
    worker's ``pid`` (run monitoring checks it), then Dagster's own execution, which records
    the run's events and status; a failure is in the event log, not raised."""
    recon_job = recon_job_from_origin(run.job_code_origin)
    instance.report_engine_event(
        f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
    )
    try:
        for _ in core_execute_run(recon_job, run, instance, inject_env_vars=True):
            pass
    except Exception:  # noqa: BLE001, S110 - core_execute_run logged it and failed the run
        pass


_TEST_ORACLES = {
    "AssetGraphView": "dagster._core.asset_graph_view.asset_graph_view",
    "TemporalContext": "dagster._core.asset_graph_view.asset_graph_view",
    "CachingStaleStatusResolver": "dagster._core.definitions.data_version",
    "StaleStatus": "dagster._core.definitions.data_version",
    "WorkspaceProcessContext": "dagster._core.workspace.context",
    "WorkspaceFileTarget": "dagster._core.workspace.load_target",
    "process_config": "dagster._config",
    "dagster_instance_config": "dagster._core.instance.config",
    "dagster_instance_config_schema": "dagster._core.instance.config",
}


def __getattr__(name: str) -> object:
    if name not in _TEST_ORACLES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_TEST_ORACLES[name]), name)


__all__ = [
    "INDEX_SHARD_NAME",
    "NO_COMPUTE_LOGS_YAML",
    "SQLITE_BUSY_TIMEOUT_SECONDS",
    "CheckRunHealthResult",
    "ConfigurableClassData",
    "PostProcessingError",
    "SqliteEventLogStorage",
    "SqliteRunStorage",
    "WorkerStatus",
    "execute_existing_run",
]
