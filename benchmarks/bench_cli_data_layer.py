"""The data layer through the CLI against a bare read of the same file, in the same run (issue 15).

For each N: Helsinki tiled N times (one copy per level-6 cell, new ids, ``osm_tile``), then
1. a bare pyosmium read of that file with node locations and areas (the floor: reading it once),
2. ``s2vec materialize --profile city --stages extract,features,raster --workers W`` on a fresh
   root and a fresh Dagster instance (``<root>/_dagster``), one Dagster run per partition,
and prints the ratio, the time per partition and the peak memory of the command's process and of
its largest child (a partition worker or an osmium-tool pass). ``--pythonpath DIR`` runs another
checkout (a ``git worktree`` of an older commit) for a before/after.

usage: python benchmarks/bench_cli_data_layer.py [--copies 16,64] [--workers 2] [--work DIR]
       [--pythonpath DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import osmium

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' osm_tile
from s2vec_pipeline.settings import bundled_source  # noqa: E402
from s2vec_pipeline_tests.osm_tile import cell_center_offsets, tile_pbf  # noqa: E402

CHILD = """
import resource, sys, time
from s2vec_pipeline.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t
me = resource.getrusage(resource.RUSAGE_SELF)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print("RESULT", rc, wall, me.ru_maxrss, kids.ru_maxrss,
      me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, file=sys.stderr)
"""


def bare_read(pbf: Path) -> tuple[float, int]:
    """Seconds for one pyosmium pass with locations and areas, and the objects seen."""
    t0 = time.perf_counter()
    n = 0
    for _ in osmium.FileProcessor(str(pbf)).with_locations().with_areas():
        n += 1
    return time.perf_counter() - t0, n


def run_cli(pbf: Path, root: Path, workers: int, pythonpath: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    args = ["materialize", "--source", str(pbf), "--root", str(root), "--profile", "city"]
    args += ["--stages", "extract,features,raster", "--workers", str(workers)]
    # cwd outside any checkout: `python -c` puts the working directory first on sys.path
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=root.parent,
    )
    line = [x for x in done.stderr.splitlines() if x.startswith("RESULT")]
    if not line or line[0].split()[1] != "0":
        raise SystemExit(f"materialize failed:\n{done.stderr[-3000:]}")
    _, _, wall, me_kib, kid_kib, cpu = line[0].split()
    runs = re.search(r"(\d+) Dagster run\(s\)", done.stdout)
    return {
        "cli_s": float(wall),
        "cpu_s": float(cpu),
        "peak_mib": int(me_kib) / 1024,
        "child_peak_mib": int(kid_kib) / 1024,
        "runs": int(runs.group(1)) if runs else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", default="16,64")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", default=None, help="folder for the tiled files (kept) and roots")
    ap.add_argument("--pythonpath", default=None, help="run another checkout of the package")
    ap.add_argument("--json", default=None, help="append each result as a JSON line here")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="s2vec-bench-cli-"))
    work.mkdir(parents=True, exist_ok=True)
    src = bundled_source("helsinki")
    print(f"load before: {os.getloadavg()[0]:.2f}; workers {args.workers}; work {work}")
    header = (
        f"{'copies':>6} {'MB':>6} {'runs':>5} {'bare s':>7} {'cli s':>7} {'ratio':>6} "
        f"{'s/run':>6} {'cpu s':>7} {'peak MiB':>9} {'child MiB':>9} {'load':>5}"
    )
    print(header)
    for n in (int(c) for c in args.copies.split(",")):
        pbf = work / f"helsinki-x{n}.osm.pbf"
        if not pbf.exists():
            tile_pbf(src, cell_center_offsets(src, n), pbf)
        bare, _ = bare_read(pbf)
        root = work / f"root-x{n}"
        shutil.rmtree(root, ignore_errors=True)
        r = run_cli(pbf, root, args.workers, args.pythonpath)
        shutil.rmtree(root, ignore_errors=True)
        runs = (r["runs"] or 1) - 1  # the first run observes the sources
        r.update(
            copies=n, mb=pbf.stat().st_size / 1e6, bare_s=bare, ratio=r["cli_s"] / bare,
            per_run_s=r["cli_s"] / max(runs, 1), load=os.getloadavg()[0], workers=args.workers,
        )  # fmt: skip
        print(
            f"{n:>6} {r['mb']:>6.1f} {runs:>5} {bare:>7.2f} {r['cli_s']:>7.1f} "
            f"{r['ratio']:>6.1f} {r['per_run_s']:>6.2f} {r['cpu_s']:>7.1f} "
            f"{r['peak_mib']:>9.0f} {r['child_peak_mib']:>9.0f} {r['load']:>5.2f}",
            flush=True,
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
