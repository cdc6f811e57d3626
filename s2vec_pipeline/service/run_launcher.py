"""A run launcher whose runs start in warm processes: each run of the daemon's queue goes to a
long-lived worker that loaded the code location once, instead of a fresh process per run.

Dagster's ``DefaultRunLauncher`` asks the code server to spawn a Python process per run, which
imports Dagster and the definitions (~2 s on an idle core, 5–15 s on a loaded 2-core host)
before the run's first step: with one run per level-6 cell, that start-up was most of a
region's time through the daemon (docs/benchmarks.md, "The service path through the daemon").
``WarmRunLauncher`` keeps a few spawned workers (``worker_pool.SpawnPool``, as the CLI's
parallel partition runs do). A worker executes one run at a time, exactly as ``dagster api
execute_run`` would (same events and run status handling: ``dagster_compat.execute_existing_run``),
then waits for the next; one spare is started ahead, so the next run finds a warm worker.

- Health: the worker records its pid in the run's first engine event, as a code server's run
  process does, so run monitoring (``LocalProcessRunLauncher.check_run_worker_health``) marks a
  run FAILURE when its worker died (killed, out of memory). A dead worker is replaced.
- Terminate (the UI's "Terminate", from the webserver's own launcher): the run's worker, found
  by the pid the run recorded, is killed and the run marked CANCELED; a new worker replaces
  it. Delta commits are atomic, so a killed run leaves each table at its old version or its
  new one.
- A worker serves ``max_runs_per_worker`` runs (memory a long-lived process may keep, a CUDA
  context included once it embedded on a GPU), and exits after ``idle_timeout_s`` without work.
- Runs whose code location is not importable here (another Python executable: a separate code
  server image) go to the code server as with ``DefaultRunLauncher``.

Like ``LocalProcessRunLauncher`` it needs the daemon and the runs on one host (``make ui``,
``dagster dev``). In ``dagster.yaml``::

    run_launcher:
      module: s2vec_pipeline.service.run_launcher
      class: WarmRunLauncher
      config: {max_runs_per_worker: 100, idle_timeout_s: 600}
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

import dagster as dg

from s2vec_pipeline.service.dagster_compat import ConfigurableClassData, execute_existing_run
from s2vec_pipeline.service.instance import LocalProcessRunLauncher, process_alive, run_worker_pid
from s2vec_pipeline.worker_pool import SpawnPool

Connection = multiprocessing.connection.Connection
#: Tag of the runs this launcher handed to a warm worker (``terminate`` finds them by it).
WORKER_TAG = "s2vec/run_worker"


@dataclass
class _Worker:
    proc: BaseProcess
    conn: Connection
    run_id: str | None = None  # the run it executes now
    runs: int = 0  # runs sent to it so far
    idle_since: float = field(default_factory=time.monotonic)


class WarmRunLauncher(LocalProcessRunLauncher):
    """Launches each run in a warm, long-lived worker process (module docstring)."""

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        max_runs_per_worker: int = 100,
        idle_timeout_s: float = 600.0,
        spare_workers: int = 1,
    ) -> None:
        super().__init__(inst_data=inst_data)
        self.max_runs_per_worker = max_runs_per_worker
        self.idle_timeout_s = idle_timeout_s
        self.spare_workers = spare_workers
        self._pool = SpawnPool(grace_s=5)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # launch_run, terminate and the janitor thread
        self._janitor: threading.Thread | None = None

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {
            "max_runs_per_worker": dg.Field(int, is_required=False, default_value=100),
            "idle_timeout_s": dg.Field(float, is_required=False, default_value=600.0),
            "spare_workers": dg.Field(int, is_required=False, default_value=1),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> WarmRunLauncher:
        return cls(inst_data=inst_data, **dict(config_value))

    # ------------------------------------------------------------------ launching

    def launch_run(self, context: Any) -> None:  # dagster's LaunchRunContext
        run = context.dagster_run
        origin = run.job_code_origin
        if origin is None or origin.executable_path != sys.executable:
            super().launch_run(context)  # another environment: its code server starts it
            return
        with self._lock:
            self._collect()
            self._start_janitor()
            budget = self.max_runs_per_worker
            worker = next((w for w in self._workers if w.run_id is None and w.runs < budget), None)
            if worker is None:
                worker = self._start_worker()
            # tagged first: a "Terminate" from the webserver must find it as one of ours
            self._instance.add_run_tags(run.run_id, {WORKER_TAG: "warm"})
            try:
                worker.conn.send(run.run_id)
            except OSError:  # it died while idle: a fresh one takes the run
                self._drop(worker)
                worker = self._start_worker()
                worker.conn.send(run.run_id)
            worker.run_id, worker.runs = run.run_id, worker.runs + 1
            idle = sum(w.run_id is None and w.runs < budget for w in self._workers)
            for _ in range(self.spare_workers - idle):
                self._start_worker()  # warm for the next run

    def _start_worker(self) -> _Worker:
        mine, theirs = self._pool.pipe()
        proc = self._pool.start(
            _warm_worker,
            (theirs, self._instance.get_ref()),
            name="s2vec-run-worker",
        )
        theirs.close()
        worker = _Worker(proc, mine)
        self._workers.append(worker)
        return worker

    def _collect(self) -> None:
        """Take the workers' news: a finished run frees its worker; a worker that ended
        (killed, out of memory: run monitoring fails its run) is forgotten; an idle one that
        spent its run budget or idled ``idle_timeout_s`` is told to exit."""
        now = time.monotonic()
        for w in list(self._workers):
            with contextlib.suppress(EOFError, OSError):
                while w.conn.poll():
                    if w.conn.recv() == w.run_id:
                        w.run_id, w.idle_since = None, now
            if not w.proc.is_alive():
                self._drop(w)
            elif w.run_id is None and (
                w.runs >= self.max_runs_per_worker or now - w.idle_since > self.idle_timeout_s
            ):
                self._retire(w)

    def _retire(self, worker: _Worker) -> None:
        with contextlib.suppress(OSError):
            worker.conn.send(None)  # it exits when it reads this
        worker.conn.close()
        self._workers.remove(worker)
        self._pool.release(worker.proc)

    def _start_janitor(self) -> None:
        """Retire idle workers also when no run comes (``_collect`` every few seconds)."""
        if self._janitor is not None and self._janitor.is_alive():
            return

        def tidy() -> None:
            while True:
                time.sleep(min(30.0, max(self.idle_timeout_s / 4, 0.5)))
                with self._lock:
                    self._collect()
                    if not self._workers:
                        return

        self._janitor = threading.Thread(target=tidy, name="s2vec-run-workers", daemon=True)
        self._janitor.start()

    def _drop(self, worker: _Worker) -> None:
        worker.conn.close()
        if worker.proc.is_alive():
            worker.proc.kill()
        worker.proc.join()
        self._workers.remove(worker)
        self._pool.release(worker.proc)

    # ------------------------------------------------------------------ stopping

    def terminate(self, run_id: str) -> bool:
        """Stop a run of a warm worker from any process of this host (the UI's webserver has
        its own launcher, without the daemon's workers): kill the worker whose pid the run
        recorded, mark the run CANCELED. A run not started yet is marked CANCELED and its
        worker, finding it so, does not start it."""
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        if run.tags.get(WORKER_TAG) != "warm":
            return super().terminate(run_id)  # launched by a code server
        self._instance.report_run_canceling(run)
        found = run_worker_pid(self._instance, run_id)
        if found is not None and process_alive(found[0], not_started_after=found[1]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(found[0], signal.SIGKILL)
        with self._lock:
            self._collect()  # one of ours: forgotten, replaced at the next launch
        self._instance.report_run_canceled(run, message="run terminated: its worker was stopped")
        return True

    def dispose(self) -> None:
        with self._lock:
            for w in list(self._workers):
                self._retire(w)  # idle ones exit now; busy ones after their run


def _warm_worker(conn: Connection, instance_ref: Any) -> None:
    """A worker: executes each run id it receives and answers with that id; exits on None or
    when its launcher (the daemon) is gone. The launcher decides when it retires, so a run is
    never sent to a worker that is leaving."""
    # Ctrl-C of `dagster dev` reaches the process group: Dagster's execution turns it into an
    # interrupted run (spawned with SIGINT ignored, see worker_pool.SpawnPool.start).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        while True:
            try:
                run_id = conn.recv()
            except (EOFError, OSError):  # the launcher (the daemon) is gone
                return
            if run_id is None:
                return
            run = instance.get_run_by_id(run_id)
            if run is not None:
                execute_existing_run(instance, run, os.getpid())
            with contextlib.suppress(OSError):
                conn.send(run_id)
