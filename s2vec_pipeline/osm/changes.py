"""Nightly refresh of an OSM source from change files (``.osc`` / ``.osc.gz``).

The user's source file is never modified. Updated extracts live under the storage root::

    <root>/_sources/<id>/ledger.json               what was applied; the current extract
    <root>/_sources/<id>/<stem>.<batch>.osm.pbf    the current updated extract

``<id>`` is ``<stem>-<hash of the source's resolved absolute path>`` (``source_id``): sources
with the same file name in different folders never share a folder, and nothing is written
outside ``<root>/_sources/<id>/``.

``apply_changes`` merges every change file not applied yet onto the current extract in one pass
(``osmium.MergeInputReader.apply_to_reader``: C++ end to end, the newest version of each object
wins, deletions remove objects) and writes a new PBF atomically (temp file, fsync, rename). The
ledger is then rewritten atomically to point at it and only after that is the previous updated
extract deleted. A batch is all or nothing: every new file is read in full and checked before
anything is written, so a corrupt or stale file leaves the ledger and the extracts untouched.

Rules
-----
* Order: ``list_change_files`` sorts by the numbers in the path relative to the folder, compared
  as numbers ("natural" order), so the replication layout ``000/123/456.osc.gz`` sorts by its
  sequence number 123456 and ``day-9.osc`` comes before ``day-10.osc``. ``apply_changes`` applies
  the files in the order it is given.
* Identity: a change file is known by its *name*: the last three path parts for the replication
  layout (``000/123/456.osc.gz``), otherwise its file name. The same name with the same sha256 is
  skipped; the same name with other content is an error, as is the same content under a new name.
* Staleness (``StaleChangeError``): a change file is refused as older than the extract when
  (1) its replication sequence number (from ``<n>.state.txt`` beside it, else from the
  replication path) is not greater than the extract's ``osmosis_replication_sequence_number``
  header (or the previous file's in the same batch), or, when either number is unknown,
  (2) it holds at least one object that the extract also holds (both with a version) and none of
  those objects is newer than the extract's: a greater version, or the same version with a
  later timestamp (the order libosmium's merge uses to pick the copy it keeps). Objects the
  extract lacks (creations, objects outside the extract) do not count either way: a file
  overlapping the extract in part (normal at the start of a replication stream) is applied,
  and the merge keeps the newer copy of each object. Timestamps alone are not compared with
  the extract's date: edits committed late carry timestamps older than the replication
  cut-off, so such a rule would refuse valid minutely diffs.
* Header: the new PBF has the region's box as its bounding box (partitions are derived from
  it), keeps the base's replication base URL, and gets the sequence number and
  ``osmosis_replication_timestamp`` of the last applied file when its ``state.txt`` (or
  replication path, for the number) tells them.

Regions
-------
Extracts stay regional, as Geofabrik-style regional updates (a fresh ``osmium extract`` of the
updated data) do. The region is the original source's header box, or its nodes' extent when
the header has none (``osm_extract.source_bbox``), recorded in the ledger on first use.

1. A new change file is applied to a source only if it concerns the region
   (``_files_in_region``): one of its objects is held by the extract (its change or deletion
   must apply, it may also move out), or is a node whose new location is inside the box, a way
   with a node inside the box (locations after the file), or a relation with such a node or
   way, or a held object, as member. Otherwise it is recorded in the ledger's ``outside`` list
   and in ``ChangeResult.outside`` (skipped, not reconsidered, on later runs); the extract is
   not rewritten. ``files_outside_every_source`` names the files no source took.
2. The files that concern it are merged onto the current extract (below) and the merged file
   is cut back to the box by the rule of ``osmium extract --strategy smart``, done in pyosmium
   (``_cut``: no osmium-tool needed): nodes inside the box; ways
   with at least one node inside, with all their nodes (a way crossing the border is kept
   whole); relations with a member kept so far and their parent relations; multipolygon
   relations with such a member complete. Created objects wholly outside are therefore not
   added, and an object moved out of the region (a node used by no kept way) leaves it.
   Cutting after merging, rather than filtering the change objects, is exact by construction:
   the same rule as an extract made from scratch, including effects on objects the change
   files do not hold (a way whose only inside node moved out). Both bundled extracts are fixed
   points of this cut (checked against osmium-tool's cut, and by the tests against the cut
   here), so a first refresh changes nothing else; an extract holding more than the smart box
   cut keeps (data beyond its header box) loses that at its first refresh, and the cells of
   everything the cut removed are touched (``_removed_by_cut``, from the objects the cut's
   writing pass left out).
3. Touched cells are reported only within the region's level-6 cover: no other partition
   reads this source.

Touched cells
-------------
Level-6 cells whose features may change: old and new locations of changed and deleted nodes;
for each affected way (changed, or in the base and using a changed node) the cells of its
vertices in the old and in the new state; for each affected relation (changed, or a
multipolygon/boundary relation using a changed node or an affected way) the cells of its member
nodes and of the vertices of its member ways, old and new (nested relations are not followed;
members missing from a clipped extract are skipped). A way or relation whose vertices span more
than one cell also touches every cell meeting their lat/lng bounding box, because its segment
midpoints and its area's representative point can lie in a cell holding none of its vertices.
Each file's cells are computed against the state after the files before it, so the batch's
cells are the union of the per-file cells recorded in the ledger. Only cells of the source's
region (the level-6 cover of its box) are kept: see "Regions".

Performance
-----------
The merge is libosmium's, in C++ end to end (``apply_to_reader`` streams the base and the sorted
changes into an ``osmium.io.Writer``): no Python object is written, so the ~1 MB/s of
``SimpleWriter`` does not apply and osmium-tool's ``apply-changes`` (the same libosmium code)
would not be faster. Python work: one read of the base's relations, one read of its nodes and
ways (node locations go to a C++ ``flex_mem`` index; Python sees every way's node list and,
unless the changed nodes are too scattered for a small C++ id filter, only the changed nodes),
and the change files. Measured on this machine: a few-object change on the bundled 0.7 MB
extracts ~0.35-0.45 s; 3,000 moved nodes and 500 changed ways on Helsinki ~1.1 s, ~110 MB
peak RSS for the whole process. Scaling those rates (~2-3 MB/s of PBF for the way pass and
the merge), an extract of tens of MB takes tens of seconds and ~16 B per node of index memory.
For continent-sized files (GBs) the Python way pass and the in-memory index are too slow and
big: run ``osmium apply-changes`` (osmium-tool) for the merge, find affected ways and relations
with ``osmium getparents`` and node locations from a persistent on-disk index
(``sparse_file_array``), and keep this ledger.

The region cut (two reads of the merged file, Python id sets) dominates small updates:
measured on this shared 2-core machine (load ~6), a one-node change took 1.4 s on Helsinki and
1.6 s on Monaco in all, at ~155 MiB peak RSS for the whole process (osmium-tool's cut, used
before, took ~1.2 s for the cut alone but peaked at 1.7-2.5 GB: its dense id sets grow with the
spread of the ids). It grows with the extract: 14 s (9.7 s selection, 4.5 s writing) for
Helsinki tiled 16 times (8.2 MB) at load 9; C++ id sets (``osmium.IdTracker``) would be the
next step. A batch that only moves or creates nodes inside the region, on an extract that
came out of a cut, skips it (``_cut_is_a_no_op``): the nightly case of small edits pays the
cut once, at the first batch. A change file
outside the region costs no cut.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import osmium
import osmium.io

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL
from s2vec_pipeline.errors import InvalidSourceError, S2VecError
from s2vec_pipeline.osm.extract import source_bbox, validate_source
from s2vec_pipeline.storage import fs
from s2vec_pipeline.storage.locks import exclusive
from s2vec_pipeline.storage.versioning import file_sha256

__all__ = [
    "LEDGER_FORMAT",
    "SOURCES_DIR",
    "AppliedChange",
    "ChangeFileError",
    "ChangeLedgerError",
    "ChangeResult",
    "StaleChangeError",
    "apply_changes",
    "applied_changes",
    "change_file_name",
    "current_extract",
    "files_outside_every_source",
    "list_change_files",
    "outside_changes",
    "read_ledger",
    "replication_sequence",
    "reset_source",
    "source_dir",
    "source_id",
]

SOURCES_DIR = "_sources"
LEDGER_NAME = "ledger.json"
LEDGER_FORMAT = 1
CHANGE_SUFFIXES = (".osc", ".osc.gz")
AREA_RELATION_TYPES = frozenset({"multipolygon", "boundary"})  # what osmium assembles as areas
LOCATION_STORE = "flex_mem"  # node location index: sparse for extracts, dense for planets
_DENSE_FILTER_BLOCKS = 64  # IdFilter for changed nodes if it costs at most 64 x 512 KB
GENERATOR = "s2vec_pipeline.osm.changes"

_REPLICATION_PATH = re.compile(r"^(\d{3})/(\d{3})/(\d{3})\.osc(?:\.gz)?$")
_ROOT_ELEMENT = re.compile(rb"<(osmChange|osm)[\s>/]")
_DIGITS = re.compile(r"(\d+)")
_TMP_MARK = ".tmp-"
COORDINATE_PRECISION = 10_000_000  # osmium's fixed-point coordinates: 1e-7 degrees

logger = logging.getLogger(__name__)


class ChangeFileError(InvalidSourceError):
    """A change file is missing, not an osmChange document, truncated or corrupt."""


class StaleChangeError(S2VecError):
    """A change file is older than (or already contained in) the extract it would update."""


class ChangeLedgerError(S2VecError):
    """The ledger disagrees with the files: renamed or altered change files, a changed source."""


@dataclass(frozen=True)
class AppliedChange:
    """One ledger entry: a change file that has been merged into the source's extract."""

    name: str
    sha256: str
    size: int
    applied_at: str
    cells: tuple[str, ...]
    sequence: int | None
    batch: int
    path: str


