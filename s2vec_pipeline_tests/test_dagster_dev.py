"""The real thing, briefly: ``dagster dev`` on loopback (webserver + daemon) lists the assets and
partitions over GraphQL, and the daemon's region sensor launches a run for a newly registered
region that completes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from s2vec_pipeline.cli import main
from s2vec_pipeline.settings import bundled_source
from s2vec_pipeline_tests.conftest import HELSINKI_L6

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 120  # ~13 s on an idle machine; the run loads torch in a fresh process
RUN_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=20) as resp:
        return json.loads(resp.read())["data"]


RUNS = """{ runsOrError(filter: {tags: [{key: "s2vec/region", value: "hki"}]}) {
  ... on Runs { results { runId status tags { key value } } } } }"""
ASSETS = """{ assetNodes { assetKey { path } isPartitioned partitionKeys } }"""
SENSOR = """query ($loc: String!) { sensorOrError(sensorSelector: {repositoryLocationName: $loc,
  repositoryName: "__repository__", sensorName: "materialize_new_regions"}) {
  ... on Sensor { description sensorState { ticks(limit: 5) { status runIds } } } } }"""
LOCATION = """{ workspaceOrError { ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


@pytest.mark.slow
def test_dagster_dev_launches_a_region_and_answers_graphql(tmp_path: Path, monkeypatch) -> None:
    home, root = tmp_path / "home", tmp_path / "root"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    helsinki = str(bundled_source("helsinki"))
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "S2VEC_ROOT": str(root),
        "S2VEC_SOURCES": helsinki,
        "S2VEC_CHANGES": str(tmp_path / "changes"),
    }
    # Register a region as a user would (adds its cell as a partition in $DAGSTER_HOME).
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("S2VEC_SOURCES", helsinki)
    args = ["region", "add", "hki", "--bbox", "60.15,24.90,60.20,25.00", "--root", str(root)]
    assert main(args) == 0

    port = _free_port()
    log = (tmp_path / "dagster_dev.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                location = _graphql(port, LOCATION)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "dagster_dev.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "dagster dev did not answer"
                time.sleep(1)
        (entry,) = location["workspaceOrError"]["locationEntries"]
        assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", entry

        nodes = {"/".join(n["assetKey"]["path"]): n for n in _graphql(port, ASSETS)["assetNodes"]}
        assert {"osm_sources", "osm_features", "cell_features", "raster_tiles"} <= set(nodes)
        assert {"mae_model", "cell_embeddings", "image_embeddings"} <= set(nodes)
        assert HELSINKI_L6 in nodes["osm_features"]["partitionKeys"]

        deadline = time.monotonic() + RUN_S
        status = None
        while status != "SUCCESS":
            runs = _graphql(port, RUNS)["runsOrError"]["results"]
            status = runs[0]["status"] if runs else None
            text = (tmp_path / "dagster_dev.log").read_text()
            assert status not in ("FAILURE", "CANCELED"), text[-5000:]
            assert "caught an error" not in text, text[-5000:]
            assert time.monotonic() < deadline, f"region run not done: {runs}"
            time.sleep(2)
        tags = {t["key"]: t["value"] for t in runs[0]["tags"]}
        assert tags["dagster/partition"] == HELSINKI_L6
        assert (root / "raster_tiles" / f"parent_l6={HELSINKI_L6}").is_dir()
        # The region sensor, its description and the tick that launched the region's run.
        sensor = _graphql(port, SENSOR, {"loc": entry["name"]})["sensorOrError"]
        assert "s2vec region add" in sensor["description"]
        ticks = sensor["sensorState"]["ticks"]
        assert any(runs[0]["runId"] in t["runIds"] for t in ticks), ticks
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
