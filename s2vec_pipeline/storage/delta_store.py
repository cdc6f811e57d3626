"""Delta Lake tables under one storage root, partitioned by ``parent_l6``.

Every write replaces exactly the partitions it names, in one atomic commit (overwrite with a
``parent_l6 IN (...)`` predicate): a table is at its old version or fully at its new one, and a
rerun never duplicates rows. Each table carries a *contract* (profile, taxonomy version, channel
names, image side...) as JSON in its Delta description, so later writers and readers can refuse
to mix incompatible data.

Any number of processes may write different partitions of one table at once, also while the table
does not exist yet: the first writer creates it with an empty commit of the schema and contract
(creators serialize on a lock file, so exactly one creates and the others check its contract),
every write is an overwrite with a partition predicate, and a commit that loses to a concurrent
one (``CommitFailedError``) is written again after a jittered exponential back-off. A streamed
write keeps an LZ4-compressed Arrow IPC copy of what it streamed under ``<root>/_staging/`` so
that a retry does not need the data again; the copy is deleted when the write ends.

Large writes of one partition (the embedding tables) go through :func:`replace_partition`
instead: Parquet files written by polars, then one Delta transaction that adds them and removes
the partition's old files, made again on a conflict with the same files (nothing staged,
nothing produced twice).

A full, read-only or unwritable root raises :class:`StorageUnavailableError` naming the root and
what to do; nothing is committed, and the files the failed write left are removed by
``s2vec maintain`` (:mod:`s2vec_pipeline.storage.maintenance`).

Reads go through polars or through a pyarrow dataset opened with a ``SubTreeFileSystem``: plain
``DeltaTable.to_pyarrow_*`` reads can abort the interpreter at exit (see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.transaction import AddAction

from s2vec_pipeline.errors import (
    STORAGE_FAULTS,
    DamagedTableError,
    IncompatibleTableError,
    MissingInputError,
    RootNotWritableError,
    StorageUnavailableError,
    storage_fault,
)
from s2vec_pipeline.storage import fs
from s2vec_pipeline.storage.locks import exclusive

PARTITION_COLUMN = "parent_l6"
CONTRACT_KEY = "s2vec"
# under the root (an object-store root: under its local cache, fs.local_cache): replay
# copies of streamed writes, deleted after each
STAGING_DIR = "_staging"
# Application-level retries of a commit that lost to a concurrent writer (the data is written
# again): bounded, full-jitter exponential back-off, at most ~25 s of sleeping in all.
COMMIT_ATTEMPTS = 10
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0
# delta-rs itself retries a commit whose version number was taken, re-checking only for logical
# conflicts and without rewriting data; its default (15) can run out with many writers at once.
DELTA_COMMIT_RETRIES = 100
#: Commits between Delta checkpoints (``delta.checkpointInterval``; Delta's default is 100).
#: Loading a table replays the JSON commits since the last checkpoint: ~21 ms with 80 of them,
#: ~4 ms from a fresh checkpoint, and a partition's write loads its tables several times.
CHECKPOINT_INTERVAL = 10

_T = TypeVar("_T")
log = logging.getLogger(__name__)

WriteData = pa.Table | pa.RecordBatchReader


def table_uri(root: str | os.PathLike, name: str) -> str:
    """The table's location: a local path, or a URI of the root's object store."""
    return fs.join(root, name)


def table_exists(root: str | os.PathLike, name: str) -> bool:
    uri = table_uri(root, name)
    try:
        return DeltaTable.is_deltatable(uri)
    except OSError as e:  # delta-rs cannot reach the object store (credentials, endpoint)
        if not fs.is_object_store(uri):
            raise
        raise RootNotWritableError(
            f"cannot read table {name} under {root} ({' '.join(str(e).split())[:200]}): check "
            f"the credentials and endpoint in the environment ({fs.env_hint(uri)})"
        ) from e


def _open(root: str | os.PathLike, name: str) -> DeltaTable:
    try:
        with readable(root, name):
            return DeltaTable(table_uri(root, name))
    except TableNotFoundError as e:
        raise MissingInputError(
            f"table {name!r} does not exist under {root}: build it first "
            f"(s2vec materialize --root {root})"
        ) from e


@contextlib.contextmanager
def readable(root: str | os.PathLike, name: str) -> Iterator[None]:
    """A table that cannot be read (a corrupt ``_delta_log`` entry, a data file gone) as
    :class:`DamagedTableError` naming it and what to do, instead of a raw DeltaError."""
    try:
        yield
    except (TableNotFoundError, CommitFailedError, DamagedTableError):
        raise
    except (DeltaError, FileNotFoundError, pl.exceptions.ComputeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DamagedTableError(
            f"table {name} under {root} cannot be read ({first}). A data file gone: a plain "
            f"`s2vec materialize --root {root}` rewrites the partitions that lost files. A "
            f"corrupt _delta_log entry: restore it from a backup, or delete "
            f"{table_uri(root, name)} and rerun `s2vec materialize --root {root}` to rebuild it"
        ) from e


def table_contract(root: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The contract stored with the table, or None when the table does not exist."""
    if not table_exists(root, name):
        return None
    return _contract_of(_open(root, name))