@dataclass(frozen=True)
class ChangeResult:
    """What ``apply_changes`` did. ``extract`` is the file the pipeline should now read."""

    extract: Path
    applied: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    touched_cells: list[str] = field(default_factory=list)
    # New change files holding nothing in the source's region: recorded, not applied.
    outside: list[Path] = field(default_factory=list)


def files_outside_every_source(results: Iterable[ChangeResult]) -> list[Path]:
    """The change files that were outside the region of every source they were new to (the
    ``outside`` lists of one refresh's results, minus files any source applied)."""
    results = list(results)
    applied = {p for r in results for p in r.applied}
    seen: dict[Path, None] = {}
    for r in results:
        for p in r.outside:
            if p not in applied:
                seen.setdefault(p, None)
    return list(seen)


# ---------------------------------------------------------------------------------------------
# Change files: listing, names, sequence numbers
# ---------------------------------------------------------------------------------------------
def _is_change_file(path: Path) -> bool:
    return path.name.endswith(CHANGE_SUFFIXES) and not path.name.startswith(".")


def _natural_key(rel: str) -> list[Any]:
    parts = _DIGITS.split(rel.replace(os.sep, "/"))
    return [int(p) if k % 2 else p.lower() for k, p in enumerate(parts)]


def _change_stem(rel: str) -> str:
    return rel[: -len(".gz")] if rel.endswith(".gz") else rel


def list_change_files(folder: str | os.PathLike) -> list[Path]:
    """The ``.osc`` / ``.osc.gz`` files under ``folder`` (recursively) in replication order.

    Numbers in the path are compared as numbers, so ``000/001/002.osc.gz`` (sequence 1002) comes
    before ``000/001/010.osc.gz`` and ``day-9.osc`` before ``day-10.osc``. The same change both
    plain and gzipped (``7.osc`` and ``7.osc.gz``) is refused: it would be applied twice.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ChangeFileError(f"change folder {root} does not exist or is not a folder")
    found = [p for p in root.rglob("*") if p.is_file() and _is_change_file(p)]
    rel = {p: p.relative_to(root).as_posix() for p in found}
    by_stem: dict[str, Path] = {}
    for p in found:
        other = by_stem.setdefault(_change_stem(rel[p]), p)
        if other is not p:
            raise ChangeFileError(
                f"change folder {root} holds the same change twice: {rel[other]} and {rel[p]}; "
                f"keep one of them"
            )
    return sorted(found, key=lambda p: (_natural_key(rel[p]), rel[p]))


def change_file_name(path: str | os.PathLike) -> str:
    """The name a change file is recorded under: ``000/123/456.osc.gz`` for the replication
    layout (a bare ``456.osc.gz`` is ambiguous across folders), otherwise the file name."""
    p = Path(path)
    tail = "/".join(p.parts[-3:])
    return tail if _REPLICATION_PATH.match(tail) else p.name


def replication_sequence(path: str | os.PathLike) -> int | None:
    """Sequence number of a change file: ``sequenceNumber`` of the ``<n>.state.txt`` beside it,
    else the number spelt by a replication path (``000/123/456.osc.gz`` -> 123456), else None."""
    state = _read_state(Path(path))
    if state.get("sequenceNumber", "").isdigit():
        return int(state["sequenceNumber"])
    m = _REPLICATION_PATH.match("/".join(Path(path).parts[-3:]))
    return int("".join(m.groups())) if m else None


def _state_path(path: Path) -> Path:
    name = path.name
    for suffix in (".osc.gz", ".osc"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".state.txt")
    return path.with_name(name + ".state.txt")


def _read_state(path: Path) -> dict[str, str]:
    """The Java-properties ``state.txt`` of a replication file ({} if there is none)."""
    try:
        text = _state_path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip().replace("\\:", ":")
    return out


# ---------------------------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------------------------
def _source_stem(source: Path) -> str:
    """A readable name for file names: the file name without ``.osm.pbf``, safe characters
    only, never empty and never starting with a dot (``...osm.pbf`` would give ``..``)."""
    name = source.name
    for suffix in (".osm.pbf", ".pbf"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:64] or "source"


def source_id(source: str | os.PathLike) -> str:
    """A source's identity under the root: ``<readable stem>-<12 hex digits of the sha256 of
    its resolved absolute path>``. Two files with the same name in different folders get
    different ids; the id is one plain path component."""
    path = Path(source).resolve()
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:12]
    return f"{_source_stem(path)}-{digest}"


def source_dir(root: str | os.PathLike, source: str | os.PathLike) -> Path:
    """Folder holding the ledger and updated extracts of one source: ``<root>/_sources/<id>/``
    (see ``source_id``). Nothing of a source is ever written outside it.

    On an object-store root this is a local working copy (osmium reads and writes local files)
    under the root's cache (``fs.local_cache``); the ledger and the current extract are
    kept on the store at ``<root>/_sources/<id>/`` and synchronized by ``_pull`` / ``_push``."""
    parent = fs.local_cache(root, SOURCES_DIR)
    sdir = parent / source_id(source)
    if sdir.parent != parent or sdir.name in ("", ".", ".."):  # by construction; kept as a guard
        raise ChangeLedgerError(f"source {source} maps to {sdir}, outside {parent}")
    return sdir


def read_ledger(root: str | os.PathLike, source: str | os.PathLike) -> dict[str, Any] | None:
    """The source's ledger as stored (see ``_new_ledger`` for the format), or None."""
    return _load_ledger(_pull(root, source, extract=False))


