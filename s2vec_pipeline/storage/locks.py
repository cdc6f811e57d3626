"""The one inter-process lock helper: an exclusive lock on a file, through ``filelock``.

Used wherever two processes (two CLI runs, a CLI run and the Dagster daemon, two Dagster runs)
must not interleave on the same local files: applying change files to a source copy, rewriting
``regions.yaml``, training one model version, creating a Delta table. The lock is an OS lock
(``flock`` on POSIX, ``msvcrt`` on Windows): a killed holder releases it, and the lock file itself
stays in place (its presence means nothing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["LockHeldError", "exclusive"]


class LockHeldError(RuntimeError):
    """A non-blocking :func:`exclusive` found the lock held by another process or thread."""


@contextmanager
def exclusive(path: str | os.PathLike[str], blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its parent folders) for the block.

    ``blocking=False`` raises :class:`LockHeldError` at once when someone else holds it;
    callers turn that into the error a user can act on.
    """
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the lock belongs to the process's holder, not to one thread of it;
    # a fresh FileLock per call so that two holders in one process exclude each other too.
    lock = FileLock(lock_path, blocking=blocking, thread_local=False)
    try:
        lock.acquire()
    except Timeout as e:
        raise LockHeldError(f"{lock_path} is held by another process") from e
    try:
        yield
    finally:
        lock.release()
