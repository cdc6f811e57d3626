"""The one lock helper: exclusive across processes, non-blocking mode refuses at once."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest

from s2vec_pipeline.storage.locks import LockHeldError, exclusive


def _hold(path: str, held: mp.synchronize.Event, release: mp.synchronize.Event) -> None:
    with exclusive(path):
        held.set()
        release.wait(timeout=60)


def test_exclusive_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / ".x.lock"  # parent folders are created
    ctx = mp.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(path), held, release))
    holder.start()
    try:
        assert held.wait(timeout=60)
        t0 = time.monotonic()
        with pytest.raises(LockHeldError, match=".x.lock"), exclusive(path, blocking=False):
            pass
        assert time.monotonic() - t0 < 1.0  # refused at once, not after a wait
    finally:
        release.set()
        holder.join(timeout=60)
    assert holder.exitcode == 0
    # free again once the holder is gone; a second holder in the same process is refused
    with (
        exclusive(path, blocking=False),
        pytest.raises(LockHeldError),
        exclusive(path, blocking=False),
    ):
        pass


def _hold_version(root: str, held: mp.synchronize.Event, release: mp.synchronize.Event) -> None:
    from s2vec_pipeline.model.train import _version_lock

    with _version_lock(root, "abc"):
        held.set()
        release.wait(timeout=60)


@pytest.mark.slow
def test_training_lock_waits_for_the_other_trainer(tmp_path: Path) -> None:
    """A second trainer of the same model version waits for the first instead of failing."""
    from s2vec_pipeline.model.train import _version_lock

    ctx = mp.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_version, args=(str(tmp_path), held, release))
    holder.start()
    try:
        assert held.wait(timeout=60)
        threading.Timer(1.5, release.set).start()
        t0 = time.monotonic()
        with _version_lock(tmp_path, "abc"):  # entered only once the holder let go
            assert release.is_set() and time.monotonic() - t0 >= 1.0
    finally:
        release.set()
        holder.join(timeout=60)
    assert holder.exitcode == 0
