"""Scaling of the data layer (extract -> cell_features -> raster_tiles, Delta writes) with the
number of level-6 partitions, on PBFs tiled from a bundled extract.

For each N, the extract is copied N times (new ids, coordinates moved to the centres of the N
level-6 cells nearest to it: one copy per partition), then a fresh process runs
`osm_split.extract_partitions` (osmium-tool split, spawned workers) and, in its per-partition
callback, writes `osm_features`, aggregates and writes `cell_features`, rasterizes and writes
`raster_tiles` for that partition only: the bounded-memory path the Dagster asset uses.

`--grid RxC` instead tiles copies side by side (R rows x C columns, `--spacing` x the extract's
box) to make a dense area, e.g. for `--profile paper` images with every pixel filled.

usage: python benchmarks/bench_scaling.py [--copies 1,4,16,64,256] [--workers 2]
       [--per-group 4] [--profile city] [--source helsinki] [--grid RxC --spacing 2]
       [--json out.json] [--plot docs/scaling.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests' osm_tile

CHILD = r"""
import json, resource, sys, time
import polars as pl
import pyarrow as pa
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline.cells.features import aggregate_cell_features
from s2vec_pipeline.osm.split import extract_partitions
from s2vec_pipeline.cells.raster import RASTER_SCHEMA, iter_raster_batches
from s2vec_pipeline.osm.coverage import cells_covering_source
from s2vec_pipeline.settings import PipelineSettings

def main():
    pbf, root, profile, workers, per_group, parts_json = sys.argv[1:7]
    settings = PipelineSettings(root=root, profile_name=profile, sources=(pbf,))
    tax, prof = settings.taxonomy, settings.profile
    channels = list(tax.channel_names)
    partitions = json.loads(parts_json) or cells_covering_source(pbf)
    per_partition = {}

    def on_partition(token, rows):
        delta_store.write_partitions(root, "osm_features", rows.to_arrow(), [token],
                                     settings.contract("osm_features"))
        cells = aggregate_cell_features(rows, tax, prof)
        delta_store.write_partitions(root, "cell_features", cells.to_arrow(), [token],
                                     settings.contract("cell_features", channels=channels))
        if cells.height:
            reader = pa.RecordBatchReader.from_batches(
                RASTER_SCHEMA, iter_raster_batches(cells, channels, prof.side))
            delta_store.write_partitions(root, "raster_tiles", reader, [token],
                                         settings.contract("raster_tiles", channels=channels))
        per_partition[token] = {
            "rows": rows.height, "pixels": cells.height,
            "images": cells["image_token"].n_unique() if cells.height else 0,
            "full_images": int((cells.group_by("image_token").len()["len"]
                                == prof.side * prof.side).sum()) if cells.height else 0,
        }

    t0 = time.perf_counter()
    res = extract_partitions([pbf], tax, prof, partitions, on_partition, workers=int(workers),
                             partitions_per_group=int(per_group), in_process_max_bytes=0)
    wall = time.perf_counter() - t0
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print("RESULT " + json.dumps({
        "partitions": len(partitions), "failed": len(res.failed), "groups": res.groups,
        "wall_s": wall, "split_s": res.seconds_split, "extract_s": res.seconds_extract,
        "write_s": res.seconds_merge, "objects_read": res.stats.objects_read,
        "rows": res.stats.rows, "coordinator_peak_b": me,
        "worker_peak_b": res.worker_peak_rss_bytes, "any_child_peak_b": kids,
        "per_partition": per_partition,
    }))

if __name__ == "__main__":
    main()
