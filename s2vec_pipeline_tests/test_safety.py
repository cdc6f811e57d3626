"""Never lose or strand data (issue 16): each finding reproduced on the bundled extracts with
real Delta tables, a real Dagster instance and the real CLI, then checked fixed.

docs/reliability.md lists the trials these tests keep and how to rerun the slow ones."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from deltalake import DeltaTable

from s2vec_pipeline.errors import MissingInputError
from s2vec_pipeline.service.runner import DATA_ASSETS, Launcher, materialize, parse_stages
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6, TINY_MODEL
from s2vec_pipeline_tests.test_object_storage import aws, s3_env, s3_server  # noqa: F401

EMBEDDINGS = ["cell_embeddings", "image_embeddings"]


def _rows(root: Path, table: str, partition: str) -> int:
    return delta_store.read_partitions(root, table, [partition], ["parent_l6"]).height


@pytest.fixture(scope="module")
def embedded_home(
    materialized: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The data layer plus a tiny model and embeddings of both partitions, made by Dagster runs
    (so the instance records every table's rows). Copy before changing it."""
    root, home = tmp_path_factory.mktemp("safe_root"), tmp_path_factory.mktemp("safe_home")
    shutil.copytree(materialized[0], root, dirs_exist_ok=True)
    shutil.copytree(materialized[1], home, dirs_exist_ok=True)
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        materialize(
            PipelineSettings(root=str(root)),
            [HELSINKI_L6, MONACO_L6],
            parse_stages(["train", "embed"]),
            instance,
            op_config={"mae_model": TINY_MODEL},
        )
    return root, home


