"""Maintenance of every Delta table under a storage root: compact, vacuum, remove leftovers.

Each partition write adds at least one small file per partition, and every overwrite leaves the
replaced files on disk (older versions still reference them). :func:`maintain_root` walks the
Delta tables under a root and, for each:

1. compacts small files into larger ones (``optimize.compact``, one commit, with the Parquet
   settings of the table's writes, ``tables.writer_properties``; a conflict with a concurrent
   writer is retried like any commit, see ``delta_store.retry_commit``);
2. vacuums (``vacuum(full=True)``) files no version within the retention references, and files
   no version references at all (those of failed or killed writes) once older than the
   retention;
3. deletes the ``*.parquet#N`` staging files a killed write left (vacuum never deletes them)
   and, under ``<root>/_staging/``, the replay copies of killed streamed writes, both once older
   than the retention;
4. checkpoints the table (``delta_store.settle_log``), first giving a table created before
   ``delta_store.CHECKPOINT_INTERVAL`` existed that interval: later loads replay no commit;

and reports the files and bytes on disk before and after, per table.

**Retention and concurrent writers.** A running write's data files exist on disk, untracked,
until its commit; a reader pinned to an older version (training reads ``raster_tiles`` at one
version, time travel) needs the files that later versions removed. Vacuum deletes both kinds
once older than the retention, so the retention must exceed the longest write plus the longest
pinned read. The default is Delta's own default, 7 days (168 h): maintenance can then run
at any time, beside any number of writers and readers. A file replaced today is deleted by the
first maintenance a week from now, so disk usage drops one cycle late. A shorter retention is
accepted (``retention_hours=0`` deletes everything unreferenced now: tests, a quiet root) and is
only safe when nothing else writes or reads older versions of the root meanwhile.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.storage import delta_store, fs, tables
from s2vec_pipeline.storage.locks import exclusive

DEFAULT_RETENTION_HOURS = 168  # Delta's default deletedFileRetentionDuration (7 days)


@dataclass(frozen=True)
class TableMaintenance:
    """What maintenance did to one table. Files and bytes count everything on disk under the
    table's directory (data, staging leftovers and ``_delta_log``); ``active_files`` are the
    data files the current version references."""

    table: str
    version_before: int
    version_after: int
    files_before: int
    bytes_before: int
    files_after: int
    bytes_after: int
    active_files_before: int
    active_files_after: int
    compacted_removed: int  # small files compaction replaced ...
    compacted_added: int  # ... by these
    vacuumed: int  # unreferenced files deleted by vacuum
    staging_removed: int  # ``*.parquet#N`` leftovers of killed writes deleted

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def disk_usage(path: str | os.PathLike) -> tuple[int, int]:
    """(files, bytes) of every regular file under ``path`` (objects under an object-store
    prefix)."""
    if fs.is_object_store(path):
        entries = fs.list_files(path)
        return len(entries), sum(e.size for e in entries)
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                files += 1
                size += os.path.getsize(p)
    return files, size


def _vacuum(root: str | os.PathLike, name: str, retention_hours: float) -> int:
    """Vacuum (full) and return how many files it deleted.

    delta-rs lists expired tombstones again on every later vacuum, files long gone included,
    and each vacuum adds two commits: only vacuum when a listed file is still on disk, and only
    count those.
    """
    present = {e.relative for e in fs.list_files(delta_store.table_uri(root, name))}
    if not present.intersection(delta_store.vacuum(root, name, retention_hours, dry_run=True)):
        return 0
    return len(present.intersection(delta_store.vacuum(root, name, retention_hours)))


def maintain_table(
    root: str | os.PathLike, name: str, retention_hours: float = DEFAULT_RETENTION_HOURS
) -> TableMaintenance:
    """Compact, vacuum and clean one table (see the module docstring); returns the report."""
    uri = delta_store.table_uri(root, name)
    with delta_store.storage_errors(root, name, action="maintain table"):
        files_before, bytes_before = disk_usage(uri)
        version_before = delta_store.table_version(root, name)
        active_before = len(delta_store.data_files(root, name))
        metrics = delta_store.compact(root, name, tables.writer_properties(name))
        vacuumed = _vacuum(root, name, retention_hours)
        staging = delta_store.remove_staging_leftovers(root, name, retention_hours)
        delta_store.settle_log(root, name)
        files_after, bytes_after = disk_usage(uri)
        return TableMaintenance(
            table=name,
            version_before=version_before,
            version_after=delta_store.table_version(root, name),
            files_before=files_before,
            bytes_before=bytes_before,
            files_after=files_after,
            bytes_after=bytes_after,
            active_files_before=active_before,
            active_files_after=len(delta_store.data_files(root, name)),
            compacted_removed=int(metrics.get("numFilesRemoved", 0)),
            compacted_added=int(metrics.get("numFilesAdded", 0)),
            vacuumed=vacuumed,
            staging_removed=len(staging),
        )


def maintain_root(
    root: str | os.PathLike, retention_hours: float = DEFAULT_RETENTION_HOURS
) -> list[TableMaintenance]:
    """Maintain every Delta table under ``root`` (one maintenance at a time per root).

    Also deletes the replay copies of killed streamed writes under ``<root>/_staging/`` older
    than the retention; the report row ``_staging`` counts them (files and bytes before/after).
    """
    if retention_hours < 0:
        raise S2VecError(f"retention must be at least 0 hours, got {retention_hours}")
    if not fs.is_dir(root):
        raise S2VecError(f"storage root {root} does not exist: nothing to maintain")
    # OS lock and staging copies are local files (for an object-store root: its local cache)
    with exclusive(fs.local_cache(root, ".maintenance.lock")):
        tables = delta_store.list_tables(root)
        reports = [maintain_table(root, name, retention_hours) for name in tables]
        staging_dir = delta_store.replay_dir(root)
        if staging_dir.is_dir() and any(staging_dir.iterdir()):
            with delta_store.storage_errors(root, delta_store.STAGING_DIR, action="clean"):
                files_before, bytes_before = disk_usage(staging_dir)
                old = delta_store.remove_replay_copies(root, retention_hours)
                files_after, bytes_after = disk_usage(staging_dir)
            reports.append(
                TableMaintenance(
                    table=delta_store.STAGING_DIR,
                    version_before=-1,
                    version_after=-1,
                    files_before=files_before,
                    bytes_before=bytes_before,
                    files_after=files_after,
                    bytes_after=bytes_after,
                    active_files_before=0,
                    active_files_after=0,
                    compacted_removed=0,
                    compacted_added=0,
                    vacuumed=0,
                    staging_removed=len(old),
                )
            )
    return reports


def format_report(reports: list[TableMaintenance]) -> str:
    """A plain-text table of the reports, one line per table and a total line."""
    head = (
        f"{'table':<18} {'files before':>12} {'after':>7} {'MB before':>10} {'after':>8} "
        f"{'active':>11} {'compacted':>10} {'vacuumed':>9} {'staging':>8}"
    )
    lines = [head]
    for r in reports:
        lines.append(
            f"{r.table:<18} {r.files_before:>12} {r.files_after:>7} "
            f"{r.bytes_before / 1e6:>10.2f} {r.bytes_after / 1e6:>8.2f} "
            f"{f'{r.active_files_before}->{r.active_files_after}':>11} "
            f"{f'{r.compacted_removed}->{r.compacted_added}':>10} {r.vacuumed:>9} "
            f"{r.staging_removed:>8}"
        )
    fb = sum(r.files_before for r in reports)
    fa = sum(r.files_after for r in reports)
    bb = sum(r.bytes_before for r in reports)
    ba = sum(r.bytes_after for r in reports)
    lines.append(f"{'total':<18} {fb:>12} {fa:>7} {bb / 1e6:>10.2f} {ba / 1e6:>8.2f}")
    return "\n".join(lines)
