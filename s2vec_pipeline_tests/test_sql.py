"""SQL over the Delta tables: recipes, label joins, empty results and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2vec_pipeline.analysis.sql import (
    LABEL_JOIN_SQL,
    REGION_BY_PARENT_SQL,
    SIMILAR_CELLS_SQL,
    NoTablesError,
    SQLError,
    SQLSession,
    UnknownTableError,
    join_labels,
    list_tables,
    region_embeddings,
    run_sql,
    similar_cells,
)
from s2vec_pipeline.cells import s2
from s2vec_pipeline.errors import InvalidCellError
from s2vec_pipeline.storage import delta_store

DIM, SIDE = 16, 4  # 4×4 pixels per image keeps the tables small
ANCHORS = {"4693": (60.17, 24.94), "12cd": (43.73, 7.42)}


def _rows(part: str, image_ids: np.ndarray, level: int, emb: np.ndarray, version: str) -> pa.Table:
    cell_ids = image_ids if level == 13 else s2.children_grid(image_ids, level).reshape(-1)
    images = image_ids if level == 13 else np.repeat(image_ids, SIDE * SIDE)
    offsets = np.arange(0, emb.size + 1, DIM, dtype=np.int32)
    return pa.table(
        {
            "parent_l6": [part] * len(cell_ids),
            "image_token": pa.array(s2.to_token(images)),
            "cell_token": pa.array(s2.to_token(cell_ids)),
            "cell_id": pa.array(s2.to_signed(cell_ids)),
            "level": pa.array(np.full(len(cell_ids), level, np.int8)),
            "model_version": [version] * len(cell_ids),
            "embedding": pa.ListArray.from_arrays(pa.array(offsets), pa.array(emb.ravel())),
        }
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cell_embeddings (3 images × 16 cells per partition) and image_embeddings, model 'm1'."""
    root = tmp_path_factory.mktemp("sql")
    rng = np.random.default_rng(0)
    for part, (lat, lng) in ANCHORS.items():
        anchor = s2.latlng_to_cell_id(np.array([lat]), np.array([lng]), 12)
        images = s2.children_grid(anchor, 13).reshape(-1)[:3]
        cells = rng.standard_normal((3 * SIDE * SIDE, DIM), dtype=np.float32)
        contract = {"table": "cell_embeddings"}
        delta_store.write_partitions(
            root, "cell_embeddings", _rows(part, images, 15, cells, "m1"), [part], contract
        )
        means = cells.reshape(3, SIDE * SIDE, DIM).mean(1)
        delta_store.write_partitions(
            root,
            "image_embeddings",
            _rows(part, images, 13, means, "m1"),
            [part],
            {"table": "image_embeddings"},
        )
    return root


def test_tables_and_plain_queries(root: Path) -> None:
    assert list_tables(root) == ["cell_embeddings", "image_embeddings"]
    out = run_sql(
        root, "SELECT parent_l6, count(*) AS n FROM cell_embeddings GROUP BY 1 ORDER BY 1"
    )
    assert out.to_pylist() == [{"parent_l6": "12cd", "n": 48}, {"parent_l6": "4693", "n": 48}]
    # Empty results are fine: a table with the right columns and no rows.
    empty = run_sql(root, "SELECT cell_token FROM cell_embeddings WHERE parent_l6 = 'ffff'")
    assert empty.num_rows == 0 and empty.column_names == ["cell_token"]


def test_similar_cells_recipe(root: Path) -> None:
    token = run_sql(root, "SELECT cell_token FROM cell_embeddings ORDER BY cell_token LIMIT 1")[
        "cell_token"
    ][0].as_py()
    top = similar_cells(root, token, k=5)
    assert top.num_rows == 5 and top["cell_token"][0].as_py() == token
    sims = top["similarity"].to_pylist()
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and sims == sorted(sims, reverse=True)
    # The recipe text is what runs: same answer through run_sql with the documented params.
    same = run_sql(root, SIMILAR_CELLS_SQL, params={"cell_token": token, "k": 5})
    assert same.equals(top)
    # Against numpy.
    df = delta_store.read_partitions(root, "cell_embeddings")
    emb = np.asarray(df["embedding"].to_list(), dtype=np.float64)
    q = emb[df["cell_token"].to_list().index(token)]
    cos = emb @ q / np.linalg.norm(emb, axis=1) / np.linalg.norm(q)
    assert np.allclose(sorted(cos, reverse=True)[:5], sims, atol=1e-5)
    image = run_sql(root, "SELECT image_token FROM image_embeddings LIMIT 1")[0][0].as_py()
    assert (
        similar_cells(root, image, k=2, table="image_embeddings")["cell_token"][0].as_py() == image
    )
    with pytest.raises(InvalidCellError, match="no embedding"):
        similar_cells(root, "4693", k=3)  # a partition cell, not a pixel cell
    with pytest.raises(InvalidCellError):
        similar_cells(root, "not-a-token")


