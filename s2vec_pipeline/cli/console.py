"""What a command shows on the terminal besides its results: progress lines on stderr while it
runs, and when it fails one ``error:`` line and the exit code.

Exit codes: 0 success, 2 bad input or a state the user can fix (``S2VecError``, a full,
read-only or unwritable disk), 1 an internal error, 130 interrupted, 141 (as a Unix tool killed
by SIGPIPE) when the reader of stdout went away (``s2vec sql ... | head``), silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import traceback
from collections.abc import Iterator

from s2vec_pipeline.errors import STORAGE_FAULTS, S2VecError, exception_chain, storage_fault

INTERRUPTED = "interrupted; tables stay at their last committed version"
#: 128 + SIGPIPE: what a shell reports for a writer whose reader closed the pipe.
EXIT_CLOSED_PIPE = 141


class _ProgressHandler(logging.StreamHandler):
    """Progress lines on stderr. A record with ``transient=True`` (training epochs) rewrites one
    line on a terminal; when stderr is not a terminal every record is a plain line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.tty = sys.stderr.isatty()
        self.open_line = False

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        if self.tty and getattr(record, "transient", False):
            self.stream.write(f"\r\x1b[K{msg}")
            self.open_line = True
        else:
            # A line after epochs ends the rewritten line: the last epoch's line stays.
            self.stream.write(("\n" if self.open_line else "") + msg + "\n")
            self.open_line = False
        self.flush()


@contextlib.contextmanager
def console(verbosity: int) -> Iterator[None]:
    """While a command runs: progress lines on stderr and, at default verbosity, Dagster's own
    Python logger quiet. Undone after it, so library callers (and later tests) in the same
    process are unaffected."""
    from s2vec_pipeline.service.runner import PROGRESS_LOGGER

    progress, dagster_logger = logging.getLogger(PROGRESS_LOGGER), logging.getLogger("dagster")
    handler = _ProgressHandler()
    saved = (progress.level, progress.propagate, dagster_logger.level)
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    if verbosity <= 0:
        dagster_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        if handler.open_line:
            handler.stream.write("\n")
        progress.removeHandler(handler)
        progress.setLevel(saved[0])
        progress.propagate = saved[1]
        dagster_logger.setLevel(saved[2])


def failure(exc: BaseException, verbosity: int) -> int:
    """Report a command's exception in one ``error:`` line (``-vv``: its traceback first) and
    return the exit code; re-raises what is neither an error nor an interruption."""
    if isinstance(exc, S2VecError):
        return _fail(exc, str(exc), 2, verbosity)
    if _interrupted(exc):
        return _fail(exc, INTERRUPTED, 130, verbosity)
    if not isinstance(exc, Exception):  # SystemExit and the like
        raise exc
    inner = _innermost(exc)
    code = storage_fault(inner)
    if code is not None:  # a full, read-only or unwritable disk: the user fixes it
        fault = STORAGE_FAULTS[code]
        filename = getattr(inner, "filename", None)
        # the file, else the error's own words (which name it: "... (os error 30): PATH")
        where = filename or (str(inner).strip().splitlines() or [""])[0]
        advice = fault.advice(filename or "the root")
        message = f"{fault.reason} ({where}): {advice}; nothing was committed"
        return _fail(exc, message, 2, verbosity)
    text = (str(inner).strip().splitlines() or [""])[0]
    message = f"{type(inner).__name__}: {text} (unexpected: rerun with -vv for the traceback)"
    return _fail(exc, message, 1, verbosity)


def stdout_closed(exc: BaseException) -> bool:
    """``exc`` is a broken pipe on stdout: whoever read our output went away."""
    if not isinstance(exc, BrokenPipeError):
        return False
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


def quiet_closed_stdout() -> int:
    """End quietly after the reader of stdout went away: what is still buffered for it goes
    nowhere (Python would otherwise complain when it flushes stdout at exit)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_CLOSED_PIPE


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, however Dagster wrapped it (``DagsterExecutionInterruptedError``, a step
    failure around a ``KeyboardInterrupt``)."""
    return any(
        isinstance(e, KeyboardInterrupt) or type(e).__name__ == "DagsterExecutionInterruptedError"
        for e in exception_chain(exc)
    )


def _innermost(exc: BaseException) -> BaseException:
    """The exception a Dagster step failure wraps (its ``user_exception`` or cause chain)."""
    inner, seen = exc, set()
    while id(inner) not in seen:
        seen.add(id(inner))
        nxt = getattr(inner, "user_exception", None) or inner.__cause__
        if nxt is None:
            break
        inner = nxt
    return inner


def _fail(exc: BaseException, message: str, code: int, verbosity: int) -> int:
    if verbosity >= 2:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    return code
