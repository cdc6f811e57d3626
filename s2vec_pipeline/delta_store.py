"""Delta Lake tables under one storage root, partitioned by ``parent_l6``.

Every write replaces exactly the partitions it names, in one atomic commit (overwrite with a
``parent_l6 IN (...)`` predicate): a table is at its old version or fully at its new one, and a
rerun never duplicates rows. Each table carries a *contract* (profile, taxonomy version, channel
names, image side...) as JSON in its Delta description, so later writers and readers can refuse
to mix incompatible data.

Reads go through polars or through a pyarrow dataset opened with a ``SubTreeFileSystem``: plain
``DeltaTable.to_pyarrow_*`` reads can abort the interpreter at exit (see docs/architecture.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from s2vec_pipeline.errors import IncompatibleTableError, MissingInputError

PARTITION_COLUMN = "parent_l6"
CONTRACT_KEY = "s2vec"


def table_uri(root: str | os.PathLike, name: str) -> str:
    return str(Path(root) / name)


def table_exists(root: str | os.PathLike, name: str) -> bool:
    return DeltaTable.is_deltatable(table_uri(root, name))


def _open(root: str | os.PathLike, name: str) -> DeltaTable:
    try:
        return DeltaTable(table_uri(root, name))
    except TableNotFoundError as e:
        raise MissingInputError(
            f"table {name!r} does not exist under {root}: materialize it first "
            f"(s2vec materialize --root {root} ...)"
        ) from e


def table_contract(root: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The contract stored with the table, or None when the table does not exist."""
    if not table_exists(root, name):
        return None
    desc = DeltaTable(table_uri(root, name)).metadata().description or "{}"
    try:
        return json.loads(desc).get(CONTRACT_KEY)
    except json.JSONDecodeError:
        return None


def check_contract(root: str | os.PathLike, name: str, contract: dict[str, Any]) -> None:
    """Refuse to write ``contract`` into a table that was written under another one."""
    existing = table_contract(root, name)
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
    data: pa.Table | pa.RecordBatchReader,
    partitions: Sequence[str],
    contract: dict[str, Any],
    commit_metadata: dict[str, str] | None = None,
) -> int:
    """Replace the rows of ``partitions`` with ``data`` in one commit; returns the new version.

    Rows whose ``parent_l6`` is not in ``partitions`` make the whole write fail with nothing
    committed (Delta enforces the predicate). A partition with no rows in ``data`` ends up empty.
    """
    if not partitions:
        raise ValueError("write_partitions needs at least one partition key")
    check_contract(root, name, contract)
    uri = table_uri(root, name)
    keys = ", ".join("'" + k.replace("'", "''") + "'" for k in sorted(set(partitions)))
    props = CommitProperties(
        custom_metadata={
            "s2vec.partitions": ",".join(sorted(set(partitions))),
            **(commit_metadata or {}),
        }
    )
    Path(root).mkdir(parents=True, exist_ok=True)
    exists = DeltaTable.is_deltatable(uri)
    write_deltalake(
        uri,
        data,
        mode="overwrite",
        partition_by=[PARTITION_COLUMN],
        predicate=f"{PARTITION_COLUMN} IN ({keys})" if exists else None,
        name=None if exists else name,
        description=None if exists else json.dumps({CONTRACT_KEY: contract}, sort_keys=True),
        commit_properties=props,
    )
    return DeltaTable(uri).version()


def scan_table(root: str | os.PathLike, name: str, version: int | None = None) -> pl.LazyFrame:
    """A lazy polars scan (of table ``version``, default the latest); filter on ``parent_l6``
    to prune partitions."""
    _open(root, name)  # clear error when the table is missing
    return pl.scan_delta(table_uri(root, name), version=version)


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
    return lf.collect()


def partition_keys(root: str | os.PathLike, name: str, version: int | None = None) -> list[str]:
    """The ``parent_l6`` values that hold at least one row (at table ``version``)."""
    if not table_exists(root, name):
        return []
    keys = scan_table(root, name, version).select(pl.col(PARTITION_COLUMN).unique()).collect()
    return sorted(keys[PARTITION_COLUMN].to_list())


def dataset(root: str | os.PathLike, name: str) -> ds.Dataset:
    """A pyarrow dataset over the table's current files (for streaming record batches)."""
    dt = _open(root, name)
    fs = pafs.SubTreeFileSystem(str(Path(table_uri(root, name)).resolve()), pafs.LocalFileSystem())
    return dt.to_pyarrow_dataset(filesystem=fs)


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
    return DeltaTable(table_uri(root, name)).version() if table_exists(root, name) else None


def remove_staging_leftovers(root: str | os.PathLike, name: str) -> list[Path]:
    """Delete ``*.parquet#N`` staging files a killed writer left behind (vacuum keeps them)."""
    base = Path(table_uri(root, name))
    if not base.exists():
        return []
    leftovers = [p for p in base.rglob("*.parquet#*") if p.is_file()]
    for p in leftovers:
        p.unlink()
    return leftovers
