"""The change ledger of one source: where it lives, its format (a pydantic model), reading and
writing it, and keeping it on an object-store root.

``<root>/_sources/<id>/ledger.json`` records the original source (path, sha256, size, mtime),
the current updated extract, the applied change files (with the level-6 cells each touched)
and the files found outside the source's region. ``<id>`` is the source's path key
(``storage.file_identity.path_key``). The ledger is the commit point: it is rewritten
atomically only after the extract it names is complete, and uploaded last to an object store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import pydantic

from s2vec_pipeline.errors import S2VecError, validation_problem
from s2vec_pipeline.storage import fs
from s2vec_pipeline.storage.file_identity import FileIdentity, path_key
from s2vec_pipeline.storage.locks import exclusive
from s2vec_pipeline.storage.versioning import file_sha256

SOURCES_DIR = "_sources"
LEDGER_NAME = "ledger.json"
LEDGER_FORMAT = 1
#: Marks the temp files of an update in a source folder (``<extract>.tmp-…``).
TMP_MARK = ".tmp-"


class ChangeLedgerError(S2VecError):
    """The ledger disagrees with the files: renamed or altered change files, a changed source."""


class _Record(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="ignore")


class SourceRecord(_Record):
    """The original file the changes were applied to."""

    path: str
    sha256: str
    size: int
    mtime_ns: int


class AppliedChange(_Record):
    """One ledger entry: a change file that has been merged into the source's extract."""

    name: str
    sha256: str
    size: int
    applied_at: str
    cells: tuple[str, ...]
    sequence: int | None
    batch: int
    path: str

    @property
    def recorded_at(self) -> str:
        return self.applied_at


class OutsideChange(_Record):
    """A change file holding nothing in the source's region: recorded, not applied."""

    name: str
    sha256: str
    size: int
    checked_at: str
    path: str

    @property
    def recorded_at(self) -> str:
        return self.checked_at


class Replication(_Record):
    """Replication state of the current extract (from the last applied file that told it)."""

    sequence: int | None = None
    timestamp: str | None = None


class Ledger(pydantic.BaseModel):
    """``ledger.json``. Fields in on-disk order; a ledger written before ``outside`` and
    ``region`` existed reads with their defaults."""

    model_config = pydantic.ConfigDict(extra="ignore")

    format: Literal[1]
    source: SourceRecord
    extract: str | None = None  # file name inside the source folder; None = the original source
    extract_sha256: str | None = None
    batches: int = 0
    replication: Replication = Replication()
    applied: list[AppliedChange] = []  # in application order
    outside: list[OutsideChange] = []
    # (min_lat, min_lng, max_lat, max_lng): what the updated extracts are cut back to.
    region: tuple[float, float, float, float] | None = None
    updated_at: str | None = None

    @classmethod
    def new(cls, source: Path) -> Ledger:
        """An empty ledger for ``source`` (hashed once, here)."""
        identity = FileIdentity.of(source)
        record = SourceRecord(
            path=str(source),
            sha256=file_sha256(source)[0],
            size=identity.size,
            mtime_ns=identity.mtime_ns,
        )
        return cls(format=LEDGER_FORMAT, source=record)


def source_id(source: str | os.PathLike) -> str:
    """A source's identity under the root: ``<readable stem>-<12 hex digits of the sha256 of
    its resolved absolute path>`` (``file_identity.path_key``). Two files with the same name in
    different folders get different ids; the id is one plain path component."""
    return path_key(source)


def source_dir(root: str | os.PathLike, source: str | os.PathLike) -> Path:
    """Folder holding the ledger and updated extracts of one source: ``<root>/_sources/<id>/``
    (see ``source_id``). Nothing of a source is ever written outside it.

    On an object-store root this is a local working copy (osmium reads and writes local files)
    under the root's cache (``fs.local_cache``); the ledger and the current extract are
    kept on the store at ``<root>/_sources/<id>/`` and synchronized by ``pull`` / ``push``."""
    parent = fs.local_cache(root, SOURCES_DIR)
    sdir = parent / source_id(source)
    if sdir.parent != parent or sdir.name in ("", ".", ".."):  # by construction; kept as a guard
        raise ChangeLedgerError(f"source {source} maps to {sdir}, outside {parent}")
    return sdir


def pull(root: str | os.PathLike, source: str | os.PathLike, extract: bool = True) -> Path:
    """``source_dir``, for an object-store root first brought up to date from the store: its
    ledger, and (``extract``) the current extract it names when the local copy is missing or
    of another size. A ledger is the commit point on the store: it is uploaded last."""
    sdir = source_dir(root, source)
    if not fs.is_object_store(root):
        return sdir
    remote = fs.join(root, SOURCES_DIR, sdir.name)
    raw = fs.read_bytes(fs.join(remote, LEDGER_NAME))
    sdir.mkdir(parents=True, exist_ok=True)
    if raw is None:  # nothing applied on the store (or reset there): forget the local copy
        (sdir / LEDGER_NAME).unlink(missing_ok=True)
        return sdir
    try:
        name = json.loads(raw).get("extract")
    except (ValueError, AttributeError):
        name = None  # load_ledger reports the unreadable ledger
    if extract and name:
        local, there = sdir / name, fs.join(remote, name)
        size = fs.size(there)
        if size is not None and (not local.is_file() or local.stat().st_size != size):
            fs.download_file(there, local)
    fs.write_bytes(sdir / LEDGER_NAME, raw)
    return sdir


