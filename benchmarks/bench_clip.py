"""Per-pixel areas and lengths (issue 9): what the cutting costs and what it fixes.

Four tables, on the bundled extracts (or the PBFs given), city and paper profiles:
1. objects cut per extract (areas with an area channel, ways with a length channel) and the
   share of the extraction's time spent measuring them (``ExtractStats.seconds_clipping``);
2. speed before/after: a bare pyosmium read, the extraction at git ``--before`` (default
   e3d909a, the last commit measuring areas at the inner point and segments at their midpoint)
   and now, interleaved, wall minima and medians plus CPU minima;
3. the issue's finding, before and after: area rows, and (pixel, channel) sums, above the
   pixel cell's area (``S2Cell::ExactArea`` from the official ``s2geometry`` bindings);
4. the cost of one large polygon (2,000 vertices) at pixel levels 17 and 12: CPU time, and
   the peak of numpy/Python allocations (tracemalloc, a second run).

usage: python benchmarks/bench_clip.py [PBF ...] [--repeat 7] [--before e3d909a]
(run from a git checkout: "before" is loaded from ``git show REF:s2vec_pipeline/osm/extract.py``)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import ModuleType

import numpy as np
import polars as pl
import s2geometry as s2g
import shapely
from bench_extract import bare_read

from s2vec_pipeline.cells.profiles import PROFILES
from s2vec_pipeline.osm import clip
from s2vec_pipeline.osm.extract import (
    EARTH_RADIUS_M,
    ExtractStats,
    _Collector,
    _read_source,
    extract_features,
)
from s2vec_pipeline.osm.taxonomy import load_taxonomy
from s2vec_pipeline.settings import bundled_sources

PROFILE_NAMES = ["city", "paper"]


def old_module(ref: str) -> ModuleType:
    src = subprocess.run(
        ["git", "show", f"{ref}:s2vec_pipeline/osm/extract.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "osm_extract_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("osm_extract_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["osm_extract_before"] = module
    spec.loader.exec_module(module)
    return module


def cut_counts(sources: list[str], repeat: int) -> None:
    tax = load_taxonomy()
    measure = np.asarray([c.measure for c in tax.channels])
    print(
        "| extract | profile | areas | of which cut | ways | of which cut | area / length rows "
        "| measuring s (min) | extraction s (min) | share |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in PROFILE_NAMES:
        profile = PROFILES[name]
        for src in sources:
            col = _Collector()
            _read_source(Path(src), tax, col, ExtractStats(), "flex_mem")
            chan_obj, chan_idx = np.asarray(col.chan_obj), np.asarray(col.chan_idx)
            areas = np.unique(chan_obj[measure[chan_idx] == "area_m2"])
            ways = np.unique(chan_obj[measure[chan_idx] == "length_m"])
            level = profile.pixel_level
            a = clip.polygon_cell_areas(shapely.from_wkb([col.wkb[i] for i in areas]), level)
            w = clip.line_cell_lengths(shapely.from_wkb([col.wkb[i] for i in ways]), level)
            way_cells = len(set(zip(w.index.tolist(), w.cell.tolist(), strict=True)))
            best_clip, best_all = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                _, stats = extract_features([src], tax, profile)
                best_all.append(time.perf_counter() - t0)
                best_clip.append(stats.seconds_clipping)
            m, t = min(best_clip), min(best_all)
            print(
                f"| {Path(src).name} | {name} | {len(areas):,} | {a.clipped:,} | {len(ways):,} "
                f"| {w.clipped:,} | {len(a.cell):,} / {way_cells:,} | {m:.3f} | {t:.3f} "
                f"| {m / t:.0%} |"
            )


def speed(sources: list[str], repeat: int, before: ModuleType) -> None:
    tax = load_taxonomy()
    print(
        "| extract | profile | bare read s (min / median) | before s (min / median; CPU min) "
        "| now s (min / median; CPU min) | rate vs bare (wall min), before → now |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name in PROFILE_NAMES:
        profile = PROFILES[name]
        for src in sources:
            fns = [
                lambda src=src: bare_read(src),
                lambda src=src, p=profile: before.extract_features([src], tax, p),
                lambda src=src, p=profile: extract_features([src], tax, p),
            ]
            wall: list[list[float]] = [[] for _ in fns]
            cpu: list[list[float]] = [[] for _ in fns]
            for _ in range(repeat):
                for k, fn in enumerate(fns):
                    w0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    wall[k].append(time.perf_counter() - w0)
                    cpu[k].append(time.process_time() - c0)
            (b, bm), (o, om), (n, nm) = ((min(t), statistics.median(t)) for t in wall)
            print(
                f"| {Path(src).name} | {name} | {b:.3f} / {bm:.3f} | {o:.3f} / {om:.3f}; "
                f"{min(cpu[1]):.3f} | {n:.3f} / {nm:.3f}; {min(cpu[2]):.3f} "
                f"| {b / o:.2f} → {b / n:.2f} |"
            )


def cell_area_m2(cell_ids: pl.Series) -> dict[int, float]:
    return {
        c: s2g.S2Cell(s2g.S2CellId(c & (2**64 - 1))).ExactArea() * EARTH_RADIUS_M**2
        for c in cell_ids.unique().to_list()
    }


def finding(sources: list[str], before: ModuleType) -> None:
    tax = load_taxonomy()
    print(
        "| extract | profile | code | area rows | rows > cell area | largest row / cell area "
        "| (pixel, channel) sums > cell area |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for name in PROFILE_NAMES:
        profile = PROFILES[name]
        for src in sources:
            for code, module in (("before", before), ("now", None)):
                run = module.extract_features if module else extract_features
                df, _ = run([src], tax, profile)
                rows = df.filter(pl.col("area_m2").is_not_null())
                limit = cell_area_m2(rows["cell_id"])
                cap = np.array([limit[c] for c in rows["cell_id"].to_list()])
                ratio = rows["area_m2"].to_numpy() / cap
                sums = rows.group_by("cell_id", "channel").agg(pl.col("area_m2").sum())
                sum_cap = np.array([limit[c] for c in sums["cell_id"].to_list()])
                over_sums = int((sums["area_m2"].to_numpy() > sum_cap * (1 + 1e-9)).sum())
                print(
                    f"| {Path(src).name} | {name} | {code} | {rows.height:,} "
                    f"| {int((ratio > 1 + 1e-9).sum()):,} | {ratio.max():.2f} | {over_sums:,} |"
                )


def large_polygon() -> None:
    print(
        "| polygon | pixel level | rows | CPU s | rows/s | sum of rows / area − 1 "
        "| peak MiB (tracemalloc) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(1)
    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    for radius_deg, level in ((0.05, 17), (0.25, 17), (0.25, 12)):
        r = radius_deg * (1 + 0.15 * np.sin(7 * t) + 0.05 * rng.standard_normal(len(t)))
        poly = shapely.Polygon(np.column_stack((25.0 + 2 * r * np.cos(t), 61.0 + r * np.sin(t))))
        area = clip.areas_m2(np.array([poly]))[0]
        c0 = time.process_time()
        got = clip.polygon_cell_areas(np.array([poly]), level)
        dt = time.process_time() - c0
        del got
        tracemalloc.start()  # a second run for memory: numpy and Python allocations, not GEOS'
        got = clip.polygon_cell_areas(np.array([poly]), level)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        print(
            f"| {area / 1e6:,.0f} km², 2,000 vertices | {level} | {len(got.cell):,} | {dt:.2f} "
            f"| {len(got.cell) / dt:,.0f} | {got.value.sum() / area - 1:.0e} | {peak:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sources", nargs="*", default=bundled_sources())
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--before", default="e3d909a")
    args = ap.parse_args()
    before = old_module(args.before)
    print("### Objects cut\n")
    cut_counts(args.sources, args.repeat)
    print("\n### Speed, before and now (interleaved)\n")
    speed(args.sources, args.repeat, before)
    print("\n### Issue 9: area rows above their pixel's area\n")
    finding(args.sources, before)
    print("\n### One large polygon\n")
    large_polygon()


if __name__ == "__main__":
    main()
