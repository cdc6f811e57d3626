"""``s2vec evaluate``: ridge probes on a root produced by a real (tiny) run of the pipeline.

Oracles: targets that are exact functions of raw channels, the official S2 library
(s2geometry) for parents, neighbours and cell centres, and a direct numpy ridge / R² / MAE /
RMSE computation of one fold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import s2geometry as s2g

from s2vec_pipeline.analysis.evaluation import evaluate
from s2vec_pipeline.cli import main
from s2vec_pipeline.storage import delta_store

ROAD = "road_residential_m"
BUILDING = "building_residential_m2"
N_CELLS = 1500
TOKYO_L17 = s2g.S2CellId(s2g.S2LatLng.FromDegrees(35.68, 139.76)).parent(17).ToToken()


@pytest.fixture(scope="module")
def labelled(embedded_root: Path) -> tuple[Path, pl.DataFrame, pl.DataFrame]:
    """(root, labels, raw channel values of the labelled cells) for a sample of embedded cells,
    half of them with data. Targets: an exact linear function of log1p(one raw channel),
    a nonlinear one of another, and noise."""
    cells = delta_store.read_partitions(embedded_root, "cell_embeddings", columns=["cell_token"])
    features = delta_store.read_partitions(embedded_root, "cell_features")
    joined = cells.join(features.select("cell_token", ROAD, BUILDING), on="cell_token", how="left")
    joined = joined.fill_null(0.0)
    rng = np.random.default_rng(7)
    has_data = joined["cell_token"].is_in(features["cell_token"].implode()).to_numpy()
    pick = np.concatenate(
        [
            rng.choice(np.flatnonzero(has_data), N_CELLS // 2, replace=False),
            rng.choice(np.flatnonzero(~has_data), N_CELLS // 2, replace=False),
        ]
    )
    sample = joined[np.sort(pick)]
    labels = sample.select(
        "cell_token",
        (3.0 * pl.col(ROAD).log1p() - 2.0).alias("linear_road"),
        (pl.col(BUILDING) > 0).cast(pl.Float64).alias("has_building"),
        pl.Series("noise", rng.normal(size=sample.height)),
    )
    return embedded_root, labels, sample


@pytest.fixture(scope="module")
def report(labelled):
    root, labels, _ = labelled
    return evaluate(root, labels, folds=4, seed=3)


def test_raw_probe_recovers_an_exact_linear_target(report) -> None:
    for protocol in ("random", "spatial"):
        for method in ("raw", "raw_3x3", "s2vec+raw"):
            r2, _ = report.result("linear_road", protocol, method).stat("r2")
            assert r2 > 0.999, (protocol, method, r2)
        # the training mean explains nothing of a target on held-out folds
        assert report.result("linear_road", protocol, "mean").stat("r2")[0] < 0.01
        # nothing predicts noise
        for method in report.methods:
            assert report.result("noise", protocol, method).stat("r2")[0] < 0.05, method
    assert report.folds == {"random": 4, "spatial": 4}
    assert report.n_rows == N_CELLS and report.embedding_dim == 32
    assert report.result("linear_road", "random", "raw_pca").n_features == 32
    text = report.table()
    assert "linear_road — spatial 4-fold, whole level-13 cells held out" in text


def _neighbours(token: str) -> list[str]:
    cell = s2g.S2CellId.FromToken(token)
    return [token] + [c.ToToken() for c in cell.GetAllNeighbors(cell.level())]


def test_one_fold_matches_a_direct_numpy_computation(labelled, report) -> None:
    """Features rebuilt independently (s2geometry neighbours, joins by token), ridge solved in
    closed form with the reported alpha, metrics by hand: equal to the report's fold."""
    root, labels, _ = labelled
    channels = delta_store.table_contract(root, "cell_features")["channels"]
    features = delta_store.read_partitions(root, "cell_features")
    values = {t: np.array(v) for t, *v in features.select("cell_token", *channels).iter_rows()}
    zero = np.zeros(len(channels))
    tokens = labels["cell_token"].to_list()
    raw = np.log1p(np.array([values.get(t, zero) for t in tokens]))
    block = np.array([sum(values.get(n, zero) for n in _neighbours(t)) for t in tokens])
    x = np.hstack([raw, np.log1p(block)])
    y = labels["has_building"].to_numpy()
    fold_of = np.array(report.fold_of_row["spatial"])
    res = report.result("has_building", "spatial", "raw_3x3")
    for k in (0, 2):
        fold = res.folds[k]
        train, test = fold_of != k, fold_of == k
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        std[std == 0] = 1
        xt, xv = (x[train] - mean) / std, (x[test] - mean) / std
        yc = y[train] - y[train].mean()
        w = np.linalg.solve(xt.T @ xt + fold["alpha"] * np.eye(x.shape[1]), xt.T @ yc)
        pred = xv @ w + y[train].mean()
        err = y[test] - pred
        r2 = 1 - (err**2).sum() / ((y[test] - y[test].mean()) ** 2).sum()
        assert fold["n_test"] == test.sum()
        assert fold["r2"] == pytest.approx(r2, rel=1e-6, abs=1e-9)
        assert fold["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-6)
        assert fold["rmse"] == pytest.approx(np.sqrt((err**2).mean()), rel=1e-6)


def test_spatial_folds_never_split_a_coarser_cell(labelled, report) -> None:
    _, labels, _ = labelled
    parents = [s2g.S2CellId.FromToken(t).parent(13).ToToken() for t in labels["cell_token"]]
    frame = pl.DataFrame(
        {
            "block": parents,
            "spatial": report.fold_of_row["spatial"],
            "random": report.fold_of_row["random"],
        }
    )
    per_block = frame.group_by("block").agg(
        pl.col("spatial").n_unique(), pl.col("random").n_unique()
    )
    assert (per_block["spatial"] == 1).all()
    assert (per_block["random"] > 1).any()  # the random protocol does split blocks
    assert sorted(set(report.fold_of_row["spatial"])) == [0, 1, 2, 3]
    assert report.n_blocks == per_block.height


@pytest.mark.slow
def test_lat_lon_labels_and_with_embeddings(labelled, tmp_path: Path) -> None:
    """lat/lon at cell centres map to the same cells; image embeddings keyed by image token
    as a second source give the 'with' and 's2vec+with' methods."""
    root, labels, _ = labelled
    centres = [
        s2g.S2LatLng(s2g.S2Cell(s2g.S2CellId.FromToken(t)).GetCenter())
        for t in labels["cell_token"]
    ]
    by_latlon = labels.drop("cell_token").with_columns(
        pl.Series("lat", [c.lat().degrees() for c in centres]),
        pl.Series("lon", [c.lng().degrees() for c in centres]),
    )
    images = delta_store.read_partitions(
        root, "image_embeddings", columns=["cell_token", "embedding"]
    )
    a = evaluate(root, labels.select("cell_token", "has_building"), folds=3, with_embeddings=images)
    b = evaluate(root, by_latlon.select("lat", "lon", "has_building"), folds=3)
    for method in b.methods:
        fa = a.result("has_building", "spatial", method).folds
        fb = b.result("has_building", "spatial", method).folds
        assert [f["r2"] for f in fa] == pytest.approx([f["r2"] for f in fb], rel=1e-9)
    assert {"with", "s2vec+with"} <= set(a.methods)
    dim = len(images["embedding"][0])
    assert a.result("has_building", "random", "s2vec+with").n_features == 32 + dim


@pytest.mark.slow
def test_cli_writes_json(labelled, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, labels, _ = labelled
    path = tmp_path / "labels.csv"
    labels.select("cell_token", "linear_road").head(300).write_csv(path)
    out = tmp_path / "report.json"
    images = tmp_path / "images.parquet"
    delta_store.read_partitions(
        root, "image_embeddings", columns=["cell_token", "embedding"]
    ).write_parquet(images)
    args = ["evaluate", "--labels", str(path), "--root", str(root), "--folds", "3", "--mlp"]
    assert main([*args, "--with", str(images), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear_road — random 3-fold" in printed and "raw_3x3" in printed
    data = json.loads(out.read_text())
    rows = {(r["protocol"], r["method"]): r for r in data["results"]}
    assert rows[("random", "raw")]["r2"]["mean"] > 0.999
    assert rows[("random", "raw_mlp")]["r2"]["mean"] > 0.8  # the MLP learns it too
    assert rows[("random", "s2vec+with")]["n_features"] == 32 + 32
    assert len(rows[("spatial", "s2vec")]["folds"]) == data["folds"]["spatial"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unmatched", "lie outside every partition embedded with model"),
        ("nan", "NaN"),
        ("single", "1 row"),
        ("no_target", "no numeric target"),
        ("constant", "one value only"),
        ("unknown_model", "unknown model version"),
        ("missing_file", "does not exist"),
        ("no_key", "cell_token column or lat and lon"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    labelled, tmp_path: Path, capsys: pytest.CaptureFixture, case: str, expected: str
) -> None:
    root, labels, _ = labelled
    good = labels.select("cell_token", "linear_road").head(40)
    frames = {
        # a level-17 cell in Tokyo: a valid pixel token that no image of this root holds
        "unmatched": pl.concat(
            [good, pl.DataFrame({"cell_token": [TOKYO_L17], "linear_road": [1.0]})]
        ),
        "nan": good.with_columns(
            pl.when(pl.int_range(40) == 5)
            .then(None)
            .otherwise(pl.col("linear_road"))
            .alias("linear_road")
        ),
        "single": good.head(1),
        "no_target": good.select("cell_token", pl.lit("x").alias("name")),
        "constant": good.with_columns(pl.lit(2.0).alias("linear_road")),
        "unknown_model": good,
        "no_key": good.select("linear_road"),
    }
    path = tmp_path / "labels.parquet"
    if case in frames:
        frames[case].write_parquet(path)
    args = ["evaluate", "--labels", str(path), "--root", str(root)]
    if case == "unknown_model":
        args += ["--model-version", "0123456789abcdef"]
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0]
    assert captured.out == ""


def test_tiny_label_set_reports_undefined_r2_as_null(labelled, tmp_path: Path) -> None:
    """Six cells, three spatial folds: a one-cell test fold has no R² (null in the JSON, left
    out of the mean, said in a note); MAE and RMSE stay defined."""
    root, labels, _ = labelled
    parents = labels.with_columns(
        pl.Series(
            "block", [s2g.S2CellId.FromToken(t).parent(13).ToToken() for t in labels["cell_token"]]
        )
    )
    blocks = parents["block"].unique(maintain_order=True).to_list()[:3]
    # 4 cells in one image, 1 in each of two others
    rows = pl.concat(
        [
            parents.filter(pl.col("block") == blocks[0]).head(4),
            parents.filter(pl.col("block") == blocks[1]).head(1),
            parents.filter(pl.col("block") == blocks[2]).head(1),
        ]
    ).select("cell_token", "noise")
    path = tmp_path / "tiny.csv"
    rows.write_csv(path)
    out = tmp_path / "tiny.json"
    assert (
        main(
            [
                "evaluate",
                "--labels",
                str(path),
                "--root",
                str(root),
                "--folds",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())  # strict JSON: no NaN
    spatial = [r for r in data["results"] if r["protocol"] == "spatial" and r["method"] == "raw"][0]
    assert sorted(f["n_test"] for f in spatial["folds"]) == [1, 1, 4]
    assert [f["r2"] is None for f in spatial["folds"]].count(True) == 2
    assert all(f["mae"] is not None for f in spatial["folds"])
    assert any("R² is undefined" in n for n in data["notes"])


@pytest.mark.slow
def test_evaluation_asset_shows_the_table(labelled, tmp_path: Path) -> None:
    """The Dagster `evaluate` job on a labels file: the metadata holds the same probe results
    as the plain function, here the raw probe recovering an exact linear target."""
    import json

    import dagster as dg

    from s2vec_pipeline.definitions import build_definitions
    from s2vec_pipeline.defs.resources import resource_run_config
    from s2vec_pipeline.settings import PipelineSettings

    root, labels, _ = labelled
    path = tmp_path / "labels.parquet"
    labels.select("cell_token", "linear_road").write_parquet(path)
    settings = PipelineSettings(root=str(root))
    job = build_definitions(settings).resolve_job_def("evaluate")
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            instance=instance,
            run_config={
                "resources": resource_run_config(settings),
                "ops": {"evaluation": {"config": {"labels": str(path), "folds": 4}}},
            },
        )
    (mat,) = result.asset_materializations_for_node("evaluation")
    meta = mat.metadata
    assert meta["labelled_cells"].value == labels.height
    assert "linear_road" in meta["results"].value
    body = json.loads(json.dumps(meta["report"].value))
    assert "linear_road" in json.dumps(body)
    direct = evaluate(root, labels.select("cell_token", "linear_road"), folds=4)
    assert direct.result("linear_road", "spatial", "raw").stat("r2")[0] > 0.999
