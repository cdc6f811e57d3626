"""Jobs for ``test_run_launcher.py``, at module level so that a worker process can load them
from their code origin (``dg.reconstructable``), as it loads the pipeline's jobs."""

import os
import time
from pathlib import Path

import dagster as dg


class Note(dg.Config):
    folder: str
    wait_s: float = 0.0


@dg.op
def note_pid(config: Note) -> None:
    """Writes this process's id where the test reads it; waits when asked (to be killed)."""
    Path(config.folder, f"{os.getpid()}-{time.monotonic_ns()}.pid").write_text(str(os.getpid()))
    time.sleep(config.wait_s)


@dg.job(executor_def=dg.in_process_executor)  # the op runs in the run worker itself
def note_pid_job() -> None:
    note_pid()