def push(
    root: str | os.PathLike, sdir: Path, extract: str | None, previous: str | None = None
) -> None:
    """Upload a new current extract, then the ledger (the commit point), to an object-store
    root; then delete the extract it replaced. Nothing to do for a local root."""
    if not fs.is_object_store(root):
        return
    remote = fs.join(root, SOURCES_DIR, sdir.name)
    if extract:
        fs.upload_file(sdir / extract, fs.join(remote, extract))
    fs.upload_file(sdir / LEDGER_NAME, fs.join(remote, LEDGER_NAME))
    if previous and previous != extract:
        fs.delete(fs.join(remote, previous))


def load_ledger(sdir: Path) -> Ledger | None:
    """The ledger in a source folder, None when there is none; a broken or foreign one is a
    ``ChangeLedgerError`` saying how to start again."""
    path = sdir / LEDGER_NAME
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChangeLedgerError(
            f"change ledger {path} cannot be read ({e}); restore it from a backup, or delete "
            f"{sdir} to start again from the original source"
        ) from e
    if not isinstance(raw, dict) or raw.get("format") != LEDGER_FORMAT:
        raise ChangeLedgerError(
            f"change ledger {path} is not a format-{LEDGER_FORMAT} ledger; delete {sdir} to start "
            f"again from the original source"
        )
    try:
        return Ledger.model_validate(raw)
    except pydantic.ValidationError as e:
        raise ChangeLedgerError(
            f"change ledger {path} is damaged ({validation_problem(e, '(top)')}); restore it "
            f"from a backup, or delete {sdir} to start again from the original source"
        ) from None


def save_ledger(sdir: Path, ledger: Ledger) -> None:
    """Rewrite the ledger atomically (the commit point of a local update)."""
    body = json.dumps(ledger.model_dump(mode="json"), indent=2)
    fs.write_text(sdir / LEDGER_NAME, body + "\n")


@contextlib.contextmanager
def locked(sdir: Path) -> Iterator[None]:
    """Exclusive lock on the source folder: two refreshes of one source never interleave."""
    with exclusive(sdir / ".lock"):
        yield


def check_source(ledger: Ledger, source: Path, sdir: Path) -> None:
    """The original must be the file the ledger's changes were applied to (hashed only when its
    path, size or mtime changed; the record then follows the file)."""
    rec = ledger.source
    identity = FileIdentity.of(source)
    if str(source) == rec.path and identity.same_version(rec.size, rec.mtime_ns):
        return
    sha, _ = file_sha256(source)
    if sha != rec.sha256:
        raise ChangeLedgerError(
            f"source {source} is not the file the changes in {sdir / LEDGER_NAME} were applied "
            f"to ({rec.path}, sha256 {rec.sha256[:12]}..., now {sha[:12]}...). If it is a "
            f"fresh download, start again from it with reset_source(root, source) (deletes "
            f"{sdir}); if it is another extract with the same file name, rename it"
        )
    ledger.source = rec.model_copy(
        update={"path": str(source), "size": identity.size, "mtime_ns": identity.mtime_ns}
    )


def remove_leftovers(sdir: Path, ledger: Ledger | None) -> None:
    """Temp files and extracts the ledger does not point at (a crash between rename and ledger
    write leaves one behind)."""
    keep = ledger.extract if ledger else None
    for p in sdir.iterdir():
        if not p.is_file():
            continue
        temp = TMP_MARK in p.name or p.name.endswith(".partial")  # ours, or fs.replacing's
        if temp or (p.name.endswith(".osm.pbf") and p.name != keep):
            p.unlink(missing_ok=True)


def read_ledger(root: str | os.PathLike, source: str | os.PathLike) -> dict | None:
    """The source's ledger as stored (validated; see ``Ledger`` for the format), or None."""
    ledger = load_ledger(pull(root, source, extract=False))
    return None if ledger is None else ledger.model_dump(mode="json")


def current_extract(root: str | os.PathLike, source: str | os.PathLike) -> Path:
    """The PBF the pipeline should read for ``source``: the newest updated extract under the
    root, or the original file when no change has been applied."""
    sdir = pull(root, source)
    ledger = load_ledger(sdir)
    if ledger is None or not ledger.extract:
        return Path(source)
    return sdir / ledger.extract


def reset_source(root: str | os.PathLike, source: str | os.PathLike) -> None:
    """Forget every applied change of ``source`` (ledger and updated extracts), e.g. after the
    original file was replaced by a fresh download. The original file is not touched."""
    sdir = source_dir(root, source)
    if fs.is_object_store(root):
        fs.delete_tree(fs.join(root, SOURCES_DIR, sdir.name))
    if not sdir.is_dir():
        return
    with locked(sdir):
        for p in sdir.iterdir():
            if p.is_file() and p.name != ".lock":
                p.unlink()


def applied_changes(root: str | os.PathLike, source: str | os.PathLike) -> list[AppliedChange]:
    """The ledger's entries, in application order (empty if none)."""
    ledger = load_ledger(pull(root, source, extract=False))
    return list(ledger.applied) if ledger else []


def outside_changes(root: str | os.PathLike, source: str | os.PathLike) -> list[str]:
    """Names of the change files recorded as outside the source's region, in the order seen."""
    ledger = load_ledger(pull(root, source, extract=False))
    return [e.name for e in ledger.outside] if ledger else []


def cell_source_version(
    root: str | os.PathLike, sources: Iterable[str | os.PathLike], cell: str
) -> str:
    """What the OSM data of one level-6 cell depends on: each covering source's identity (path
    as configured, size, modification time) and the last applied change batch that touched
    the cell.

    A change file touching other cells leaves this version unchanged, so only the partitions a
    change really reaches are re-extracted.
    """
    parts = []
    for src in sorted(str(s) for s in sources):
        identity = FileIdentity.of(src)
        touched = [e.batch for e in applied_changes(root, src) if cell in e.cells]
        parts.append([src, identity.size, identity.mtime_ns, max(touched, default=0)])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
