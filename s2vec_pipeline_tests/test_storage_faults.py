"""A full or read-only storage root: exit 2 with a message naming the root, nothing committed,
leftovers removed by the next maintenance.

Real file systems, not mocks: a 2 MiB tmpfs mounted for the test (really full), then remounted
read-only. Mounting needs root (CAP_SYS_ADMIN); without it the tests skip and say so.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from s2vec_pipeline.cli import main
from s2vec_pipeline.errors import StorageUnavailableError, storage_fault
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline.storage.maintenance import maintain_root

CONTRACT = {"table": "t", "profile": "city", "taxonomy_version": "v1"}


def _mount(target: Path, options: str) -> None:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system, unmounted afterwards."""
    target = tmp_path / "small"
    target.mkdir()
    _mount(target, "size=2m")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _rows(key: str, n: int) -> pa.Table:
    values = np.random.default_rng(n).random(n)  # random floats: incompressible
    return pa.table({"parent_l6": pa.array([key] * n, pa.string()), "x": pa.array(values)})


def _data_files(uri: Path) -> set[Path]:
    return {p for p in uri.rglob("*") if p.is_file() and "_delta_log" not in p.parts}


def test_disk_full_commits_nothing_and_maintenance_cleans(small_fs: Path) -> None:
    root = small_fs / "root"
    delta_store.write_partitions(root, "t", _rows("a", 1000), ["a"], CONTRACT)
    before = delta_store.read_partitions(root, "t")
    version = delta_store.table_version(root, "t")
    big = _rows("b", 1_000_000)  # ~8 MB of parquet into 2 MiB
    streamed = pa.RecordBatchReader.from_batches(big.schema, big.to_batches(100_000))
    uri = root / "t"
    files_before = _data_files(uri)

    writes = [
        lambda: delta_store.write_partitions(root, "t", big, ["b"], CONTRACT),
        lambda: delta_store.write_partitions(root, "t", streamed, ["b"], CONTRACT),
        # the embedding tables' path: polars files, then a transaction
        lambda: delta_store.replace_partition(
            root, "t", big.to_batches(100_000), big.schema, "b", CONTRACT, row_group_rows=16384
        ),
    ]
    for write in writes:
        with pytest.raises(StorageUnavailableError) as err:
            write()
        message = str(err.value)
        assert "no space left on device" in message and str(root) in message
        assert "s2vec maintain" in message and f"version is {version}" in message
        assert delta_store.table_version(root, "t") == version
        assert delta_store.read_partitions(root, "t").equals(before)
        assert not any((root / delta_store.STAGING_DIR).glob("*"))  # replay copy deleted
    assert _data_files(uri) >= files_before
    # whatever the failed writes left, the next maintenance removes: only referenced files stay
    maintain_root(root, retention_hours=0)
    referenced = {Path(u.removeprefix("file://")) for u in DeltaTable(str(uri)).file_uris()}
    assert _data_files(uri) == referenced
    assert not any((root / delta_store.STAGING_DIR).glob("*"))
    assert delta_store.read_partitions(root, "t").equals(before)


@pytest.mark.slow
def test_disk_full_through_the_cli_exits_2(
    small_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024 - 64 * 1024))  # leave 64 KiB: not enough
    root = small_fs / "root"
    rc = main(["materialize", "--root", str(root), "--cells", "12cd", "--stages", "extract"])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]  # Dagster logs the step failure above it
    # the first write to fail is the table or the root's Dagster records, whichever comes first
    assert last.startswith("error: cannot write ")
    assert "no space left on device" in last and str(root) in last and "Traceback" not in err
    assert delta_store.table_version(root, "osm_features") in (None, 0)  # at most the empty table
    if delta_store.table_exists(root, "osm_features"):
        assert delta_store.read_partitions(root, "osm_features").height == 0


def test_read_only_root(small_fs: Path) -> None:
    root = small_fs / "root"
    delta_store.write_partitions(root, "t", _rows("a", 100), ["a"], CONTRACT)
    before = delta_store.read_partitions(root, "t")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(StorageUnavailableError, match="read-only") as err:
        delta_store.write_partitions(root, "t", _rows("b", 100), ["b"], CONTRACT)
    assert str(root) in str(err.value) and "another --root" in str(err.value)
    with pytest.raises(StorageUnavailableError, match="read-only"):
        delta_store.write_partitions(root, "new_table", _rows("b", 100), ["b"], CONTRACT)
    assert delta_store.read_partitions(root, "t").equals(before)
    assert delta_store.table_version(root, "t") == 1


def test_storage_faults_are_recognised_in_every_form(tmp_path: Path) -> None:
    """The one errno table (errors.storage_fault): an OSError anywhere in the chain, an OS error
    code in a message (delta-rs, Rust, Python), SQLite's words for a full disk."""
    assert storage_fault(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
    for text, code in (
        ("Generic error: No space left on device (os error 28)", errno.ENOSPC),
        ('Os { code: 30, kind: ReadOnlyFilesystem, message: "Read-only file system" }', 30),
        ("[Errno 13] Permission denied: '/x'", errno.EACCES),
        ("(sqlite3.OperationalError) database or disk is full", errno.ENOSPC),
        ("(sqlite3.OperationalError) disk I/O error", errno.ENOSPC),
    ):
        assert storage_fault(RuntimeError(text)) == code, text
    try:
        try:
            (tmp_path / "missing" / "f").write_text("x")
        except FileNotFoundError as e:  # not a storage fault: the folder is missing
            assert storage_fault(e) is None
            raise RuntimeError("wrapped") from OSError(errno.EDQUOT, "Disk quota exceeded")
    except RuntimeError as wrapped:
        assert storage_fault(wrapped) == errno.EDQUOT
    assert storage_fault(ValueError("os error 2")) is None  # ENOENT: not the disk's state


def test_a_read_only_output_file_through_the_cli(
    small_fs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An OS error outside the Delta writes (polars writing --out): exit 2 and one line naming
    the file, not an 'unexpected' error."""
    table = tmp_path / "t.csv"
    table.write_text("x\n1\n2\n")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    out = small_fs / "result.csv"
    args = ["sql", "SELECT * FROM t", "--table", f"t={table}", "--root", str(tmp_path)]
    assert main([*args, "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: the file system is read-only (") and str(out) in line
    assert "mount it read-write" in line and not out.exists()