def _contract_of(table: DeltaTable) -> dict[str, Any] | None:
    try:
        return json.loads(table.metadata().description or "{}").get(CONTRACT_KEY)
    except json.JSONDecodeError:
        return None


def check_contract(root: str | os.PathLike, name: str, contract: dict[str, Any]) -> None:
    """Refuse to write ``contract`` into a table that was written under another one."""
    _refuse_other_contract(root, name, table_contract(root, name), contract)


def _refuse_other_contract(
    root: str | os.PathLike, name: str, existing: dict[str, Any] | None, contract: dict[str, Any]
) -> None:
    if existing is None:
        return
    diffs = [
        f"{k}: table has {existing.get(k)!r}, this run has {v!r}"
        for k, v in contract.items()
        if existing.get(k) != v
    ]
    if diffs:
        raise IncompatibleTableError(
            f"table {table_uri(root, name)} was written with different settings ("
            + "; ".join(diffs)
            + "). Use another --root for these settings, or delete that table to rebuild it."
        )


def write_partitions(
    root: str | os.PathLike,
    name: str,
    data: WriteData,
    partitions: Sequence[str],
    contract: dict[str, Any],
    commit_metadata: dict[str, str] | None = None,
    *,
    writer_properties: WriterProperties | None = None,
) -> int:
    """Replace the rows of ``partitions`` with ``data`` in one commit; returns its version.

    Rows whose ``parent_l6`` is not in ``partitions`` make the whole write fail with nothing
    committed (Delta enforces the predicate). A partition with no rows in ``data`` ends up empty.
    Safe to call from many processes at once for different partitions, also on a missing table.
    ``data``: a table, or a stream (a retry reads a staged copy of it). ``writer_properties``:
    the Parquet settings (``tables.writer_properties``; None: delta-rs' defaults).
    """
    if not partitions:
        raise ValueError("write_partitions needs at least one partition key")
    with storage_errors(root, name):
        return _write_partitions(
            root,
            name,
            data,
            partitions,
            contract,
            commit_metadata,
            writer_properties,
        )


def _write_partitions(
    root: str | os.PathLike,
    name: str,
    data: WriteData,
    partitions: Sequence[str],
    contract: dict[str, Any],
    commit_metadata: dict[str, str] | None,
    writer_properties: WriterProperties | None,
) -> int:
    uri = table_uri(root, name)
    keys = sorted(set(partitions))
    in_list = ", ".join("'" + k.replace("'", "''") + "'" for k in keys)
    write_id = uuid.uuid4().hex
    props = CommitProperties(
        custom_metadata={
            "s2vec.partitions": ",".join(keys),
            "s2vec.write_id": write_id,
            **(commit_metadata or {}),
        },
        max_commit_retries=DELTA_COMMIT_RETRIES,
    )
    with _ReplayableData(data, replay_dir(root), name) as replayable:
        # before any data is streamed; the first attempt writes on the version loaded here
        table = ensure_table(root, name, replayable.schema, contract)

        def attempt(i: int) -> None:
            write_deltalake(
                table if i == 0 else uri,
                replayable.for_attempt(i),
                mode="overwrite",
                partition_by=[PARTITION_COLUMN],
                predicate=f"{PARTITION_COLUMN} IN ({in_list})",
                commit_properties=props,
                writer_properties=writer_properties,
            )

        retry_commit(attempt)
    return _version_of_write(uri, write_id)


