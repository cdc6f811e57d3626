"""Every pixel cell of an embedded partition has an embedding (images without data included),
and labels / embeddings by area (GeoJSON, GeoParquet), on a root produced by a real (tiny) run.

Oracles, computed without the code under test: the model's encoder run directly on an all-zero
image; each cell's position inside its image from s2sphere (``to_face_ij_orientation``); the
pixel cells an area covers from s2sphere's ``RegionCoverer`` and the area inside each from
shapely on a local equirectangular plane (cells ~70 m wide: the plane's distortion is below
1e-4 of an area, checked with a tolerance of 2e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s2geometry as s2g
import s2sphere
import shapely
import torch
from shapely.geometry import Polygon, box, mapping

from s2vec_pipeline.analysis.evaluation import LabelError, embedding_matrix, evaluate
from s2vec_pipeline.analysis.sql import join_labels_any_cell, pool_areas_sql
from s2vec_pipeline.cells import s2
from s2vec_pipeline.cli import main
from s2vec_pipeline.storage import delta_store

HELSINKI_L6 = "4693"
MONACO_L6 = "12cd"
PIXEL, IMAGE = 17, 13
SIDE = 1 << (PIXEL - IMAGE)
ROAD = "road_residential_m"
EARTH_R = 6_371_008.8


# --- oracles -----------------------------------------------------------------------------


def _model_version(root: Path) -> str:
    (version,) = delta_store.read_partitions(root, "cell_embeddings")["model_version"].unique()
    return str(version)


def _zero_image_embedding(root: Path, version: str) -> np.ndarray:
    """(S*S, D): the encoder run directly on the all-zero image."""
    from s2vec_pipeline.model.registry import load_model

    model, card = load_model(root, version)
    with torch.no_grad():
        z = model.eval().encode(torch.zeros(1, len(card.channels), card.side, card.side))
    return z[0].numpy().astype(np.float64)


def _pixel_index(token: str) -> int:
    """row * S + col of a pixel cell inside its image, from s2sphere's (i, j)."""
    _, i, j, _ = s2sphere.CellId.from_token(token).to_face_ij_orientation()
    shift = 30 - PIXEL
    return ((i >> shift) & (SIDE - 1)) * SIDE + ((j >> shift) & (SIDE - 1))


def _stored(root: Path) -> dict[str, np.ndarray]:
    ce = delta_store.read_partitions(root, "cell_embeddings", columns=["cell_token", "embedding"])
    return dict(zip(ce["cell_token"].to_list(), np.asarray(ce["embedding"].to_list()), strict=True))


def _empty_images(root: Path, partition: str) -> list[str]:
    """Level-13 neighbours of the partition's tiled images that have no tile (no data)."""
    tiles = delta_store.read_partitions(root, "raster_tiles", [partition], ["image_token"])
    tiled = set(tiles["image_token"].to_list())
    out = set()
    for t in tiled:
        cell = s2g.S2CellId.FromToken(t)
        for n in cell.GetAllNeighbors(IMAGE):
            if n.ToToken() not in tiled and n.parent(6).ToToken() == partition:
                out.add(n.ToToken())
    return sorted(out)


def _no_data(root: Path, partition: str) -> str:
    return _empty_images(root, partition)[0]


def _children(image: str) -> list[str]:
    c = s2g.S2CellId.FromToken(image)
    kid, end, out = c.child_begin(PIXEL), c.child_end(PIXEL), []
    while kid != end:
        out.append(kid.ToToken())
        kid = kid.next()
    return out


def _cell_polygon_xy(token: str, lat0: float, lng0: float) -> Polygon:
    cell = s2sphere.Cell(s2sphere.CellId.from_token(token))
    pts = []
    for k in range(4):
        ll = s2sphere.LatLng.from_point(cell.get_vertex(k))
        pts.append(_xy(ll.lng().degrees, ll.lat().degrees, lat0, lng0))
    return Polygon(pts)


def _xy(lng: float, lat: float, lat0: float, lng0: float) -> tuple[float, float]:
    k = np.pi / 180 * EARTH_R
    return (lng - lng0) * k * np.cos(np.radians(lat0)), (lat - lat0) * k


