"""Extraction speed: OSM objects/s of `osm_features` vs a bare pyosmium read with node locations.

Both rates divide the number of objects in the file (nodes + ways + relations) by wall time.
usage: python benchmarks/bench_extract.py [PBF ...] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import osmium

from s2vec_pipeline.cells.profiles import PROFILES
from s2vec_pipeline.osm.extract import extract_features
from s2vec_pipeline.osm.taxonomy import load_taxonomy
from s2vec_pipeline.settings import bundled_sources


def bare_read(path: str) -> int:
    """The floor: every object, node locations cached, areas assembled (as we do)."""
    n = 0
    for _ in osmium.FileProcessor(path).with_locations().with_areas():
        n += 1
    return n


def count_objects(path: str) -> int:
    n = 0
    for _ in osmium.FileProcessor(path):
        n += 1
    return n


def interleaved(fns: list, repeat: int) -> list[tuple[float, float]]:
    """(min, median) seconds of each fn, runs interleaved so background load hits all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [(min(t), statistics.median(t)) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sources", nargs="*", default=bundled_sources())
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    tax, city = load_taxonomy(), PROFILES["city"]
    print(
        "| extract | objects | bare read s (min / median) | bare objects/s | osm_features s "
        "(min / median) | objects/s | rate ratio (min) | rows |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for src in args.sources:
        n = count_objects(src)
        (bare, bare_med), (ours, ours_med) = interleaved(
            [lambda src=src: bare_read(src), lambda src=src: extract_features([src], tax, city)],
            args.repeat,
        )
        rows = extract_features([src], tax, city)[0].height
        print(
            f"| {Path(src).name} | {n:,} | {bare:.3f} / {bare_med:.3f} | {n / bare:,.0f} | "
            f"{ours:.3f} / {ours_med:.3f} | {n / ours:,.0f} | {bare / ours:.2f} | {rows:,} |"
        )


if __name__ == "__main__":
    main()
