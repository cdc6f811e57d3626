"""settings.py, the one configuration surface: what each variable sets, its default, and that
a blank variable counts as unset. Plain values, no Dagster run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from s2vec_pipeline import settings
from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.storage import fs

REPO = Path(__file__).resolve().parents[1]


def test_defaults_without_variables() -> None:
    assert settings.default_root({}) == "s2vec_data"
    assert settings.cache_dir({}) == Path.home() / ".cache" / "s2vec"
    assert settings.executor_name({}) == ""
    assert settings.dagster_home({}) is None
    s = settings.PipelineSettings.from_env({})
    assert s.root == os.path.abspath("s2vec_data")
    assert (s.profile_name, s.taxonomy_path, s.changes_dir) == ("city", None, None)
    assert [Path(p).name for p in s.sources] == ["helsinki.osm.pbf", "monaco.osm.pbf"]


def test_each_variable(tmp_path: Path) -> None:
    env = {
        "S2VEC_ROOT": str(tmp_path / "root"),
        "S2VEC_PROFILE": "paper",
        "S2VEC_SOURCES": os.pathsep.join(["/a.osm.pbf", "/b.osm.pbf"]),
        "S2VEC_TAXONOMY": "/t.yaml",
        "S2VEC_CHANGES": "/changes",
        "S2VEC_CACHE_DIR": str(tmp_path / "cache"),
        "S2VEC_EXECUTOR": " K8s ",
        "DAGSTER_HOME": "/home/dagster",
    }
    s = settings.PipelineSettings.from_env(env)
    assert (s.root, s.profile_name, s.taxonomy_path, s.changes_dir) == (
        str(tmp_path / "root"),
        "paper",
        "/t.yaml",
        "/changes",
    )
    assert s.sources == ["/a.osm.pbf", "/b.osm.pbf"]
    assert settings.default_root(env) == str(tmp_path / "root")
    assert settings.cache_dir(env) == tmp_path / "cache"
    assert settings.executor_name(env) == "k8s"
    assert settings.dagster_home(env) == "/home/dagster"


def test_a_blank_variable_is_unset() -> None:
    names = ["S2VEC_ROOT", "S2VEC_PROFILE", "S2VEC_SOURCES", "S2VEC_CHANGES", "S2VEC_CACHE_DIR"]
    blank = {name: "  " for name in [*names, "DAGSTER_HOME", "S2VEC_TRAIN_CRON"]}
    assert settings.PipelineSettings.from_env(blank) == settings.PipelineSettings.from_env({})
    assert settings.default_root(blank) == "s2vec_data"
    assert settings.cache_dir(blank) == Path.home() / ".cache" / "s2vec"
    assert settings.dagster_home(blank) is None
    assert settings.schedule_cron("S2VEC_TRAIN_CRON", "0 3 * * 0", blank) == "0 3 * * 0"


def test_schedule_crons() -> None:
    env = {"S2VEC_REFRESH_CRON": "30 1 * * *"}
    assert settings.schedule_cron("S2VEC_REFRESH_CRON", "0 2 * * *", env) == "30 1 * * *"
    assert settings.schedule_cron("S2VEC_MAINTAIN_CRON", "0 4 * * 6", env) == "0 4 * * 6"
    with pytest.raises(ValueError, match="S2VEC_NIGHTLY_CRON is not a schedule's variable"):
        settings.schedule_cron("S2VEC_NIGHTLY_CRON", "0 2 * * *", env)


def test_local_cache_of_an_object_store_root(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("S2VEC_CACHE_DIR", str(tmp_path / "cache"))
    cache = fs.local_cache("s3://bucket/prefix", "_split")
    assert cache.parent.parent == tmp_path / "cache" and cache.name == "_split"
    assert fs.local_cache(tmp_path / "root", "_split") == tmp_path / "root" / "_split"


def test_bad_worker_count_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S2VEC_WORKERS", "0")
    with pytest.raises(S2VecError, match="S2VEC_WORKERS must be a whole number"):
        settings.default_workers()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_ui_passes_the_change_folder(tmp_path: Path) -> None:
    """``make ui CHANGES=DIR`` gives ``dagster dev`` an absolute S2VEC_CHANGES (the UI's
    refresh applies the change files there); an exported S2VEC_CHANGES is the default.
    ``make -n`` prints the commands without running them."""
    env = {k: v for k, v in os.environ.items() if k != "S2VEC_CHANGES"}
    for args, extra, expected in (
        (["CHANGES=changes"], {}, str(REPO / "changes")),
        ([], {"S2VEC_CHANGES": str(tmp_path)}, str(tmp_path)),
        ([], {}, ""),
    ):
        done = subprocess.run(
            ["make", "-n", "-C", str(REPO), "ui", *args],
            capture_output=True,
            text=True,
            env={**env, **extra},
            check=True,
        )
        assert f"S2VEC_CHANGES={expected} " in done.stdout, done.stdout