def _oracle_weights(geom: Polygon) -> dict[str, float]:
    """{pixel token: m² of ``geom`` inside it}, by s2sphere covering + shapely on a plane."""
    lng_lo, lat_lo, lng_hi, lat_hi = geom.bounds
    lat0, lng0 = (lat_lo + lat_hi) / 2, (lng_lo + lng_hi) / 2
    rc = s2sphere.RegionCoverer()
    rc.min_level = rc.max_level = PIXEL
    rc.max_cells = 1_000_000
    rect = s2sphere.LatLngRect.from_point_pair(
        s2sphere.LatLng.from_degrees(lat_lo, lng_lo), s2sphere.LatLng.from_degrees(lat_hi, lng_hi)
    )
    flat = shapely.transform(geom, lambda c: np.array([_xy(x, y, lat0, lng0) for x, y in c]))
    out = {}
    for cid in rc.get_covering(rect):
        a = flat.intersection(_cell_polygon_xy(cid.to_token(), lat0, lng0)).area
        if a > 0:
            out[cid.to_token()] = a
    return out


def _oracle_pool(weights: dict[str, float], per_cell) -> np.ndarray:  # noqa: ANN001
    total = sum(weights.values())
    return sum(w * per_cell(t) for t, w in weights.items()) / total


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(embedded_root: Path) -> dict:
    version = _model_version(embedded_root)
    zero = _zero_image_embedding(embedded_root, version)
    stored = _stored(embedded_root)
    features = delta_store.read_partitions(embedded_root, "cell_features")
    raw = dict(zip(features["cell_token"].to_list(), features[ROAD].to_list(), strict=True))

    def embedding(token: str) -> np.ndarray:
        return stored[token] if token in stored else zero[_pixel_index(token)]

    return {"version": version, "zero": zero, "embedding": embedding, "raw": raw}


def _grid(lat0: float, lng0: float, rows: int, cols: int, d: float) -> list[Polygon]:
    """rows x cols boxes of d degrees of latitude by 2d of longitude (~square at 60° N)."""
    return [
        box(lng0 + 2 * b * d, lat0 + a * d, lng0 + 2 * (b + 1) * d, lat0 + (a + 1) * d)
        for a in range(rows)
        for b in range(cols)
    ]


@pytest.fixture(scope="module")
def area_geoms(embedded_root: Path) -> list[Polygon]:
    """300 boxes of ~110 m over central Helsinki (more areas than raw channels, so a linear
    probe of 122 pooled channels is determined), a triangle and a box with a hole inside
    images of Helsinki and Monaco without data."""
    geoms = _grid(60.160, 24.925, 15, 20, 0.001)
    for partition in (HELSINKI_L6, MONACO_L6):
        image = s2g.S2Cell(s2g.S2CellId.FromToken(_empty_images(embedded_root, partition)[0]))
        c = s2g.S2LatLng(image.GetCenter())
        lat, lng = c.lat().degrees(), c.lng().degrees()
        geoms.append(Polygon([(lng - 0.002, lat - 0.001), (lng + 0.002, lat), (lng, lat + 0.001)]))
        outer = box(lng - 0.002, lat - 0.001, lng + 0.002, lat + 0.001)
        geoms.append(outer.difference(box(lng - 0.0005, lat - 0.0003, lng + 0.0005, lat + 0.0003)))
    return geoms


