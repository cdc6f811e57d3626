"""The one lock helper: exclusive across processes, non-blocking mode refuses at once."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from s2vec_pipeline.locks import LockHeldError, exclusive


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


def test_training_lock_reports_training_in_progress(tmp_path: Path) -> None:
    from s2vec_pipeline.model.train import TrainingInProgressError, _version_lock

    with (
        _version_lock(tmp_path, "abc"),
        pytest.raises(TrainingInProgressError, match="being trained by another process"),
        _version_lock(tmp_path, "abc"),
    ):
        pass
    with _version_lock(tmp_path, "abc"):  # released on exit
        pass
