"""The training checkpoint ``last.ckpt``: whole or absent, and set aside when damaged.

``AtomicCheckpoint`` writes it at each epoch end through a temporary file that is flushed,
checked and renamed over the previous one (a full disk keeps the previous one and fails with
one line naming the folder); ``set_aside_if_torn`` moves a damaged one out of the way before
a resume, so training starts over instead of failing on it forever.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from s2vec_pipeline.errors import STORAGE_FAULTS, StorageUnavailableError, storage_fault
from s2vec_pipeline.model.callbacks import progress


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded (truncated, a damaged member), else
    None. Torch checkpoints are zip archives: the CRC of every member is checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return str(e)
    return None if bad is None else f"member {bad} is damaged"


def set_aside_if_torn(resume: Path) -> None:
    """A damaged ``last.ckpt`` (a disk that filled while it was written by an older version,
    a bad sector) is moved beside the work folder with a warning; training then starts over
    instead of failing on it forever."""
    for leftover in resume.parent.glob(f"{resume.name}.*.tmp"):  # a save that was killed
        leftover.unlink(missing_ok=True)
    if not resume.is_file():
        return
    problem = checkpoint_problem(resume)
    if problem is None:
        return
    aside = resume.parent.with_name(f"{resume.parent.name}.torn-last.ckpt")
    os.replace(resume, aside)
    progress.warning(
        "warning: the training checkpoint %s is damaged (%s): set aside as %s; training starts "
        "over",
        resume,
        problem,
        aside,
    )


class AtomicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose file is whole or absent: written to a temporary file, flushed
    to disk (fsync), checked, then renamed over the previous one. A full disk keeps the
    previous checkpoint and fails with :class:`StorageUnavailableError` naming the folder."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        temporary = f"{filepath}.{os.getpid()}.tmp"
        try:
            super()._save_checkpoint(trainer, temporary)
            if trainer.is_global_zero:  # only rank 0 writes the file
                with open(temporary, "rb") as f:
                    os.fsync(f.fileno())
                problem = checkpoint_problem(Path(temporary))
                if problem is not None:
                    raise OSError(f"checkpoint {temporary} reads back damaged: {problem}")
                os.replace(temporary, filepath)
                directory = os.open(os.path.dirname(filepath) or ".", os.O_RDONLY)
                try:
                    os.fsync(directory)  # the rename itself survives a power cut
                finally:
                    os.close(directory)
        except Exception as e:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            folder = os.path.dirname(filepath)
            free = shutil.disk_usage(folder).free
            code = storage_fault(e)
            if code is not None or "write failed" in str(e) or free < (64 << 20):
                raise StorageUnavailableError(
                    f"cannot write the training checkpoint in {folder}: "
                    f"{STORAGE_FAULTS[code].reason if code else 'the write failed'} "
                    f"({free / 2**20:.0f} MiB free on that disk). Free space there (or use "
                    f"another --root) and rerun: training resumes from the last whole epoch"
                ) from e
            raise
        self._last_checkpoint_saved = filepath