def test_region_recipes(root: Path) -> None:
    by_parent = region_embeddings(root, parent_l6="4693")
    assert by_parent.num_rows == 48 and set(by_parent["parent_l6"].to_pylist()) == {"4693"}
    assert run_sql(root, REGION_BY_PARENT_SQL, params={"parent_l6": "4693"}).equals(by_parent)
    image = by_parent["image_token"][0].as_py()
    one_image = region_embeddings(root, tokens=[image])
    assert one_image.num_rows == SIDE * SIDE
    assert set(one_image["image_token"].to_pylist()) == {image}
    # A covering at mixed levels: a level-6 cell and an image of the other partition.
    other = run_sql(root, "SELECT image_token FROM image_embeddings WHERE parent_l6 = '12cd'")
    mixed = region_embeddings(root, tokens=["4693", other[0][0].as_py(), "4693"])
    assert mixed.num_rows == 48 + SIDE * SIDE  # no duplicates from overlapping tokens
    assert region_embeddings(root, tokens=["b"]).num_rows == 0  # face 5: nothing there
    with pytest.raises(SQLError, match="exactly one"):
        region_embeddings(root)


def test_label_join(root: Path, tmp_path: Path) -> None:
    cells = run_sql(root, "SELECT cell_token FROM cell_embeddings ORDER BY cell_token LIMIT 3")
    tokens = cells["cell_token"].to_pylist()
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "cell_token,label\n" + "\n".join(f"{t},{i}" for i, t in enumerate(tokens)) + "\n4693,9\n"
    )  # a token that looks like a number and matches no cell
    joined = join_labels(root, csv)
    assert joined["cell_token"].to_pylist() == sorted(tokens)
    assert joined.column_names == ["cell_token", "label", "level", "model_version", "embedding"]
    assert len(joined["embedding"][0].as_py()) == DIM
    parquet = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"cell_token": tokens, "y": [0.5, 1.5, 2.5]}), parquet)
    assert run_sql(root, LABEL_JOIN_SQL, extra_tables={"labels": parquet}).num_rows == 3
    frame = pl.DataFrame({"cell_token": tokens[:1], "y": [1]})
    assert join_labels(root, frame).num_rows == 1
    with pytest.raises(SQLError, match="does not exist"):
        join_labels(root, tmp_path / "missing.csv")
    with pytest.raises(SQLError, match="hide the Delta table"):
        run_sql(root, "SELECT 1", extra_tables={"cell_embeddings": frame})


def test_clear_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(SQLError, match=r"(?s)duckdb.*syntax error.*cell_embeddings"):
        run_sql(root, "SELEC * FROM cell_embeddings")
    with pytest.raises(UnknownTableError, match=r"(?s)nosuch.*cell_embeddings, image_embeddings"):
        run_sql(root, "SELECT * FROM nosuch")
    with pytest.raises(SQLError, match="no_column"):
        run_sql(root, "SELECT no_column FROM cell_embeddings")
    with pytest.raises(NoTablesError, match=str(tmp_path)):
        run_sql(tmp_path, "SELECT 1")


def test_queries_see_only_the_current_snapshot(tmp_path: Path) -> None:
    def write(part: str, n: int) -> None:
        table = pa.table(
            {"parent_l6": pa.array([part] * n, pa.string()), "x": pa.array(range(n), pa.int64())}
        )
        delta_store.write_partitions(tmp_path, "t", table, [part], {"table": "t"})

    write("4693", 5)
    write("12cd", 2)
    write("4693", 3)  # replaces the partition: the old file stays on disk, unreferenced
    out = run_sql(tmp_path, "SELECT parent_l6, count(*) AS n FROM t GROUP BY 1 ORDER BY 1")
    assert out.to_pylist() == [{"parent_l6": "12cd", "n": 2}, {"parent_l6": "4693", "n": 3}]
    assert out.schema.field("parent_l6").type == pa.string()  # "4693" stays text
    write("12cd", 0)
    write("4693", 0)  # an empty table still has its columns
    assert run_sql(tmp_path, "SELECT * FROM t").column_names == ["parent_l6", "x"]


def test_session_with_cached_tables(root: Path, tmp_path: Path) -> None:
    token = run_sql(root, "SELECT cell_token FROM cell_embeddings LIMIT 1")[0][0].as_py()
    with SQLSession(root, cache=["cell_embeddings"]) as session:
        assert session.tables == ["cell_embeddings", "image_embeddings"]
        top = similar_cells(session, token, k=3)
        assert top.equals(similar_cells(root, token, k=3))  # cached = read from Delta
        labels = pl.DataFrame({"cell_token": [token], "y": [1]})
        assert join_labels(session, labels).num_rows == 1
        assert session.tables == ["cell_embeddings", "image_embeddings"]  # labels removed
        assert region_embeddings(session, parent_l6="12cd").num_rows == 48
    with pytest.raises(UnknownTableError, match="cannot cache"):
        SQLSession(root, cache=["nosuch"])