#: Target size of a data file written by :func:`replace_partition` (delta-rs' own default)
TARGET_FILE_BYTES = 100 * 1024 * 1024
#: Attempts of a :func:`replace_partition` commit: each is a log read and a commit file (the
#: data files are kept), and any concurrent commit to the table costs one
STRICT_COMMIT_ATTEMPTS = 30


def replace_partition(
    root: str | os.PathLike,
    name: str,
    batches: Iterable[pa.RecordBatch],
    schema: pa.Schema,
    partition: str,
    contract: dict[str, Any],
    commit_metadata: dict[str, str] | None = None,
    *,
    row_group_rows: int,
) -> int:
    """Replace the rows of one partition with ``batches`` in one commit; returns its version.

    For large writes of one partition (the embedding tables): the rows go to Parquet files
    written by polars (uncompressed, statistics on, ``row_group_rows`` a row group, a new file
    every ~``TARGET_FILE_BYTES``), then one Delta transaction adds them and removes the
    partition's files. delta-rs' own writer splits every batch by partition and encodes a
    ``list<float32>`` ~2x slower (docs/benchmarks.md). The batches are consumed once: a commit
    that loses to a concurrent one is made again from the new table state with the same files.
    Each commit lands only on the version it read (no rebase), so two writers of one partition
    never both add rows. Rows of another partition fail the write with nothing committed; no
    batches leave the partition empty. The files of a failed write are deleted (those of a
    killed one, by ``s2vec maintain``'s vacuum).
    """
    with storage_errors(root, name):
        table = ensure_table(root, name, schema, contract)
        uri = table_uri(root, name)
        metadata = {
            "s2vec.partitions": partition,
            "s2vec.write_id": uuid.uuid4().hex,
            **(commit_metadata or {}),
        }
        added: list[AddAction] = []
        try:
            for group in _file_groups(batches, TARGET_FILE_BYTES):
                added.append(_write_data_file(uri, group, schema, partition, row_group_rows))
            # the first attempt on the version loaded before the files were written: a commit
            # landed meanwhile fails it, and the retries read the table again
            return retry_commit(
                lambda i: _commit_replacing(
                    table if i == 0 else DeltaTable(uri), partition, added, metadata
                ),
                attempts=STRICT_COMMIT_ATTEMPTS,
            )
        except BaseException:
            if added and not _may_be_committed(uri, metadata["s2vec.write_id"]):
                for action in added:
                    _delete_quietly(fs.join(uri, unquote(action.path)))
            raise


def _may_be_committed(uri: str, write_id: str) -> bool:
    """Whether a write that raised may still have committed (a failure after its commit, in a
    checkpoint): its files must then stay. When the log cannot be read, they stay too (the
    next maintenance vacuums them if unreferenced)."""
    try:
        return _find_write(uri, write_id, DeltaTable(uri).version()) is not None
    except Exception:
        return True


def _delete_quietly(location: str) -> None:
    with contextlib.suppress(Exception):
        if fs.exists(location):
            fs.delete(location)


def _file_groups(
    batches: Iterable[pa.RecordBatch], target_bytes: int
) -> Iterator[list[pa.RecordBatch]]:
    group: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        if batch.num_rows:
            group.append(batch)
            size += batch.nbytes
        if size >= target_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def _write_data_file(
    uri: str,
    batches: list[pa.RecordBatch],
    schema: pa.Schema,
    partition: str,
    row_group_rows: int,
) -> AddAction:
    """One Parquet file of ``partition`` (without the partition column, as Delta stores it)
    and its add action with Delta statistics of the non-nested columns."""
    rows = pa.Table.from_batches(batches, schema=schema)
    keys = rows.column(PARTITION_COLUMN)
    if keys.null_count or not pc.all(pc.equal(keys, partition)).as_py():
        raise ValueError(f"rows of another partition than {partition} in a write of {partition}")
    rows = rows.drop_columns([PARTITION_COLUMN])
    relative = f"{PARTITION_COLUMN}={partition}/part-00000-{uuid.uuid4()}-c000.parquet"
    location = fs.join(uri, relative)
    frame = pl.from_arrow(rows)
    assert isinstance(frame, pl.DataFrame)
    options: dict[str, Any] = {
        "compression": "uncompressed",
        "statistics": True,
        "row_group_size": row_group_rows,
    }
    try:
        if fs.is_object_store(uri):
            filesystem, path = fs.filesystem(location)
            with filesystem.open_output_stream(path) as sink:
                frame.write_parquet(sink, **options)
        else:
            Path(location).parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(location, **options)
    except BaseException:
        _delete_quietly(location)  # a part written before the failure (a full disk)
        raise
    return AddAction(
        path=quote(relative, safe="/="),
        size=fs.size(location) or 0,
        partition_values={PARTITION_COLUMN: partition},
        modification_time=int(time.time() * 1000),
        data_change=True,
        stats=json.dumps(_delta_stats(rows)),
    )


