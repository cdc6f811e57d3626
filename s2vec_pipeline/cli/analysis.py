"""Commands that use the embeddings of a materialized root: ``evaluate`` (linear probes on your
labels), ``pool`` (one embedding per area of yours) and ``map`` (drawn on a map)."""

from __future__ import annotations

import argparse
from pathlib import Path

from s2vec_pipeline.cli.options import add_root, cells_given, csv_list, existing_root
from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.storage import fs


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="linear probes of the embeddings on your labels, against raw-feature baselines",
        description="Ridge probes (alpha by inner cross-validation) predicting each numeric "
        "label column from S2Vec embeddings, raw log1p features, raw 3x3 neighbourhood, PCA of "
        "the raw features and fusions, in random k-fold and spatially blocked folds. Labels: "
        "Parquet or CSV with a cell_token (pixel level) or lat/lon column and numeric targets, "
        "or areas (GeoJSON or GeoParquet polygons with numeric columns): every feature is then "
        "the area-weighted mean over the pixel cells covering each area.",
    )
    p.add_argument(
        "--labels",
        required=True,
        metavar="FILE",
        help="labels: .parquet or .csv per cell, or .geojson / GeoParquet per area",
    )
    add_root(p)
    p.add_argument("--model-version", default=None, help="model whose embeddings to evaluate")
    p.add_argument(
        "--with",
        dest="with_file",
        default=None,
        metavar="OTHER.parquet",
        help="another embedding source keyed by cell_token (a list column or numeric columns)",
    )
    p.add_argument(
        "--targets", type=csv_list, default=None, metavar="COL,...", help="label columns"
    )
    p.add_argument("--folds", type=int, default=5, help="folds per protocol (default 5)")
    p.add_argument(
        "--block-level",
        type=int,
        default=None,
        help="S2 level of the cells the spatial protocol holds out whole (default: image level)",
    )
    p.add_argument("--seed", type=int, default=0, help="fold seed (default 0)")
    p.add_argument(
        "--mlp", action="store_true", help="also a small MLP probe on embeddings and raw features"
    )
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the report as JSON")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from s2vec_pipeline.analysis import evaluation

    if args.out and not args.out.endswith(".json"):
        raise S2VecError(f"--out must end in .json, got {args.out}")
    root = existing_root(args)
    labels, areas = evaluation.read_labels(args.labels)
    other = evaluation.read_embedding_file(args.with_file) if args.with_file else None
    report = evaluation.evaluate(
        root,
        labels,
        model_version=args.model_version,
        with_embeddings=other,
        folds=args.folds,
        seed=args.seed,
        block_level=args.block_level,
        targets=args.targets,
        mlp=args.mlp,
        areas=areas,
    )
    print(report.table())
    if args.out:
        evaluation.write_report(report, args.out)
        print(f"\nreport written to {args.out}")
    return 0


def add_pool(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pool",
        help="one embedding per area of yours: pixel embeddings pooled, area-weighted",
        description="For each polygon of a GeoJSON or GeoParquet file: the mean of the "
        "embeddings of the pixel cells it covers, each weighted by the square metres of the "
        "polygon inside the cell (images without data count with the empty image's "
        "embedding). Areas reaching a partition that is not embedded are refused.",
    )
    p.add_argument("--areas", required=True, metavar="FILE", help=".geojson or GeoParquet")
    add_root(p)
    p.add_argument("--model-version", default=None, help="embeddings of this model")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE.parquet",
        help="one row per area: its attributes, area_index, area_m2, cells, model_version, "
        "embedding",
    )
    p.add_argument(
        "--cells-out",
        default=None,
        metavar="FILE.parquet",
        help="also the (area_index, cell_token, area_m2) pieces, for the SQL pooling recipe",
    )
    p.set_defaults(func=cmd_pool)


def cmd_pool(args: argparse.Namespace) -> int:
    from s2vec_pipeline.analysis import areas

    root = existing_root(args)
    done = areas.write_pooled(root, args.areas, args.out, args.model_version, args.cells_out)
    print(
        f"{done['areas']} area(s) pooled over {done['cells']} (area, cell) pieces with model "
        f"{done['model_version']} (width {done['dim']}): written to {args.out}"
    )
    if args.cells_out:
        print(f"pieces written to {args.cells_out}")
    return 0


def add_map(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map",
        help="draw embeddings (first 3 principal components as RGB) or a channel on a map",
        description="Cells drawn as their true S2 polygons, north up, with legend and "
        "coordinates. --out FILE.png (matplotlib) or FILE.html (self-contained: inline SVG, "
        "opens offline; hover shows the cell token and its top channels).",
    )
    add_root(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--cells",
        type=csv_list,
        metavar="TOKEN,...",
        help="cells to draw: level-6 partitions, image cells or any cells down to pixels",
    )
    where.add_argument("--region", metavar="NAME", help="a registered region (s2vec region add)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--embedding", action="store_true", help="the cells' embeddings")
    what.add_argument("--channel", metavar="NAME", help="one raster channel, e.g. road_primary_m")
    what.add_argument(
        "--reconstruction",
        action="store_true",
        help="one image (--cells IMAGE_TOKEN): input, masked input and the model's "
        "reconstruction side by side (PNG only)",
    )
    p.add_argument("--model-version", default=None, help="embeddings of this model")
    p.add_argument("--out", required=True, metavar="FILE.png|FILE.html", help="output file")
    p.set_defaults(func=cmd_map)


def cmd_map(args: argparse.Namespace) -> int:
    from s2vec_pipeline.analysis import maps

    root = existing_root(args)
    if Path(args.out).suffix.lower() not in (".png", ".html", ".htm"):
        raise S2VecError(f"--out must end in .png or .html, got {args.out}")
    if args.region:
        from s2vec_pipeline.cells.regions import RegionRegistry

        cells = list(RegionRegistry(root).get(args.region).cells)
    else:
        cells = cells_given(args.cells)
    if args.reconstruction:
        if len(cells) != 1 or not args.out.lower().endswith(".png"):
            raise S2VecError("--reconstruction draws one image: --cells IMAGE_TOKEN --out F.png")
        png = maps.reconstruction_png(root, cells[0], args.model_version)
        fs.write_bytes(args.out, png)  # whole or not at all
        print(f"reconstruction of image {cells[0]} written to {args.out}")
        return 0
    if args.embedding:
        layer = maps.embedding_layer(root, cells, args.model_version)
    else:
        layer = maps.channel_layer(root, cells, args.channel)
    out = maps.write_map(layer, args.out)
    print(f"{layer.title}\nwritten to {out}")
    return 0