def _pull(root: str | os.PathLike, source: str | os.PathLike, extract: bool = True) -> Path:
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
        name = None  # _load_ledger reports the unreadable ledger
    if extract and name:
        local, there = sdir / name, fs.join(remote, name)
        size = fs.size(there)
        if size is not None and (not local.is_file() or local.stat().st_size != size):
            fs.download_file(there, local)
    fs.write_bytes(sdir / LEDGER_NAME, raw)
    return sdir


def _push(
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


def current_extract(root: str | os.PathLike, source: str | os.PathLike) -> Path:
    """The PBF the pipeline should read for ``source``: the newest updated extract under the
    root, or the original file when no change has been applied."""
    sdir = _pull(root, source)
    ledger = _load_ledger(sdir)
    if ledger is None or not ledger["extract"]:
        return Path(source)
    return sdir / ledger["extract"]


def reset_source(root: str | os.PathLike, source: str | os.PathLike) -> None:
    """Forget every applied change of ``source`` (ledger and updated extracts), e.g. after the
    original file was replaced by a fresh download. The original file is not touched."""
    sdir = source_dir(root, source)
    if fs.is_object_store(root):
        fs.delete_tree(fs.join(root, SOURCES_DIR, sdir.name))
    if not sdir.is_dir():
        return
    with _locked(sdir):
        for p in sdir.iterdir():
            if p.is_file() and p.name != ".lock":
                p.unlink()


def _new_ledger(source: Path, sha: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "format": LEDGER_FORMAT,
        "source": {
            "path": str(source),
            "sha256": sha,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        },
        "extract": None,  # file name inside the source folder; None = the original source
        "extract_sha256": None,
        "batches": 0,
        "replication": {"sequence": None, "timestamp": None},
        "applied": [],  # AppliedChange fields, in application order
        # Change files with nothing in the region: name, sha256, size, checked_at, path.
        "outside": [],
        # (min_lat, min_lng, max_lat, max_lng): what the updated extracts are cut back to.
        "region": None,
        "updated_at": None,
    }


def _load_ledger(sdir: Path) -> dict[str, Any] | None:
    path = sdir / LEDGER_NAME
    if not path.exists():
        return None
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChangeLedgerError(
            f"change ledger {path} cannot be read ({e}); restore it from a backup, or delete "
            f"{sdir} to start again from the original source"
        ) from e
    if not isinstance(ledger, dict) or ledger.get("format") != LEDGER_FORMAT:
        raise ChangeLedgerError(
            f"change ledger {path} is not a format-{LEDGER_FORMAT} ledger; delete {sdir} to start "
            f"again from the original source"
        )
    return ledger


def _write_json_atomic(path: Path, obj: Any) -> None:
    fs.write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(sdir: Path) -> Iterator[None]:
    """Exclusive lock on the source folder: two refreshes of one source never interleave."""
    with exclusive(sdir / ".lock"):
        yield


def _check_source(ledger: dict[str, Any], source: Path, sdir: Path) -> None:
    """The original must be the file the ledger's changes were applied to."""
    rec = ledger["source"]
    st = source.stat()
    if (str(source), st.st_size, st.st_mtime_ns) == (rec["path"], rec["size"], rec["mtime_ns"]):
        return
    sha, _ = file_sha256(source)
    if sha != rec["sha256"]:
        raise ChangeLedgerError(
            f"source {source} is not the file the changes in {sdir / LEDGER_NAME} were applied "
            f"to ({rec['path']}, sha256 {rec['sha256'][:12]}..., now {sha[:12]}...). If it is a "
            f"fresh download, start again from it with reset_source(root, source) (deletes "
            f"{sdir}); if it is another extract with the same file name, rename it"
        )
    rec.update(path=str(source), size=st.st_size, mtime_ns=st.st_mtime_ns)


def _remove_leftovers(sdir: Path, ledger: dict[str, Any] | None) -> None:
    """Temp files and extracts the ledger does not point at (a crash between rename and ledger
    write leaves one behind)."""
    keep = ledger["extract"] if ledger else None
    for p in sdir.iterdir():
        if not p.is_file():
            continue
        if _TMP_MARK in p.name or (p.name.endswith(".osm.pbf") and p.name != keep):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Reading change files
# ---------------------------------------------------------------------------------------------
Loc = tuple[float, float]  # (lat, lng)
Member = tuple[str, int]  # ("n" | "w" | "r", id)
# (version, timestamp): libosmium's merge keeps the object with the greater one (same version:
# newer timestamp), so "newer" means the same here.
Stamp = tuple[int, float]


def _stamp(obj: osmium.osm.OSMObject) -> Stamp:
    return (obj.version, obj.timestamp.timestamp())


@dataclass
class _ChangeFile:
    path: Path
    name: str
    sha256: str
    size: int
    sequence: int | None
    state_timestamp: str | None
    # Newest version of each object in the file, first item its Stamp; a state of None means
    # deleted.
    nodes: dict[int, tuple[Stamp, Loc | None]] = field(default_factory=dict)
    ways: dict[int, tuple[Stamp, tuple[int, ...] | None]] = field(default_factory=dict)
    rels: dict[int, tuple[Stamp, tuple[Member, ...] | None, bool]] = field(default_factory=dict)


def _check_root_element(path: Path) -> None:
    """Refuse an OSM data file (``<osm>``) named like a change file: osmium would read it as
    'modify everything', silently resurrecting deleted objects."""
    try:
        with path.open("rb") as raw:
            magic = raw.read(2)
        opener = gzip.open if magic == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            head = f.read(8192)
    except (OSError, EOFError) as e:
        raise ChangeFileError(
            f"change file {path} cannot be read ({e}): it is truncated or not gzip; download it "
            f"again"
        ) from e
    m = _ROOT_ELEMENT.search(head)
    if m and m.group(1) == b"osm":
        raise ChangeFileError(
            f"change file {path} is an OSM data file (<osm> root), not an osmChange file "
            f"(<osmChange> root): apply only .osc change files"
        )


def _read_change_file(path: Path, name: str, sha: str, size: int) -> _ChangeFile:
    """Read every object of a change file (this also proves it is complete and well-formed)."""
    _check_root_element(path)
    state = _read_state(path)
    cf = _ChangeFile(path, name, sha, size, replication_sequence(path), state.get("timestamp"))
    nodes, ways, rels = cf.nodes, cf.ways, cf.rels
    try:
        for obj in osmium.FileProcessor(str(path)):
            oid, deleted = obj.id, obj.deleted
            stamp = _stamp(obj)
            version = stamp[0]
            if oid < 0:
                raise ChangeFileError(
                    f"change file {path} holds {obj.type_str()}{oid} with a negative id: "
                    f"unsaved editor objects cannot be applied; upload them to OSM first"
                )
            if obj.is_node():
                if oid in nodes and nodes[oid][0] > stamp:
                    continue
                loc = None
                if not deleted:
                    location = obj.location
                    if not location.valid():
                        raise ChangeFileError(
                            f"change file {path}: node {oid} version {version} has no valid "
                            f"location; the file is malformed, download it again"
                        )
                    loc = (location.lat, location.lon)
                nodes[oid] = (stamp, loc)
            elif obj.is_way():
                if oid in ways and ways[oid][0] > stamp:
                    continue
                ways[oid] = (stamp, None if deleted else tuple(n.ref for n in obj.nodes))
            elif obj.is_relation():
                if oid in rels and rels[oid][0] > stamp:
                    continue
                members = None if deleted else tuple((m.type, m.ref) for m in obj.members)
                rels[oid] = (stamp, members, obj.tags.get("type") in AREA_RELATION_TYPES)
    except osmium.InvalidLocationError as e:  # not a RuntimeError: e.g. lat="999"
        raise ChangeFileError(
            f"change file {path} has a coordinate osmium cannot read ({e}); latitudes lie in "
            f"-90..90, longitudes in -180..180: fix or remove the file. Nothing was applied"
        ) from e
    except ValueError as e:  # e.g. id="99999999999999999999": "illegal id"
        raise ChangeFileError(
            f"change file {path} holds a value osmium cannot read ({e}); ids are 64-bit "
            f"integers: fix or remove the file. Nothing was applied"
        ) from e
    except RuntimeError as e:
        raise ChangeFileError(
            f"change file {path} is truncated or corrupt ({e}); download it again. Nothing was "
            f"applied"
        ) from e
    return cf


# ---------------------------------------------------------------------------------------------
# The base extract: objects the changes refer to
# ---------------------------------------------------------------------------------------------
class _Base:
    """What the changes need from the base extract: versions of changed objects, node
    locations (a C++ index of every node), the ways that are changed, use a changed node or
    belong to an area or changed relation, and the area and changed relations."""

    def __init__(self) -> None:
        self.node_stamps: dict[int, Stamp] = {}
        self.ways: dict[int, tuple[Stamp, tuple[int, ...]]] = {}
        self.rels: dict[int, tuple[Stamp, tuple[Member, ...], bool]] = {}
        self.locations: Any = None  # osmium.index.LocationTable

    def node_loc(self, nid: int) -> Loc | None:
        try:
            loc = self.locations.get(nid)
        except KeyError:  # not in the extract (clipped)
            return None
        return (loc.lat, loc.lon) if loc.valid() else None


def _load_base(path: Path, files: Sequence[_ChangeFile]) -> _Base:
    """Two reads of the base: its relations (few), then nodes and ways.

    osmium's ``IdTracker`` is not used: its id sets are dense bitmaps allocated in 512 KB blocks
    of 2^22 ids, and node ids (up to ~1.2e10) scattered over OSM's history touch a block each:
    tracking the 30k nodes of the Monaco extract took 1.2 GB. Here node locations go to a
    ``flex_mem`` location index (~16 B per node) filled in C++, and Python sees the ways (to find
    those using changed nodes) and only the changed nodes when they fall in at most
    ``_DENSE_FILTER_BLOCKS`` blocks (a C++ ``IdFilter``), else every node id.
    """
    changed_nodes = {nid for cf in files for nid in cf.nodes}
    changed_ways = {wid for cf in files for wid in cf.ways}
    changed_rels = {rid for cf in files for rid in cf.rels}
    base = _Base()
    for rel in osmium.FileProcessor(str(path), osmium.osm.RELATION):
        is_area = rel.tags.get("type") in AREA_RELATION_TYPES
        if is_area or rel.id in changed_rels:
            members = tuple((m.type, m.ref) for m in rel.members)
            base.rels[rel.id] = (_stamp(rel), members, is_area)
    member_ways = {
        ref for _, members, _ in base.rels.values() for kind, ref in members if kind == "w"
    }
    for cf in files:
        for _, members, _ in cf.rels.values():
            member_ways.update(ref for kind, ref in members or () if kind == "w")

    processor = osmium.FileProcessor(str(path), osmium.osm.NODE | osmium.osm.WAY).with_locations(
        LOCATION_STORE
    )
    if len({nid >> 22 for nid in changed_nodes}) <= _DENSE_FILTER_BLOCKS:
        processor.with_filter(osmium.filter.IdFilter(changed_nodes).enable_for(osmium.osm.NODE))
    stamps, ways = base.node_stamps, base.ways
    for obj in processor:  # the location index sees every node before the filter
        if obj.is_node():
            if obj.id in changed_nodes:
                stamps[obj.id] = _stamp(obj)
        else:
            refs = tuple(n.ref for n in obj.nodes)
            wid = obj.id
            if wid in changed_ways or wid in member_ways or not changed_nodes.isdisjoint(refs):
                ways[wid] = (_stamp(obj), refs)
    base.locations = processor.node_location_storage
    return base


# ---------------------------------------------------------------------------------------------
# Staleness
# ---------------------------------------------------------------------------------------------
def _effective_changes(
    files: Sequence[_ChangeFile], base: _Base, header_sequence: int | None
) -> list[_ChangeFile]:
    """Apply the staleness rule of the module docstring to each file in order, and return the
    files reduced to the objects that take effect: the merge keeps the greater (version,
    timestamp) of each object, so an object not newer than the extract's changes nothing and
    touches no cell."""
    seq = header_sequence
    stamps: dict[tuple[str, int], Stamp] = {}  # written by earlier files of the batch
    out: list[_ChangeFile] = []
    for cf in files:
        kept = _ChangeFile(cf.path, cf.name, cf.sha256, cf.size, cf.sequence, cf.state_timestamp)
        compared = newer = 0
        example = ""
        for kind, table, kept_table in (
            ("n", cf.nodes, kept.nodes),
            ("w", cf.ways, kept.ways),
            ("r", cf.rels, kept.rels),
        ):
            for oid, entry in table.items():
                old = stamps.get((kind, oid))
                if old is None:
                    if kind == "n":
                        old = base.node_stamps.get(oid)
                    elif oid in (base.ways if kind == "w" else base.rels):
                        old = (base.ways if kind == "w" else base.rels)[oid][0]
                new = entry[0]
                if old is not None and old[0] and new[0]:  # both have a version
                    compared += 1
                    if new <= old:
                        example = example or f"{kind}{oid} v{new[0]} (extract has v{old[0]})"
                        continue
                    newer += 1
                kept_table[oid] = entry
        if cf.sequence is not None and seq is not None:
            if cf.sequence <= seq:
                raise StaleChangeError(
                    f"change file {cf.path} has replication sequence {cf.sequence}, not after "
                    f"the extract's {seq}: it is already contained in the extract. Remove it from "
                    f"the change folder (or pass only newer files)"
                )
        elif compared and not newer:
            raise StaleChangeError(
                f"change file {cf.path} is older than the extract: none of the {compared} "
                f"objects it shares with the extract is newer there, e.g. {example}. It was "
                f"probably applied already or belongs before the extract's date; remove it"
            )
        if cf.sequence is not None:
            seq = cf.sequence
        for kind, table in (("n", kept.nodes), ("w", kept.ways), ("r", kept.rels)):
            for oid, entry in table.items():
                stamps[(kind, oid)] = entry[0]
        out.append(kept)
    return out


# ---------------------------------------------------------------------------------------------
# Touched cells
# ---------------------------------------------------------------------------------------------
class _Shapes:
    """Point sets ("shapes") per file; cells are computed in bulk at the end."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.lng: list[float] = []
        self.starts: list[int] = []
        self.file_of: list[int] = []

    def add(self, file_index: int, points: Iterable[Loc | None]) -> None:
        start = len(self.lat)
        for p in points:
            if p is not None:
                self.lat.append(p[0])
                self.lng.append(p[1])
        if len(self.lat) > start:
            self.starts.append(start)
            self.file_of.append(file_index)

    def cells_per_file(self, n_files: int) -> list[set[str]]:
        out: list[set[str]] = [set() for _ in range(n_files)]
        if not self.starts:
            return out
        lat = np.asarray(self.lat)
        lng = np.asarray(self.lng)
        ids = s2.latlng_to_cell_id(lat, lng, PARTITION_LEVEL)
        starts = np.asarray(self.starts)
        shape_of_point = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(lat))))
        file_of = np.asarray(self.file_of)
        tokens = s2.to_token(ids)
        for fi in range(n_files):
            out[fi].update(np.unique(tokens[file_of[shape_of_point] == fi]).tolist())
        multi = np.flatnonzero(np.minimum.reduceat(ids, starts) != np.maximum.reduceat(ids, starts))
        if len(multi):
            bounds = (
                np.minimum.reduceat(lat, starts),
                np.minimum.reduceat(lng, starts),
                np.maximum.reduceat(lat, starts),
                np.maximum.reduceat(lng, starts),
            )
            for k in multi.tolist():
                box = [float(b[k]) for b in bounds]
                if box[3] - box[1] > 180:  # crosses the antimeridian: the short way round
                    sel = slice(starts[k], starts[k + 1] if k + 1 < len(starts) else len(lat))
                    seg = lng[sel]
                    box[1], box[3] = float(seg[seg >= 0].min()), float(seg[seg < 0].max())
                # Edges are geodesics (clip.py): one bows poleward of its ends' latitudes by at
                # most sin(2 lat)/2 * dlng^2 / 8 (radians); pad both sides by twice that bound.
                dlng = math.radians((box[3] - box[1]) % 360.0)
                pad = math.degrees(dlng * dlng / 8.0) + 1e-7
                box[0], box[2] = max(box[0] - pad, -90.0), min(box[2] + pad, 90.0)
                out[int(file_of[k])].update(s2.to_token(s2.cover_bbox(*box)).tolist())
        return out


def _touched_cells(files: Sequence[_ChangeFile], base: _Base) -> list[set[str]]:
    """Level-6 cells each file touches (see the module docstring)."""
    node_ways: dict[int, set[int]] = defaultdict(set)
    member_rels: dict[Member, set[int]] = defaultdict(set)
    for wid, (_, refs) in base.ways.items():
        for ref in refs:
            node_ways[ref].add(wid)
    for rid, (_, members, _) in base.rels.items():
        for m in members:
            member_rels[m].add(rid)
    for cf in files:
        for wid, (_, refs) in cf.ways.items():
            for ref in refs or ():
                node_ways[ref].add(wid)
        for rid, (_, members, _) in cf.rels.items():
            for m in members or ():
                member_rels[m].add(rid)

    # State after the files processed so far (None = deleted), over the base.
    ov_nodes: dict[int, Loc | None] = {}
    ov_ways: dict[int, tuple[int, ...] | None] = {}
    ov_rels: dict[int, tuple[tuple[Member, ...], bool] | None] = {}

    def node_old(nid: int) -> Loc | None:
        if nid in ov_nodes:
            return ov_nodes[nid]
        return base.node_loc(nid)

    def way_old(wid: int) -> tuple[int, ...]:
        if wid in ov_ways:
            return ov_ways[wid] or ()
        entry = base.ways.get(wid)
        return entry[1] if entry else ()

    def rel_old(rid: int) -> tuple[tuple[Member, ...], bool]:
        if rid in ov_rels:
            return ov_rels[rid] or ((), False)
        entry = base.rels.get(rid)
        return (entry[1], entry[2]) if entry else ((), False)

    shapes = _Shapes()
    for fi, cf in enumerate(files):

        def node_new(nid: int, cf: _ChangeFile = cf) -> Loc | None:
            return cf.nodes[nid][1] if nid in cf.nodes else node_old(nid)

        def way_new(wid: int, cf: _ChangeFile = cf) -> tuple[int, ...]:
            return (cf.ways[wid][1] or ()) if wid in cf.ways else way_old(wid)

        def rel_new(rid: int, cf: _ChangeFile = cf) -> tuple[tuple[Member, ...], bool]:
            if rid in cf.rels:
                _, members, is_area = cf.rels[rid]
                return (members or (), is_area)
            return rel_old(rid)

        for nid in cf.nodes:
            shapes.add(fi, [node_old(nid)])
            shapes.add(fi, [node_new(nid)])

        ways = set(cf.ways)
        for nid in cf.nodes:
            for wid in node_ways.get(nid, ()):
                if nid in way_old(wid) or nid in way_new(wid):
                    ways.add(wid)
        for wid in ways:
            shapes.add(fi, [node_old(r) for r in way_old(wid)])
            shapes.add(fi, [node_new(r) for r in way_new(wid)])

        rels = set(cf.rels)
        for member in [("n", nid) for nid in cf.nodes] + [("w", wid) for wid in ways]:
            for rid in member_rels.get(member, ()):
                (old_m, old_area), (new_m, new_area) = rel_old(rid), rel_new(rid)
                if (old_area and member in old_m) or (new_area and member in new_m):
                    rels.add(rid)
        for rid in rels:
            for members, node_at, way_of in (
                (rel_old(rid)[0], node_old, way_old),
                (rel_new(rid)[0], node_new, way_new),
            ):
                points: list[Loc | None] = []
                for kind, ref in members:
                    if kind == "n":
                        points.append(node_at(ref))
                    elif kind == "w":
                        points.extend(node_at(r) for r in way_of(ref))
                shapes.add(fi, points)

        for nid, (_, loc) in cf.nodes.items():
            ov_nodes[nid] = loc
        for wid, (_, refs) in cf.ways.items():
            ov_ways[wid] = refs
        for rid, (_, members, is_area) in cf.rels.items():
            ov_rels[rid] = None if members is None else (members, is_area)
    return shapes.cells_per_file(len(files))


# ---------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------
Box = tuple[float, float, float, float]  # (min_lat, min_lng, max_lat, max_lng)


def _source_region(source: Path) -> Box:
    """The region of a source: its header box, or the extent of its nodes without one."""
    min_lat, min_lng, max_lat, max_lng = source_bbox(source)
    return (min_lat, min_lng, max_lat, max_lng)


def _inside(box: Box, loc: Loc | None) -> bool:
    if loc is None:
        return False
    min_lat, min_lng, max_lat, max_lng = box
    if not min_lat <= loc[0] <= max_lat:
        return False
    if min_lng <= max_lng:
        return min_lng <= loc[1] <= max_lng
    return loc[1] >= min_lng or loc[1] <= max_lng  # a box across the antimeridian


def _region_cells(box: Box) -> set[str]:
    return set(s2.to_token(s2.cover_bbox(*box, PARTITION_LEVEL)).tolist())


def _files_in_region(files: Sequence[_ChangeFile], base: _Base, box: Box) -> list[bool]:
    """Whether each (effective) file holds something for the region, in order.

    A file concerns the region when one of its objects is held by the extract (a change or
    deletion of it must apply: the object may also leave the region), or is a node whose new
    location is inside the box, a way with a node inside the box (locations after the file),
    or a relation with such a node or way, or a held object, as member. That is what
    ``osmium extract --strategy smart`` starts from (nodes inside, ways and relations using
    them); files concerning the region are merged and the result is cut back to it, files
    that do not are not applied at all.
    """
    held: set[tuple[str, int]] = set()  # added by earlier files of this batch
    nodes_new: dict[int, Loc | None] = {}
    ways_new: dict[int, tuple[int, ...] | None] = {}
    out: list[bool] = []

    def node_loc(nid: int) -> Loc | None:
        return nodes_new[nid] if nid in nodes_new else base.node_loc(nid)

    def way_refs(wid: int) -> tuple[int, ...]:
        if wid in ways_new:
            return ways_new[wid] or ()
        entry = base.ways.get(wid)
        return entry[1] if entry else ()

    def is_held(kind: str, oid: int) -> bool:
        if (kind, oid) in held:
            return True
        if kind == "n":
            return oid in base.node_stamps or base.node_loc(oid) is not None
        return oid in (base.ways if kind == "w" else base.rels)

    for cf in files:
        for nid, (_, loc) in cf.nodes.items():
            nodes_new[nid] = loc
        for wid, (_, refs) in cf.ways.items():
            ways_new[wid] = refs

        def way_inside(wid: int) -> bool:
            return any(_inside(box, node_loc(r)) for r in way_refs(wid))

        concerned = [("n", n) for n, (_, loc) in cf.nodes.items() if _inside(box, loc)]
        concerned += [("w", w) for w, (_, refs) in cf.ways.items() if refs and way_inside(w)]
        for rid, (_, members, _) in cf.rels.items():
            for kind, ref in members or ():
                if (
                    is_held(kind, ref)
                    or (kind == "n" and _inside(box, node_loc(ref)))
                    or (kind == "w" and way_inside(ref))
                ):
                    concerned.append(("r", rid))
                    break
        touches_held = any(
            is_held(kind, oid)
            for kind, table in (("n", cf.nodes), ("w", cf.ways), ("r", cf.rels))
            for oid in table
        )
        out.append(bool(concerned) or touches_held)
        if out[-1]:
            held.update(concerned)
    return out


def _osm_file(path: Path) -> osmium.io.File:
    """``path`` for osmium: the format from its name, PBF for our temp names (``…pbf.tmp-…``)."""
    return osmium.io.File(str(path), "pbf" if _TMP_MARK in path.name else "")


def _fixed(box: Box) -> tuple[int, int, int, int]:
    """The box in osmium's fixed-point coordinates (1e-7 degrees): min_x, min_y, max_x, max_y."""
    min_lat, min_lng, max_lat, max_lng = (round(v * COORDINATE_PRECISION) for v in box)
    return min_lng, min_lat, max_lng, max_lat


@dataclass
class _Cut:
    """What the smart cut keeps (ids by kind) and the objects it removes, as read."""

    nodes: set[int] = field(default_factory=set)
    ways: set[int] = field(default_factory=set)
    rels: set[int] = field(default_factory=set)
    removed_nodes: dict[int, Loc] = field(default_factory=dict)
    removed_ways: dict[int, list[int]] = field(default_factory=dict)
    removed_rels: list[list[tuple[str, int]]] = field(default_factory=list)


def _smart_selection(merged: Path, box: Box) -> _Cut:
    """The objects ``osmium extract --strategy smart`` keeps (default ``types=multipolygon``):
    nodes inside the box; ways with a node inside, with all their nodes; relations with a
    member node inside or a member way kept, and recursively their parent relations; for
    those of type multipolygon, all member nodes and ways, with the ways' nodes."""
    min_x, min_y, max_x, max_y = _fixed(box)
    inside: set[int] = set()
    ways: set[int] = set()
    way_nodes: dict[int, list[int]] = {}  # every way's node list: completion needs them
    members: dict[int, list[tuple[str, int]]] = {}
    matched: set[int] = set()
    extra_nodes: set[int] = set()
    extra_ways: set[int] = set()
    for obj in osmium.FileProcessor(_osm_file(merged)):
        if obj.is_node():
            loc = obj.location
            if loc.valid() and min_x <= loc.x <= max_x and min_y <= loc.y <= max_y:
                inside.add(obj.id)
        elif obj.is_way():
            refs = [n.ref for n in obj.nodes]
            way_nodes[obj.id] = refs
            if any(r in inside for r in refs):
                ways.add(obj.id)
        else:
            mem = [(m.type, m.ref) for m in obj.members]
            members[obj.id] = mem
            if any((t == "n" and r in inside) or (t == "w" and r in ways) for t, r in mem):
                matched.add(obj.id)
                if obj.tags.get("type") == "multipolygon":
                    extra_nodes.update(r for t, r in mem if t == "n")
                    extra_ways.update(r for t, r in mem if t == "w")
    parents: dict[int, set[int]] = {}
    for rid, mem in members.items():
        for t, r in mem:
            if t == "r":
                parents.setdefault(r, set()).add(rid)
    rels, todo = set(matched), list(matched)
    while todo:  # parent relations, recursively
        for parent in parents.get(todo.pop(), ()):
            if parent not in rels:
                rels.add(parent)
                todo.append(parent)
    nodes = inside | extra_nodes
    for wid in ways | extra_ways:
        nodes.update(way_nodes.get(wid, ()))
    return _Cut(nodes=nodes, ways=ways | extra_ways, rels=rels)


def _cut(merged: Path, out: Path, box: Box, options: dict[str, str]) -> _Cut:
    """The smart cut of ``merged`` to the region box (``_smart_selection``, in pyosmium: no
    osmium-tool needed), with the header ``options`` and the box as header bounds, fsynced.
    Returns the selection with the objects it removed."""
    cut = _smart_selection(merged, box)
    header = osmium.io.Header()
    min_lat, min_lng, max_lat, max_lng = box
    header.add_box(osmium.osm.Box(min_lng, min_lat, max_lng, max_lat))
    header.set("generator", GENERATOR)
    for key, value in options.items():
        header.set(key, value)
    writer = osmium.SimpleWriter(_osm_file(out), header=header, overwrite=True)
    try:
        for obj in osmium.FileProcessor(_osm_file(merged)):
            if obj.is_node():
                if obj.id in cut.nodes:
                    writer.add_node(obj)
                elif obj.location.valid():
                    cut.removed_nodes[obj.id] = (obj.location.lat, obj.location.lon)
            elif obj.is_way():
                if obj.id in cut.ways:
                    writer.add_way(obj)
                else:
                    cut.removed_ways[obj.id] = [n.ref for n in obj.nodes]
            elif obj.id in cut.rels:
                writer.add_relation(obj)
            else:
                cut.removed_rels.append([(m.type, m.ref) for m in obj.members])
    finally:
        writer.close()
    with out.open("rb") as f:
        os.fsync(f.fileno())
    return cut


def _cut_is_a_no_op(files: Sequence[_ChangeFile], box: Box) -> bool:
    """Whether cutting the merge would keep every object, so the cut can be skipped: the files
    only create or move nodes to locations inside the box (no deletion, no way or relation).

    Holds when the current extract came out of a cut (a cut is idempotent): inside nodes stay
    inside, so every kept way still has a node inside, every matched relation still matches,
    and the new nodes are inside. The original source may hold more than its box: its first
    batch is always cut.
    """
    return all(
        not cf.ways and not cf.rels and all(_inside(box, loc) for _, loc in cf.nodes.values())
        for cf in files
    )


def _removed_by_cut(cut: _Cut, files: Sequence[_ChangeFile], base: _Base) -> set[str]:
    """Level-6 cells of the objects the cut removed (in the merged file, not in the cut).

    Most are objects the change files moved out or created outside, already counted; the rest
    are objects of an extract that the smart box cut would not have kept (an extract made with
    another rule): their features go too, so their cells are touched. Locations come from the
    removed nodes, the change files and the base index.
    """
    changed_locs: dict[int, Loc | None] = {}
    for cf in files:
        changed_locs.update((nid, loc) for nid, (_, loc) in cf.nodes.items())

    def loc(nid: int) -> Loc | None:
        if nid in cut.removed_nodes:
            return cut.removed_nodes[nid]
        return changed_locs[nid] if nid in changed_locs else base.node_loc(nid)

    def way_refs(wid: int) -> list[int]:
        if wid in cut.removed_ways:
            return cut.removed_ways[wid]
        entry = base.ways.get(wid)
        return list(entry[1]) if entry else []

    shapes = _Shapes()
    for point in cut.removed_nodes.values():
        shapes.add(0, [point])
    for refs in cut.removed_ways.values():
        shapes.add(0, [loc(r) for r in refs])
    for members in cut.removed_rels:
        points: list[Loc | None] = []
        for kind, ref in members:
            if kind == "n":
                points.append(loc(ref))
            elif kind == "w":
                points.extend(loc(r) for r in way_refs(ref))
        shapes.add(0, points)
    return shapes.cells_per_file(1)[0]


# ---------------------------------------------------------------------------------------------
# Writing the merged extract
# ---------------------------------------------------------------------------------------------
_REPLICATION_KEYS = (
    "osmosis_replication_base_url",
    "osmosis_replication_sequence_number",
    "osmosis_replication_timestamp",
    "timestamp",
)


def _read_header(path: Path) -> tuple[osmium.osm.Box, dict[str, str], bool]:
    reader = osmium.io.Reader(str(path), osmium.osm.osm_entity_bits.NOTHING)
    try:
        header = reader.header()
        return (
            header.box(),
            {k: header.get(k, "") for k in _REPLICATION_KEYS},
            header.has_multiple_object_versions,
        )
    finally:
        reader.close()


def _merge(base: Path, changes: Sequence[Path], out: Path, header: osmium.io.Header) -> None:
    """C++ merge of the change files onto ``base`` into ``out`` (newest version wins)."""
    merger = osmium.MergeInputReader()
    for path in changes:
        merger.add_file(str(path))
    reader = osmium.io.Reader(str(base))
    writer = osmium.io.Writer(osmium.io.File(str(out), "pbf"), header, overwrite=True)
    try:
        merger.apply_to_reader(reader, writer, False)
    finally:
        reader.close()
        writer.close()
    with out.open("rb") as f:
        os.fsync(f.fileno())


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resolve_inputs(change_files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(change_files, str | os.PathLike):
        p = Path(change_files)
        if p.is_dir():
            return list_change_files(p)
        change_files = [p]
    out: list[Path] = []
    for f in change_files:
        p = Path(f)
        if not p.is_file():
            raise ChangeFileError(f"change file {p} does not exist or is not a file")
        if not p.name.endswith(CHANGE_SUFFIXES):
            raise ChangeFileError(
                f"change file {p} must be named *.osc or *.osc.gz (the name tells osmium the "
                f"format); rename it"
            )
        out.append(p)
    return out


def apply_changes(
    root: str | os.PathLike,
    source: str | os.PathLike,
    change_files: str | os.PathLike | Iterable[str | os.PathLike],
) -> ChangeResult:
    """Bring ``source`` up to date with the change files not applied yet, without touching it.

    ``change_files`` is a list of ``.osc``/``.osc.gz`` paths (applied in that order) or a folder
    (``list_change_files`` order). Returns the extract now current for the source, the files
    applied now and skipped as already applied, and the level-6 tokens the new changes touched:
    the partitions to recompute. Raises ``ChangeFileError`` (corrupt file), ``StaleChangeError``
    (file older than the extract) or ``ChangeLedgerError`` (renamed/altered files, changed
    source); in every error case nothing is applied.
    """
    src = validate_source(source).resolve()
    files = _resolve_inputs(change_files)
    sdir = source_dir(root, src)
    sdir.mkdir(parents=True, exist_ok=True)
    # An OS lock: on an object-store root it serializes the refreshes of one host (run the
    # nightly refresh from one place; see docs/deploying.md).
    with _locked(sdir):
        _pull(root, src)
        ledger = _load_ledger(sdir)
        if ledger is not None:
            _check_source(ledger, src, sdir)
        _remove_leftovers(sdir, ledger)
        current = sdir / ledger["extract"] if ledger and ledger["extract"] else src
        if not current.is_file():
            raise ChangeLedgerError(
                f"ledger {sdir / LEDGER_NAME} points at {current}, which is missing; delete "
                f"{sdir} (reset_source) to rebuild from the original source and all change files"
            )

        known = [*ledger["applied"], *ledger.get("outside", [])] if ledger else []
        by_name = {e["name"]: e for e in known}
        by_sha = {e["sha256"]: e for e in known}
        new: list[_ChangeFile] = []
        skipped: list[Path] = []
        for path in files:
            name = change_file_name(path)
            sha, size = file_sha256(path)
            prev = by_name.get(name)
            if prev is not None:
                if prev["sha256"] != sha:
                    when = prev.get("applied_at") or prev["checked_at"]
                    raise ChangeLedgerError(
                        f"change file {path} has the name {name!r} of a file recorded on "
                        f"{when} but other content (sha256 {sha[:12]}... vs "
                        f"{prev['sha256'][:12]}...). Change files must not be altered once "
                        f"applied: restore the original file, or reset_source and re-apply all"
                    )
                skipped.append(path)
                continue
            if sha in by_sha:
                when = by_sha[sha].get("applied_at") or by_sha[sha]["checked_at"]
                raise ChangeLedgerError(
                    f"change file {path} has the same content as {by_sha[sha]['name']!r}, "
                    f"recorded on {when}: remove the copy"
                )
            entry = {"name": name, "sha256": sha, "applied_at": "(this run)"}
            by_name[name] = by_sha[sha] = entry
            new.append(_ChangeFile(path, name, sha, size, None, None))
        if not new:
            return ChangeResult(extract=current, skipped=skipped)

        _, repl, history = _read_header(current)
        if history:
            raise InvalidSourceError(
                f"OSM source {current} is a history file (several versions per object): only "
                f"plain extracts can be updated with change files"
            )
        new = [_read_change_file(cf.path, cf.name, cf.sha256, cf.size) for cf in new]
        try:
            base = _load_base(current, new)
        except RuntimeError as e:
            raise InvalidSourceError(f"OSM source {current} cannot be read: {e}") from e
        base_seq = repl["osmosis_replication_sequence_number"]
        effective = _effective_changes(new, base, int(base_seq) if base_seq.isdigit() else None)

        if ledger is None:
            st = src.stat()
            ledger = _new_ledger(src, file_sha256(src)[0], st)
        ledger.setdefault("outside", [])
        if not ledger.get("region"):
            ledger["region"] = list(_source_region(src))
        region: Box = tuple(ledger["region"])  # type: ignore[assignment]
        in_region = _files_in_region(effective, base, region)
        inside = [cf for cf, keep in zip(effective, in_region, strict=True) if keep]
        outside = [cf for cf, keep in zip(effective, in_region, strict=True) if not keep]
        checked_at = _now()
        for cf in outside:
            logger.info(
                "change file %s holds nothing in the region of %s %s: not applied to it",
                cf.path,
                src,
                region,
            )
            ledger["outside"].append(
                {
                    "name": cf.name,
                    "sha256": cf.sha256,
                    "size": cf.size,
                    "checked_at": checked_at,
                    "path": str(cf.path.resolve()),
                }
            )
        if not inside:
            ledger["updated_at"] = checked_at
            _write_json_atomic(sdir / LEDGER_NAME, ledger)
            _push(root, sdir, None)
            return ChangeResult(
                extract=current, skipped=skipped, outside=[cf.path for cf in outside]
            )
        cells = _touched_cells(inside, base)
        region_cells = _region_cells(region)
        cells = [c & region_cells for c in cells]  # other cells never read this source

        batch = int(ledger["batches"]) + 1
        out = sdir / f"{_source_stem(src)}.{batch:06d}.osm.pbf"
        merged = out.with_name(f"{out.name}{_TMP_MARK}merged-{os.getpid()}")
        tmp = out.with_name(f"{out.name}{_TMP_MARK}{os.getpid()}")

        header = osmium.io.Header()
        options: dict[str, str] = {}
        base_seq = repl["osmosis_replication_sequence_number"]
        sequence = int(base_seq) if base_seq.isdigit() else None
        timestamp = repl["osmosis_replication_timestamp"] or None
        for cf in inside:  # the last file that tells them wins
            sequence = cf.sequence if cf.sequence is not None else sequence
            timestamp = cf.state_timestamp or timestamp
        if repl["osmosis_replication_base_url"]:
            options["osmosis_replication_base_url"] = repl["osmosis_replication_base_url"]
        if sequence is not None:
            options["osmosis_replication_sequence_number"] = str(sequence)
        if timestamp:
            options["osmosis_replication_timestamp"] = timestamp
            options["timestamp"] = timestamp
        for key, value in options.items():
            header.set(key, value)
        try:
            if int(ledger["batches"]) >= 1 and _cut_is_a_no_op(inside, region):
                # The merge is its own cut: write it with the cut's header directly.
                header.add_box(osmium.osm.Box(region[1], region[0], region[3], region[2]))
                header.set("generator", GENERATOR)
                _merge(current, [cf.path for cf in inside], tmp, header)
            else:
                _merge(current, [cf.path for cf in inside], merged, header)
                cut = _cut(merged, tmp, region, options)
                cells[-1] |= _removed_by_cut(cut, inside, base) & region_cells
            os.replace(tmp, out)
        except RuntimeError as e:
            raise ChangeFileError(
                f"merging {[str(cf.path) for cf in inside]} onto {current} failed ({e}); "
                f"nothing was applied"
            ) from e
        finally:
            merged.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        _fsync_dir(sdir)

        applied_at = _now()
        for cf, file_cells in zip(inside, cells, strict=True):
            ledger["applied"].append(
                {
                    "name": cf.name,
                    "sha256": cf.sha256,
                    "size": cf.size,
                    "applied_at": applied_at,
                    "cells": sorted(file_cells),
                    "sequence": cf.sequence,
                    "batch": batch,
                    "path": str(cf.path.resolve()),
                }
            )
        previous = ledger["extract"]
        ledger.update(
            extract=out.name,
            extract_sha256=file_sha256(out)[0],
            batches=batch,
            replication={"sequence": sequence, "timestamp": timestamp},
            updated_at=applied_at,
        )
        _write_json_atomic(sdir / LEDGER_NAME, ledger)
        _push(root, sdir, out.name, previous)
        if previous and previous != out.name:
            (sdir / previous).unlink(missing_ok=True)
        touched = sorted(set().union(*cells))
        return ChangeResult(
            extract=out,
            applied=[cf.path for cf in inside],
            skipped=skipped,
            touched_cells=touched,
            outside=[cf.path for cf in outside],
        )


def applied_changes(root: str | os.PathLike, source: str | os.PathLike) -> list[AppliedChange]:
    """The ledger's entries as objects, in application order (empty if none)."""
    ledger = read_ledger(root, source)
    if ledger is None:
        return []
    return [
        AppliedChange(
            name=e["name"],
            sha256=e["sha256"],
            size=e["size"],
            applied_at=e["applied_at"],
            cells=tuple(e["cells"]),
            sequence=e["sequence"],
            batch=e["batch"],
            path=e["path"],
        )
        for e in ledger["applied"]
    ]


def outside_changes(root: str | os.PathLike, source: str | os.PathLike) -> list[str]:
    """Names of the change files recorded as outside the source's region, in the order seen."""
    ledger = read_ledger(root, source)
    return [e["name"] for e in ledger.get("outside", [])] if ledger else []


def cell_source_version(
    root: str | os.PathLike, sources: Iterable[str | os.PathLike], cell: str
) -> str:
    """What the OSM data of one level-6 cell depends on: each covering source's identity (path,
    size, modification time) and the last applied change batch that touched the cell.

    A change file touching other cells leaves this version unchanged, so only the partitions a
    change really reaches are re-extracted.
    """
    parts = []
    for src in sorted(str(s) for s in sources):
        st = Path(src).stat()
        touched = [e.batch for e in applied_changes(root, src) if cell in e.cells]
        parts.append([src, st.st_size, st.st_mtime_ns, max(touched, default=0)])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