#: Delta truncates string statistics; longer values are left out of the file's min/max
_STATS_STRING_LIMIT = 32


def _delta_stats(rows: pa.Table) -> dict[str, Any]:
    """The ``stats`` of an add action: row count, and min/max/null count of the non-nested
    columns (what delta-rs writes; readers use them to skip files)."""
    minimum: dict[str, Any] = {}
    maximum: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for field, column in zip(rows.schema, rows.columns, strict=True):
        if pa.types.is_nested(field.type):
            continue
        nulls[field.name] = column.null_count
        low, high = pc.min_max(column).values()
        low, high = low.as_py(), high.as_py()
        if low is None or (isinstance(high, str) and len(high) > _STATS_STRING_LIMIT):
            continue
        minimum[field.name], maximum[field.name] = low, high
    return {
        "numRecords": rows.num_rows,
        "minValues": minimum,
        "maxValues": maximum,
        "nullCount": nulls,
    }


def _commit_replacing(
    table: DeltaTable, partition: str, added: list[AddAction], metadata: dict[str, str]
) -> int:
    """One commit of ``added`` that removes the partition's files in ``table``'s snapshot, on
    that version and no other (``max_commit_retries=0``: a later commit fails it)."""
    version = table.version()
    table.create_write_transaction(
        added,
        mode="overwrite",
        schema=table.schema(),
        partition_by=[PARTITION_COLUMN],
        partition_filters=[(PARTITION_COLUMN, "=", partition)],
        commit_properties=CommitProperties(custom_metadata=metadata, max_commit_retries=0),
    )
    return version + 1


def ensure_table(
    root: str | os.PathLike, name: str, schema: pa.Schema, contract: dict[str, Any]
) -> DeltaTable:
    """Create the table, empty, with ``schema`` and ``contract`` unless it exists; check it;
    returns it as loaded for the check (a write's first attempt commits on that version).

    On a local root creators serialize on ``<root>/.<name>.create.lock`` (two racing delta-rs
    ``create`` calls can both commit, one over the other, on a local file system). On an object
    store there is no lock: version 0 is written with a conditional PUT, so exactly one creator
    wins and the others fail ("already exists" / ``CommitFailedError``). Either way, a table found
    already there must carry ``contract``.
    """
    uri = table_uri(root, name)
    if not DeltaTable.is_deltatable(uri):
        if fs.is_object_store(root):
            _create(uri, name, schema, contract)
        else:
            Path(root).mkdir(parents=True, exist_ok=True)
            with exclusive(Path(root) / f".{name}.create.lock"):
                if not DeltaTable.is_deltatable(uri):
                    _create(uri, name, schema, contract)
    table = _open(root, name)
    _refuse_other_contract(root, name, _contract_of(table), contract)
    return table


def _create(uri: str, name: str, schema: pa.Schema, contract: dict[str, Any]) -> None:
    """Commit version 0 of an empty table; losing to another creator is fine (the caller then
    checks the winner's contract)."""
    try:
        DeltaTable.create(
            uri,
            schema,
            mode="error",
            partition_by=[PARTITION_COLUMN],
            name=name,
            description=json.dumps({CONTRACT_KEY: contract}, sort_keys=True),
            configuration={"delta.checkpointInterval": str(CHECKPOINT_INTERVAL)},
            # No retry: delta-rs would commit the losing CREATE again as version 1 over the
            # winner's metadata (seen on S3 with two creators); losing must fail here.
            commit_properties=CommitProperties(max_commit_retries=0),
        )
    except CommitFailedError:
        if not DeltaTable.is_deltatable(uri):  # not a lost race: a real failure
            raise
    except DeltaError as e:
        # a creator that does not take the lock (another tool, another host) won
        if "already exists" not in str(e):
            raise


