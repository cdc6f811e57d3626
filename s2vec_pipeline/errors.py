"""Errors a user can act on. Each message says what was wrong and what to do about it."""

import errno
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class S2VecError(Exception):
    """Base class: bad input or state the user can fix. The CLI prints these without a traceback."""


class InvalidSourceError(S2VecError):
    """An OSM source file is missing, not a PBF, truncated or corrupt."""


class InvalidCellError(S2VecError):
    """A cell token, cell id or level is not valid S2."""


class InvalidBoundingBoxError(S2VecError):
    """A bounding box is malformed or out of range."""


class InvalidProfileError(S2VecError):
    """A resolution profile or image/pixel level combination is not allowed."""


class TaxonomyError(S2VecError):
    """The feature taxonomy YAML is malformed."""


class NoFeaturesError(S2VecError):
    """A source or region holds no feature the taxonomy matches."""


class CellOutsideSourcesError(S2VecError):
    """A requested partition cell is not covered by any configured source."""


class IncompatibleTableError(S2VecError):
    """An existing Delta table was written with another profile, taxonomy or schema."""


class MissingInputError(S2VecError):
    """An upstream table or partition that this step needs has not been materialized."""


class StorageUnavailableError(S2VecError):
    """The storage root is full, read-only or not writable: a write committed nothing."""


class InstanceUnavailableError(S2VecError):
    """The Dagster instance ($DAGSTER_HOME) cannot be opened: its PostgreSQL is unreachable,
    refuses the credentials, or its configuration is incomplete."""


class RootNotWritableError(S2VecError):
    """The storage root cannot be created or written."""


class DamagedTableError(S2VecError):
    """A Delta table cannot be read: a corrupt log entry, or a data file that is gone."""


def quiet_worker_interrupts() -> None:
    """In a spawned worker process: Ctrl-C (SIGINT, sent to the whole process group) ends it
    at once with status 130 and no traceback; the parent reports the interruption once."""
    import os
    import signal

    signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def start_quietly(process: Any) -> None:
    """Start a spawned ``multiprocessing`` process with SIGINT ignored until it installs its
    own handler (:func:`quiet_worker_interrupts`): a Ctrl-C while it still imports would
    otherwise print a traceback from its bootstrap."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        process.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: Dagster's ``user_exception``, causes and contexts
    (the one walk: chains can loop, so each is visited once)."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "user_exception", None), e.__cause__, e.__context__]


# -- storage faults: a full, read-only or unwritable disk (the one errno table) ---------------


@dataclass(frozen=True)
class StorageFault:
    """An OS error the user fixes on their side: what happened and what to do about it."""

    code: int  #: the errno
    reason: str  #: what happened, e.g. "no space left on device"
    remedy: str  #: what to do; ``{where}`` is the folder or root to fix

    @property
    def needs_space(self) -> bool:
        """Freeing space fixes it (a full disk or quota), not permissions or a remount."""
        return self.code in (errno.ENOSPC, errno.EDQUOT)

    def advice(self, where: str, maintain_root: str | None = None) -> str:
        """What to do, ending with the other way out: another root. ``maintain_root``: the
        root whose ``s2vec maintain`` frees space (the files of failed writes)."""
        maintain = (
            f" (`s2vec maintain --root {maintain_root}` deletes the files of failed writes and "
            f"of old table versions)"
            if maintain_root is not None and self.needs_space
            else ""
        )
        return f"{self.remedy.format(where=where)}{maintain} or use another --root / S2VEC_ROOT"


STORAGE_FAULTS: dict[int, StorageFault] = {
    f.code: f
    for f in (
        StorageFault(errno.ENOSPC, "no space left on device", "free space on that disk"),
        StorageFault(errno.EDQUOT, "disk quota exceeded", "free space within your quota"),
        StorageFault(errno.EROFS, "the file system is read-only", "mount it read-write"),
        StorageFault(errno.EACCES, "permission denied", "make {where} writable for this user"),
        StorageFault(errno.EPERM, "operation not permitted", "make {where} writable for this user"),
    )
}
# delta-rs reports OS errors inside its messages: "(os error 28)", "Os { code: 30, ..." (Rust),
# "[Errno 28]" (a Python error raised while it read our stream)
_OS_ERROR_IN_MESSAGE = re.compile(r"(?:os error|\bcode:|\berrno)\s*(\d+)", re.IGNORECASE)
# SQLite (Dagster's records) says so in words: SQLITE_FULL, and SQLITE_IOERR when its journal
# cannot grow on a full disk
_SQLITE_FULL = ("database or disk is full", "disk i/o error")


def storage_fault(error: BaseException) -> int | None:
    """The errno of a full / read-only / unwritable storage behind ``error`` (an ``OSError`` in
    its chain, an OS error code in a message, SQLite's words for a full disk), else None."""
    for e in exception_chain(error):
        if isinstance(e, OSError) and e.errno in STORAGE_FAULTS:
            return e.errno
        text = str(e)
        for m in _OS_ERROR_IN_MESSAGE.finditer(text):
            if int(m.group(1)) in STORAGE_FAULTS:
                return int(m.group(1))
        if any(words in text.lower() for words in _SQLITE_FULL):
            return errno.ENOSPC
    return None


def validation_problem(error: Any, top: str = "value") -> str:
    """One line from a ``pydantic.ValidationError``: its first complaint as ``field: what is
    wrong`` (``top`` when the whole value is wrong), without pydantic's URL. The one way the
    files the project reads back (ledger, regions, manifest, model card) name a bad field."""
    first = error.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ())) or top
    return f"{where}: {str(first.get('msg', 'invalid')).lower()}"
