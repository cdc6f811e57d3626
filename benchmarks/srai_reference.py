"""Reference benchmark: srai 0.10.2's S2Vec data preparation on one OSM extract.

Runs in its own virtual environment, never in the project's (see README-srai.md):

    /work/srai-venv/bin/python benchmarks/srai_reference.py PATH.osm.pbf [PATH ...]
        [--repeat 3] [--json] [--filter geofabrik|hex2vec]

What one run does, the way srai's own S2Vec example (examples/embedders/s2vec_embedder.ipynb)
prepares data, stopping before training:

1. area: the PBF header's bounding box (not timed);
2. images: ``S2Regionalizer(resolution=img_res)`` over that area (timed as part of "prep");
3. OSM loading: ``OSMPbfLoader(pbf_file=...).load(images, tags, ignore_cache=True)``, i.e.
   quackosm ``PbfFileReader.convert_pbf_to_geodataframe`` over DuckDB spatial ("load");
4. dataset: ``S2VecEmbedder(img_res=13, patch_res=17)._prepare_dataset(...)`` with
   ``is_fitting=True``, exactly what ``S2VecEmbedder.fit`` runs before building the model:
   level-17 patches of every image, IntersectionJoiner, CountEmbedder counts, normalisation,
   ``S2VecDataset`` and its DataLoader ("prep").

Every repeat runs in a fresh child process (no warm Python/DuckDB caches) with a fresh quackosm
working directory (where quackosm caches its result parquet files), deleted after the run.
Peak RSS is ``ru_maxrss`` from ``os.wait4`` on that child: the largest single process among the
child and the helper processes it waited for (quackosm spawns some), not their sum.

Times: load and prep as above; total = load + prep; process = the child's wall time from spawn
to exit as seen by the parent (interpreter start, imports, writing results included); process
CPU = user + system time of the child and its helpers (less sensitive to a busy machine than
wall time). The 1-minute load average before each run is kept in the JSON output.
"""

from __future__ import annotations

# Keep module-level work light: quackosm starts helper processes with the "spawn" method, and
# each of them re-imports this file as __mp_main__.
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

IMG_RES = 13
PATCH_RES = 17
BATCH_SIZE = 64
FILTERS = ("geofabrik", "hex2vec")


# --------------------------------------------------------------------------- child process
def _torchvision_workaround() -> object:
    """Let timm import torchvision beside the CPU torch build.

    PyPI's torchvision is built against CUDA torch; importing it beside torch+cpu fails with
    "operator torchvision::nms does not exist" when it registers meta kernels. srai only needs
    timm's layers, never these ops, so defining the two schemas is enough. The returned Library
    must stay alive (deleting it removes the definitions).
    """
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": sys.version.split()[0]}
    for dist in (
        "srai",
        "quackosm",
        "duckdb",
        "duckdb-ext-spatial",
        "torch",
        "torchvision",
        "timm",
        "polars",
        "geopandas",
        "shapely",
        "pandas",
        "pyarrow",
    ):
        try:
            out[dist] = version(dist)
        except Exception:  # noqa: BLE001
            out[dist] = "missing"
    return out


def _pbf_area(pbf: str):
    """The header bounding box of the extract as a one-row GeoDataFrame (WGS84)."""
    import geopandas as gpd
    import osmium
    from shapely.geometry import box

    reader = osmium.io.Reader(pbf, osmium.osm.osm_entity_bits.NOTHING)
    try:
        b = reader.header().box()
    finally:
        reader.close()
    if not b.valid():
        raise SystemExit(f"{pbf}: the PBF header has no bounding box")
    geom = box(b.bottom_left.lon, b.bottom_left.lat, b.top_right.lon, b.top_right.lat)
    return gpd.GeoDataFrame(geometry=[geom], crs="EPSG:4326")


