"""A storage root on an object store: the pipeline on ``s3://bucket/root`` against a real
S3-compatible server (moto's server mode, a separate process on loopback), configured only by the
standard AWS environment. Values are compared with the same run on a local root."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from s2vec_pipeline.cli import main
from s2vec_pipeline.settings import ENV_CACHE_DIR
from s2vec_pipeline.storage import delta_store, fs
from s2vec_pipeline_tests.conftest import MONACO_L6

pytestmark = pytest.mark.slow  # each test needs moto's S3 server (own process)

BUCKET = "s2vec-test"
DATA_TABLES = ["osm_features", "cell_features", "raster_tiles"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server in its own process (delta-rs holds the GIL in some calls, so an
    in-process threaded server can deadlock), with the test bucket; yields the AWS
    environment pointing at it (set per test by ``aws``)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # moto[server] is a dev dependency (pyproject.toml): a missing one fails, never skips
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=BUCKET)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def aws(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The standard AWS environment pointing at the server, for this test only."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_env(aws: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``s3://`` root, a local Dagster home and cache for this test."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))
    return f"s3://{BUCKET}/{tmp_path.name}/root"


def _objects(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [o["Key"] for p in pages for o in p.get("Contents", []) if o["Key"].startswith(prefix)]


def _sorted_table(root: str | Path, table: str) -> pl.DataFrame:
    df = delta_store.read_partitions(root, table)
    return df.sort(df.columns[: min(6, len(df.columns))])


def test_storage_paths_local_and_s3(s3_env: str, tmp_path: Path) -> None:
    assert fs.join(s3_env, "a", "b.json") == f"{s3_env}/a/b.json"
    assert fs.join(tmp_path, "a") == str(tmp_path / "a")
    for root in (s3_env, str(tmp_path / "local")):
        target = fs.join(root, "x", "f.json")
        assert fs.read_bytes(target) is None and not fs.exists(target)
        fs.write_bytes(target, b"one")
        fs.write_bytes(target, b"two")
        assert fs.read_bytes(target) == b"two" and fs.is_file(target)
        assert fs.list_dirs(root) == ["x"]
        assert [e.relative for e in fs.list_files(root)] == ["x/f.json"]
        fs.delete_tree(fs.join(root, "x"))
        assert fs.list_files(root) == []
    # only pyarrow's empty folder markers ("…/") may remain
    assert [k for k in _objects(s3_env.split("/", 3)[3]) if not k.endswith("/")] == []


def test_materialize_data_stages_and_sql_on_s3(
    s3_env: str, tmp_path: Path, monaco_pbf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "local_root"
    common = ["--source", str(monaco_pbf), "--cells", MONACO_L6]
    stages = ["--stages", "extract,features,raster"]
    assert main(["materialize", "--root", s3_env, *common, *stages]) == 0
    # the same run on a local root (its own instance: DAGSTER_HOME unset)
    home = os.environ.pop("DAGSTER_HOME")
    try:
        assert main(["materialize", "--root", str(local), *common, *stages]) == 0
    finally:
        os.environ["DAGSTER_HOME"] = home
    capsys.readouterr()
    prefix = s3_env.split("/", 3)[3]
    keys = _objects(prefix)
    assert f"{prefix}/s2vec_root.json" in keys
    for table in DATA_TABLES:
        assert f"{prefix}/{table}/_delta_log/00000000000000000000.json" in keys
        on_s3, on_disk = _sorted_table(s3_env, table), _sorted_table(local, table)
        assert on_s3.height > 0
        assert on_s3.equals(on_disk), table
        assert delta_store.table_contract(s3_env, table) == delta_store.table_contract(local, table)
    assert not any("_dagster" in k or "_staging" in k for k in keys)  # both stay local

    # SQL over the s3 tables agrees with SQL over the local ones
    query = (
        "SELECT channel, count(*) AS n, sum(length_m) AS m FROM osm_features "
        "GROUP BY channel ORDER BY channel"
    )
    out = {}
    for name, root in (("s3", s3_env), ("local", str(local))):
        path = tmp_path / f"{name}.parquet"
        assert main(["sql", query, "--root", root, "--out", str(path)]) == 0
        out[name] = pl.read_parquet(path)
    assert out["s3"].height > 3 and out["s3"].equals(out["local"])

    # the manifest on s3 records the source: later commands need no --source
    assert main(["sql", "SELECT count(*) AS n FROM raster_tiles", "--root", s3_env]) == 0
    from s2vec_pipeline.storage.manifest import recorded_sources

    assert recorded_sources(s3_env) == [str(monaco_pbf.resolve())]


def test_missing_bucket_is_one_line_exit_2(
    aws: dict[str, str], tmp_path: Path, monaco_pbf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = "s3://no-such-bucket-s2vec/root"
    code = main(["materialize", "--root", root, "--source", str(monaco_pbf), "--cells", MONACO_L6])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "'no-such-bucket-s2vec'" in err
    assert "does not exist" in err and "create it" in err
    import boto3

    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert "no-such-bucket-s2vec" not in names  # nothing created, nothing written


def test_object_root_needs_dagster_home(
    s3_env: str, monaco_pbf: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv("DAGSTER_HOME")
    code = main(["materialize", "--root", s3_env, "--source", str(monaco_pbf), "--cells", "12cd"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "DAGSTER_HOME" in err and len(err.splitlines()) == 1
    assert _objects(s3_env.split("/", 3)[3]) == []  # nothing written


def _write_one(root: str, table: str, key: str, env: dict[str, str], queue: mp.Queue) -> None:
    """A writer process: one partition of ``table`` (created by whoever comes first)."""
    os.environ.update(env)
    try:
        data = pa.table({"parent_l6": [key] * 50, "value": list(range(50))})
        version = delta_store.write_partitions(root, table, data, [key], {"table": table})
        queue.put((key, version, None))
    except Exception as e:  # reported to the test
        queue.put((key, None, repr(e)))


@pytest.mark.parametrize("table", ["t0", "t1", "t2", "t3"])
def test_two_writers_create_and_write_one_s3_table(s3_env: str, table: str) -> None:
    """Two processes create and write one fresh table at once. Each race is close to a coin
    toss, so four tables: before the fixes half the rounds failed (the losing CREATE was
    committed again as version 1; a writer read its version from a shifted history)."""
    ctx = mp.get_context("spawn")  # deltalake panics in forked children
    queue = ctx.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == ENV_CACHE_DIR}
    procs = [
        ctx.Process(target=_write_one, args=(s3_env, table, k, env, queue)) for k in ("aa", "bb")
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[2] for r in results] == [None, None], results
    df = delta_store.read_partitions(s3_env, table).sort("parent_l6", "value")
    assert df["parent_l6"].to_list() == ["aa"] * 50 + ["bb"] * 50
    assert df["value"].to_list() == list(range(50)) * 2
    # exactly one version 0 (the creation) and one commit per writer after it
    logs = sorted(k for k in _objects(s3_env.split("/", 3)[3]) if f"{table}/_delta_log/" in k)
    assert [k.rsplit("/", 1)[1] for k in logs if k.endswith(".json")] == [
        f"{v:020d}.json" for v in range(3)
    ]
    # each writer reports the version its own commit got
    by_key = {key: version for key, version, _ in results}
    assert sorted(by_key.values()) == [1, 2]
    for key, version in by_key.items():
        assert _commit_partitions(s3_env, table, version) == key


def _commit_partitions(root: str, table: str, version: int) -> str:
    """The partitions the commit file of ``version`` names (read with boto3, not delta-rs)."""
    import json

    import boto3

    key = f"{root.split('/', 3)[3]}/{table}/_delta_log/{version:020d}.json"
    body = boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    infos = [json.loads(line)["commitInfo"] for line in body.splitlines() if "commitInfo" in line]
    return infos[0]["s2vec.partitions"]


def test_losing_creator_checks_the_contract(s3_env: str) -> None:
    """Two creators of one fresh table: the conditional PUT of version 0 lets one win; the
    loser (which found no table before creating) checks the winner's contract."""
    schema = pa.schema([("parent_l6", pa.string()), ("value", pa.int64())])
    uri = delta_store.table_uri(s3_env, "c")
    delta_store._create(uri, "c", schema, {"table": "c", "profile": "city"})
    # a second creation attempt of version 0 loses without raising …
    delta_store._create(uri, "c", schema, {"table": "c", "profile": "paper"})
    assert delta_store.table_contract(s3_env, "c") == {"table": "c", "profile": "city"}
    # … and ensure_table then refuses the other contract
    from s2vec_pipeline.errors import IncompatibleTableError

    with pytest.raises(IncompatibleTableError, match="profile"):
        delta_store.ensure_table(s3_env, "c", schema, {"table": "c", "profile": "paper"})