def retry_commit(attempt: Callable[[int], _T], attempts: int = COMMIT_ATTEMPTS) -> _T:
    """Call ``attempt(i)`` until it does not raise ``CommitFailedError`` (a concurrent commit
    conflicted with this one), sleeping a full-jitter exponential back-off in between."""
    for i in range(attempts):
        try:
            return attempt(i)
        except CommitFailedError as e:
            if i == attempts - 1:
                raise
            pause = random.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**i))
            reason = str(e).splitlines()[0]
            log.info("commit conflict (%s); retry %d in %.3f s", reason, i + 1, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _version_of_write(uri: str, write_id: str, newest: int = 64) -> int:
    """The version of the commit tagged ``write_id`` (the table's latest, with a warning, when
    it is not among the ``newest`` commits)."""
    latest = DeltaTable(uri).version()  # loaded after the write: at or past its commit
    version = _find_write(uri, write_id, latest, newest)
    if version is None:
        log.warning("%s: write %s not among the %d newest commits", uri, write_id, newest)
        return latest
    return version


def _find_write(uri: str, write_id: str, latest: int, newest: int = 64) -> int | None:
    """The version of the commit tagged ``write_id``, found in the commit files counting down
    from ``latest`` (later commits may exist already), or None. Not ``DeltaTable.history()``:
    it labels commits by counting down from its snapshot's version while listing the log anew,
    so a commit landing in between shifts every label by one (seen on S3 with two writers)."""
    for version in range(latest, max(-1, latest - newest), -1):
        data = fs.read_bytes(fs.join(uri, "_delta_log", f"{version:020d}.json"))
        for line in (data or b"").decode().splitlines():
            info = json.loads(line).get("commitInfo")
            if info is not None and info.get("s2vec.write_id") == write_id:
                return version
    return None


class _ReplayableData:
    """Hands ``data`` to a write attempt, again on a retry without needing the producer again.

    A table is simply reused. A record-batch stream is consumed once: while the first attempt
    streams it, each batch is also appended to an LZ4-compressed Arrow IPC file under
    ``staging``; later attempts read that file (memory-mapped, streaming). Memory stays bounded
    by one batch; the file is deleted on exit (and by maintenance if the process was killed).
    """

    def __init__(self, data: WriteData, staging: Path, name: str) -> None:
        self._data: pa.Table | pa.RecordBatchReader = data
        self._path = staging / f"{name}-{uuid.uuid4().hex}.arrows"
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._tee: Iterator[pa.RecordBatch] | None = None
        self._replays: list[pa.MemoryMappedFile] = []

    def __enter__(self) -> _ReplayableData:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for f in self._replays:
                f.close()
            if self._writer is not None:
                with contextlib.suppress(OSError):  # e.g. a full disk: the copy goes anyway
                    self._writer.close()
        finally:
            self._path.unlink(missing_ok=True)

    @property
    def schema(self) -> pa.Schema:
        return self._data.schema

    def for_attempt(self, i: int) -> pa.Table | pa.RecordBatchReader:
        if isinstance(self._data, pa.Table):
            return self._data
        if i == 0:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            options = pa.ipc.IpcWriteOptions(compression="lz4")
            self._writer = pa.ipc.new_stream(str(self._path), self._data.schema, options=options)
            self._tee = self._teed(self._data, self._writer)
            return pa.RecordBatchReader.from_batches(self._data.schema, self._tee)
        if self._writer is not None:  # first retry: finish the copy, then replay it
            for _ in self._tee or ():
                pass
            self._writer.close()
            self._writer = None
        source = pa.memory_map(str(self._path))
        self._replays.append(source)
        return pa.ipc.open_stream(source)

    @staticmethod
    def _teed(
        reader: pa.RecordBatchReader, writer: pa.ipc.RecordBatchStreamWriter
    ) -> Iterator[pa.RecordBatch]:
        for batch in reader:
            writer.write_batch(batch)
            yield batch


# -- storage faults: a full, read-only or unwritable root -------------------------------------


@contextlib.contextmanager
def storage_errors(
    root: str | os.PathLike, name: str, action: str = "write table"
) -> Iterator[None]:
    """Turn an OS storage fault raised in the block into :class:`StorageUnavailableError`."""
    try:
        yield
    except StorageUnavailableError:
        raise
    except Exception as e:
        code = storage_fault(e)
        if code is None:
            raise
        fault = STORAGE_FAULTS[code]
        version = table_version_safe(root, name)
        state = "no table exists" if version is None else f"the table's version is {version}"
        raise StorageUnavailableError(
            f"cannot {action} {name!r} under {root}: {fault.reason}. Nothing of this write was "
            f"committed ({state}); {fault.advice(str(root), maintain_root=str(root))}."
        ) from e


def table_version_safe(root: str | os.PathLike, name: str) -> int | None:
    """``table_version`` that answers None instead of raising on an unreadable root."""
    try:
        return table_version(root, name)
    except Exception:
        return None


def scan_table(root: str | os.PathLike, name: str, version: int | None = None) -> pl.LazyFrame:
    """A lazy polars scan (of table ``version``, default the latest); filter on ``parent_l6``
    to prune partitions."""
    table = _open(root, name)  # a clear error when the table is missing; the scan's one load
    if version is not None:
        with readable(root, name):
            table.load_as_version(version)
    uri = table_uri(root, name)
    if not fs.is_object_store(uri) and quote(uri) != uri:
        # polars' native Delta scan opens delta-rs' %-encoded file paths as they are (a root
        # with a space or a non-ASCII letter would not be found): read through pyarrow with
        # the sub-tree filesystem (which also avoids the abort at exit, see module doc)
        return pl.scan_delta(
            table,
            use_pyarrow=True,
            pyarrow_options={"filesystem": pafs.SubTreeFileSystem(uri, pafs.LocalFileSystem())},
        )
    return pl.scan_delta(table)


def read_partitions(
    root: str | os.PathLike,
    name: str,
    partitions: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    version: int | None = None,
) -> pl.DataFrame:
    lf = scan_table(root, name, version)
    if partitions is not None:
        lf = lf.filter(pl.col(PARTITION_COLUMN).is_in(list(partitions)))
    if columns is not None:
        lf = lf.select(columns)
    with readable(root, name):
        return lf.collect()


def data_file_actions(root: str | os.PathLike, name: str, version: int | None = None) -> pa.Table:
    """The table's add actions at ``version`` (default the latest), flattened: one row per data
    file with its log ``path``, ``num_records`` and ``partition.parent_l6``, from the log alone."""
    dt = _open(root, name)
    with readable(root, name):  # a corrupt log: DamagedTableError naming it
        if version is not None:
            dt.load_as_version(version)
        return pa.table(dt.get_add_actions(flatten=True))


def partition_keys(root: str | os.PathLike, name: str, version: int | None = None) -> list[str]:
    """The ``parent_l6`` values that hold at least one row (at table ``version``), from the
    Delta log alone: a partition whose data file is gone is still listed (and reported lost,
    ``integrity.lost_data``)."""
    if not table_exists(root, name):
        return []
    actions = data_file_actions(root, name, version)
    if actions.num_rows == 0:
        return []
    # a file without statistics (another writer) counts as holding rows
    keys = actions.filter(pc.fill_null(pc.greater(actions["num_records"], 0), True))
    return sorted(set(keys[f"partition.{PARTITION_COLUMN}"].to_pylist()))


def dataset(root: str | os.PathLike, name: str) -> ds.Dataset:
    """A pyarrow dataset over the table's current files (for streaming record batches)."""
    dt = _open(root, name)
    uri = table_uri(root, name)
    if fs.is_object_store(uri):
        base_fs, base = fs.filesystem(uri)
    else:
        base_fs, base = pafs.LocalFileSystem(), str(Path(uri).resolve())
    return dt.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(base, base_fs))


