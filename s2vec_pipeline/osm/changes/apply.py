"""``apply_changes``: bring a source's updated extract up to date with new change files, in
named steps (open the ledger, pick the new files, read and check them, split them by region,
merge and cut, commit the ledger). See the package docstring for the rules."""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import osmium
import osmium.io

from s2vec_pipeline.errors import InvalidSourceError
from s2vec_pipeline.osm.changes import region as rg
from s2vec_pipeline.osm.changes.base import Base, effective_changes, load_base
from s2vec_pipeline.osm.changes.cells import region_cells, removed_by_cut, touched_cells
from s2vec_pipeline.osm.changes.files import (
    ChangeFile,
    ChangeFileError,
    change_file_name,
    read_change_file,
    resolve_inputs,
)
from s2vec_pipeline.osm.changes.ledger import (
    LEDGER_NAME,
    TMP_MARK,
    AppliedChange,
    ChangeLedgerError,
    Ledger,
    OutsideChange,
    Replication,
    check_source,
    load_ledger,
    locked,
    pull,
    push,
    remove_leftovers,
    save_ledger,
    source_dir,
)
from s2vec_pipeline.osm.extract import validate_source
from s2vec_pipeline.storage import fs
from s2vec_pipeline.storage.file_identity import file_stem
from s2vec_pipeline.storage.versioning import file_sha256

logger = logging.getLogger("s2vec_pipeline.osm.changes")

_REPLICATION_KEYS = (
    "osmosis_replication_base_url",
    "osmosis_replication_sequence_number",
    "osmosis_replication_timestamp",
    "timestamp",
)


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
    files = resolve_inputs(change_files)
    sdir = source_dir(root, src)
    sdir.mkdir(parents=True, exist_ok=True)
    # An OS lock: on an object-store root it serializes the refreshes of one host (run the
    # nightly refresh from one place; see docs/deploying.md).
    with locked(sdir):
        ledger, current = _open(root, src, sdir)
        new, skipped = _new_files(files, ledger)
        if not new:
            return ChangeResult(extract=current, skipped=skipped)
        effective, base, repl = _read_batch(current, new)
        ledger = ledger or Ledger.new(src)
        if ledger.region is None:
            ledger.region = rg.source_region(src)
        in_region = rg.files_in_region(effective, base, ledger.region)
        inside = [cf for cf, keep in zip(effective, in_region, strict=True) if keep]
        outside = [cf for cf, keep in zip(effective, in_region, strict=True) if not keep]
        _record_outside(ledger, outside, src)
        if not inside:
            save_ledger(sdir, ledger)
            push(root, sdir, None)
            return ChangeResult(
                extract=current, skipped=skipped, outside=[cf.path for cf in outside]
            )
        out = sdir / f"{file_stem(src)}.{ledger.batches + 1:06d}.osm.pbf"
        cells = _write_extract(current, inside, base, out, ledger, repl)
        _commit(root, sdir, ledger, inside, cells, out, repl)
        return ChangeResult(
            extract=out,
            applied=[cf.path for cf in inside],
            skipped=skipped,
            touched_cells=sorted(set().union(*cells)),
            outside=[cf.path for cf in outside],
        )


def _open(root: str | os.PathLike, src: Path, sdir: Path) -> tuple[Ledger | None, Path]:
    """The source's ledger (checked against the source; leftovers of a crash removed) and the
    extract the new changes go onto."""
    pull(root, src)
    ledger = load_ledger(sdir)
    if ledger is not None:
        check_source(ledger, src, sdir)
    remove_leftovers(sdir, ledger)
    current = sdir / ledger.extract if ledger and ledger.extract else src
    if not current.is_file():
        raise ChangeLedgerError(
            f"ledger {sdir / LEDGER_NAME} points at {current}, which is missing; delete "
            f"{sdir} (reset_source) to rebuild from the original source and all change files"
        )
    return ledger, current


def _new_files(files: Sequence[Path], ledger: Ledger | None) -> tuple[list[ChangeFile], list[Path]]:
    """The files not recorded yet (named, hashed, not read) and those recorded already. A
    recorded name with other content, or recorded content under a new name, is an error."""
    known: list[AppliedChange | OutsideChange] = (
        [*ledger.applied, *ledger.outside] if ledger else []
    )
    by_name: dict[str, tuple[str, str]] = {e.name: (e.sha256, e.recorded_at) for e in known}
    by_sha: dict[str, tuple[str, str]] = {e.sha256: (e.name, e.recorded_at) for e in known}
    new: list[ChangeFile] = []
    skipped: list[Path] = []
    for path in files:
        name = change_file_name(path)
        sha, size = file_sha256(path)
        if name in by_name:
            old_sha, when = by_name[name]
            if old_sha != sha:
                raise ChangeLedgerError(
                    f"change file {path} has the name {name!r} of a file recorded on "
                    f"{when} but other content (sha256 {sha[:12]}... vs "
                    f"{old_sha[:12]}...). Change files must not be altered once "
                    f"applied: restore the original file, or reset_source and re-apply all"
                )
            skipped.append(path)
            continue
        if sha in by_sha:
            old_name, when = by_sha[sha]
            raise ChangeLedgerError(
                f"change file {path} has the same content as {old_name!r}, "
                f"recorded on {when}: remove the copy"
            )
        by_name[name] = (sha, "(this run)")
        by_sha[sha] = (name, "(this run)")
        new.append(ChangeFile(path, name, sha, size, None, None))
    return new, skipped


