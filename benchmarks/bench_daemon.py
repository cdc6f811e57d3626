"""The service path with a real daemon: a region launched as the UI does, and a change's latency.

Starts ``dagster dev`` (webserver + daemon, ``dagster.yaml`` as ``make ui`` writes it: 2 runs
at once) on loopback with a fresh ``DAGSTER_HOME`` and root, the source being Helsinki tiled N times
(``osm_tile``, one copy per level-6 cell, new ids), then measures:

1. **Region, end to end**: a GraphQL ``launchRun`` of ``materialize_region`` with a box over the
   whole source (what the UI's launchpad sends), until every partition run of the region
   succeeded; the runs per cell (the target is one), the sum of their durations, and a bare
   pyosmium read of the same file (locations + areas) measured in the same process.
2. **One-node change to new embeddings**: a tiny model is trained and the changed cell embedded
   (through ``runner.materialize`` against the same instance), a change file moving one tagged
   node is written to ``S2VEC_CHANGES``, and ``refresh_sources`` is launched over GraphQL (what
   the nightly schedule launches); the latency is from that launch to the cell's new
   ``cell_embeddings`` materialization, split into the observation run, the wait for the
   ``refresh_stale_partitions`` sensor and the one ``partition_pipeline`` run.

usage: python benchmarks/bench_daemon.py [--copies 16] [--port 13400] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from xml.sax.saxutils import quoteattr

import dagster as dg
import osmium
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' osm_tile
from bench_extract import bare_read  # noqa: E402

from s2vec_pipeline.cells import s2  # noqa: E402
from s2vec_pipeline.osm.coverage import source_cells  # noqa: E402
from s2vec_pipeline.osm.extract import source_bbox  # noqa: E402
from s2vec_pipeline.service.instance import pooled_sqlite_config  # noqa: E402
from s2vec_pipeline.settings import PipelineSettings, bundled_source  # noqa: E402
from s2vec_pipeline_tests.osm_tile import cell_center_offsets, tile_pbf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REGION = "bench"
TINY = {"epochs": 1, "embed_dim": 32, "depth": 1, "num_heads": 4, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2, "batch_size": 32}  # fmt: skip
LOCATION = """{ workspaceOrError { ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
LAUNCH = """mutation ($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } } }"""
RUNS = """query ($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results {
  runId jobName status startTime endTime creationTime tags { key value } } } } }"""


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["data"]


def launch(port: int, location: str, job: str, run_config: dict) -> tuple[str, float]:
    params = {
        "selector": {"repositoryLocationName": location, "repositoryName": "__repository__",
                     "jobName": job},
        "runConfigData": run_config,
        "mode": "default",
    }  # fmt: skip
    t0 = time.time()
    out = graphql(port, LAUNCH, {"p": params})["launchRun"]
    assert out["__typename"] == "LaunchRunSuccess", out
    return out["run"]["runId"], t0


def runs(port: int, **filt: object) -> list[dict]:
    return graphql(port, RUNS, {"f": filt})["runsOrError"]["results"]


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def wait_runs(port: int, want: int, timeout: float, **filt: object) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = runs(port, **filt)
        bad = [r for r in got if r["status"] in ("FAILURE", "CANCELED")]
        assert not bad, bad
        if len(got) >= want and all(r["status"] == "SUCCESS" for r in got):
            return got
        assert time.monotonic() < deadline, f"runs not done: {[r['status'] for r in got]}"
        time.sleep(2)


def moved_node(pbf: Path, cell: str, nth: int) -> str:
    """A change file moving the ``nth`` tagged amenity node of ``cell`` used by no way 0.0001
    degrees north (a new version of it, so each change file moves another node)."""
    used: set[int] = set()
    for w in osmium.FileProcessor(str(pbf), osmium.osm.WAY):
        used.update(n.ref for n in w.nodes)
    for n in osmium.FileProcessor(str(pbf), osmium.osm.NODE):
        if n.id in used or "amenity" not in n.tags:
            continue
        lat, lon = n.location.lat, n.location.lon
        if str(s2.to_token(s2.latlng_to_cell_id(lat, lon, 6))) != cell:
            continue
        if nth > 0:
            nth -= 1
            continue
        tags = "".join(f"<tag k={quoteattr(t.k)} v={quoteattr(t.v)}/>" for t in n.tags)
        return (
            "<?xml version='1.0'?>\n<osmChange version=\"0.6\"><modify>"
            f'<node id="{n.id}" version="{n.version + 1}" timestamp="2030-01-01T00:00:00Z" '
            f'uid="1" user="bench" changeset="1" lat="{lat + 1e-4:.7f}" lon="{lon:.7f}">'
            f"{tags}</node></modify></osmChange>\n"
        )
    raise SystemExit(f"no tagged amenity node used by no way in cell {cell}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=16, help="copies of Helsinki (16: ~11 MB)")
    ap.add_argument("--port", type=int, default=13400)
    ap.add_argument("--work", default=None, help="folder for the tiled PBF, root and home")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per phase")
    ap.add_argument(
        "--dagster-yaml",
        type=Path,
        default=REPO / "dagster.yaml",
        help="instance settings to start from (default: the repository's; an older one to "
        "compare launchers in the same session)",
    )
    ap.add_argument("--region-only", action="store_true", help="skip the change latency")
    ap.add_argument(
        "--change-only",
        action="store_true",
        help="reuse --work from an earlier run (its region, model and embeddings): measure one "
        "more change only (a later nightly change: the extract already came out of a cut)",
    )
    args = ap.parse_args()

    src = bundled_source("helsinki")
    work = Path(args.work or tempfile.mkdtemp(prefix="s2vec-daemon-"))
    work.mkdir(parents=True, exist_ok=True)
    pbf = work / f"helsinki-x{args.copies}.osm.pbf"
    if not pbf.exists():
        tile_pbf(src, cell_center_offsets(src, args.copies), pbf)
    root, home, changes = work / "root", work / "home", work / "changes"
    if not args.change_only:
        for d in (root, home, changes):
            shutil.rmtree(d, ignore_errors=True)
        home.mkdir()
        changes.mkdir()
        # as `make ui` writes it: the repository's settings plus the pooled SQLite storages
        (home / "dagster.yaml").write_text(
            args.dagster_yaml.read_text() + pooled_sqlite_config(str(home))
        )
    settings = PipelineSettings(root=str(root), sources=[str(pbf)], changes_dir=str(changes))
    cells = sorted(source_cells(settings.sources))
    t0 = time.perf_counter()
    objects = bare_read(str(pbf))
    bare_s = time.perf_counter() - t0

    env = {**os.environ, "DAGSTER_HOME": str(home), "S2VEC_ROOT": str(root),
           "S2VEC_SOURCES": str(pbf), "S2VEC_CHANGES": str(changes)}  # fmt: skip
    log = (work / "dagster_dev.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml",
         "-h", "127.0.0.1", "-p", str(args.port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    out: dict = {"copies": args.copies, "size_mb": round(pbf.stat().st_size / 1e6, 1),
                 "cells": len(cells), "objects": objects, "bare_read_s": round(bare_s, 2),
                 "load_start": load()}  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                (entry,) = graphql(args.port, LOCATION)["workspaceOrError"]["locationEntries"]
                if entry["locationOrLoadError"]:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "dagster dev is down"
            time.sleep(1)
        assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", entry
        loc = entry["name"]
        # The first observation of the sources (register_source_partitions, at start): what a
        # running deployment has before anyone launches a region.
        wait_runs(args.port, 1, args.timeout, pipelineName="refresh_sources")

        if not args.change_only:
            region(args, loc, pbf, cells, bare_s, out, proc.pid)
        if not args.region_only:
            change(args, loc, pbf, cells, settings, home, changes, out)
        out["load_end"] = load()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    print(json.dumps(out, indent=1))


def cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds so far of the live processes of ``dagster dev`` (``pid``), by role."""
    roles: dict[str, float] = {}
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except psutil.Error:
            continue
        role = ("webserver" if "dagster_webserver" in cmd or "dagster-webserver" in cmd
                else "daemon" if "dagster-daemon" in cmd or "dagster._daemon" in cmd
                else "code server" if " grpc" in cmd or "code-server" in cmd
                else "run workers" if "multiprocessing" in cmd else "other")  # fmt: skip
        roles[role] = roles.get(role, 0.0) + t.user + t.system
    return roles


def region(args: argparse.Namespace, loc: str, pbf: Path, cells: list, bare_s: float,
           out: dict, dev_pid: int) -> None:  # fmt: skip
    """1. The region, as the UI launches it."""
    cpu0 = cpu_by_role(dev_pid)
    lat0, lng0, lat1, lng1 = source_bbox(pbf)
    bbox = f"{lat0},{lng0},{lat1},{lng1}"
    config = {"ops": {"resolve_region": {"config": {"region": REGION, "bbox": bbox}}}}
    _, t_launch = launch(args.port, loc, "materialize_region", config)
    tag = [{"key": "s2vec/region", "value": REGION}]
    done = wait_runs(args.port, len(cells), args.timeout, tags=tag)
    end = max(r["endTime"] for r in done)
    cpu1 = cpu_by_role(dev_pid)
    out["region_cpu_s_by_role"] = {k: round(v - cpu0.get(k, 0.0), 1) for k, v in cpu1.items()}
    out["region_runs"] = len(done)
    out["region_cells"] = len({t["value"] for r in done for t in r["tags"]
                               if t["key"] == "dagster/partition"})  # fmt: skip
    out["region_s"] = round(end - t_launch, 1)
    out["region_run_s_sum"] = round(sum(r["endTime"] - r["startTime"] for r in done), 1)
    out["region_x_bare"] = round(out["region_s"] / bare_s, 1)
    # Where the time went: the launch run, the partition runs' creation, queue and execution.
    (first,) = runs(args.port, pipelineName="materialize_region")
    created = sorted(r["creationTime"] for r in done)
    waits = [r["startTime"] - r["creationTime"] for r in done]
    durations = sorted(r["endTime"] - r["startTime"] for r in done)
    out["timeline_s"] = {
        "launch_run_start": round(first["startTime"] - t_launch, 1),
        "launch_run_end": round(first["endTime"] - t_launch, 1),
        "first_partition_run_created": round(created[0] - t_launch, 1),
        "last_partition_run_created": round(created[-1] - t_launch, 1),
        "queue_wait_mean": round(sum(waits) / len(waits), 1),
        "run_s_median": round(durations[len(durations) // 2], 1),
    }
    out["load_region_end"] = load()
    time.sleep(75)  # materialize_new_regions (60 s) ticks after the registration: no rerun
    out["partition_runs_after_75s"] = len(runs(args.port, pipelineName="partition_pipeline"))
    print(json.dumps(out), flush=True)


def change(args: argparse.Namespace, loc: str, pbf: Path, cells: list, settings: PipelineSettings,
           home: Path, changes: Path, out: dict) -> None:  # fmt: skip
    """2. A one-node change to new embeddings."""
    from s2vec_pipeline.service.runner import materialize

    target = cells[len(cells) // 2]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        materialize(settings, [target], ["mae_model", "cell_embeddings", "image_embeddings"],
                    instance, op_config={"mae_model": TINY})  # fmt: skip
        key = dg.AssetKey("cell_embeddings")
        before = instance.get_latest_data_version_record(key, False, target).storage_id
        nth = len(list(changes.glob("*.osc")))
        (changes / f"{nth + 1:04d}.osc").write_text(moved_node(pbf, target, nth))
        out["change_file"] = nth + 1
        out["load_change_start"] = load()
        obs_id, t_change = launch(args.port, loc, "refresh_sources", {})
        deadline = time.monotonic() + args.timeout
        while True:
            rec = instance.get_latest_data_version_record(key, False, target)
            if rec.storage_id > before:
                break
            assert time.monotonic() < deadline, "no new embeddings"
            time.sleep(0.5)
        out["change_to_embeddings_s"] = round(rec.timestamp - t_change, 1)
        obs = instance.get_run_stats(obs_id)
        stale = instance.get_runs(
            filters=dg.RunsFilter(tags={"s2vec/trigger": "stale"}, created_after=t_launch_dt(
                t_change)))  # fmt: skip
        out["stale_runs"] = [(r.tags["dagster/partition"], sorted(map(str, r.asset_selection)))
                             for r in stale]  # fmt: skip
        (run,) = stale
        rec_run = instance.get_run_record_by_id(run.run_id)
        deadline = time.monotonic() + 120
        while not instance.get_run_by_id(run.run_id).is_finished:  # its end, for the split
            assert time.monotonic() < deadline
            time.sleep(0.5)
        stats = instance.get_run_stats(run.run_id)
        out["observation_run_s"] = round(obs.end_time - t_change, 1)
        out["sensor_wait_s"] = round(rec_run.create_timestamp.timestamp() - obs.end_time, 1)
        out["pipeline_run_s"] = round(rec.timestamp - rec_run.create_timestamp.timestamp(), 1)
        out["pipeline_run_worker_s"] = round(stats.end_time - stats.start_time, 1)


def t_launch_dt(t: float):  # noqa: ANN201
    import datetime as dt

    return dt.datetime.fromtimestamp(t - 1, dt.UTC)


if __name__ == "__main__":
    main()