def iter_batches(
    root: str | os.PathLike,
    name: str,
    partitions: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    batch_size: int = 1024,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches; memory stays bounded by ``batch_size`` rows."""
    dset = dataset(root, name)
    flt = None
    if partitions is not None:
        flt = ds.field(PARTITION_COLUMN).isin(list(partitions))
    yield from dset.to_batches(
        columns=list(columns) if columns else None, filter=flt, batch_size=batch_size
    )


def table_version(root: str | os.PathLike, name: str) -> int | None:
    return _open(root, name).version() if table_exists(root, name) else None


def table_schema(root: str | os.PathLike, name: str) -> pa.Schema:
    """The Arrow schema of a table as stored (list and string types as Delta keeps them)."""
    return pa.schema(_open(root, name).schema().to_arrow())


def list_tables(root: str | os.PathLike) -> list[str]:
    """Names of the Delta tables directly under ``root``, sorted."""
    if fs.is_object_store(root):
        names = fs.list_dirs(root)
    else:
        base = Path(root)
        if not base.is_dir():
            return []
        names = sorted(p.name for p in base.iterdir() if p.is_dir())
    return [n for n in names if DeltaTable.is_deltatable(table_uri(root, n))]


def data_files(root: str | os.PathLike, name: str) -> list[str]:
    """The data files of the table's current version: plain local paths on a local root
    (delta-rs' URIs are %-encoded: a root with a space or a non-ASCII letter would not be
    found), URIs on an object store."""
    uris = _open(root, name).file_uris()
    if fs.is_object_store(root):
        return uris
    return [unquote(u.removeprefix("file://")) for u in uris]


# -- maintenance: compaction, vacuum, leftovers of killed writes ------------------------------


def compact(
    root: str | os.PathLike, name: str, writer_properties: WriterProperties | None = None
) -> dict[str, Any]:
    """Rewrite the current version's small files into larger ones in one commit (retried like
    any commit on a conflict), with the Parquet settings ``writer_properties`` (the table's
    writes' own: ``tables.writer_properties``); returns delta-rs' metrics
    (``numFilesRemoved``/``Added``...)."""
    uri = table_uri(root, name)
    return retry_commit(
        lambda _i: DeltaTable(uri).optimize.compact(writer_properties=writer_properties)
    )


def settle_log(root: str | os.PathLike, name: str) -> None:
    """Give the table this project's checkpoint interval (a table created before it has Delta's
    100: one metadata commit, which concurrent writers retry like any conflict) and checkpoint
    its current version, so that the next loads replay no JSON commit."""
    uri = table_uri(root, name)
    key = "delta.checkpointInterval"
    if DeltaTable(uri).metadata().configuration.get(key) != str(CHECKPOINT_INTERVAL):
        retry_commit(
            lambda _i: DeltaTable(uri).alter.set_table_properties(
                {key: str(CHECKPOINT_INTERVAL)}, raise_if_not_exists=False
            )
        )
    DeltaTable(uri).create_checkpoint()


def vacuum(
    root: str | os.PathLike, name: str, retention_hours: float, dry_run: bool = False
) -> list[str]:
    """Delete (or with ``dry_run`` only list) the files no version within ``retention_hours``
    references, and unreferenced files (failed writes) older than that: paths relative to the
    table. The retention is the caller's (Delta's 7-day minimum is not enforced)."""
    return DeltaTable(table_uri(root, name)).vacuum(
        retention_hours=int(retention_hours),
        dry_run=dry_run,
        enforce_retention_duration=False,
        full=True,
    )


def remove_staging_leftovers(
    root: str | os.PathLike, name: str, retention_hours: float
) -> list[str]:
    """Delete the ``*.parquet#N`` files a killed writer left in the table's folder (vacuum never
    deletes them) once older than ``retention_hours`` (a running write's are younger); returns
    their locations. On an object store delta-rs uploads in parts: none should be there."""
    cutoff = time.time() - retention_hours * 3600
    found = [
        e.location
        for e in fs.list_files(table_uri(root, name))
        if ".parquet#" in e.relative and e.mtime <= cutoff
    ]
    for location in found:
        fs.delete(location)
    return found


def replay_dir(root: str | os.PathLike) -> Path:
    """The local folder of the replay copies of streamed writes (``_ReplayableData``)."""
    return fs.local_cache(root, STAGING_DIR)


def remove_replay_copies(root: str | os.PathLike, retention_hours: float) -> list[Path]:
    """Delete the replay copies older than ``retention_hours``: those of killed writes (a write
    deletes its own when it ends); returns them."""
    folder = replay_dir(root)
    if not folder.is_dir():
        return []
    cutoff = time.time() - retention_hours * 3600
    old = []
    for p in folder.iterdir():
        try:
            if p.is_file() and p.stat().st_mtime <= cutoff:
                p.unlink(missing_ok=True)
                old.append(p)
        except FileNotFoundError:  # its writer finished (deleted it) meanwhile
            continue
    return old
