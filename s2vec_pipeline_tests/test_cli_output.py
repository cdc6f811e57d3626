"""What the ``s2vec`` command prints, through the real CLI on the bundled extracts: one
``error:`` line for a failing run (no Dagster log pages), tracebacks only with ``-vv``, exit 2
for bad input, progress lines, and no Lightning chatter while training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from s2vec_pipeline.cli import main
from s2vec_pipeline.model.registry import list_models
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6
from s2vec_pipeline_tests.test_osm_changes import _osc

REPO = Path(__file__).resolve().parents[1]
DATA_TABLES = ["osm_features", "cell_features", "raster_tiles"]
#: What Lightning prints on every fit unless silenced.
LIGHTNING_LINES = [
    "GPU available",
    "TPU available",
    "limit_val_batches",
    "Loading `train_dataloader`",
    "`Trainer.fit` stopped",
    "Tip",
]


@pytest.fixture
def root(materialized_root: Path, tmp_path: Path) -> Path:
    """A private copy of the materialized data layer (the CLI adds its Dagster records)."""
    copy = tmp_path / "root"
    shutil.copytree(materialized_root, copy)
    return copy


def _versions(root: Path) -> dict[str, int | None]:
    return {t: delta_store.table_version(root, t) for t in DATA_TABLES}


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_failing_run_prints_one_error_line(root: Path, capsys: pytest.CaptureFixture) -> None:
    before = _versions(root)
    args = ["materialize", "--root", str(root), "--cells", MONACO_L6, "--profile", "paper"]
    assert main([*args, "--stages", "extract,features,raster"]) == 2
    out, err = capsys.readouterr()
    (line,) = _lines(err)
    assert line.startswith("error: ") and "written with different settings" in line
    for noise in ("Traceback", "STEP_FAILURE", "RUN_FAILURE", " - dagster - "):
        assert noise not in err and noise not in out
    assert _versions(root) == before

    # The same failure with -vv: the traceback, then the same error line last.
    assert main([*args, "--stages", "extract,features,raster", "-vv"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert _lines(err)[-1] == line
    assert _versions(root) == before


@pytest.mark.slow
def test_failing_step_prints_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A failure inside a Dagster step (features before any extraction): one line at default
    verbosity; with -vv Dagster's logs carry the step failure, and the same line comes last."""
    args = ["materialize", "--root", str(tmp_path), "--cells", MONACO_L6, "--stages", "features"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    (line,) = _lines(err)
    assert line.startswith("error: osm_features does not exist")
    for noise in ("Traceback", "STEP_FAILURE", "RUN_FAILURE", " - dagster - "):
        assert noise not in err and noise not in out
    assert main([*args, "-vv"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "STEP_FAILURE" in err
    assert _lines(err)[-1] == line


def test_cells_naming_no_cell_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for value in (",", " , ,"):
        assert main(["materialize", "--root", str(tmp_path / "r"), "--cells", value]) == 2
        (line,) = _lines(capsys.readouterr().err)
        assert line.startswith("error: --cells names no cell")
    assert main(["materialize", "--root", str(tmp_path / "r"), "--stages", ","]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith("error: unknown stage(s) (none given): choose from extract,features")
    assert not (tmp_path / "r").exists()


def test_tokens_are_plain_in_messages(tmp_path: Path, monaco_pbf: Path, capsys) -> None:
    args = ["materialize", "--root", str(tmp_path), "--source", str(monaco_pbf)]
    assert main([*args, "--cells", HELSINKI_L6]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert f"cells {HELSINKI_L6} are outside" in line and f"cover {MONACO_L6}." in line
    assert "np.str_" not in line and "[" not in line


@pytest.mark.slow
def test_bad_coordinate_in_change_file(root: Path, tmp_path: Path, capsys) -> None:
    """lat="999" makes osmium raise InvalidLocationError (not a RuntimeError) while reading."""
    changes = tmp_path / "changes"
    bad = _osc(
        changes / "0001.osc",
        modify='  <node id="1" version="2" timestamp="2030-01-01T00:00:00Z" uid="1" user="t" '
        'changeset="1" lat="999" lon="24.94"/>\n',
    )
    before = _versions(root)
    assert main(["refresh", "--root", str(root), "--changes", str(changes)]) == 2
    out, err = capsys.readouterr()
    (line,) = _lines(err)
    assert line.startswith("error: change file ") and str(bad) in line and "999" in line
    assert "Traceback" not in out + err and "InvalidLocationError" not in out + err
    assert _versions(root) == before
    ledgers = (
        list((root / "_sources").glob("*/ledger.json")) if (root / "_sources").exists() else []
    )
    assert all("0001.osc" not in p.read_text() for p in ledgers)


def test_sql_says_when_it_cuts(materialized_root: Path, capsys: pytest.CaptureFixture) -> None:
    n = delta_store.read_partitions(materialized_root, "cell_features", columns=["cell_token"])
    assert n.height > 50
    query = "SELECT cell_token FROM cell_features"
    assert main(["sql", query, "--root", str(materialized_root)]) == 0
    assert f"showing 50 of {n.height} rows (--limit to change)" in capsys.readouterr().out
    assert main(["sql", query, "--root", str(materialized_root), "--limit", "7"]) == 0
    assert f"showing 7 of {n.height} rows" in capsys.readouterr().out
    assert main(["sql", f"{query} LIMIT 3", "--root", str(materialized_root)]) == 0
    assert "showing" not in capsys.readouterr().out


@pytest.mark.slow
def test_partition_progress_and_verbose(
    tmp_path: Path, monaco_pbf: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["materialize", "--source", str(monaco_pbf), "--stages", "extract"]
    assert main([*args, "--root", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert _lines(err) and all(line.startswith("[") for line in _lines(err)), err
    (line,) = _lines(err)
    assert line.startswith(f"[1/1] data_layer {MONACO_L6} done in ") and "OSM objects read" in line
    # -v: Dagster's INFO logs (the source observation logs one)
    assert main([*args, "--root", str(tmp_path / "b"), "-v"]) == 0
    err = capsys.readouterr().err
    assert " - dagster - INFO - " in err and f"[1/1] data_layer {MONACO_L6} done" in err


@pytest.mark.slow
def test_training_prints_epochs_not_lightning(root: Path) -> None:
    """A real subprocess (stderr not a terminal): Lightning's handlers write to the process's
    stderr, which pytest's capture would not see."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("DAGSTER_HOME", None)
    cmd = [sys.executable, "-m", "s2vec_pipeline.cli", "materialize", "--root", str(root)]
    cmd += ["--cells", MONACO_L6, "--stages", "train", "--epochs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    for noise in LIGHTNING_LINES:
        assert noise not in done.stderr + done.stdout, noise
    assert "\r" not in done.stderr  # plain lines when stderr is not a terminal
    lines = _lines(done.stderr)
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/2", "2/2"]
    assert all(" loss " in e for e in epochs)
    assert any(line.startswith("[1/1] train_model done in ") for line in lines)
    # the rest of stderr: at most the asset-check warning line, and why each failed
    others = [line for line in lines if line not in epochs and not line.startswith("[")]
    assert all(line.startswith("warning: ") for line in others), others
    if others:
        assert others[0].startswith("warning: asset checks")
        assert any("too few to validate a model" in line for line in others[1:]), others
    (version,) = list_models(root)
    assert f"model            {version}" in done.stdout


#: Every command the README documents (``s2vec region`` has two).
COMMANDS = [
    ["materialize"],
    ["refresh"],
    ["region", "add"],
    ["region", "list"],
    ["status"],
    ["sql"],
    ["maintain"],
    ["evaluate"],
    ["pool"],
    ["map"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_takes_verbose(command: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert "-v, --verbose" in capsys.readouterr().out


def test_status_verbose(root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["status", "-v", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "osm_features" in out and "cell_features" in out
    assert main(["status", "-vv", "--root", str(root / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)")  # -vv: the traceback first
    assert _lines(err)[-1] == f"error: --root {root / 'missing'} does not exist: give the " + (
        "root of a materialized run"
    )


def _s2vec(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The real ``s2vec`` in its own process, with these variables (and no DAGSTER_HOME)."""
    environ = {
        **{k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "S2VEC_ROOT")},
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    cmd = [sys.executable, "-m", "s2vec_pipeline.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=cwd, timeout=300)


def test_root_from_the_environment(materialized_root: Path, tmp_path: Path) -> None:
    """Without --root: $S2VEC_ROOT, else ./s2vec_data (of the working directory)."""
    rows = delta_store.read_partitions(materialized_root, "cell_features", columns=["cell_token"])
    query = ["sql", "SELECT count(*) AS n FROM cell_features", "--out", "n.csv"]
    done = _s2vec(query, tmp_path, S2VEC_ROOT=str(materialized_root))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "n.csv").read_text().split() == ["n", str(rows.height)]

    monaco = ["region", "add", "monaco", "--bbox", "43.72,7.40,43.75,7.44"]
    for where, env in (("a", {}), ("b", {"S2VEC_ROOT": ""}), ("c", {"S2VEC_ROOT": "../there"})):
        cwd = tmp_path / where
        cwd.mkdir()
        done = _s2vec(monaco, cwd, **env)
        assert done.returncode == 0, done.stderr
        expected = (cwd / "../there").resolve() if env.get("S2VEC_ROOT") else cwd / "s2vec_data"
        assert (expected / "regions.yaml").is_file()


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """``s2vec sql ... | head -1``: a real pipe whose reader goes away after one line, while
    the command still has ~700 KB to print (more than a pipe holds)."""
    csv = tmp_path / "big.csv"
    csv.write_text("n,text\n" + "".join(f"{i},{'x' * 30}\n" for i in range(20_000)))
    cmd = [sys.executable, "-m", "s2vec_pipeline.cli", "sql", "SELECT * FROM big"]
    cmd += ["--table", f"big={csv}", "--root", str(tmp_path), "--limit", "20000"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"shape: (20_000, 2)")
    proc.stdout.close()  # what head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) in (0, 141)
    assert err == ""
