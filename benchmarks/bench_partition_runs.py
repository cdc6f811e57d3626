"""One partition per Dagster run on a large source: the cost of each run's extraction.

The Dagster layer materializes one level-6 partition per run. For a source above
``osm_split.IN_PROCESS_MAX_BYTES`` each run used to cut the WHOLE source with osmium-tool for its
one partition (time per run grows with the input); with the split cache
(``osm_split.cached_split``, under ``<root>/_split``) the first run cuts the source once and
later runs read only their group's file.

The script tiles a bundled extract N times (one copy per level-6 cell, new ids), runs
``s2vec materialize --stages extract --cells K cells --workers 1`` on a fresh root and prints the
``extract_seconds`` Dagster recorded for each partition's run. ``--pythonpath DIR`` runs another
checkout of the project (e.g. a ``git worktree`` of an older commit) for a before/after.

usage: python benchmarks/bench_partition_runs.py [--copies 160] [--cells 8]
       [--work DIR] [--pythonpath DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' osm_tile
from s2vec_pipeline.cells import s2  # noqa: E402
from s2vec_pipeline.osm.extract import source_bbox  # noqa: E402
from s2vec_pipeline.settings import bundled_source  # noqa: E402
from s2vec_pipeline_tests.osm_tile import cell_center_offsets, tile_pbf  # noqa: E402

READ_METADATA = r"""
import json, os, sys
import dagster as dg
inst = dg.DagsterInstance.from_config(sys.argv[1])
recs = inst.fetch_materializations(dg.AssetKey("osm_features"), limit=10_000).records
print(json.dumps([
    (r.asset_materialization.partition, r.asset_materialization.metadata["extract_seconds"].value)
    for r in sorted(recs, key=lambda r: r.timestamp)
]))
"""


def copy_cells(src: Path, copies: int) -> list[str]:
    """The level-6 cells holding the copies' centres, in the order the tiler lays them."""
    lat0, lng0, lat1, lng1 = source_bbox(src)
    off = np.asarray(cell_center_offsets(src, copies))
    ids = s2.latlng_to_cell_id((lat0 + lat1) / 2 + off[:, 0], (lng0 + lng1) / 2 + off[:, 1], 6)
    return list(dict.fromkeys(s2.to_token(ids).tolist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=160, help="copies of Helsinki (160: ~83 MB)")
    ap.add_argument("--cells", type=int, default=8, help="partitions to materialize")
    ap.add_argument("--work", default=None, help="folder for the tiled PBF and the root")
    ap.add_argument("--pythonpath", default=None, help="checkout of the project to run")
    args = ap.parse_args()

    src = bundled_source("helsinki")
    work = Path(args.work or tempfile.mkdtemp(prefix="s2vec-partition-runs-"))
    work.mkdir(parents=True, exist_ok=True)
    pbf = work / f"helsinki-x{args.copies}.osm.pbf"
    if not pbf.exists():
        tile_pbf(src, cell_center_offsets(src, args.copies), pbf)
    cells = copy_cells(src, args.copies)[: args.cells]
    root = work / "root"
    shutil.rmtree(root, ignore_errors=True)
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    cmd = [sys.executable, "-m", "s2vec_pipeline.cli", "materialize", "--source", str(pbf),
           "--root", str(root), "--cells", ",".join(cells), "--stages", "extract",
           "--workers", "1"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=work)  # not this tree
    wall = time.perf_counter() - t0
    out = subprocess.run(
        [sys.executable, "-c", READ_METADATA, str(root / "_dagster")],
        env=env, check=True, capture_output=True, text=True, cwd=work,
    )  # fmt: skip
    per_run = json.loads(out.stdout)
    print(
        f"source: {pbf.name}, {pbf.stat().st_size / 1e6:.1f} MB; {len(cells)} partitions; "
        f"{os.cpu_count()} cores; code: {args.pythonpath or 'this checkout'}"
    )
    print("| run | partition | extract s |\n|---:|---|---:|")
    for n, (token, seconds) in enumerate(per_run, 1):
        print(f"| {n} | {token} | {seconds:.2f} |")
    secs = [s for _, s in per_run]
    print(f"\nwhole command {wall:.1f} s; first run {secs[0]:.2f} s, later runs median "
          f"{float(np.median(secs[1:])) if len(secs) > 1 else float('nan'):.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