# --- models, refresh, maintenance on s3 ---------------------------------------------------

NEW_NODE = 99_000_000_123  # a restaurant the change file adds in Monaco


@contextlib.contextmanager
def _local_dagster() -> Iterator[None]:
    """The local root's own instance (<root>/_dagster): DAGSTER_HOME unset for the block."""
    home = os.environ.pop("DAGSTER_HOME", None)
    try:
        yield
    finally:
        if home is not None:
            os.environ["DAGSTER_HOME"] = home


def _data_stages_on_both(s3_root: str, local: Path, monaco_pbf: Path) -> None:
    args = [
        "--source",
        str(monaco_pbf),
        "--cells",
        MONACO_L6,
        "--stages",
        "extract,features,raster",
    ]
    assert main(["materialize", "--root", s3_root, *args]) == 0
    with _local_dagster():
        assert main(["materialize", "--root", str(local), *args]) == 0


def test_models_and_embeddings_on_s3(s3_env: str, tmp_path: Path, monaco_pbf: Path) -> None:
    from s2vec_pipeline.model.registry import list_models, load_model
    from s2vec_pipeline.service.runner import dagster_instance, materialize, parse_stages
    from s2vec_pipeline.settings import PipelineSettings
    from s2vec_pipeline_tests.conftest import TINY_MODEL

    local = tmp_path / "local_root"
    _data_stages_on_both(s3_env, local, monaco_pbf)
    for root in (s3_env, str(local)):
        settings = PipelineSettings(root=root, sources=[str(monaco_pbf.resolve())])
        with contextlib.ExitStack() as stack:
            if root == str(local):
                stack.enter_context(_local_dagster())
            instance = stack.enter_context(dagster_instance(root))
            report = materialize(
                settings,
                [MONACO_L6],
                parse_stages(["train", "embed"]),
                instance,
                op_config={"mae_model": TINY_MODEL},
            )
            assert report.checks_failed == []
    (version,) = list_models(s3_env)
    assert list_models(local) == [version]  # the same content hash on both roots
    prefix = s3_env.split("/", 3)[3]
    keys = set(_objects(f"{prefix}/models/{version}/"))
    for name in ("model_card.json", "model.ckpt", "last.ckpt", "loss_curve.png"):
        assert f"{prefix}/models/{version}/{name}" in keys
    assert not any("/models/." in k for k in _objects(prefix))  # no work folder on the store
    model, card = load_model(s3_env, version)
    local_model, local_card = load_model(local, version)
    assert card.directory == f"{s3_env}/models/{version}"
    assert card.partitions == local_card.partitions and card.n_train == local_card.n_train
    assert sum(p.numel() for p in model.parameters()) > 0
    for table in ("cell_embeddings", "image_embeddings"):
        on_s3, on_disk = _sorted_table(s3_env, table), _sorted_table(local, table)
        assert on_s3.height > 0 and on_s3.height == on_disk.height
        assert on_s3.drop("embedding").equals(on_disk.drop("embedding"))
        a = np.asarray(on_s3["embedding"].to_list(), dtype=np.float32)
        b = np.asarray(on_disk["embedding"].to_list(), dtype=np.float32)
        # same tiles, same seed, same code on CPU: the same weights, so the same embeddings
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _restaurant_change(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "0001.osc"
    path.write_text(
        "<?xml version='1.0' encoding='UTF-8'?>\n<osmChange version=\"0.6\" generator=\"t\">\n"
        "<create>\n"
        f'  <node id="{NEW_NODE}" version="1" timestamp="2024-02-01T00:00:00Z" uid="1" '
        'user="t" changeset="1" lat="43.7370000" lon="7.4220000">\n'
        '    <tag k="amenity" v="restaurant"/>\n  </node>\n'
        "</create>\n</osmChange>\n"
    )
    return path


def test_refresh_with_a_change_file_on_s3(
    s3_env: str, tmp_path: Path, monaco_pbf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from s2vec_pipeline.osm import changes as osm_changes

    local = tmp_path / "local_root"
    _data_stages_on_both(s3_env, local, monaco_pbf)
    changes = tmp_path / "changes"
    _restaurant_change(changes)
    capsys.readouterr()
    assert main(["refresh", "--root", s3_env, "--changes", str(changes)]) == 0
    out = capsys.readouterr().out
    assert "applied to" in out and "0001.osc" in out and MONACO_L6 in out
    with _local_dagster():
        assert main(["refresh", "--root", str(local), "--changes", str(changes)]) == 0
    capsys.readouterr()
    for table in DATA_TABLES:
        assert _sorted_table(s3_env, table).equals(_sorted_table(local, table)), table
    rows = delta_store.read_partitions(s3_env, "osm_features").filter(pl.col("osm_id") == NEW_NODE)
    assert rows.height >= 1 and rows["lat"][0] == pytest.approx(43.737, abs=1e-6)
    # the ledger and the updated extract live on the store, not only in the local cache
    sid = osm_changes.source_id(monaco_pbf)
    prefix = s3_env.split("/", 3)[3]
    keys = _objects(f"{prefix}/_sources/{sid}/")
    assert f"{prefix}/_sources/{sid}/ledger.json" in keys
    assert any(k.endswith(".000001.osm.pbf") for k in keys)
    ledger = osm_changes.read_ledger(s3_env, monaco_pbf)
    assert [e["name"] for e in ledger["applied"]] == ["0001.osc"]
    # a fresh host (empty local cache) sees what was applied: nothing to do again
    shutil.rmtree(os.environ[ENV_CACHE_DIR])
    versions = {t: delta_store.table_version(s3_env, t) for t in DATA_TABLES}
    assert main(["refresh", "--root", s3_env, "--changes", str(changes)]) == 0
    assert "applied: no new change file" in capsys.readouterr().out
    assert {t: delta_store.table_version(s3_env, t) for t in DATA_TABLES} == versions
    extract = osm_changes.current_extract(s3_env, monaco_pbf)
    assert extract.is_file() and extract.name.endswith(".000001.osm.pbf")

    # regions and status read and write the same root
    bbox = "43.73,7.41,43.75,7.44"
    assert main(["region", "add", "monaco-town", "--bbox", bbox, "--root", s3_env]) == 0
    assert f"{prefix}/regions.yaml" in _objects(prefix)
    capsys.readouterr()
    assert main(["region", "list", "--root", s3_env]) == 0
    assert "monaco-town" in capsys.readouterr().out
    assert main(["status", "--root", s3_env]) == 0
    status = capsys.readouterr().out
    assert f"root {s3_env}" in status and "0001.osc" in status and "monaco-town" in status


def test_maintain_compacts_and_vacuums_an_s3_table(
    s3_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    contract = {"table": "m"}
    for i in range(3):  # three versions of one partition, two more small files in another
        data = pa.table({"parent_l6": ["aa"] * 10, "value": [i] * 10})
        delta_store.write_partitions(s3_env, "m", data, ["aa"], contract)
    for key in ("bb", "cc"):
        data = pa.table({"parent_l6": [key] * 5, "value": [7] * 5})
        delta_store.write_partitions(s3_env, "m", data, [key], contract)
    before = _sorted_table(s3_env, "m")
    prefix = s3_env.split("/", 3)[3]
    parquet = lambda: [  # noqa: E731 (data files: not the checkpoints under _delta_log/)
        k for k in _objects(f"{prefix}/m/") if k.endswith(".parquet") and "/_delta_log/" not in k
    ]
    assert len(parquet()) == 5  # two of them replaced but still on the store
    capsys.readouterr()
    assert main(["maintain", "--root", s3_env, "--retention-hours", "0"]) == 0
    out = capsys.readouterr().out
    assert "m " in out and "1 table(s) maintained" in out
    assert _sorted_table(s3_env, "m").equals(before)
    assert before["value"].to_list() == [2] * 10 + [7] * 10
    assert len(parquet()) == len(
        delta_store.DeltaTable(delta_store.table_uri(s3_env, "m")).file_uris()
    )
