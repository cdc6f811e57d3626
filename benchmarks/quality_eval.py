"""Probe quality on labels built from the bundled extracts (the figures in docs/quality.md).

Labels per level-17 cell (the city profile's pixels), from OSM tags the taxonomy does not turn
into channels, so no input channel holds them directly:

* ``addresses``: log1p of the objects with an ``addr:housenumber`` (nodes, and ways at the
  mean of their nodes) in the cell (cell-local);
* ``named``: log1p of the named objects (``name``) in the cell (cell-local);
* ``named_3x3``: log1p of the named objects in the cell and its 8 neighbours (context).

Every pixel of every embedded image is labelled (empty pixels too), so the probe must also tell
empty from busy cells.

``--held-out CHANNEL`` adds the target ``held_out`` = log1p of that ``cell_features`` channel
(cell-local): the model must have been trained without it (``held_out_channels``), and every
raw method then drops it too, so all methods see the same inputs.

``--train KEY=VALUE`` (repeatable) first trains a model with those ``TrainConfig`` fields over
the root's profile defaults (e.g. ``--train augment=true --train seed=1``), embeds every
partition with it, then evaluates it (the lever comparison of docs/quality.md).
``--images`` adds the image embeddings as ``--with`` twice: pooled over every pixel
(``with``, what ``image_embeddings`` holds) and over the pixels with data only
(``with_data``), each alone and fused with the cell embedding.
``--summary FILE`` appends one JSON line per run: config, model version, training seconds and
the R² mean / std per target, protocol and method.

usage: python benchmarks/quality_eval.py ROOT [--out report.json] [--labels labels.parquet]
       [--train KEY=VALUE ...] [--held-out CHANNEL] [--images] [--summary runs.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import osmium
import polars as pl

from s2vec_pipeline.analysis import evaluation
from s2vec_pipeline.analysis.cell_matrices import neighbourhood_ids, raw_feature_matrix
from s2vec_pipeline.analysis.evaluation import evaluate, write_report
from s2vec_pipeline.analysis.labels import label_cells
from s2vec_pipeline.cells import s2
from s2vec_pipeline.settings import bundled_sources
from s2vec_pipeline.storage import delta_store

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


def held_out_label(root: str, labels: pl.DataFrame, channel: str) -> pl.DataFrame:
    """``labels`` plus ``held_out`` = log1p of ``channel`` in each label cell."""
    ids = label_cells(labels, PIXEL_LEVEL)
    values = raw_feature_matrix(root, ids, [channel])[:, 0]
    return labels.with_columns(pl.Series("held_out", np.log1p(values)))


def train_and_embed(root: str, overrides: dict[str, Any]) -> tuple[str, float]:
    """Train a model with ``overrides`` over the profile's config, embed every partition;
    (model version, training seconds)."""
    from s2vec_pipeline.model.config import TrainConfig
    from s2vec_pipeline.model.data import RASTER_TABLE, raster_partition_keys, raster_snapshot
    from s2vec_pipeline.model.embed import write_embeddings
    from s2vec_pipeline.model.registry import load_model
    from s2vec_pipeline.model.train import train_model

    contract = delta_store.table_contract(root, RASTER_TABLE)
    config = TrainConfig.for_profile(contract.get("profile", ""), **overrides)
    t0 = time.perf_counter()
    card = train_model(root, config=config)
    seconds = time.perf_counter() - t0
    model, card = load_model(root, card.model_version)
    write_embeddings(root, model, card, raster_partition_keys(root, raster_snapshot(root)))
    return card.model_version, seconds


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as ``TrainConfig`` fields, typed by each field's default."""
    from s2vec_pipeline.model.config import TrainConfig

    defaults = {name: f.default for name, f in TrainConfig.model_fields.items()}
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in defaults:
            raise SystemExit(f"--train {item}: no TrainConfig field {key!r}")
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, tuple):
            out[key] = tuple(v for v in value.split(",") if v)
        elif isinstance(default, int | float) or default is None:
            out[key] = json.loads(value)
        else:
            out[key] = value
    return out


