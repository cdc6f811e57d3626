"""Parallel partition runs: long-lived spawned workers (``worker_pool.SpawnPool``) that load
the definitions once and serve one partition run after another, so a run costs the run, not a
process start. A worker that fails or dies fails its partition only and is replaced.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import dagster as dg

from s2vec_pipeline.errors import S2VecError, quiet_worker_interrupts
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.worker_pool import SpawnPool

if TYPE_CHECKING:
    from s2vec_pipeline.service.runner import Launcher


def run_in_workers(
    launcher: Launcher, job_name: str, order: list[str], assets: Sequence[str], workers: int
) -> dict[str, BaseException]:
    """``Launcher.run_partitions`` with ``workers`` long-lived workers; returns the failed
    partitions with their error. A worker exits when sent None, else is killed
    after 30 s."""
    from s2vec_pipeline.service.runner import RunReport, report_done

    pending = list(order)
    idle: list[mp.connection.Connection] = []
    busy: dict[mp.connection.Connection, tuple[BaseProcess, str, float]] = {}
    procs: dict[mp.connection.Connection, BaseProcess] = {}
    failures: dict[str, BaseException] = {}
    done = 0
    args = (
        launcher.instance.get_ref(),
        launcher.settings.settings_dict(),
        launcher.log_level,
        launcher.tags,
    )
    with SpawnPool(grace_s=30) as pool:

        def start_worker() -> None:
            mine, theirs = pool.pipe()
            procs[mine] = pool.start(_partition_worker, (theirs, *args, job_name, list(assets)))
            theirs.close()
            idle.append(mine)

        try:
            for _ in range(min(workers, len(pending))):
                start_worker()
            while pending or busy:
                while pending and idle:
                    conn = idle.pop()
                    k = pending.pop(0)
                    try:
                        conn.send(k)
                    except OSError:  # it died while idle: its partition goes to another
                        pending.insert(0, k)
                        pool.reap(procs.pop(conn))
                        start_worker()
                        continue
                    busy[conn] = (procs[conn], k, time.perf_counter())
                ready = pool.wait([p for p, *_ in busy.values()], busy)
                for conn in [c for c in busy if c in ready or busy[c][0].sentinel in ready]:
                    proc, k, t0 = busy.pop(conn)
                    outcome = _next_partition(conn) if conn.poll() else None  # None: died
                    if isinstance(outcome, RunReport):
                        launcher.report.merge(outcome)
                        done += 1
                        report_done(job_name, k, done, len(order), t0, outcome.detail)
                    else:
                        failures[k] = outcome or RuntimeError(
                            f"the worker for partition {k} died (exit code {proc.exitcode})"
                        )
                    if outcome is not None:
                        idle.append(conn)
                    else:  # died: replace it while partitions remain
                        pool.reap(procs.pop(conn))
                        if pending:
                            start_worker()
        finally:
            for conn in procs:  # a None tells a worker to exit
                with contextlib.suppress(OSError):
                    conn.send(None)
    return failures


#: Fault injection for tests: a worker given a partition listed here (comma-separated) kills
#: itself with SIGKILL before its run, as the kernel's OOM killer would.
ENV_KILL_PARTITION = "S2VEC_TEST_KILL_PARTITION"


def _next_partition(conn: mp.connection.Connection) -> Any:
    """The next message, or None when the other end is gone."""
    try:
        return conn.recv()
    except (EOFError, OSError):  # closed, or reset by a process that died
        return None


def _partition_worker(
    conn: mp.connection.Connection,
    instance_ref: Any,
    settings: dict[str, Any],
    log_level: str,
    tags: dict[str, str],
    job_name: str,
    assets: list[str],
) -> None:
    """A long-lived worker: loads the definitions once, then runs each partition it receives
    (None: exit) and sends back that run's report or its error."""
    # the runner imports this module: its names are imported when a worker starts
    from s2vec_pipeline.service.runner import Launcher, RunReport, quiet_python_loggers

    quiet_worker_interrupts()
    quiet_python_loggers(log_level)

    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        launcher = Launcher(PipelineSettings(**settings), instance, log_level, tags)
        while (partition := _next_partition(conn)) is not None:
            if partition in os.environ.get(ENV_KILL_PARTITION, "").split(","):
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests (OOM killer)
            launcher.report = RunReport()
            try:
                launcher.run(job_name, partition, assets)
                _send(conn, launcher.report)
            except S2VecError as e:
                _send(conn, e)
            except Exception as e:  # noqa: BLE001 - Dagster errors do not always pickle
                _send(conn, RuntimeError(f"{type(e).__name__}: {e}"))
            except BaseException:  # Ctrl-C, as Dagster turns it into an interrupt inside runs
                os._exit(130)  # quietly: the coordinator reports the interruption once


def _send(send: mp.connection.Connection, outcome: object) -> None:
    """Send a worker's outcome; a parent that is gone (interrupted) needs none."""
    with contextlib.suppress(BrokenPipeError):
        send.send(outcome)