def _read_batch(
    current: Path, new: Sequence[ChangeFile]
) -> tuple[list[ChangeFile], Base, dict[str, str]]:
    """Read every new file in full and what they need of the current extract; returns the
    files reduced to the objects that take effect (staleness checked), the base and the
    extract's replication header fields."""
    repl, history = _read_header(current)
    if history:
        raise InvalidSourceError(
            f"OSM source {current} is a history file (several versions per object): only "
            f"plain extracts can be updated with change files"
        )
    files = [read_change_file(cf.path, cf.name, cf.sha256, cf.size) for cf in new]
    try:
        base = load_base(current, files)
    except RuntimeError as e:
        raise InvalidSourceError(f"OSM source {current} cannot be read: {e}") from e
    seq = repl["osmosis_replication_sequence_number"]
    return effective_changes(files, base, int(seq) if seq.isdigit() else None), base, repl


def _record_outside(ledger: Ledger, outside: Sequence[ChangeFile], src: Path) -> None:
    checked_at = _now()
    for cf in outside:
        logger.info(
            "change file %s holds nothing in the region of %s %s: not applied to it",
            cf.path,
            src,
            ledger.region,
        )
        ledger.outside.append(
            OutsideChange(
                name=cf.name,
                sha256=cf.sha256,
                size=cf.size,
                checked_at=checked_at,
                path=str(cf.path.resolve()),
            )
        )
    ledger.updated_at = checked_at


def _replication(repl: dict[str, str], files: Sequence[ChangeFile]) -> Replication:
    """The new extract's sequence number and timestamp: those of the last file that tells them,
    else the current extract's."""
    seq = repl["osmosis_replication_sequence_number"]
    sequence = int(seq) if seq.isdigit() else None
    timestamp = repl["osmosis_replication_timestamp"] or None
    for cf in files:
        sequence = cf.sequence if cf.sequence is not None else sequence
        timestamp = cf.state_timestamp or timestamp
    return Replication(sequence=sequence, timestamp=timestamp)


def _header_options(repl: dict[str, str], files: Sequence[ChangeFile]) -> dict[str, str]:
    """Header fields of the new extract: the base URL kept, sequence and timestamp updated."""
    state = _replication(repl, files)
    options: dict[str, str] = {}
    if repl["osmosis_replication_base_url"]:
        options["osmosis_replication_base_url"] = repl["osmosis_replication_base_url"]
    if state.sequence is not None:
        options["osmosis_replication_sequence_number"] = str(state.sequence)
    if state.timestamp:
        options["osmosis_replication_timestamp"] = state.timestamp
        options["timestamp"] = state.timestamp
    return options


def _write_extract(
    current: Path,
    inside: Sequence[ChangeFile],
    base: Base,
    out: Path,
    ledger: Ledger,
    repl: dict[str, str],
) -> list[set[str]]:
    """Merge the files onto the current extract and cut the result back to the region into
    ``out`` (atomically); returns the level-6 cells each file touched within the region (the
    last file also carries the cells of what the cut removed)."""
    region = ledger.region
    assert region is not None
    within = region_cells(region)
    cells = [c & within for c in touched_cells(inside, base)]  # others never read this source
    merged = out.with_name(f"{out.name}{TMP_MARK}merged-{os.getpid()}")
    options = _header_options(repl, inside)
    header = osmium.io.Header()
    for key, value in options.items():
        header.set(key, value)
    paths = [cf.path for cf in inside]
    try:
        with fs.replacing(out) as tmp:
            if ledger.batches >= 1 and rg.cut_is_a_no_op(inside, region):
                # The merge is its own cut: write it with the cut's header directly.
                header.add_box(osmium.osm.Box(region[1], region[0], region[3], region[2]))
                header.set("generator", rg.GENERATOR)
                merge(current, paths, tmp, header)
            else:
                merge(current, paths, merged, header)
                selection = rg.cut(merged, tmp, region, options)
                cells[-1] |= removed_by_cut(selection, inside, base) & within
    except RuntimeError as e:
        raise ChangeFileError(
            f"merging {[str(p) for p in paths]} onto {current} failed ({e}); nothing was applied"
        ) from e
    finally:
        merged.unlink(missing_ok=True)
    return cells


def _commit(
    root: str | os.PathLike,
    sdir: Path,
    ledger: Ledger,
    inside: Sequence[ChangeFile],
    cells: Sequence[set[str]],
    out: Path,
    repl: dict[str, str],
) -> None:
    """Record the batch in the ledger (the commit point), upload it to an object store, then
    delete the extract it replaced."""
    applied_at = _now()
    batch = ledger.batches + 1
    for cf, file_cells in zip(inside, cells, strict=True):
        ledger.applied.append(
            AppliedChange(
                name=cf.name,
                sha256=cf.sha256,
                size=cf.size,
                applied_at=applied_at,
                cells=tuple(sorted(file_cells)),
                sequence=cf.sequence,
                batch=batch,
                path=str(cf.path.resolve()),
            )
        )
    previous = ledger.extract
    ledger.extract = out.name
    ledger.extract_sha256 = file_sha256(out)[0]
    ledger.batches = batch
    ledger.replication = _replication(repl, inside)
    ledger.updated_at = applied_at
    save_ledger(sdir, ledger)
    push(root, sdir, out.name, previous)
    if previous and previous != out.name:
        (sdir / previous).unlink(missing_ok=True)


def _read_header(path: Path) -> tuple[dict[str, str], bool]:
    """The replication fields of a PBF's header, and whether it is a history file."""
    reader = osmium.io.Reader(str(path), osmium.osm.osm_entity_bits.NOTHING)
    try:
        header = reader.header()
        fields = {k: header.get(k, "") for k in _REPLICATION_KEYS}
        return fields, header.has_multiple_object_versions
    finally:
        reader.close()


def merge(base: Path, changes: Sequence[Path], out: Path, header: osmium.io.Header) -> None:
    """C++ merge of the change files onto ``base`` into ``out`` as PBF (newest version wins)."""
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


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
