"""Does a table still hold what Dagster recorded for one of its partitions?

Dagster's records say a partition was materialized with N rows; the Delta table may since have
lost that partition (a delete, a hand-edited log) or a data file (deleted from disk). Both make
the partition unreadable or silently empty, while the data versions Dagster compares still say
"up to date". :func:`lost_data` is the one test for it: ``runner.Launcher.stale_or_missing``
recomputes such a partition, ``s2vec status`` reports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import unquote

import dagster as dg

from s2vec_pipeline.storage import delta_store, fs


def recorded_rows(instance: dg.DagsterInstance, table: str, partition: str) -> int | None:
    """The ``dagster/row_count`` of the partition's latest materialization (None: no record)."""
    record = instance.get_latest_data_version_record(dg.AssetKey(table), False, partition)
    if record is None or record.asset_materialization is None:
        return None
    value = record.asset_materialization.metadata.get("dagster/row_count")
    return None if value is None else int(value.value)


def has_data(instance: dg.DagsterInstance, root: str | os.PathLike) -> Callable[[str, str], bool]:
    """``check(table, partition)``: the table still holds what Dagster recorded (the
    ``has_data`` hook of ``automation.assets_to_run``). Each table's file list is read once per
    table version, not once per partition: a plan over N partitions reads it once."""
    files: dict[str, tuple[int | None, dict[str, list]]] = {}

    def check(table: str, partition: str) -> bool:
        version = delta_store.table_version(root, table)
        if table not in files or files[table][0] != version:
            files[table] = (version, _add_actions(root, table) if version is not None else {})
        return lost_data(instance, root, table, partition, files[table][1]) is None

    return check


def _add_actions(root: str | os.PathLike, table: str) -> dict[str, list]:
    return delta_store.data_file_actions(root, table).to_pydict()


def lost_data(
    instance: dg.DagsterInstance,
    root: str | os.PathLike,
    table: str,
    partition: str,
    actions: dict[str, list] | None = None,
) -> str | None:
    """Why ``table`` no longer holds the rows Dagster recorded for ``partition``, else None.

    Lost: the partition holds fewer rows than recorded (none at all after a delete), or one of
    its data files is gone from storage. A partition recorded empty (sea) or never recorded
    loses nothing. Reads only the Delta log and lists the partition's files: cheap enough to
    ask for every partition of every table.
    """
    rows = recorded_rows(instance, table, partition)
    if not rows:
        return None
    uri = delta_store.table_uri(root, table)
    if not delta_store.table_exists(root, table):
        return f"Dagster recorded {rows} rows, but the table {table} is gone"
    if actions is None:  # the table's add actions, unless the caller read them already
        actions = _add_actions(root, table)
    column = f"partition.{delta_store.PARTITION_COLUMN}"
    mine = [i for i, k in enumerate(actions.get(column, [])) if k == partition]
    counts = [actions["num_records"][i] for i in mine]
    held = sum(int(c) for c in counts if c is not None)
    if not mine or (None not in counts and held < rows):  # a file without statistics: unknown
        return f"Dagster recorded {rows} rows, the table holds {held}"
    for i in mine:
        # log paths are %-encoded relative paths (``parent_l6=12cd/part-….parquet``)
        location = fs.join(uri, unquote(actions["path"][i]))
        if not fs.exists(location):
            return f"data file {location} is gone"
    return None