def image_embeddings(root: str, model_version: str) -> dict[str, pl.DataFrame]:
    """Image embeddings of ``model_version`` pooled over every pixel (``with``) and over the
    pixels with data only (``with_data``), keyed by image token."""
    cells = (
        delta_store.scan_table(root, "cell_embeddings")
        .filter(pl.col("model_version") == model_version)
        .select("image_token", "cell_id", "embedding")
        .collect()
    )
    channels = delta_store.table_contract(root, "raster_tiles")["channels"]
    raw = raw_feature_matrix(root, s2.from_signed(cells["cell_id"].to_numpy()), channels)
    emb = np.asarray(cells["embedding"].list.to_array(len(cells["embedding"][0])).to_numpy())
    frame = pl.DataFrame({"image_token": cells["image_token"], "has_data": (raw > 0).any(axis=1)})
    out = {}
    for name, keep in (("with", np.ones(len(emb), bool)), ("with_data", frame["has_data"])):
        keep = np.asarray(keep)
        tokens = frame["image_token"].to_numpy()[keep]
        uniq, inverse = np.unique(tokens, return_inverse=True)
        sums = np.zeros((len(uniq), emb.shape[1]))
        np.add.at(sums, inverse, emb[keep])
        pooled = sums / np.bincount(inverse)[:, None]
        out[name] = pl.DataFrame({"cell_token": uniq, "embedding": pooled.tolist()})
    return out


def evaluate_levers(
    root: str,
    labels: pl.DataFrame,
    model_version: str | None,
    seed: int,
    drop_channels: list[str],
    others: dict[str, pl.DataFrame],
) -> evaluation.EvaluationReport:
    """``evaluation.evaluate`` with raw methods over the channels not in ``drop_channels``, the
    fusion ``s2vec+raw_3x3`` and several ``--with`` sources (alone and fused with s2vec)."""
    inputs = evaluation.prepare(root, labels, model_version)
    kept = [c for c in inputs.channels if c not in drop_channels]
    inputs = replace(inputs, grid=replace(inputs.grid, channels=kept))
    library = evaluation.feature_sets(inputs, others)
    emb, raw3 = library["s2vec"][0], library["raw_3x3"][0]
    features = {}
    for name, value in library.items():  # the fusion right after s2vec+raw
        features[name] = value
        if name == "s2vec+raw":
            features["s2vec+raw_3x3"] = (np.hstack([emb, raw3]), None)
    plan, fold_notes = evaluation.fold_plan(inputs, 5, seed)
    notes = evaluation.input_notes(inputs, emb.shape[1]) + fold_notes
    if drop_channels:
        notes.append(f"raw methods without {', '.join(drop_channels)}")
    return evaluation.run_evaluation(inputs, features, plan, notes, seed)


def r2_summary(report: evaluation.EvaluationReport) -> dict[str, dict[str, list[float]]]:
    """{target/protocol: {method: [mean, std]}} of R² over folds."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in report.results:
        out.setdefault(f"{r.target}/{r.protocol}", {})[r.method] = [
            round(v, 4) for v in r.stat("r2")
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("--sources", nargs="*", default=bundled_sources())
    ap.add_argument("--labels", default=None, help="also write the labels here (.parquet)")
    ap.add_argument("--out", default=None, help="write the report as JSON")
    ap.add_argument("--with", dest="with_file", default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the evaluation folds")
    ap.add_argument("--train", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--held-out", default=None, metavar="CHANNEL")
    ap.add_argument("--images", action="store_true")
    ap.add_argument("--summary", default=None, metavar="FILE.jsonl")
    args = ap.parse_args()
    root = str(args.root)
    model_version, train_s, overrides = None, None, parse_overrides(args.train)
    if args.train:
        model_version, train_s = train_and_embed(root, overrides)
        print(f"trained {model_version} in {train_s:.1f} s with {overrides}")
    t0 = time.perf_counter()
    labels = build_labels(root, args.sources)
    if args.held_out:
        labels = held_out_label(root, labels, args.held_out)
    if args.labels:
        labels.write_parquet(args.labels)
    t1 = time.perf_counter()
    if args.train or args.held_out or args.images:
        version = evaluation.prepare(root, labels, model_version).model_version
        others = image_embeddings(root, version) if args.images else {}
        if args.with_file:
            others["with_file"] = evaluation.read_embedding_file(args.with_file)
        drop = [args.held_out] if args.held_out else []
        report = evaluate_levers(root, labels, version, args.seed, drop, others)
    else:
        other = evaluation.read_embedding_file(args.with_file) if args.with_file else None
        report = evaluate(Path(root), labels, with_embeddings=other, seed=args.seed)
    t2 = time.perf_counter()
    print(report.table())
    print(f"\nlabels built in {t1 - t0:.1f} s, evaluated in {t2 - t1:.1f} s")
    if args.out:
        write_report(report, args.out)
    if args.summary:
        line = {
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "held_out": args.held_out,
            "model_version": report.model_version,
            "train_s": None if train_s is None else round(train_s, 1),
            "eval_seed": args.seed,
            "cpus": os.cpu_count(),
            "r2": r2_summary(report),
        }
        with open(args.summary, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
