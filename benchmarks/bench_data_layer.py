"""Whole data layer (extract -> features -> raster, Delta writes, through Dagster) per extract:
wall time and peak memory of a fresh `s2vec materialize` process, median of N; next to srai
0.10.2's S2Vec data preparation when its venv exists (benchmarks/README-srai.md).

usage: python benchmarks/bench_data_layer.py [--repeat 3] [--srai-python /work/srai-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s2vec_pipeline.settings import bundled_source

HERE = Path(__file__).resolve().parent


CHILD = """
import resource, sys, time
from s2vec_pipeline.cli import main

def run(root):
    t = time.perf_counter()
    rc = main(["materialize", "--source", SRC, "--root", root,
               "--stages", "extract,features,raster"])
    assert rc == 0
    return time.perf_counter() - t

cold = run(ROOT + "/cold")  # imports Dagster, builds its instance and definitions
r = resource.getrusage(resource.RUSAGE_SELF)
print("COLD", cold)
print("CPU", r.ru_utime + r.ru_stime)
print("PEAK", r.ru_maxrss)
print("WARM", run(ROOT + "/warm"))  # a long-lived code server's case
"""


def ours(src: Path, repeat: int) -> dict[str, float]:
    """Medians of: process wall s, cold and warm materialize s, process CPU s, peak RSS MiB."""
    runs: list[dict[str, float]] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as root:
            code = f"SRC = {str(src)!r}\nROOT = {root!r}\n" + CHILD
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                raise SystemExit(out.stdout + out.stderr)
            facts: dict[str, float] = {}
            for ln in out.stdout.splitlines():
                parts = ln.split()
                if len(parts) == 2 and parts[0] in ("COLD", "WARM", "CPU", "PEAK"):
                    facts[parts[0]] = float(parts[1])
            facts["PEAK"] /= 1024
            facts["WALL"] = wall
            runs.append(facts)
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def srai(python: str, src: Path, repeat: int) -> dict | None:
    script = HERE / "srai_reference.py"
    if not Path(python).exists() or not script.exists():
        return None
    out = subprocess.run(
        [python, str(script), str(src), "--repeat", str(repeat), "--json"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        print(f"srai run failed: {out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["extracts"][0]["median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--srai-python", default="/work/srai-venv/bin/python")
    args = ap.parse_args()
    rows = []
    for name in ["helsinki", "monaco"]:
        src = bundled_source(name)
        rows.append((name, ours(src, args.repeat), srai(args.srai_python, src, args.repeat)))
    print(
        "| extract | s2vec process s | materialize s, cold / warm | s2vec CPU s (cold process) "
        "| s2vec peak MiB | srai load+prepare s | srai CPU s | srai peak MiB "
        "| speed-up cold / warm | CPU ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m, ref in rows:
        theirs = (
            f"{ref['total_s']:.2f} | {ref['cpu_s']:.2f} | {ref['peak_rss_mib']:.0f} | "
            f"{ref['total_s'] / m['COLD']:.1f}x / {ref['total_s'] / m['WARM']:.1f}x | "
            f"{ref['cpu_s'] / m['CPU']:.1f}x"
            if ref
            else "n/a | n/a | n/a | n/a | n/a"
        )
        print(
            f"| {name} | {m['WALL']:.2f} | {m['COLD']:.2f} / {m['WARM']:.2f} | {m['CPU']:.2f} | "
            f"{m['PEAK']:.0f} | {theirs} |"
        )


if __name__ == "__main__":
    main()