def child(pbf: str, workdir: str, filter_name: str) -> None:
    t_start = time.perf_counter()
    import logging
    import resource
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    _keep = _torchvision_workaround()  # noqa: F841  (must outlive the timm import)

    from srai.embedders import S2VecEmbedder
    from srai.loaders import OSMPbfLoader
    from srai.loaders.osm_loaders.filters import GEOFABRIK_LAYERS, HEX2VEC_FILTER
    from srai.regionalizers import S2Regionalizer

    tags = GEOFABRIK_LAYERS if filter_name == "geofabrik" else HEX2VEC_FILTER
    area = _pbf_area(pbf)
    t_imported = time.perf_counter()

    # (b1) images: level-13 S2 cells covering the area
    t0 = time.perf_counter()
    images = S2Regionalizer(resolution=IMG_RES, buffer=True).transform(area)
    t1 = time.perf_counter()

    # (a) OSM loading through srai's quackosm-based loader
    loader = OSMPbfLoader(pbf_file=pbf, download_directory=workdir, verbosity_mode="silent")
    features = loader.load(images, tags, ignore_cache=True)
    t2 = time.perf_counter()

    # (b2) S2Vec dataset preparation: what S2VecEmbedder.fit does before the model/trainer
    embedder = S2VecEmbedder(
        target_features=tags, batch_size=BATCH_SIZE, img_res=IMG_RES, patch_res=PATCH_RES
    )
    counts_df, _dataloader, dataset = embedder._prepare_dataset(
        images, features, BATCH_SIZE, shuffle=True, is_fitting=True
    )
    t3 = time.perf_counter()

    cached = sorted(
        os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs
    )
    result = {
        "pbf": os.path.abspath(pbf),
        "filter": filter_name,
        "imports_s": t_imported - t_start,
        "regions_s": t1 - t0,
        "load_s": t2 - t1,
        "dataset_s": t3 - t2,
        "prep_s": (t1 - t0) + (t3 - t2),
        "total_s": t3 - t0,
        "n_features": int(len(features)),
        "n_feature_columns": int(len(features.columns) - 1),
        "n_images": int(len(dataset)),
        "n_patches": int(counts_df.shape[0]),
        "n_channels": int(counts_df.shape[1]),
        "nonempty_channels": int((~embedder._empty_features_mask).sum()),
        "self_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "helpers_maxrss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "quackosm_cache_files": cached,
        "versions": _versions(),
    }
    sys.stdout.flush()
    print("SRAI_RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent process
def wait_idle(max_load: float, max_wait_s: float) -> None:
    """Wait until the 1-minute load average is below max_load (a shared machine)."""
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    if os.getloadavg()[0] >= max_load:
        print(
            f"# still busy after {max_wait_s:.0f} s (load {os.getloadavg()[0]:.2f}): "
            "running anyway",
            file=sys.stderr,
            flush=True,
        )


def run_once(pbf: str, filter_name: str, keep_logs: bool) -> dict:
    workdir = tempfile.mkdtemp(prefix="srai-quackosm-")
    fd, log_path = tempfile.mkstemp(prefix="srai-child-", suffix=".log")
    os.close(fd)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        pbf,
        "--_workdir",
        workdir,
        "--filter",
        filter_name,
    ]
    try:
        load_1m = os.getloadavg()[0]
        with open(log_path, "w", encoding="utf-8") as errlog:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=errlog, text=True, cwd=workdir
            )
            out = proc.stdout.read()
            proc.stdout.close()
            # wait4, not getrusage(RUSAGE_CHILDREN): the latter is a running maximum over all
            # children so far, wait4 gives this child's (and its waited-for helpers') peak
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        lines = [ln for ln in out.splitlines() if ln.startswith("SRAI_RESULT ")]
        if proc.returncode != 0 or not lines:
            with open(log_path, encoding="utf-8", errors="replace") as fh:
                tail = fh.read()[-4000:]
            raise SystemExit(
                f"child failed (rc={proc.returncode}) on {pbf}:\n{tail}\n(log: {log_path})"
            )
        res = json.loads(lines[-1][len("SRAI_RESULT ") :])
        res["process_s"] = wall
        res["peak_rss_mib"] = ru.ru_maxrss / 1024  # Linux: KiB
        res["cpu_s"] = ru.ru_utime + ru.ru_stime  # child + waited-for helpers, user + system
        res["loadavg_1m_before"] = load_1m
        if not keep_logs:
            os.unlink(log_path)
        return res
    finally:
        # quackosm caches its result parquet files in its working directory: delete them all
        shutil.rmtree(workdir, ignore_errors=True)


METRICS = (
    "load_s",
    "prep_s",
    "total_s",
    "process_s",
    "cpu_s",
    "peak_rss_mib",
    "regions_s",
    "dataset_s",
    "imports_s",
    "loadavg_1m_before",
)


