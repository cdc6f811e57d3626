"""Probe quality on labels built from the bundled extracts (the figures in docs/quality.md).

Labels per level-17 cell (the city profile's pixels), from OSM tags the taxonomy does not turn
into channels, so no input channel holds them directly:

* ``addresses``: log1p of the objects with an ``addr:housenumber`` (nodes, and ways at the
  mean of their nodes) in the cell (cell-local);
* ``named``: log1p of the named objects (``name``) in the cell (cell-local);
* ``named_3x3``: log1p of the named objects in the cell and its 8 neighbours (context).

Every pixel of every embedded image is labelled (empty pixels too), so the probe must also tell
empty from busy cells.

usage: python benchmarks/quality_eval.py ROOT [--out report.json] [--labels labels.parquet]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import osmium
import polars as pl

from s2vec_pipeline import delta_store, s2
from s2vec_pipeline.evaluation import evaluate, neighbourhood_ids, write_report
from s2vec_pipeline.settings import bundled_sources

PIXEL_LEVEL = 17


def osm_points(path: str) -> pl.DataFrame:
    """lat, lon, has_address, has_name of every node and way carrying either tag."""
    rows: list[tuple[float, float, bool, bool]] = []
    fp = osmium.FileProcessor(path, osmium.osm.NODE | osmium.osm.WAY).with_locations()
    for obj in fp:
        tags = obj.tags
        addr, name = "addr:housenumber" in tags, "name" in tags
        if not (addr or name):
            continue
        if obj.is_node():
            if obj.location.valid():
                rows.append((obj.location.lat, obj.location.lon, addr, name))
        else:
            locs = [n.location for n in obj.nodes if n.location.valid()]
            if locs:
                rows.append(
                    (
                        sum(lc.lat for lc in locs) / len(locs),
                        sum(lc.lon for lc in locs) / len(locs),
                        addr,
                        name,
                    )
                )
    return pl.DataFrame(rows, schema=["lat", "lon", "addr", "name"], orient="row")


def build_labels(root: str, sources: list[str]) -> pl.DataFrame:
    points = pl.concat([osm_points(s) for s in sources])
    cells = s2.to_signed(s2.latlng_to_cell_id(points["lat"], points["lon"], PIXEL_LEVEL))
    counts = (
        points.with_columns(pl.Series("cell_id", cells))
        .group_by("cell_id")
        .agg(pl.col("addr").sum().alias("addresses"), pl.col("name").sum().alias("named"))
    )
    lookup = dict(
        zip(counts["cell_id"], zip(counts["addresses"], counts["named"], strict=True), strict=True)
    )
    emb = delta_store.read_partitions(root, "cell_embeddings", columns=["cell_token", "cell_id"])
    emb = emb.unique("cell_id").sort("cell_id")
    ids = s2.from_signed(emb["cell_id"].to_numpy())
    own = np.array([lookup.get(c, (0, 0)) for c in emb["cell_id"].to_list()], dtype=np.float64)
    nbr, valid = neighbourhood_ids(ids, PIXEL_LEVEL)
    nbr_named = np.array(
        [lookup.get(c, (0, 0))[1] for c in s2.to_signed(nbr.ravel()).tolist()], dtype=np.float64
    ).reshape(nbr.shape)
    return pl.DataFrame(
        {
            "cell_token": emb["cell_token"],
            "addresses": np.log1p(own[:, 0]),
            "named": np.log1p(own[:, 1]),
            "named_3x3": np.log1p((nbr_named * valid).sum(axis=1)),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("--sources", nargs="*", default=bundled_sources())
    ap.add_argument("--labels", default=None, help="also write the labels here (.parquet)")
    ap.add_argument("--out", default=None, help="write the report as JSON")
    ap.add_argument("--with", dest="with_file", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    labels = build_labels(args.root, args.sources)
    if args.labels:
        labels.write_parquet(args.labels)
    other = None
    if args.with_file:
        from s2vec_pipeline.evaluation import read_embedding_file

        other = read_embedding_file(args.with_file)
    t1 = time.perf_counter()
    report = evaluate(Path(args.root), labels, with_embeddings=other, seed=args.seed)
    t2 = time.perf_counter()
    print(report.table())
    print(f"\nlabels built in {t1 - t0:.1f} s, evaluated in {t2 - t1:.1f} s")
    if args.out:
        write_report(report, args.out)


if __name__ == "__main__":
    main()