def _write_geojson(path: Path, geoms: list, props: list[dict]) -> Path:
    feats = [
        {"type": "Feature", "geometry": None if g is None else mapping(g), "properties": p}
        for g, p in zip(geoms, props, strict=True)
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


# --- item 4: every pixel cell of an embedded partition ------------------------------------


def test_cells_of_images_without_data_get_the_empty_image_embedding(embedded_root, oracle):
    """Cells of images with no tile (not in cell_embeddings, whose contract stays one row per
    pixel of images with data) get the encoder's output for an all-zero image at their own
    position; cells of images with data get their stored row."""
    version = oracle["version"]
    tokens = []
    for partition in (HELSINKI_L6, MONACO_L6):
        empty = _empty_images(embedded_root, partition)
        assert empty, partition
        tokens += _children(empty[0])  # every position of one image without data
    stored = _stored(embedded_root)
    assert not any(t in stored for t in tokens)
    with_data = list(stored)[::97]
    tokens += with_data
    got = embedding_matrix(embedded_root, s2.from_token(np.array(tokens)), version)
    want = np.array([oracle["embedding"](t) for t in tokens])
    assert np.allclose(got, want, atol=1e-5)
    # positions matter: the empty image's pixel embeddings are not all alike
    assert np.abs(oracle["zero"][0] - oracle["zero"][SIDE * SIDE - 1]).max() > 1e-3
    # the stored table keeps its contract: S*S rows per image with data, none for others
    tiles = delta_store.read_partitions(embedded_root, "raster_tiles", columns=["image_token"])
    ce = delta_store.read_partitions(embedded_root, "cell_embeddings", columns=["image_token"])
    assert set(ce["image_token"].unique()) == set(tiles["image_token"])
    assert ce.height == SIDE * SIDE * tiles.height


def test_evaluate_keeps_labels_in_images_without_data(embedded_root, oracle):
    """Fails on the old code (it refused the whole label file): 512 labelled cells of images
    without data and 512 with data are all evaluated."""
    empty = [t for p in (HELSINKI_L6, MONACO_L6) for t in _children(_no_data(embedded_root, p))]
    with_data = list(_stored(embedded_root))[: len(empty)]
    tokens = empty + with_data
    raw = np.array([oracle["raw"].get(t, 0.0) for t in tokens])
    labels = pl.DataFrame({"cell_token": tokens, "road": 2.0 * np.log1p(raw) + 1.0})
    report = evaluate(embedded_root, labels, folds=3)
    assert report.n_rows == len(tokens) == 1024
    assert report.result("road", "random", "raw").stat("r2")[0] > 0.999


def test_cells_outside_every_embedded_partition_are_named(embedded_root, oracle, capsys, tmp_path):
    """12cf is next to Monaco but not materialized: the error names its cells and the
    partition, counts only those, and the CLI exits 2 with one line."""
    outside = _children(s2g.S2CellId.FromToken("12cf").child_begin(IMAGE).ToToken())[:7]
    inside = _children(_empty_images(embedded_root, MONACO_L6)[0])[:5]
    ids = s2.from_token(np.array(inside + outside))
    with pytest.raises(LabelError) as err:
        embedding_matrix(embedded_root, ids, oracle["version"])
    text = str(err.value)
    assert "7 of 12 label cell(s) lie outside every partition embedded with model" in text
    assert f"12cf: 7 cell(s) (e.g. {outside[0]}," in text
    assert "--cells 12cf" in text and "12cd" not in text.split("by partition:")[1]
    # through the CLI
    labels = tmp_path / "outside_labels.csv"
    pl.DataFrame({"cell_token": inside + outside, "y": np.arange(12.0)}).write_csv(labels)
    assert main(["evaluate", "--labels", str(labels), "--root", str(embedded_root)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "12cf: 7 cell(s)" in err_lines[0]


def test_sql_recipe_gives_every_cell_and_flags_the_outside_ones(embedded_root, oracle):
    empty = _children(_empty_images(embedded_root, HELSINKI_L6)[0])[:40]
    with_data = list(_stored(embedded_root))[:40]
    outside = _children(s2g.S2CellId.FromToken("12cf").child_begin(IMAGE).ToToken())[:2]
    labels = pl.DataFrame({"cell_token": empty + with_data + outside})
    out = pl.from_arrow(join_labels_any_cell(embedded_root, labels, oracle["version"], IMAGE))
    assert out.height == labels.height  # nothing dropped
    rows = {r["cell_token"]: r for r in out.iter_rows(named=True)}
    for t in empty + with_data:
        assert rows[t]["embedded"] and rows[t]["image_has_data"] == (t in with_data)
        assert np.allclose(rows[t]["embedding"], oracle["embedding"](t), atol=1e-5)
    for t in outside:
        assert not rows[t]["embedded"] and rows[t]["embedding"] is None


# --- item 5: areas -----------------------------------------------------------------------


def test_evaluate_by_area_pools_area_weighted(embedded_root, oracle, area_geoms, tmp_path):
    """Targets made from the data by an independent pooling (s2sphere cells, shapely areas):
    an exact linear function of the pooled first embedding dimension, and of the pooled log1p
    road length of each cell, given to the pipeline per cell as a ``--with`` source. The s2vec
    and ``with`` probes recover them: the pipeline pooled the same cells with the same
    weights. (The raw probes run on the same pooled features; ridge on 122 pooled channels,
    most rare, is too unstable to serve as the oracle here.)"""
    weights = [_oracle_weights(g) for g in area_geoms]

    def road(t: str) -> float:
        return float(np.log1p(oracle["raw"].get(t, 0.0)))

    props = [
        {
            "name": f"area {k}",
            "road": 3.0 * _oracle_pool(w, road) - 2.0,
            "emb0": _oracle_pool(w, lambda t: oracle["embedding"](t)[0]),
        }
        for k, w in enumerate(weights)
    ]
    path = _write_geojson(tmp_path / "areas.geojson", area_geoms, props)
    images = {s2g.S2CellId.FromToken(t).parent(IMAGE).ToToken() for w in weights for t in w}
    cells = [t for image in sorted(images) for t in _children(image)]
    other = tmp_path / "road.parquet"
    pl.DataFrame({"cell_token": cells, "road": [road(t) for t in cells]}).write_parquet(other)
    out = tmp_path / "report.json"
    argv = ["evaluate", "--labels", str(path), "--root", str(embedded_root), "--folds", "4"]
    assert main([*argv, "--with", str(other), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_rows"] == len(area_geoms) and report["unit"] == "area"
    res = {(r["target"], r["protocol"], r["method"]): r for r in report["results"]}
    spread = {t: float(np.std([p[t] for p in props])) for t in ("road", "emb0")}
    # RMSE, not R²: a spatial fold without roads has a constant target (R² undefined there).
    for protocol in ("random", "spatial"):
        assert res[("road", protocol, "with")]["rmse"]["mean"] < 1e-3 * spread["road"]
        assert res[("emb0", protocol, "s2vec")]["rmse"]["mean"] < 1e-3 * spread["emb0"]
        assert res[("road", protocol, "mean")]["rmse"]["mean"] > 0.5 * spread["road"]
        assert ("road", protocol, "raw_3x3") in res  # the baselines ran on the same folds
    assert res[("road", "random", "with")]["r2"]["mean"] > 0.999
    assert report["folds"]["spatial"] >= 2


def test_pool_command_matches_the_oracle_and_the_sql_recipe(
    embedded_root, oracle, area_geoms, tmp_path
):
    """``s2vec pool`` on a GeoParquet file: area, cell pieces and pooled embeddings agree with
    the independent pooling; the SQL recipe on its pieces gives the same embeddings."""
    wkb = shapely.to_wkb(np.asarray(area_geoms, dtype=object))
    table = pa.table({"district": [f"d{k}" for k in range(len(wkb))], "geometry": wkb})
    column = {"encoding": "WKB", "geometry_types": ["Polygon"]}
    meta = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    table = table.replace_schema_metadata({b"geo": json.dumps(meta).encode()})
    src = tmp_path / "areas.parquet"
    pq.write_table(table, src)
    out, pieces = tmp_path / "pooled.parquet", tmp_path / "pieces.parquet"
    args = ["pool", "--areas", str(src), "--root", str(embedded_root), "--out", str(out)]
    assert main([*args, "--cells-out", str(pieces)]) == 0
    pooled = pl.read_parquet(out)
    assert pooled["district"].to_list() == table["district"].to_pylist()
    assert (pooled["model_version"] == oracle["version"]).all()
    got = np.asarray(pooled["embedding"].to_list())
    for k, g in enumerate(area_geoms):
        w = _oracle_weights(g)
        assert pooled["area_m2"][k] == pytest.approx(sum(w.values()), rel=2e-3)
        assert pooled["cells"][k] == len(w)
        want = _oracle_pool(w, oracle["embedding"])
        assert np.allclose(got[k], want, atol=2e-3 * np.abs(want).max()), k
    sql = pl.from_arrow(pool_areas_sql(embedded_root, str(pieces), oracle["version"], IMAGE))
    assert sql["area_index"].to_list() == list(range(len(area_geoms)))
    assert np.allclose(sql["covered_m2"], pooled["area_m2"], rtol=1e-9)
    assert np.allclose(np.asarray(sql["embedding"].to_list()), got, rtol=1e-5, atol=1e-6)


def test_bad_areas_exit_2_naming_the_rows(embedded_root, tmp_path, capsys):
    good = box(24.93, 60.165, 24.935, 60.167)
    bowtie = Polygon([(24.93, 60.16), (24.94, 60.17), (24.94, 60.16), (24.93, 60.17)])
    cases = {
        "geometries": (
            [good, Polygon(), bowtie, shapely.Point(24.93, 60.16), None],
            [
                "empty geometry in row(s) 1",
                "invalid geometry in row(s) 2",
                "not a polygon in row(s) 3",
                "no geometry in row(s) 4",
            ],
        ),
        "no_numeric": ([good, good], ["no numeric target column"]),
        "outside": (
            [good, box(7.09, 42.95, 7.10, 42.96), good],  # south of Monaco: 12cf
            ["area row(s) 1 (rows count from 0) reach partition(s) 12cf", "--cells 12cf"],
        ),
    }
    for name, (geoms, expected) in cases.items():
        plain = name == "no_numeric"
        props = [{"name": "x"} if plain else {"y": float(k)} for k in range(len(geoms))]
        path = _write_geojson(tmp_path / f"{name}.geojson", geoms, props)
        for argv in (
            ["evaluate", "--labels", str(path), "--root", str(embedded_root), "--folds", "2"],
            ["pool", "--areas", str(path), "--root", str(embedded_root), "--out",
             str(tmp_path / f"{name}.parquet")],
        ):  # fmt: skip
            if name == "no_numeric" and argv[0] == "pool":
                continue  # pooling needs no numeric column
            assert main(argv) == 2, (name, argv[0])
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1, lines
            for text in expected:
                assert text in lines[0], (name, lines[0])
            assert not (tmp_path / f"{name}.parquet").exists()  # nothing half-written
