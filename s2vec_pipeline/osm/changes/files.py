"""Change files (``.osc`` / ``.osc.gz``): listing in replication order, the names they are
recorded under, replication sequence numbers (``state.txt``), and reading every object of one
(which also proves it complete and well-formed)."""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import osmium

from s2vec_pipeline.errors import InvalidSourceError

CHANGE_SUFFIXES = (".osc", ".osc.gz")
AREA_RELATION_TYPES = frozenset({"multipolygon", "boundary"})  # what osmium assembles as areas

_REPLICATION_PATH = re.compile(r"^(\d{3})/(\d{3})/(\d{3})\.osc(?:\.gz)?$")
_ROOT_ELEMENT = re.compile(rb"<(osmChange|osm)[\s>/]")
_DIGITS = re.compile(r"(\d+)")


class ChangeFileError(InvalidSourceError):
    """A change file is missing, not an osmChange document, truncated or corrupt."""


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


Loc = tuple[float, float]  # (lat, lng)
Member = tuple[str, int]  # ("n" | "w" | "r", id)
# (version, timestamp): libosmium's merge keeps the object with the greater one (same version:
# newer timestamp), so "newer" means the same here.
Stamp = tuple[int, float]


def stamp_of(obj: osmium.osm.OSMObject) -> Stamp:
    return (obj.version, obj.timestamp.timestamp())


@dataclass
class ChangeFile:
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


def read_change_file(path: Path, name: str, sha: str, size: int) -> ChangeFile:
    """Read every object of a change file (this also proves it is complete and well-formed)."""
    _check_root_element(path)
    state = _read_state(path)
    cf = ChangeFile(path, name, sha, size, replication_sequence(path), state.get("timestamp"))
    nodes, ways, rels = cf.nodes, cf.ways, cf.rels
    try:
        for obj in osmium.FileProcessor(str(path)):
            oid, deleted = obj.id, obj.deleted
            stamp = stamp_of(obj)
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


def resolve_inputs(change_files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
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
