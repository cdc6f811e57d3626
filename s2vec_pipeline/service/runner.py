"""Launch the code location's jobs from Python: what ``s2vec materialize`` and ``s2vec refresh``
run, and what the tests run.

Every run is a run of a real job of ``definitions.py`` (``refresh_sources``, ``data_layer``,
``train_model``, ``embed``), one partition per run, with the settings in its run config and the
CLI's request in its tags: the UI lists these runs under their job and re-executes them as they
were. Runs execute in this process (``execute_in_process``) against a persistent instance:
``$DAGSTER_HOME`` when set, else ``<root>/_dagster``, so later refreshes compare with what these
runs recorded. An object-store root (``s3://…``) needs ``$DAGSTER_HOME``: Dagster's SQLite
instance cannot live on an object store.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from s2vec_pipeline.errors import (
    STORAGE_FAULTS,
    InstanceUnavailableError,
    NoFeaturesError,
    S2VecError,
    StorageUnavailableError,
    exception_chain,
    storage_fault,
)
from s2vec_pipeline.osm import changes as osm_changes
from s2vec_pipeline.osm.coverage import source_cells, sources_for
from s2vec_pipeline.osm.extract_cache import interleave_groups
from s2vec_pipeline.service.instance import (
    PREVIOUS_CLI_CONFIGS,
    cli_instance_config,
    open_dagster_instance,
    reap_dead_runs,
)
from s2vec_pipeline.service.partition_workers import run_in_workers
from s2vec_pipeline.settings import PipelineSettings, dagster_home
from s2vec_pipeline.storage import fs
from s2vec_pipeline.storage.locks import exclusive

# CLI stage name -> asset keys, in pipeline order.
STAGES: dict[str, list[str]] = {
    "extract": ["osm_features"],
    "features": ["cell_features"],
    "raster": ["raster_tiles"],
    "train": ["mae_model"],
    "embed": ["cell_embeddings", "image_embeddings"],
}
DATA_ASSETS = [*STAGES["extract"], *STAGES["features"], *STAGES["raster"]]
EMBEDDING_ASSETS = STAGES["embed"]
CLI_TAG = "s2vec/cli"
PID_TAG = "s2vec/pid"  # the process running the run: a run whose process is gone is reaped
#: One INFO line per finished run ("[2/5] data_layer 4693 done in 3.1 s"); silent unless a
#: handler is attached (the CLI attaches one writing to stderr).
PROGRESS_LOGGER = "s2vec_pipeline.progress"
_progress = logging.getLogger(PROGRESS_LOGGER)
#: The Dagster console logger's level when the CLI runs quietly: Dagster logs nothing at
#: CRITICAL, so a failing step prints no ERROR/STEP_FAILURE lines; the CLI prints the error once.
QUIET = "CRITICAL"


def console_log_level(verbosity: int) -> str:
    """Dagster console level for the CLI's ``-v`` count: quiet, INFO (-v, -vv), DEBUG (-vvv)."""
    return QUIET if verbosity <= 0 else "INFO" if verbosity < 3 else "DEBUG"


def quiet_python_loggers(log_level: str) -> None:
    """At the quiet level, also Dagster's own Python logger (instance messages), for the rest
    of this process (a spawned worker; the CLI scopes it to its command): the run's events stay
    in the instance, where the UI shows them."""
    if log_level == QUIET:
        logging.getLogger("dagster").setLevel(logging.CRITICAL)


@dataclass
class RunReport:
    run_ids: list[str] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)
    assets: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)  # "asset:check" -> passed
    warnings: dict[str, bool] = field(default_factory=dict)  # WARN-severity checks
    reasons: dict[str, str] = field(default_factory=dict)  # failed check -> its description
    model_version: str | None = None  # the model that embedded, when embeddings ran
    up_to_date: dict[str, list[str]] = field(default_factory=dict)  # job -> skipped partitions
    detail: str = ""  # what the latest run read, for its progress line ("9876 objects read")

    def merge(self, other: RunReport) -> None:
        self.run_ids += other.run_ids
        for mine, theirs in ((self.checks, other.checks), (self.warnings, other.warnings)):
            for name, passed in theirs.items():
                mine[name] = mine.get(name, True) and passed
        self.reasons.update(other.reasons)

    @property
    def checks_failed(self) -> list[str]:
        return [name for name, passed in self.checks.items() if not passed]

    @property
    def warnings_raised(self) -> list[str]:
        return [name for name, passed in self.warnings.items() if not passed]