"""


def count_objects(pbf: Path) -> int:
    out = subprocess.run(
        ["osmium", "fileinfo", "-e", "-g", "data.count.nodes", str(pbf)],
        capture_output=True,
        text=True,
        check=True,
    )
    n = int(out.stdout.strip())
    for kind in ("ways", "relations"):
        out = subprocess.run(
            ["osmium", "fileinfo", "-e", "-g", f"data.count.{kind}", str(pbf)],
            capture_output=True,
            text=True,
            check=True,
        )
        n += int(out.stdout.strip())
    return n


def copy_cells(src: Path, offsets: list[tuple[float, float]]) -> list[str]:
    import numpy as np

    from s2vec_pipeline.cells import s2
    from s2vec_pipeline.osm.extract import source_bbox

    min_lat, min_lng, max_lat, max_lng = source_bbox(src)
    lat = np.array([(min_lat + max_lat) / 2 + a for a, _ in offsets])
    lng = np.array([(min_lng + max_lng) / 2 + b for _, b in offsets])
    return sorted(set(s2.to_token(s2.latlng_to_cell_id(lat, lng, 6)).tolist()))


def run_one(pbf: Path, args: argparse.Namespace, work: Path, partitions: list[str]) -> dict:
    root = work / f"root-{pbf.stem}"
    script = work / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), str(pbf), str(root), args.profile, str(args.workers),
         str(args.per_group), json.dumps(partitions)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    process_wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    facts = json.loads(line[len("RESULT ") :])
    facts["process_wall_s"] = process_wall
    return facts


def main() -> None:
    from s2vec_pipeline.settings import bundled_source
    from s2vec_pipeline_tests.osm_tile import (
        cell_center_offsets,
        fill_cell_offsets,
        grid_offsets,
        tile_pbf,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--copies", default="1,4,16,64,256")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--per-group", type=int, default=4)
    ap.add_argument("--profile", default="city")
    ap.add_argument("--source", default="helsinki")
    ap.add_argument("--grid", default=None, help="RxC: copies side by side instead")
    ap.add_argument("--spacing", type=float, default=1.0)
    ap.add_argument(
        "--fill-level",
        type=int,
        default=None,
        help="tile copies over the cell at this level holding the source (dense images)",
    )
    ap.add_argument("--step", default="0.024,0.045", help="fill grid step: LAT,LNG degrees")
    ap.add_argument("--work", default=None, help="folder for the tiled PBFs and tables")
    ap.add_argument("--json", default=None, help="append results as JSON lines here")
    ap.add_argument("--plot", default=None, help="PNG of time per partition and peak memory")
    args = ap.parse_args()

    src = bundled_source(args.source)
    work = Path(args.work or tempfile.mkdtemp(prefix="s2vec-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.fill_level is not None:
        lat_step, lng_step = (float(v) for v in args.step.split(","))
        layouts = [
            (f"fill{args.fill_level}", fill_cell_offsets(src, args.fill_level, lat_step, lng_step))
        ]
        args.grid = "fill"
    elif args.grid:
        r, c = (int(v) for v in args.grid.lower().split("x"))
        layouts = [(f"grid{r}x{c}", grid_offsets(src, r, c, args.spacing))]
    else:
        layouts = [
            (f"centers{n}", cell_center_offsets(src, n)) for n in map(int, args.copies.split(","))
        ]
    print(
        f"machine: {os.cpu_count()} cores; workers {args.workers}; {args.per_group} partitions "
        f"per group; profile {args.profile}; source {src.name}"
    )
    print(
        "| copies | PBF MB | objects | partitions | wall s | s / partition | split s | "
        "extract s | write s | objects/s | coordinator peak MiB | worker peak MiB | "
        "any child peak MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for name, offsets in layouts:
        pbf = work / f"{args.source}-{name}.osm.pbf"
        if not pbf.exists():
            t0 = time.perf_counter()
            tile_pbf(src, offsets, pbf)
            print(f"(tiled {pbf.name}: {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        objects = count_objects(pbf)
        # one partition per copy: the cells the copies were centred on (a grid: its cover)
        partitions = [] if args.grid else copy_cells(src, offsets)
        f = run_one(pbf, args, work, partitions)
        f.update(
            copies=len(offsets),
            pbf_bytes=pbf.stat().st_size,
            objects=objects,
            layout=name,
            profile=args.profile,
            workers=args.workers,
            per_group=args.per_group,
        )
        results.append(f)
        mib = 2**20
        print(
            f"| {len(offsets)} | {f['pbf_bytes'] / 1e6:.1f} | {objects:,} | {f['partitions']} | "
            f"{f['wall_s']:.1f} | {f['wall_s'] / f['partitions']:.2f} | {f['split_s']:.1f} | "
            f"{f['extract_s']:.1f} | {f['write_s']:.1f} | {objects / f['wall_s']:,.0f} | "
            f"{f['coordinator_peak_b'] / mib:.0f} | {f['worker_peak_b'] / mib:.0f} | "
            f"{f['any_child_peak_b'] / mib:.0f} |",
            flush=True,
        )
        if args.grid:
            pp = f["per_partition"]
            print("\n| partition | rows | images | full images | non-empty pixels |")
            print("|---|---:|---:|---:|---:|")
            for token, v in sorted(pp.items()):
                if v["rows"]:
                    print(
                        f"| {token} | {v['rows']:,} | {v['images']} | {v['full_images']} | "
                        f"{v['pixels']:,} |"
                    )
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(f) + "\n")
    if args.plot and len(results) > 1:
        plot(results, Path(args.plot))


def plot(results: list[dict], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["partitions"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(n, [r["wall_s"] / r["partitions"] for r in results], "o-", label="wall / partition")
    a.plot(n, [r["extract_s"] / r["partitions"] for r in results], "s--", label="workers")
    a.plot(n, [r["write_s"] / r["partitions"] for r in results], "^--", label="features+writes")
    a.set_xscale("log", base=2)
    a.set_xlabel("level-6 partitions")
    a.set_ylabel("seconds per partition")
    a.legend()
    a.grid(alpha=0.3)
    mib = 2**20
    b.plot(n, [r["coordinator_peak_b"] / mib for r in results], "o-", label="coordinator")
    b.plot(n, [r["worker_peak_b"] / mib for r in results], "s-", label="largest worker")
    b.plot(n, [r["any_child_peak_b"] / mib for r in results], "^--", label="largest child (any)")
    b.set_xscale("log", base=2)
    b.set_xlabel("level-6 partitions")
    b.set_ylabel("peak RSS, MiB")
    b.set_ylim(bottom=0)
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle("Data layer scaling (tiled Helsinki, 2 shared cores)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