def summarize(runs: list[dict]) -> dict:
    first = runs[0]
    med = {m: statistics.median(r[m] for r in runs) for m in METRICS}
    return {
        "extract": os.path.basename(first["pbf"]),
        "pbf": first["pbf"],
        "filter": first["filter"],
        "repeats": len(runs),
        "median": med,
        "runs": [{m: r[m] for m in METRICS} for r in runs],
        "n_features": first["n_features"],
        "n_images": first["n_images"],
        "n_patches": first["n_patches"],
        "n_channels": first["n_channels"],
        "nonempty_channels": first["nonempty_channels"],
        "quackosm_cache_files_deleted": first["quackosm_cache_files"],
    }


def markdown(summaries: list[dict], versions: dict, repeat: int, filter_name: str) -> str:
    v = versions
    lines = [
        f"srai {v['srai']} · quackosm {v['quackosm']} · duckdb {v['duckdb']} "
        f"(spatial ext {v['duckdb-ext-spatial']}) · torch {v['torch']} · polars {v['polars']} "
        f"· geopandas {v['geopandas']} · Python {v['python']}",
        f"S2Vec img_res={IMG_RES}, patch_res={PATCH_RES}; tags: "
        f"{'GEOFABRIK_LAYERS' if filter_name == 'geofabrik' else 'HEX2VEC_FILTER'}; "
        f"median of {repeat} fresh-process run(s)",
        "",
        "| extract | features | images | patches | channels | load (s) | prep (s) | total (s) "
        "| process (s) | process CPU (s) | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        m = s["median"]
        lines.append(
            f"| {s['extract']} | {s['n_features']} | {s['n_images']} | {s['n_patches']} "
            f"| {s['n_channels']} | {m['load_s']:.2f} | {m['prep_s']:.2f} | {m['total_s']:.2f} "
            f"| {m['process_s']:.2f} | {m['cpu_s']:.2f} | {m['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pbf", nargs="*", help="OSM .osm.pbf extract(s)")
    p.add_argument("--repeat", type=int, default=3, help="fresh-process runs per extract")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line with the medians instead of the markdown table",
    )
    p.add_argument(
        "--filter",
        choices=FILTERS,
        default="geofabrik",
        help="srai tag filter: GEOFABRIK_LAYERS (default; srai's S2Vec example) or HEX2VEC_FILTER",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        metavar="LOAD",
        default=None,
        help="before each run, wait until the 1-minute load average is below LOAD",
    )
    p.add_argument(
        "--wait-max",
        type=float,
        default=600,
        metavar="S",
        help="longest wait per run for --wait-idle (default 600 s)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep each child's stderr log")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_workdir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a._child:
        child(a._child, a._workdir, a.filter)
        return 0

    if not a.pbf:
        p.error("give at least one .osm.pbf extract")
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    summaries, versions = [], None
    for pbf in a.pbf:
        if not os.path.isfile(pbf):
            p.error(f"no such file: {pbf}")
        runs = []
        for i in range(a.repeat):
            if a.wait_idle is not None:
                wait_idle(a.wait_idle, a.wait_max)
            r = run_once(os.path.abspath(pbf), a.filter, a.keep_logs)
            versions = r["versions"]
            runs.append(r)
            print(
                f"# {os.path.basename(pbf)} run {i + 1}/{a.repeat}: load {r['load_s']:.2f} s, "
                f"prep {r['prep_s']:.2f} s, total {r['total_s']:.2f} s, "
                f"process {r['process_s']:.2f} s (CPU {r['cpu_s']:.2f} s), "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB, load avg before "
                f"{r['loadavg_1m_before']:.2f}",
                file=sys.stderr,
                flush=True,
            )
        summaries.append(summarize(runs))

    if a.json:
        print(
            json.dumps(
                {
                    "tool": "srai",
                    "versions": versions,
                    "img_res": IMG_RES,
                    "patch_res": PATCH_RES,
                    "filter": "GEOFABRIK_LAYERS" if a.filter == "geofabrik" else "HEX2VEC_FILTER",
                    "repeat": a.repeat,
                    "extracts": summaries,
                }
            )
        )
    else:
        print(markdown(summaries, versions, a.repeat, a.filter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