def parse_stages(stages: Sequence[str]) -> list[str]:
    names = [s.strip() for s in stages if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise S2VecError(
            f"unknown stage(s) {', '.join(unknown or stages) or '(none given)'}: choose from "
            f"{','.join(STAGES)}"
        )
    return [a for stage in STAGES if stage in names for a in STAGES[stage]]


def check_instance_home(root: str) -> None:
    """An object-store root needs ``$DAGSTER_HOME``: Dagster's SQLite instance cannot live on
    an object store. Raises :class:`InstanceUnavailableError` (exit 2) when it is unset."""
    if fs.is_object_store(root) and not dagster_home():
        raise InstanceUnavailableError(
            f"storage root {root} is an object store, where Dagster's instance cannot live: set "
            f"DAGSTER_HOME to a local folder (or a PostgreSQL-backed instance, docs/deploying.md) "
            f"so that runs and refreshes share their recorded versions"
        )


def instance_home(root: str) -> str:
    """The Dagster home the CLI's commands use for ``root``: ``$DAGSTER_HOME`` when set, else
    ``<root>/_dagster``."""
    return dagster_home() or os.path.join(root, "_dagster")


@contextlib.contextmanager
def dagster_instance(root: str) -> Iterator[dg.DagsterInstance]:
    """The instance under ``$DAGSTER_HOME`` when set (the UI then shows these runs), else one
    kept under ``<root>/_dagster``: refreshes compare with the versions earlier runs recorded."""
    if dagster_home():
        # An unreachable PostgreSQL or wrong credentials: InstanceUnavailableError (exit 2).
        with open_dagster_instance() as instance:
            yield instance
    elif fs.is_object_store(root):
        check_instance_home(root)
    else:
        home = instance_home(root)
        os.makedirs(home, exist_ok=True)
        config = os.path.join(home, "dagster.yaml")
        # Several `s2vec materialize` processes may start on a fresh root at once: opening the
        # instance creates its SQLite schemas, which must happen once ("table runs already
        # exists" otherwise). Later opens only read the schemas.
        try:
            writable = os.access(home, os.W_OK)
            if os.path.exists(config) and not writable:
                # a read-only root (status): SQLite cannot open its files there, so read a
                # copy (removed when the process ends); nothing is written to the root
                snapshot = tempfile.mkdtemp(prefix="s2vec-readonly-instance-")
                atexit.register(shutil.rmtree, snapshot, True)
                shutil.copytree(home, snapshot, dirs_exist_ok=True)
                if _read(config) == cli_instance_config(home):  # ours names the root's paths
                    with open(os.path.join(snapshot, "dagster.yaml"), "w") as f:
                        f.write(cli_instance_config(snapshot))
                instance = dg.DagsterInstance.local_temp(snapshot)
            else:
                with exclusive(os.path.join(home, ".open.lock")):
                    # Written by us (also the older files): see cli_instance_config.
                    if not os.path.exists(config) or _read(config) in PREVIOUS_CLI_CONFIGS:
                        fs.write_bytes(config, cli_instance_config(home).encode())
                    instance = dg.DagsterInstance.local_temp(home)
        except Exception as e:
            full = _storage_error(e, home)
            if full is None:
                raise
            raise full from e
        with instance:
            if writable:  # runs of killed CLI processes: failed, not STARTED forever
                reap_dead_runs(instance)
            yield instance


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _storage_error(exc: BaseException, home: str) -> StorageUnavailableError | None:
    """A full disk under the instance's SQLite files, as the error a user can act on (other
    faults are a step's own: its message names them)."""
    code = storage_fault(exc)
    if code is None or not STORAGE_FAULTS[code].needs_space:
        return None
    fault = STORAGE_FAULTS[code]
    return StorageUnavailableError(
        f"cannot write the Dagster records under {home}: {fault.reason}. Nothing was "
        f"committed; {fault.advice(home)}"
    )


def _user_error(exc: BaseException) -> S2VecError | None:
    """Find the S2VecError a Dagster step failure wraps."""
    return next((e for e in exception_chain(exc) if isinstance(e, S2VecError)), None)


class Launcher:
    """Runs jobs of the definitions built from ``settings`` on ``instance``, collecting a report."""

    def __init__(
        self,
        settings: PipelineSettings,
        instance: dg.DagsterInstance,
        log_level: str = "WARNING",
        tags: dict[str, str] | None = None,
    ) -> None:
        from s2vec_pipeline.definitions import build_definitions
        from s2vec_pipeline.defs.partitions import add_partitions

        self.settings = settings
        self.instance = instance
        self.log_level = log_level
        self.tags = tags or {}
        self.defs = build_definitions(settings)
        self.report = RunReport()
        add_partitions(instance, source_cells(settings.sources))

    def run(
        self,
        job_name: str,
        partition: str | None = None,
        assets: Sequence[str] | None = None,
        op_config: dict[str, dict[str, Any]] | None = None,
    ) -> dg.ExecuteInProcessResult:
        from s2vec_pipeline.defs.resources import resource_run_config

        job = self.defs.resolve_job_def(job_name)
        run_config: dict[str, Any] = {
            "resources": resource_run_config(self.settings),
            "loggers": {"console": {"config": {"log_level": self.log_level}}},
        }
        if op_config:
            run_config["ops"] = {op: {"config": cfg} for op, cfg in op_config.items()}
        try:
            result = job.execute_in_process(
                run_config=run_config,
                instance=self.instance,
                partition_key=partition,
                asset_selection=[dg.AssetKey(a) for a in assets] if assets else None,
                tags={**self.tags, PID_TAG: str(os.getpid())},  # for reap_dead_runs
            )
        except Exception as e:  # unwrap Dagster's step failure into the user's error
            user = _user_error(e) or _storage_error(e, str(self.instance.root_directory))
            if user is not None:
                raise user from None
            raise
        self.report.run_ids.append(result.run_id)
        self.report.detail = _run_detail(result)
        for ev in result.get_asset_check_evaluations():
            name = f"{ev.asset_key.to_user_string()}:{ev.check_name}"
            book = (
                self.report.warnings
                if ev.severity == dg.AssetCheckSeverity.WARN
                else self.report.checks
            )
            book[name] = book.get(name, True) and ev.passed
            if not ev.passed and ev.description:
                self.report.reasons[name] = ev.description
        return result

    def stale_or_missing(
        self, partition: str, assets: Sequence[str], model_version: str | None = None
    ) -> list[str]:
        """The requested assets of one partition to compute, by the rule the sensors share
        (``automation.assets_to_run``): from the first one never materialized, stale, whose rows
        or files the table lost (``integrity``) or, for embeddings, made by another model than
        ``model_version``, to the end."""
        from s2vec_pipeline.defs.automation import assets_to_run

        return assets_to_run(
            self.instance, self.defs, partition, assets, model_version, self.has_data
        )

    @functools.cached_property
    def has_data(self) -> Callable[[str, str], bool]:
        from s2vec_pipeline.service.integrity import has_data

        return has_data(self.instance, self.settings.root)

    def run_partitions(
        self, job_name: str, partitions: Sequence[str], assets: Sequence[str], workers: int = 1
    ) -> None:
        """One run per partition, ``workers`` at a time. With several workers, each is a
        long-lived spawned process (deltalake cannot run in forked children) that loads the
        definitions once and serves one partition after another: a run costs the run, not a
        process start. A worker that fails or dies fails its partition only (a dead worker is
        replaced): the others run to the end, then the first failure is raised."""
        order = interleave_groups(partitions)
        if workers <= 1 or len(order) <= 1:
            for i, k in enumerate(order, 1):
                t0 = time.perf_counter()
                self.run(job_name, k, assets)
                report_done(job_name, k, i, len(order), t0, self.report.detail)
            return
        failures = run_in_workers(self, job_name, order, assets, workers)
        if failures:
            k, first = next(iter(sorted(failures.items())))
            if len(failures) > 1 or not isinstance(first, S2VecError):
                raise PartitionsFailedError(
                    f"{len(failures)} of {len(order)} partitions failed "
                    f"({', '.join(sorted(failures))}); the others were written. First, {k}: "
                    f"{first}"
                )
            raise first


def report_done(
    job_name: str, partition: str | None, i: int, n: int, t0: float, detail: str = ""
) -> None:
    what = f"{job_name} {partition}" if partition else job_name
    extra = f" ({detail})" if detail else ""
    _progress.info("[%d/%d] %s done in %.1f s%s", i, n, what, time.perf_counter() - t0, extra)


def _run_detail(result: dg.ExecuteInProcessResult) -> str:
    """Extraction counts from the run's osm_features materialization, when it has one."""
    for event in result.get_asset_materialization_events():
        m = event.step_materialization_data.materialization
        if m.asset_key.to_user_string() == "osm_features" and "objects_read" in m.metadata:
            read, matched = m.metadata["objects_read"].value, m.metadata["objects_matched"].value
            how = m.metadata.get("extraction")
            if how is not None and how.value == "cached":
                return "rows kept by its group's extraction"
            return f"{read} OSM objects read, {matched} matched"
    return ""


class PartitionsFailedError(S2VecError):
    """Some partitions of a parallel materialization failed; the others were written."""


def materialize(
    settings: PipelineSettings,
    partitions: Sequence[str],
    assets: Sequence[str],
    instance: dg.DagsterInstance,
    log_level: str = "WARNING",
    op_config: dict[str, dict] | None = None,
    tags: dict[str, str] | None = None,
    workers: int = 1,
    force: bool = False,
) -> RunReport:
    """Materialize ``assets`` for ``partitions`` (level-6 tokens): the source observation, one
    data-layer run per partition (``workers`` at once), training, then one embedding run per
    partition.

    Partitions whose assets are up to date (materialized, not stale: same inputs, code and
    settings) are skipped and listed in ``report.up_to_date``; ``force`` recomputes them.
    ``op_config`` maps op names (``mae_model``, ``embeddings``) to their run config.
    """
    from s2vec_pipeline.defs.model import current_model_version

    partitions = sorted(set(partitions))
    sources_for(settings.sources, partitions)  # every partition covered: fail before any run
    launcher = Launcher(settings, instance, log_level, tags)
    launcher.report.partitions, launcher.report.assets = partitions, list(assets)
    data = [a for a in DATA_ASSETS if a in assets]
    _check_contracts(settings, data)  # another profile or taxonomy: refused before any run
    if "osm_features" in data:
        launcher.run("refresh_sources")  # versions of every cell's OSM data, before extraction
    if data:
        plan = {k: list(data) if force else launcher.stale_or_missing(k, data) for k in partitions}
        launcher.report.up_to_date["data_layer"] = [k for k, todo in plan.items() if not todo]
        for todo in sorted({tuple(t) for t in plan.values() if t}):
            keys = [k for k, t in plan.items() if tuple(t) == todo]
            launcher.run_partitions("data_layer", keys, list(todo), workers)
    if "osm_features" in data:
        _require_features(settings, partitions)
    if "mae_model" in assets:
        t0 = time.perf_counter()
        trained = launcher.run(
            "train_model", op_config={"mae_model": (op_config or {}).get("mae_model", {})}
        )
        report_done("train_model", None, 1, 1, t0)
        for event in trained.get_asset_materialization_events():  # the model this run made
            meta = event.step_materialization_data.materialization.metadata.get("model_version")
            if meta is not None:
                launcher.report.model_version = str(meta.value)
    if any(a in assets for a in EMBEDDING_ASSETS):
        embed_config = dict((op_config or {}).get("embeddings", {}))
        launcher.report.model_version = embed_config.get("model_version") or (
            current_model_version(instance, settings.root)
        )
        embed_config["model_version"] = model = launcher.report.model_version
        skipped = launcher.report.up_to_date.setdefault("embed", [])
        for i, k in enumerate(partitions, 1):
            if not force and not launcher.stale_or_missing(k, ["cell_embeddings"], model):
                skipped.append(k)
                continue
            t0 = time.perf_counter()
            launcher.run("embed", k, EMBEDDING_ASSETS, {"embeddings": embed_config})
            report_done("embed", k, i, len(partitions), t0)
    return launcher.report


def _check_contracts(settings: PipelineSettings, tables: Sequence[str]) -> None:
    from s2vec_pipeline.storage import delta_store

    channels = list(settings.taxonomy.channel_names)
    for table in tables:
        extra = {"channels": channels} if table != "osm_features" else {}
        delta_store.check_contract(settings.root, table, settings.contract(table, **extra))


def _require_features(settings: PipelineSettings, partitions: list[str]) -> None:
    from s2vec_pipeline.storage import delta_store

    if (
        not delta_store.table_exists(settings.root, "osm_features")
        or not (
            delta_store.read_partitions(settings.root, "osm_features", partitions, ["parent_l6"])
        ).height
    ):
        raise NoFeaturesError(
            f"no OSM object in {', '.join(sources_for(settings.sources, partitions))} matches "
            f"the taxonomy inside cells {', '.join(map(str, partitions))}: check that the sources "
            f"cover these cells and "
            f"carry mapped tags"
        )


@dataclass
class RefreshReport:
    applied: dict[str, list[str]] = field(default_factory=dict)  # source -> change files
    touched_cells: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # change files outside every source
    recomputed: dict[str, list[str]] = field(default_factory=dict)  # asset -> partitions
    reasons: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # asset -> k -> why
    run_ids: list[str] = field(default_factory=list)


def refresh(
    settings: PipelineSettings, instance: dg.DagsterInstance, log_level: str = "WARNING"
) -> RefreshReport:
    """What the nightly schedule and ``refresh_stale_partitions`` do, in the foreground: observe
    the sources (applying new change files), then recompute each stale partition in one run,
    from its first stale asset to the end.

    Concurrent refreshes of one root take turns (an OS lock); each decides what is stale only
    once it holds the lock, so a change is applied and recomputed once.
    """
    with exclusive(fs.local_cache(settings.root, osm_changes.SOURCES_DIR, ".refresh.lock")):
        return _refresh(settings, instance, log_level)


def _refresh(
    settings: PipelineSettings, instance: dg.DagsterInstance, log_level: str
) -> RefreshReport:
    from s2vec_pipeline.defs.automation import (
        PARTITION_PIPELINE,
        PIPELINE_ASSETS,
        stale_partitions,
        stale_plan,
    )

    report = RefreshReport()
    before = {s: len(osm_changes.applied_changes(settings.root, s)) for s in settings.sources}
    outside_before = {
        s: set(osm_changes.outside_changes(settings.root, s)) for s in settings.sources
    }
    launcher = Launcher(settings, instance, log_level, {CLI_TAG: "s2vec refresh"})
    launcher.run("refresh_sources")
    for src in settings.sources:
        new = osm_changes.applied_changes(settings.root, src)[before[src] :]
        if new:
            report.applied[src] = [e.name for e in new]
            report.touched_cells += [c for e in new for c in e.cells]
    report.touched_cells = sorted(set(report.touched_cells))
    # change files this refresh found outside a source's region, and applied to no source
    newly_outside = [
        set(osm_changes.outside_changes(settings.root, s)) - outside_before[s]
        for s in settings.sources
    ]
    applied = {f for files in report.applied.values() for f in files}
    report.outside = sorted(set.intersection(*newly_outside) - applied) if newly_outside else []
    plan = stale_plan(instance, launcher.defs)
    for a in PIPELINE_ASSETS:
        report.recomputed[a] = sorted(k for k, todo in plan.items() if a in todo)
        report.reasons[a] = stale_partitions(instance, launcher.defs, a, report.recomputed[a])
    for i, (k, todo) in enumerate(sorted(plan.items()), 1):
        t0 = time.perf_counter()
        launcher.run(PARTITION_PIPELINE, k, todo)
        report_done(PARTITION_PIPELINE, k, i, len(plan), t0)
    report.run_ids = launcher.report.run_ids
    return report
