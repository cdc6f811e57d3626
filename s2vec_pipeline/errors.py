"""Errors a user can act on. Each message says what was wrong and what to do about it."""

from collections.abc import Iterator
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
