"""Maintenance compacts, vacuums and cleans staging leftovers without changing table content.

The oracle for files and bytes is an independent walk of the directory; the oracle for the
content is the table's rows read before maintenance; the leftover is a real one, from a writer
process killed with SIGKILL in the middle of writing a data file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from s2vec_pipeline.cli import main
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline.storage.maintenance import maintain_root

CONTRACT = {"table": "t", "profile": "city", "taxonomy_version": "v1"}


def _rows(key: str, n: int, seed: int) -> pa.Table:
    values = np.random.default_rng(seed).random(n)
    return pa.table({"parent_l6": pa.array([key] * n, pa.string()), "x": pa.array(values)})


def _walk(path: Path) -> tuple[int, int]:
    """Files and bytes under ``path``, counted with Path.rglob + stat (not the module's walk)."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _killed_writer(uri: str) -> None:
    write_deltalake(uri, _rows("c", 3_000_000, 7), mode="append", partition_by=["parent_l6"])


def _leave_staging_leftover(uri: str) -> Path:
    """Start a large append and SIGKILL it while a data file is being staged."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_killed_writer, args=(uri,))
    proc.start()
    deadline = time.monotonic() + 120
    found: list[Path] = []
    while time.monotonic() < deadline and proc.is_alive() and not found:
        found = [p for p in Path(uri).rglob("*.parquet#*") if p.stat().st_size > 0]
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    if not found:
        pytest.fail("the writer finished or never staged a file before it could be killed")
    return found[0]


def _table_with_debris(root: Path) -> Path:
    """Many small active files (appends), replaced files (overwrites), a killed write."""
    uri = root / "t"
    delta_store.write_partitions(root, "t", _rows("a", 100, 0), ["a"], CONTRACT)
    delta_store.write_partitions(root, "t", _rows("b", 100, 1), ["b"], CONTRACT)
    for i in range(5):  # another Delta writer appending small batches: 6 active files in "a"
        write_deltalake(uri, _rows("a", 20, 10 + i), mode="append", partition_by=["parent_l6"])
    for i in range(3):  # three overwrites of "b": three unreferenced files
        delta_store.write_partitions(root, "t", _rows("b", 50, 20 + i), ["b"], CONTRACT)
    return uri


@pytest.mark.slow
def test_maintain_compacts_vacuums_and_removes_leftovers(tmp_path: Path) -> None:
    uri = _table_with_debris(tmp_path)
    version = DeltaTable(str(uri)).version()
    leftover = _leave_staging_leftover(str(uri))
    assert DeltaTable(str(uri)).version() == version  # the killed write committed nothing
    rows = delta_store.read_partitions(tmp_path, "t").sort(["parent_l6", "x"])
    old_version = 2  # partitions a and b written once each (version 0 is the creation)
    old_rows = pl.from_arrow(DeltaTable(str(uri), version=old_version).to_pyarrow_table())
    assert old_rows.height == 200

    # 1. default retention (7 days): compaction, but every file is recent, so none deleted
    files, size = _walk(uri)
    (report,) = maintain_root(tmp_path)
    assert (report.files_before, report.bytes_before) == (files, size)
    assert (report.files_after, report.bytes_after) == _walk(uri)
    assert report.active_files_before == 7 and report.active_files_after == 2
    assert (report.compacted_removed, report.compacted_added) == (6, 1)
    assert report.vacuumed == 0 and report.staging_removed == 0 and leftover.exists()
    assert delta_store.read_partitions(tmp_path, "t").sort(["parent_l6", "x"]).equals(rows)
    again = pl.from_arrow(DeltaTable(str(uri), version=old_version).to_pyarrow_table())
    assert again.sort("x").equals(old_rows.sort("x"))  # old version still readable

    # 2. retention 0 (a quiet root): every unreferenced file and the leftover go
    files, size = _walk(uri)
    (report,) = maintain_root(tmp_path, retention_hours=0)
    assert (report.files_before, report.bytes_before) == (files, size)
    assert (report.files_after, report.bytes_after) == _walk(uri)
    assert report.staging_removed == 1 and not leftover.exists()
    assert report.bytes_after < report.bytes_before
    # on disk, outside the log, exactly the files the current version references remain
    dt = DeltaTable(str(uri))
    referenced = {Path(u.removeprefix("file://")).resolve() for u in dt.file_uris()}
    on_disk = {p.resolve() for p in uri.rglob("*") if p.is_file() and "_delta_log" not in p.parts}
    assert on_disk == referenced
    assert report.vacuumed == 6 + 3  # the compacted small files of a, the replaced ones of b
    assert delta_store.read_partitions(tmp_path, "t").sort(["parent_l6", "x"]).equals(rows)
    with pytest.raises(Exception, match="(?i)not found|no such file|does not exist"):
        DeltaTable(str(uri), version=old_version).to_pyarrow_table()


def test_maintain_cli_and_dagster_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from s2vec_pipeline.defs.maintenance import (
        DEFAULT_MAINTAIN_CRON,
        maintain_tables,
        weekly_maintenance_schedule,
    )
    from s2vec_pipeline.defs.resources import S2VecResource

    root = tmp_path / "root"
    for name in ("t1", "t2"):
        for i in range(3):
            delta_store.write_partitions(root, name, _rows("a", 10, i), ["a"], CONTRACT)
    stale = root / delta_store.STAGING_DIR / "t1-dead.arrows"  # a killed streamed write's copy
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"\0" * 1000)
    old = time.time() - 3 * 3600
    os.utime(stale, (old, old))
    before = {n: _walk(root / n) for n in ("t1", "t2")}

    assert main(["maintain", "--root", str(root), "--retention-hours", "0"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()}
    for n in ("t1", "t2"):
        assert int(lines[n][1]) == before[n][0]  # files before, as counted independently
        assert int(lines[n][2]) == _walk(root / n)[0]
    assert lines["_staging"][1:3] == ["1", "0"] and not stale.exists()

    resource = S2VecResource(root=str(root), sources=[])
    defs = dg.Definitions(
        jobs=[maintain_tables],
        schedules=[weekly_maintenance_schedule()],
        resources={"s2vec": resource},
    )
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("maintain_tables").execute_in_process(
            instance=instance,
            run_config={"ops": {"maintain_delta_tables": {"config": {"retention_hours": 0}}}},
        )
    assert result.success
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    meta = event.event_specific_data.metadata
    after = {n: _walk(root / n) for n in ("t1", "t2")}
    assert meta["files_before"].value == sum(f for f, _ in after.values())  # nothing left to do
    assert meta["bytes_after"].value == sum(b for _, b in after.values())
    assert meta["tables"].value == 2
    schedule = defs.resolve_schedule_def("weekly_maintenance")
    assert schedule.cron_schedule == DEFAULT_MAINTAIN_CRON == "0 4 * * 6"
    assert schedule.execution_timezone == "UTC"


def test_maintain_gives_an_older_table_the_checkpoint_interval_and_checkpoints_it(
    tmp_path: Path,
) -> None:
    """A table made before tables were created with ``CHECKPOINT_INTERVAL`` (Delta's 100):
    maintenance sets the interval and checkpoints the latest version, which then loads with the
    JSON commits up to it deleted; the rows do not change."""
    uri = tmp_path / "t"
    for i in range(3):
        write_deltalake(str(uri), _rows(f"p{i}", 5, i), mode="append", partition_by=["parent_l6"])
    assert "delta.checkpointInterval" not in DeltaTable(str(uri)).metadata().configuration
    before = delta_store.read_partitions(tmp_path, "t").sort("x")
    maintain_root(tmp_path, retention_hours=168)
    table = DeltaTable(str(uri))
    interval = table.metadata().configuration["delta.checkpointInterval"]
    assert interval == str(delta_store.CHECKPOINT_INTERVAL)
    latest = table.version()
    assert (uri / "_delta_log" / f"{latest:020d}.checkpoint.parquet").is_file()
    for commit in (uri / "_delta_log").glob("*.json"):
        commit.unlink()  # every commit is in the checkpoint
    assert delta_store.read_partitions(tmp_path, "t").sort("x").equals(before)
