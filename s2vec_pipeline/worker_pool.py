"""Spawned worker processes that survive a dying worker: the one home of how the pipeline
starts, watches and stops its workers.

Used by partitioned extraction (``osm.split``: one process per chunk of group tasks, a task
whose process died retried once) and by parallel partition runs (``service.runner``:
long-lived workers serving one partition after another, a dead one replaced). What to do when
a worker dies (retry, replace, fail its work) is the caller's; this module gives:

* ``spawn`` processes (deltalake panics in forked children), started with SIGINT ignored until
  they install their own quiet handler (``errors.start_quietly``);
* one wait for "a worker ended or sent something" (process sentinels and pipes together), so a
  worker killed by a signal or the OOM killer is seen at once, not at a timeout;
* a Ctrl-C told apart from a death: a worker that SIGINT ended means the whole command was
  interrupted (SIGINT reaches the process group), raised as ``KeyboardInterrupt`` once;
* no worker outliving its coordinator: on leaving the ``with`` block (done, failing or
  interrupted) each one still alive gets ``grace_s`` to exit, then is killed.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import signal
from collections.abc import Callable, Iterable
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

from s2vec_pipeline.errors import start_quietly

#: Exit statuses of a worker that Ctrl-C ended (``errors.quiet_worker_interrupts`` exits 130).
INTERRUPTED_EXIT_CODES = (130, -signal.SIGINT)


class SpawnPool:
    """The workers of one coordinator (see the module docstring)."""

    def __init__(self, grace_s: float = 0.0) -> None:
        self._ctx = mp.get_context("spawn")
        self._grace_s = grace_s
        self._procs: list[BaseProcess] = []

    def __enter__(self) -> SpawnPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def pipe(self) -> tuple[mp.connection.Connection, mp.connection.Connection]:
        """A duplex pipe for talking to a worker: keep one end, pass the other to ``start``."""
        return self._ctx.Pipe(duplex=True)

    def start(
        self, target: Callable[..., object], args: tuple[Any, ...], name: str | None = None
    ) -> BaseProcess:
        """Start one worker running ``target(*args)``."""
        proc = self._ctx.Process(target=target, args=args, name=name)
        start_quietly(proc)
        self._procs.append(proc)
        return proc

    @staticmethod
    def wait(
        procs: Iterable[BaseProcess], conns: Iterable[mp.connection.Connection] = ()
    ) -> set[object]:
        """Block until one of ``procs`` ends or one of ``conns`` has something to read; returns
        the ready connections and the sentinels (``proc.sentinel``) of the ended workers."""
        return set(mp.connection.wait([*conns, *(p.sentinel for p in procs)]))

    def reap(self, proc: BaseProcess) -> int | None:
        """Join a worker that ended and forget it; returns its exit code (negative: the signal
        that killed it). Raises ``KeyboardInterrupt`` when Ctrl-C ended it."""
        proc.join()
        if proc in self._procs:
            self._procs.remove(proc)
        if proc.exitcode in INTERRUPTED_EXIT_CODES:
            raise KeyboardInterrupt
        return proc.exitcode

    def release(self, proc: BaseProcess) -> None:
        """Stop tracking a worker told to exit on its own (a long-lived pool retiring it);
        ``multiprocessing`` reaps it when it has ended."""
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        """Give every worker still alive ``grace_s`` seconds to exit, then kill it."""
        procs, self._procs = self._procs, []
        for proc in procs:
            proc.join(timeout=self._grace_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
