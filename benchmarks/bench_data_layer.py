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


def ours(src: Path, repeat: int) -> tuple[float, float, float, float]:
    """(process wall s, materialize call s, process CPU s, peak RSS MiB), medians."""
    walls, inproc, cpus, peaks = [], [], [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as root:
            code = (
                "import resource,sys,time;from s2vec_pipeline.cli import main;"
                "t=time.perf_counter();"
                f"rc=main(['materialize','--source',{str(src)!r},'--root',{root!r},'--stages','extract,features,raster']);"
                "print('INPROC',time.perf_counter()-t);"
                "r=resource.getrusage(resource.RUSAGE_SELF);"
                "print('CPU',r.ru_utime+r.ru_stime);"
                "print('PEAK',r.ru_maxrss);sys.exit(rc)"
            )
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            if out.returncode != 0:
                raise SystemExit(out.stdout + out.stderr)
            facts = dict(
                ln.split() for ln in out.stdout.splitlines() if ln[:4] in ("PEAK", "INPR", "CPU ")
            )
            peaks.append(int(facts["PEAK"]) / 1024)
            inproc.append(float(facts["INPROC"]))
            cpus.append(float(facts["CPU"]))
    return (
        statistics.median(walls),
        statistics.median(inproc),
        statistics.median(cpus),
        statistics.median(peaks),
    )


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
        rows.append((name, *ours(src, args.repeat), srai(args.srai_python, src, args.repeat)))
    print(
        "| extract | s2vec process s | s2vec materialize s | s2vec CPU s | s2vec peak MiB "
        "| srai load+prepare s | srai CPU s | srai peak MiB | wall speed-up | CPU ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, wall, inproc, cpu, peak, ref in rows:
        theirs = (
            f"{ref['total_s']:.2f} | {ref['cpu_s']:.2f} | {ref['peak_rss_mib']:.0f} | "
            f"{ref['total_s'] / inproc:.1f}x | {ref['cpu_s'] / cpu:.1f}x"
            if ref
            else "n/a | n/a | n/a | n/a | n/a"
        )
        print(f"| {name} | {wall:.2f} | {inproc:.2f} | {cpu:.2f} | {peak:.0f} | {theirs} |")


if __name__ == "__main__":
    main()
