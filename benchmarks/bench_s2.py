"""Lat/lng -> S2 cell id: the vectorized numpy code against s2cell and the official library.

Generates N random points uniform on the sphere (default 1,000,000, fixed seed) and times
``s2vec_pipeline.cells.s2.latlng_to_cell_id`` on all of them at level 30 and level 12, then the
scalar ``s2cell.lat_lon_to_cell_id`` and the official ``s2geometry`` bindings
(``S2CellId(S2LatLng.FromDegrees(lat, lng))``) on a subsample of the same points (default
100,000; their rate is extrapolated). Each timing is the best of ``--repeats`` runs. Prints a
markdown table and checks that our ids equal the official ones on the subsample.

    python benchmarks/bench_s2.py --n 1000000 --sample 100000
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2vec_pipeline.cells import s2  # noqa: E402


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="points for the numpy code")
    parser.add_argument("--sample", type=int, default=100_000, help="points for scalar libs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import s2cell
    import s2geometry

    rng = np.random.default_rng(args.seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, args.n)))
    lng = rng.uniform(-180.0, 180.0, args.n)
    k = min(args.sample, args.n)
    lat_list, lng_list = lat[:k].tolist(), lng[:k].tolist()

    rows: list[tuple[str, int, float]] = []
    t30, ids30 = best_of(args.repeats, lambda: s2.latlng_to_cell_id(lat, lng, 30))
    rows.append(("s2vec_pipeline.cells.s2.latlng_to_cell_id, level 30", args.n, t30))
    t12, _ = best_of(args.repeats, lambda: s2.latlng_to_cell_id(lat, lng, 12))
    rows.append(("s2vec_pipeline.cells.s2.latlng_to_cell_id, level 12", args.n, t12))

    to_id = s2cell.lat_lon_to_cell_id
    t_s2cell, _ = best_of(
        args.repeats, lambda: [to_id(a, b) for a, b in zip(lat_list, lng_list, strict=True)]
    )
    rows.append(("s2cell.lat_lon_to_cell_id (scalar), level 30", k, t_s2cell))

    cell_id, from_degrees = s2geometry.S2CellId, s2geometry.S2LatLng.FromDegrees
    t_official, official = best_of(
        args.repeats,
        lambda: [cell_id(from_degrees(a, b)).id() for a, b in zip(lat_list, lng_list, strict=True)],
    )
    rows.append(("s2geometry S2CellId(S2LatLng) (scalar, official), level 30", k, t_official))

    s2cell_rate = k / t_s2cell
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print()
    print("| method | points | seconds | points/s | speed-up vs s2cell |")
    print("|---|---:|---:|---:|---:|")
    for name, n, seconds in rows:
        rate = n / seconds
        print(f"| {name} | {n:,} | {seconds:.3f} | {rate:,.0f} | {rate / s2cell_rate:.1f}x |")
    print()
    same = np.array_equal(np.asarray(ids30)[:k], np.array(official, dtype=np.uint64))
    print(f"ids identical to s2geometry on the {k:,}-point subsample: {'yes' if same else 'NO'}")
    print(
        f"s2cell extrapolated to {args.n:,} points: {args.n / s2cell_rate:.1f} s; "
        f"s2geometry: {args.n * t_official / k:.1f} s"
    )
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