@pytest.fixture
def copy(embedded_home: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    root, home = tmp_path / "root", tmp_path / "home"
    shutil.copytree(embedded_home[0], root)
    shutil.copytree(embedded_home[1], home)
    return root, home


@pytest.mark.slow
def test_rerun_after_a_lost_raster_partition_keeps_and_remakes_embeddings(
    copy: tuple[Path, Path],
) -> None:
    """Finding 1: a raster partition deleted behind Dagster's back. Before the fix, a plain
    rerun skipped the raster, trained on the other partition and committed an empty overwrite
    of the partition's embeddings (every row of 12cd gone)."""
    from s2vec_pipeline.service.status import root_status

    root, home = copy
    before = {t: _rows(root, t, MONACO_L6) for t in [*DATA_ASSETS, *EMBEDDINGS]}
    assert min(before.values()) > 0
    DeltaTable(str(root / "raster_tiles")).delete(f"parent_l6 = '{MONACO_L6}'")
    assert _rows(root, "raster_tiles", MONACO_L6) == 0
    settings = PipelineSettings(root=str(root))
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        # the lost partition is noticed: status says so, the launcher recomputes from it
        status = root_status(settings, instance)
        (raster,) = [
            p for p in status.partitions if (p.table, p.partition) == ("raster_tiles", MONACO_L6)
        ]
        assert raster.stale and raster.stale[0].startswith("lost: Dagster recorded")
        assert f"{before['raster_tiles']} rows, the table holds 0" in raster.stale[0]
        launcher = Launcher(settings, instance)
        assert launcher.stale_or_missing(MONACO_L6, DATA_ASSETS) == ["raster_tiles"]
        assert launcher.stale_or_missing(HELSINKI_L6, DATA_ASSETS) == []
        # a plain rerun of every stage brings every row back
        materialize(
            settings,
            [HELSINKI_L6, MONACO_L6],
            parse_stages(["extract", "features", "raster", "train", "embed"]),
            instance,
            op_config={"mae_model": TINY_MODEL},
        )
    after = {t: _rows(root, t, MONACO_L6) for t in before}
    assert after == before


@pytest.mark.slow
def test_embedding_write_never_commits_an_empty_overwrite(copy: tuple[Path, Path]) -> None:
    """An embedding run for a partition whose raster is gone fails with a clear error and
    leaves the embeddings as they were (no commit at all)."""
    from s2vec_pipeline.model.embed import write_embeddings
    from s2vec_pipeline.model.registry import list_models, load_model

    root, _ = copy
    DeltaTable(str(root / "raster_tiles")).delete(f"parent_l6 = '{MONACO_L6}'")
    versions = {t: delta_store.table_version(root, t) for t in EMBEDDINGS}
    rows = {t: _rows(root, t, MONACO_L6) for t in EMBEDDINGS}
    model, card = load_model(root, list_models(root)[-1])
    with pytest.raises(MissingInputError, match=f"holds no image of partition {MONACO_L6}"):
        write_embeddings(root, model, card, [MONACO_L6])
    assert {t: delta_store.table_version(root, t) for t in EMBEDDINGS} == versions
    assert {t: _rows(root, t, MONACO_L6) for t in EMBEDDINGS} == rows


@pytest.mark.slow
def test_a_deleted_data_file_is_noticed_and_repaired(copy: tuple[Path, Path]) -> None:
    """Finding 5 (second half): one data file of cell_features deleted from disk. The lost
    file is named, and a plain materialize rewrites the partition from osm_features."""
    from s2vec_pipeline.service.integrity import lost_data

    root, home = copy
    before = _rows(root, "cell_features", MONACO_L6)
    (gone,) = (root / "cell_features" / f"parent_l6={MONACO_L6}").glob("*.parquet")
    gone.unlink()
    settings = PipelineSettings(root=str(root))
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        why = lost_data(instance, root, "cell_features", MONACO_L6)
        assert why is not None and gone.name in why
        assert lost_data(instance, root, "cell_features", HELSINKI_L6) is None
        launcher = Launcher(settings, instance)
        assert launcher.stale_or_missing(MONACO_L6, DATA_ASSETS) == DATA_ASSETS[1:]
        materialize(
            settings, [MONACO_L6], parse_stages(["extract", "features", "raster"]), instance
        )
        assert lost_data(instance, root, "cell_features", MONACO_L6) is None
    assert _rows(root, "cell_features", MONACO_L6) == before


# --- CLI: one line, exit 2 (130), the root unchanged ---------------------------------------


@pytest.fixture
def data_root(materialized_root: Path, tmp_path: Path) -> Path:
    """A private copy of the data layer (no Dagster records: the CLI makes its own)."""
    root = tmp_path / "root"
    shutil.copytree(materialized_root, root)
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the root by content, but the CLI's own Dagster instance and empty
    lock files (OS locks: they stay, holding nothing)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "_dagster" not in p.parts and not p.name.endswith(".lock")
    }


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.slow
def test_refused_runs_leave_the_manifest_alone(
    data_root: Path, monaco_pbf: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Finding 4: a refused --profile and a truncated source used to be recorded in
    s2vec_root.json, and every later plain run failed on them."""
    from s2vec_pipeline.cli import main
    from s2vec_pipeline.storage.manifest import read_manifest

    stages = ["--stages", "extract,features,raster"]
    args = ["materialize", "--root", str(data_root), "--source", str(monaco_pbf), *stages]
    assert main(args) == 0  # records the manifest: city profile, Monaco
    capsys.readouterr()
    manifest = (data_root / "s2vec_root.json").read_bytes()
    assert read_manifest(data_root).profile == "city"

    assert main([*args, "--profile", "paper"]) == 2
    assert "written with different settings" in _one_error(capsys.readouterr().err)
    assert (data_root / "s2vec_root.json").read_bytes() == manifest

    truncated = tmp_path / "truncated.osm.pbf"
    truncated.write_bytes(monaco_pbf.read_bytes()[: monaco_pbf.stat().st_size // 2])
    bad = ["materialize", "--root", str(data_root), "--source", str(truncated), "--force"]
    assert main([*bad, *stages]) == 2
    assert "truncated" in _one_error(capsys.readouterr().err)
    assert (data_root / "s2vec_root.json").read_bytes() == manifest
    # a later plain run (no --source) still works from the manifest
    assert main(["materialize", "--root", str(data_root), *stages]) == 0


@pytest.mark.slow
def test_roots_with_a_space_or_non_ascii_letters(
    monaco_pbf: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Finding 3: delta-rs gives %-encoded file paths, which polars and DuckDB did not find."""
    from s2vec_pipeline.cli import main

    root = tmp_path / "r with space ünï"
    common = ["--root", str(root)]
    src = ["--source", str(monaco_pbf), "--stages", "extract,features,raster"]
    assert main(["materialize", *common, *src]) == 0
    capsys.readouterr()
    assert main(["sql", "SELECT count(*) AS n FROM cell_features", *common]) == 0
    out = capsys.readouterr().out
    expected = delta_store.read_partitions(root, "cell_features", columns=["parent_l6"]).height
    assert expected > 0 and str(expected) in out
    assert main(["status", *common]) == 0
    assert "cell_features" in capsys.readouterr().out

    pct = tmp_path / "pct%20x"
    assert main(["materialize", "--root", str(pct), *src]) == 2
    assert "'%'" in _one_error(capsys.readouterr().err)
    assert not pct.exists()


@pytest.mark.slow
def test_damaged_tables_are_named(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    """Finding 5: a corrupt _delta_log entry of cell_features made status, sql (also queries
    not touching it) and materialize exit 1 with a raw DeltaError naming no table."""
    from s2vec_pipeline.cli import main

    common = ["--root", str(data_root)]
    assert main(["status", *common]) == 0
    capsys.readouterr()
    log = sorted((data_root / "cell_features" / "_delta_log").glob("*.json"))[-1]
    log.write_text('{"add": {"path": "x", broken')
    before = _snapshot(data_root)
    assert main(["status", *common]) == 2
    line = _one_error(capsys.readouterr().err)
    assert "table cell_features under" in line and "_delta_log" in line
    # queries not touching it still work; one that does names it
    assert main(["sql", "SELECT count(*) AS n FROM raster_tiles", *common]) == 0
    n = delta_store.read_partitions(data_root, "raster_tiles", columns=["parent_l6"]).height
    assert str(n) in capsys.readouterr().out
    assert main(["sql", "SELECT count(*) FROM cell_features", *common]) == 2
    assert "table cell_features under" in _one_error(capsys.readouterr().err)
    assert main(["materialize", *common, "--stages", "extract,features,raster"]) == 2
    assert "table cell_features under" in _one_error(capsys.readouterr().err)
    assert _snapshot(data_root) == before


def test_sql_reads_only_the_roots_tables(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Finding 10: COPY … TO wrote files, read_csv read any file. Now refused by default,
    allowed with --allow-external; --out into a missing folder is exit 2 (finding 9)."""
    from s2vec_pipeline.cli import main

    common = ["--root", str(data_root)]
    secret = tmp_path / "secret.csv"
    secret.write_text("word\nswordfish\n")
    target = tmp_path / "written.csv"
    before = _snapshot(data_root)
    for query in (
        f"COPY (SELECT 1 AS a) TO '{target}'",
        f"SELECT * FROM read_csv('{secret}')",
        f"ATTACH '{tmp_path / 'other.db'}' AS other",
        f"COPY (SELECT 1 AS a) TO '{data_root / 'raster_tiles' / 'x.parquet'}'",
    ):
        assert main(["sql", query, *common]) == 2, query
        err = capsys.readouterr().err
        _one_error(err)
        assert "swordfish" not in err
    assert not target.exists() and not (tmp_path / "other.db").exists()
    assert _snapshot(data_root) == before
    assert main(["sql", f"SELECT * FROM read_csv('{secret}')", *common, "--allow-external"]) == 0
    assert "swordfish" in capsys.readouterr().out
    # --table files are still readable, and --out writes where asked
    out = tmp_path / "x.csv"
    query = "SELECT s.word, count(*) AS n FROM s, raster_tiles GROUP BY 1"
    assert main(["sql", query, *common, "--table", f"s={secret}", "--out", str(out)]) == 0
    assert "swordfish" in out.read_text()
    missing = tmp_path / "missing_dir" / "x.parquet"
    assert main(["sql", "SELECT 1", *common, "--out", str(missing)]) == 2
    assert "missing_dir" in _one_error(capsys.readouterr().err)


def test_status_on_a_folder_that_is_no_root(tmp_path: Path, capsys) -> None:
    """Finding 9: status exited 0 and created _dagster/ in any folder."""
    from s2vec_pipeline.cli import main

    folder = tmp_path / "just_a_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["status", "--root", str(folder)]) == 2
    assert "no s2vec root" in _one_error(capsys.readouterr().err)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_unknown_model_version_refused_before_any_run(data_root: Path, capsys) -> None:
    """Finding 9: a bogus --model-version was refused only after the data layer ran."""
    from s2vec_pipeline.cli import main

    before = _snapshot(data_root)
    args = ["materialize", "--root", str(data_root), "--model-version", "0123456789abcdef"]
    assert main(args) == 2
    assert "0123456789abcdef" in _one_error(capsys.readouterr().err)
    assert _snapshot(data_root) == before
    assert not (data_root / "_dagster").exists()


@pytest.mark.slow
def test_change_file_with_a_huge_id(data_root: Path, tmp_path: Path, capsys) -> None:
    """Finding 9: id="99999999999999999999" was an internal error (exit 1)."""
    from s2vec_pipeline.cli import main
    from s2vec_pipeline_tests.test_osm_changes import _osc

    changes = tmp_path / "changes"
    bad = _osc(
        changes / "0001.osc",
        modify='  <node id="99999999999999999999" version="2" timestamp="2030-01-01T00:00:00Z" '
        'uid="1" user="t" changeset="1" lat="43.73" lon="7.42"/>\n',
    )
    before = _snapshot(data_root)
    assert main(["refresh", "--root", str(data_root), "--changes", str(changes)]) == 2
    line = _one_error(capsys.readouterr().err)
    assert str(bad) in line and "illegal id" in line
    assert _snapshot(data_root) == before


# --- training: torn checkpoints, a full disk, Ctrl-C ---------------------------------------


class _Crash(Exception):
    pass


class _CrashAtEpoch:
    """A Lightning callback that fails at the start of epoch ``epoch`` (after the previous
    epoch's checkpoint was written): a crash mid-training."""

    def __new__(cls, epoch: int):  # noqa: ANN204 - built lazily: Lightning imports slowly
        import lightning as L

        class Crash(L.Callback):
            def on_train_epoch_start(self, trainer: L.Trainer, pl_module: object) -> None:
                if trainer.current_epoch == epoch:
                    raise _Crash(f"crash at epoch {epoch}")

        return Crash()


def _zip_whole(path: Path) -> bool:
    """Torch checkpoints are zip archives: whole when every member's CRC matches."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except zipfile.BadZipFile:
        return False


@pytest.mark.slow
def test_a_torn_checkpoint_is_set_aside_and_training_starts_over(
    data_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 2: a truncated last.ckpt (a disk that filled while it was written) made every
    later training fail with 'PytorchStreamReader failed reading zip archive', --force too."""
    from s2vec_pipeline.model.train import TrainConfig, train_model

    config = TrainConfig(**TINY_MODEL)
    with pytest.raises(_Crash):
        train_model(data_root, config=config, callbacks=[_CrashAtEpoch(2)])
    (work,) = (data_root / "models").glob(".*.partial")
    last = work / "last.ckpt"
    assert _zip_whole(last)  # written whole, no temporary file left
    assert not list(work.glob("*.tmp"))
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # torn
    assert not _zip_whole(last)
    with caplog.at_level("WARNING", logger="s2vec_pipeline.progress"):
        card = train_model(data_root, config=config)
    assert card.resumed_from is None  # started over, from epoch 0
    aside = work.with_name(f"{work.name}.torn-last.ckpt")
    assert aside.is_file() and "set aside" in caplog.text and str(aside) in caplog.text
    assert not work.exists() and (data_root / "models" / card.model_version).is_dir()


@pytest.mark.slow
def test_a_good_checkpoint_is_resumed(data_root: Path) -> None:
    """The check does not throw away a whole checkpoint: training resumes from it."""
    from s2vec_pipeline.model.train import TrainConfig, train_model

    config = TrainConfig(**TINY_MODEL)
    with pytest.raises(_Crash):
        train_model(data_root, config=config, callbacks=[_CrashAtEpoch(2)])
    card = train_model(data_root, config=config)
    assert card.resumed_from is not None and card.resumed_from["epoch"] == 2


def _mount_tmpfs(where: Path, size: str) -> None:
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")


@pytest.mark.slow
def test_a_full_disk_while_checkpointing(data_root: Path, tmp_path: Path) -> None:
    """Finding 2: a disk that fills during checkpointing failed with an internal error; now
    StorageUnavailableError (exit 2) names the folder, and the next run with space works."""
    import subprocess

    from s2vec_pipeline.errors import StorageUnavailableError
    from s2vec_pipeline.model.train import TrainConfig, train_model

    small = tmp_path / "small"
    _mount_tmpfs(small, "96k")  # the tiny model's checkpoint is ~300 KB
    try:
        (data_root / "models").symlink_to(small, target_is_directory=True)
        with pytest.raises(StorageUnavailableError, match="training checkpoint in") as info:
            train_model(data_root, config=TrainConfig(**TINY_MODEL))
        assert str(small) in str(info.value) or "models" in str(info.value)
        assert not [p for p in small.rglob("*.tmp")]
    finally:
        subprocess.run(["umount", str(small)], check=False)
    (data_root / "models").unlink()
    card = train_model(data_root, config=TrainConfig(**TINY_MODEL))  # space again: trains
    assert (data_root / "models" / card.model_version / "model.ckpt").is_file()


# --- killed and interrupted processes ------------------------------------------------------


def _cli(root: Path, *args: str) -> subprocess.Popen:
    """``s2vec`` in its own process group (signals reach it and its workers, not pytest), with
    the root's own Dagster instance."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    return subprocess.Popen(
        [sys.executable, "-m", "s2vec_pipeline.cli", *args, "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _running_runs(root: Path, job: str) -> list[dg.DagsterRun]:
    from s2vec_pipeline.storage.locks import exclusive

    home = root / "_dagster"
    if not (home / "dagster.yaml").exists():
        return []
    with exclusive(home / ".open.lock"):  # the CLI may be creating its schemas right now
        instance = dg.DagsterInstance.local_temp(str(home))
    with instance:
        return [r for r in instance.get_runs() if r.job_name == job and not r.is_finished]


@pytest.mark.slow
def test_killed_runs_are_marked_failed_and_shown(
    data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    """Finding 6: a SIGKILLed CLI left its run STARTED forever, invisible to s2vec status."""
    from s2vec_pipeline.cli import main

    stages = ["--stages", "extract,features,raster", "--force"]
    proc = _cli(data_root, "materialize", "--cells", MONACO_L6, *stages)

    def started() -> bool:
        return any(
            r.status == dg.DagsterRunStatus.STARTED for r in _running_runs(data_root, "data_layer")
        )

    _wait_for(started, proc, "a data_layer run")
    # at once: a partition run can take well under a second now, and must still be running
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (run,) = _running_runs(data_root, "data_layer")  # still STARTED: nobody ended it
    assert main(["status", "--root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "failed or interrupted runs" in out
    assert f"{run.run_id[:8]} data_layer {MONACO_L6} failure" in out
    assert "interrupted: its process" in out
    assert _running_runs(data_root, "data_layer") == []
    # nothing left that blocks a later run
    assert main(["materialize", "--root", str(data_root), "--cells", MONACO_L6, *stages]) == 0
    capsys.readouterr()
    assert main(["status", "--root", str(data_root)]) == 0
    assert "failed or interrupted runs" not in capsys.readouterr().out  # a success followed


def _non_progress(err: str) -> list[str]:
    return [
        line
        for line in err.replace("\r", "\n").splitlines()
        if line.strip() and not re.match(r"\s*(\x1b\[K)?(epoch \d+/\d+|\[\d+/\d+\])", line)
    ]


@pytest.mark.slow
def test_ctrl_c_during_training(data_root: Path) -> None:
    """Finding 7: Ctrl-C while training exited 1 with ~180 lines of
    DagsterExecutionInterruptedError; now exit 130 and one line. A rerun resumes."""
    proc = _cli(data_root, "materialize", "--stages", "train", "--epochs", "500")
    lines: list[str] = []

    def epoch_seen() -> bool:
        line = proc.stderr.readline()
        lines.append(line)
        return line.startswith("epoch ")

    _wait_for(epoch_seen, proc, "the first epoch")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=120)
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "DagsterExecutionInterruptedError" not in err
    (line,) = _non_progress(err)
    assert line.startswith("error: interrupted")


@pytest.mark.slow
def test_ctrl_c_during_extraction_workers(data_root: Path, tmp_path: Path) -> None:
    """Finding 7: Ctrl-C during parallel extraction printed the error line, then ~180 lines
    of worker tracebacks."""
    root = tmp_path / "fresh"
    proc = _cli(root, "materialize", "--stages", "extract", "--workers", "2")

    def workers_started() -> bool:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        return children.exists() and len(children.read_text().split()) >= 2

    _wait_for(workers_started, proc, "the extraction workers")
    # Early in their work, at once: a partition run now takes ~2 s after a ~2 s start, and a
    # signal that arrives once the command has finished (interpreter shutdown) tests nothing
    _wait_for(lambda: _running_runs(root, "data_layer") != [], proc, "a worker's partition run")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    (line,) = _non_progress(err)
    assert line.startswith("error: interrupted")


@pytest.mark.slow
def test_s3_root_without_credentials(
    s3_env: str,  # noqa: F811 - the fixture imported above
    monaco_pbf: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Finding 9: a root whose s2vec_root.json is in the bucket, opened without credentials,
    failed with "OSError: Generic S3 error" (exit 1) in status (moto lets pyarrow read
    anonymously; delta-rs cannot)."""
    from s2vec_pipeline.cli import main
    from s2vec_pipeline.settings import PipelineSettings as Settings
    from s2vec_pipeline.storage.manifest import record_sources

    taxonomy = Settings(root=s3_env, sources=(str(monaco_pbf),)).taxonomy.version
    record_sources(s3_env, [str(monaco_pbf)], "city", taxonomy)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for command in (["status"], ["materialize", "--stages", "extract"]):
        assert main([*command, "--root", s3_env]) == 2, command
        line = _one_error(capsys.readouterr().err)
        assert "AWS_ACCESS_KEY_ID" in line


def test_status_on_a_read_only_root(data_root: Path, tmp_path: Path, capsys) -> None:
    """Finding 9: status on a read-only root failed (it took a lock file, then SQLite could not
    open its files there). Real read-only bind mount; skipped where mount is not allowed."""
    from s2vec_pipeline.cli import main

    assert main(["status", "--root", str(data_root)]) == 0  # the root's instance exists
    expected = capsys.readouterr().out
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(data_root), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        assert main(["status", "--root", str(ro)]) == 0
        assert capsys.readouterr().out == expected.replace(str(data_root), str(ro))
        assert main(["materialize", "--root", str(ro), "--stages", "extract"]) == 2
        assert "not writable" in _one_error(capsys.readouterr().err)
    finally:
        subprocess.run(["umount", str(ro)], check=False)
