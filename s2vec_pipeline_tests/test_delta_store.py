"""Delta writes replace exactly their partitions in one commit, or change nothing."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake.exceptions import DeltaError

from s2vec_pipeline.errors import IncompatibleTableError, MissingInputError
from s2vec_pipeline.storage import delta_store

CONTRACT = {"table": "t", "profile": "city", "taxonomy_version": "v1"}


def _rows(keys: list[str], values: list[float]) -> pa.Table:
    return pa.table({"parent_l6": pa.array(keys, pa.string()), "x": pa.array(values, pa.float64())})


def test_partition_replace_and_failure_atomic(tmp_path: Path) -> None:
    root = tmp_path
    # version 0 is the table's creation (schema and contract, no rows), 1 the first write
    assert (
        delta_store.write_partitions(
            root, "t", _rows(["a", "a", "b"], [1, 2, 3]), ["a", "b"], CONTRACT
        )
        == 1
    )
    assert delta_store.write_partitions(root, "t", _rows(["a"], [9]), ["a"], CONTRACT) == 2
    df = delta_store.read_partitions(root, "t").sort("x")
    assert df["parent_l6"].to_list() == ["b", "a"] and df["x"].to_list() == [3, 9]
    # a row outside the named partitions fails the whole write: version and rows unchanged
    with pytest.raises(DeltaError):
        delta_store.write_partitions(root, "t", _rows(["a", "c"], [5, 6]), ["a"], CONTRACT)
    assert delta_store.table_version(root, "t") == 2
    assert sorted(delta_store.read_partitions(root, "t")["x"].to_list()) == [3, 9]
    # an empty write empties exactly that partition
    delta_store.write_partitions(root, "t", _rows([], []), ["b"], CONTRACT)
    assert delta_store.partition_keys(root, "t") == ["a"]


def _embedding_rows(key: str, n: int, seed: int) -> pa.Table:
    values = np.random.default_rng(seed).random((n, 4), dtype=np.float32)
    return pa.table(
        {
            "parent_l6": pa.array([key] * n, pa.string()),
            "cell_token": pa.array([f"{key}{i:04x}" for i in range(n)]),
            "cell_id": pa.array(np.arange(n, dtype=np.int64) * 7 - 50),
            "embedding": pa.array(list(values), pa.list_(pa.float32())),
        }
    )


def test_replace_partition_replaces_one_partition_in_one_commit(tmp_path: Path) -> None:
    """Files written by polars, committed by a Delta transaction: each reader gets the rows
    back as written, the log's statistics are those of the rows (a second computation, by
    polars), a new file starts every ``TARGET_FILE_BYTES``, and a failed write commits and
    leaves nothing."""
    a, b = _embedding_rows("a", 300, 1), _embedding_rows("b", 40, 2)
    schema = a.schema
    write = delta_store.replace_partition
    assert write(tmp_path, "t", a.to_batches(100), schema, "a", CONTRACT, row_group_rows=64) == 1
    assert write(tmp_path, "t", b.to_batches(), schema, "b", CONTRACT, row_group_rows=64) == 2
    got = delta_store.read_partitions(tmp_path, "t").sort("parent_l6", "cell_id")
    assert got.equals(pl.from_arrow(pa.concat_tables([a, b])).sort("parent_l6", "cell_id"))
    with duckdb.connect() as con:  # an independent reader of the files
        files = delta_store.data_files(tmp_path, "t")
        counts = con.execute(
            "SELECT parent_l6, count(*), sum(list_sum(embedding)) FROM read_parquet(?, "
            "hive_partitioning = true) GROUP BY 1 ORDER BY 1",
            [files],
        ).fetchall()
    sums = [float(np.sum(np.stack(t["embedding"].to_numpy(zero_copy_only=False)))) for t in (a, b)]
    assert [(k, n) for k, n, _ in counts] == [("a", 300), ("b", 40)]
    assert np.allclose([s for *_, s in counts], sums, rtol=1e-5)
    for action in delta_store.data_file_actions(tmp_path, "t").to_pylist():
        part = got.filter(pl.col("parent_l6") == action["partition.parent_l6"])
        assert action["num_records"] == part.height
        assert (action["min.cell_id"], action["max.cell_id"]) == (
            part["cell_id"].min(),
            part["cell_id"].max(),
        )
        assert action["max.cell_token"] == part["cell_token"].max()
    (path,) = [f for f in delta_store.data_files(tmp_path, "t") if "parent_l6=a" in f]
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [64] * 4 + [44]

    # rewritten: the old file goes, the new rows are there once, a file every ~2 batches
    size = a.slice(0, 100).nbytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(delta_store, "TARGET_FILE_BYTES", 2 * size)
        a2 = _embedding_rows("a", 500, 3)
        write(tmp_path, "t", a2.to_batches(100), schema, "a", CONTRACT, row_group_rows=64)
    files = [f for f in delta_store.data_files(tmp_path, "t") if "parent_l6=a" in f]
    assert len(files) == 3 and path not in files
    assert (
        delta_store.read_partitions(tmp_path, "t", ["a"])
        .sort("cell_id")
        .equals(pl.from_arrow(a2).sort("cell_id"))
    )

    # a row of another partition: nothing committed, no file left behind
    before = sorted(str(p) for p in (tmp_path / "t").rglob("*.parquet"))
    mixed = pa.concat_tables([b, _embedding_rows("a", 1, 4)])
    with pytest.raises(ValueError, match="rows of another partition than b"):
        write(tmp_path, "t", mixed.to_batches(), schema, "b", CONTRACT, row_group_rows=64)
    assert delta_store.table_version(tmp_path, "t") == 3
    assert sorted(str(p) for p in (tmp_path / "t").rglob("*.parquet")) == before
    # no rows: the partition ends up empty
    assert write(tmp_path, "t", iter([]), schema, "b", CONTRACT, row_group_rows=64) == 4
    assert delta_store.partition_keys(tmp_path, "t") == ["a"]


def test_tables_checkpoint_every_ten_commits_and_load_from_the_checkpoint(tmp_path: Path) -> None:
    """A new table checkpoints every ``CHECKPOINT_INTERVAL`` commits (a load replays at most
    that many JSON commits), and the table read from that checkpoint has every row."""
    interval = delta_store.CHECKPOINT_INTERVAL
    for i in range(interval + 2):
        delta_store.write_partitions(tmp_path, "t", _rows([f"p{i}"], [i]), [f"p{i}"], CONTRACT)
    log = tmp_path / "t" / "_delta_log"
    checkpoints = sorted(p.name for p in log.glob("*.checkpoint.parquet"))
    # delta-rs checkpoints the version whose count of commits is a multiple of the interval
    assert checkpoints == [f"{interval - 1:020d}.checkpoint.parquet"]
    for commit in log.glob("*.json"):  # the JSON commits up to it are not needed to load
        if int(commit.stem) < interval:
            commit.unlink()
    got = delta_store.read_partitions(tmp_path, "t").sort("x")
    assert got["x"].to_list() == list(range(interval + 2))


def test_contract_mismatch_refused(tmp_path: Path) -> None:
    delta_store.write_partitions(tmp_path, "t", _rows(["a"], [1.0]), ["a"], CONTRACT)
    with pytest.raises(IncompatibleTableError, match="taxonomy_version: table has 'v1'"):
        delta_store.write_partitions(
            tmp_path, "t", _rows(["a"], [1.0]), ["a"], {**CONTRACT, "taxonomy_version": "v2"}
        )
    assert delta_store.table_version(tmp_path, "t") == 1


def test_missing_table_error(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="build it first"):
        delta_store.read_partitions(tmp_path, "raster_tiles")


def test_streaming_batches_and_leftovers(tmp_path: Path) -> None:
    delta_store.write_partitions(
        tmp_path, "t", _rows(["a"] * 10 + ["b"] * 5, list(range(15))), ["a", "b"], CONTRACT
    )
    batches = list(delta_store.iter_batches(tmp_path, "t", ["b"], batch_size=2))
    assert sum(b.num_rows for b in batches) == 5 and max(b.num_rows for b in batches) <= 2
    stray = tmp_path / "t" / "parent_l6=a" / "part-x.parquet#1"
    stray.write_bytes(b"junk")
    assert delta_store.remove_staging_leftovers(tmp_path, "t", retention_hours=1) == []
    assert delta_store.remove_staging_leftovers(tmp_path, "t", retention_hours=0) == [str(stray)]
    assert not stray.exists()


def test_frame_hash_is_a_function_of_content() -> None:
    import polars as pl

    from s2vec_pipeline.storage.versioning import frame_hash

    both = pl.DataFrame({"parent_l6": ["a", "b", "a"], "s": ["xx" * 20, "yy" * 20, "zz" * 20]})
    alone = pl.DataFrame({"parent_l6": ["a", "a"], "s": ["zz" * 20, "xx" * 20]})
    sliced = both.filter(pl.col("parent_l6") == "a")  # string views still share both's buffers
    assert frame_hash(sliced, ["s"]) == frame_hash(alone, ["s"])
    assert frame_hash(alone.with_columns(pl.lit("q").alias("s")), ["s"]) != frame_hash(alone, ["s"])


def test_frame_hash_is_sha256_of_the_sorted_frames_arrow_stream() -> None:
    """The documented canonical bytes, unchanged (partition data versions are stored)."""
    import hashlib

    import polars as pl

    from s2vec_pipeline.storage.versioning import frame_hash

    df = pl.DataFrame(
        {"k": [3, 1, 2], "s": ["c", None, "a"], "v": [[1.0, 2.0], [], [3.5]]},
        schema={"k": pl.Int64, "s": pl.String, "v": pl.List(pl.Float32)},
    )
    table = df.sort("k").to_arrow(compat_level=pl.CompatLevel.oldest()).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert frame_hash(df, ["k"]) == hashlib.sha256(sink.getvalue()).hexdigest()[:16]
    assert frame_hash(df, ["k"]) == "ba3adc62c5a3ea54"  # what the code before streaming gave


def test_exact_sum_ignores_row_order() -> None:
    import numpy as np
    import polars as pl

    from s2vec_pipeline.storage.versioning import exact_sum

    values = np.random.default_rng(0).uniform(0, 1e4, 10_000)
    a = pl.DataFrame({"k": 1, "v": values}).group_by("k").agg(exact_sum("v"))
    b = pl.DataFrame({"k": 1, "v": values[::-1]}).group_by("k").agg(exact_sum("v"))
    assert a["v"][0] == b["v"][0]
    assert a["v"][0] == pytest.approx(values.sum(), rel=1e-12)


def test_every_written_column_has_a_description() -> None:
    """The column schema Dagster shows describes every column the writers write (channel
    columns of cell_features are described by their measure at write time)."""
    from s2vec_pipeline.cells.features import KEY_COLUMNS
    from s2vec_pipeline.cells.raster import RASTER_SCHEMA
    from s2vec_pipeline.model.embed import EMBEDDING_SCHEMA
    from s2vec_pipeline.osm.extract import OSM_FEATURES_SCHEMA
    from s2vec_pipeline.storage import tables

    assert list(tables.OSM_FEATURES_COLUMNS) == list(OSM_FEATURES_SCHEMA)
    assert list(tables.RASTER_COLUMNS) == RASTER_SCHEMA.names
    assert list(tables.EMBEDDING_COLUMNS) == EMBEDDING_SCHEMA.names
    assert set(tables.CELL_COLUMNS) == set(KEY_COLUMNS) | {"taxonomy_version"}


def test_replace_partition_keeps_its_files_when_it_fails_after_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the commit landed (e.g. in the checkpoint that follows it) must not
    delete the files the new version references; a failure before it deletes them."""
    from deltalake import DeltaTable

    rows = _embedding_rows("a", 30, 5)
    write = delta_store.replace_partition
    real_commit = DeltaTable.create_write_transaction

    def commit_then_fail(table: DeltaTable, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        real_commit(table, *args, **kwargs)
        raise RuntimeError("after the commit")

    monkeypatch.setattr(DeltaTable, "create_write_transaction", commit_then_fail)
    with pytest.raises(RuntimeError, match="after the commit"):
        write(tmp_path, "t", rows.to_batches(), rows.schema, "a", CONTRACT, row_group_rows=64)
    monkeypatch.undo()
    assert delta_store.table_version(tmp_path, "t") == 1
    got = delta_store.read_partitions(tmp_path, "t").sort("cell_id")
    assert got.equals(pl.from_arrow(rows).sort("cell_id"))

    def fail_before(table: DeltaTable, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("before the commit")

    files = sorted((tmp_path / "t").rglob("*.parquet"))
    monkeypatch.setattr(DeltaTable, "create_write_transaction", fail_before)
    with pytest.raises(RuntimeError, match="before the commit"):
        write(tmp_path, "t", rows.to_batches(), rows.schema, "a", CONTRACT, row_group_rows=64)
    assert sorted((tmp_path / "t").rglob("*.parquet")) == files
