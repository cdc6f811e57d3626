"""How the embedding tables are stored: Parquet settings of their writes and compactions, and
the values read back (an untrained tiny model on a synthetic raster: no training needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import DeltaTable, write_deltalake

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.raster import tensor_array
from s2vec_pipeline.model.embed import CELL_TABLE, EMPTY_TABLE, IMAGE_TABLE, write_embeddings
from s2vec_pipeline.model.mae import S2VecMAE
from s2vec_pipeline.model.registry import ModelCard
from s2vec_pipeline.model.synthetic import synthetic_raster_tiles
from s2vec_pipeline.storage import delta_store, maintenance, tables

C, S, D = 8, 16, 32
IMAGES = {"4693": 6, "12cd": 4}
KEYS = ["image_token", "cell_token", "cell_id", "level", "model_version"]


@pytest.fixture
def embedded(tmp_path: Path) -> tuple[Path, S2VecMAE, ModelCard]:
    root = tmp_path / "root"
    contract = synthetic_raster_tiles(root, IMAGES, channels=C, side=S)
    torch.manual_seed(0)
    model = S2VecMAE(C, img_size=S, embed_dim=D, depth=1, num_heads=4, decoder_depth=1).eval()
    card = ModelCard.untrained(contract, {"embed_dim": D})
    write_embeddings(root, model, card, list(IMAGES), batch_size=4, device="cpu")
    return root, model, card


def _leaves(path: str) -> dict[str, pq.ColumnChunkMetaData]:
    """Each leaf column's chunk in the file's only row group, by its dotted path."""
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 1  # a tiny partition
    group = meta.row_group(0)
    return {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}


def _check_layout(root: Path, table: str, keys: list[str]) -> None:
    files = delta_store.data_files(root, table)
    assert files
    for path in files:
        leaves = _leaves(path)
        (leaf,) = [name for name in leaves if name.startswith("embedding.")]  # list.element
        embedding = leaves.pop(leaf)
        # statistics of the list's items may be there (polars writes them for every column,
        # ~15 % of the write; no query uses them), a dictionary or compression never
        assert not embedding.has_dictionary_page
        assert embedding.compression == "UNCOMPRESSED"
        rows = pq.read_table(path)
        for name in keys:  # statistics that queries and file skipping use are kept
            stats = leaves[name].statistics
            values = rows.column(name).to_pylist()
            assert stats.has_min_max and (stats.min, stats.max) == (min(values), max(values))


def test_embedding_files_have_a_plain_list_and_key_statistics(embedded) -> None:
    root, _, _ = embedded
    _check_layout(root, CELL_TABLE, KEYS)
    _check_layout(root, IMAGE_TABLE, KEYS)
    _check_layout(root, EMPTY_TABLE, ["model_version", "row", "col", "pixel"])
    # Delta's own per-file statistics (file skipping on cell_token) are still in the log.
    actions = delta_store.data_file_actions(root, CELL_TABLE).to_pylist()
    for action in actions:
        part = action["partition.parent_l6"]
        tokens = delta_store.read_partitions(root, CELL_TABLE, [part], ["cell_token"])
        assert action["min.cell_token"] == tokens["cell_token"].min()
        assert action["max.cell_token"] == tokens["cell_token"].max()


def test_embeddings_read_back_are_the_encoders_output(embedded) -> None:
    root, model, card = embedded
    raster = delta_store.read_partitions(root, "raster_tiles").to_arrow()
    keep = np.asarray(raster.column("nonempty_pixels")) > 0
    raster = raster.filter(pa.array(keep))
    with torch.inference_mode():
        x = torch.from_numpy(tensor_array(raster, C, S).copy())
        z = model.encode(x).numpy()  # (n, S*S, D), pixel k = cell k of children_grid
    cells = delta_store.read_partitions(root, CELL_TABLE)
    images = delta_store.read_partitions(root, IMAGE_TABLE)
    assert cells.height == raster.num_rows * S * S and images.height == raster.num_rows
    for i, token in enumerate(raster.column("image_token").to_pylist()):
        rows = cells.filter(cells["image_token"] == token).sort("cell_id")
        got = np.asarray(rows["embedding"].to_list(), dtype=np.float32)
        order = np.argsort(_cell_ids_of(token, card.pixel_level))
        np.testing.assert_array_equal(got, z[i][order])  # stored bit for bit
        image = images.filter(images["image_token"] == token)["embedding"].to_list()
        assert np.allclose(image[0], z[i].astype(np.float64).mean(0), atol=1e-6)


def _cell_ids_of(image_token: str, level: int) -> np.ndarray:
    image = s2.from_token(np.array([image_token]))
    return s2.to_signed(s2.children_grid(image, level).reshape(-1))


def test_compaction_keeps_the_embedding_layout(embedded) -> None:
    root, _, _ = embedded
    before = delta_store.read_partitions(root, CELL_TABLE).sort("cell_id")
    # A second file in partition 4693, written with delta-rs' defaults (dictionary and
    # statistics on the list), so the compaction has two files to merge.
    extra = before.filter(before["parent_l6"] == "4693").head(10).to_arrow()
    write_deltalake(str(root / CELL_TABLE), extra, mode="append")
    assert len(delta_store.data_files(root, CELL_TABLE)) == len(IMAGES) + 1
    report = maintenance.maintain_table(root, CELL_TABLE, retention_hours=0)
    assert (report.compacted_removed, report.compacted_added) == (2, 1)
    _check_layout(root, CELL_TABLE, KEYS)
    after = delta_store.read_partitions(root, CELL_TABLE).sort("cell_id")
    assert after.height == before.height + 10
    assert after.unique(maintain_order=True).sort("cell_id").equals(before)


def test_a_commit_that_loses_to_a_concurrent_one_is_made_again_with_the_same_files(
    embedded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between reading the table and committing the cell rows, another writer commits to the
    table (a real commit: partition 12cd rewritten). The cell commit fails on the stale
    version and is made again from the new one with the files already written: nothing is
    embedded twice, every row is there once, and the other writer's rows stay."""
    root, model, card = embedded
    want_cells = delta_store.read_partitions(root, CELL_TABLE).sort("cell_id")
    want_images = delta_store.read_partitions(root, IMAGE_TABLE).sort("cell_id")
    other = want_cells.filter(want_cells["parent_l6"] == "12cd")
    real_commit = DeltaTable.create_write_transaction
    commits: list[int] = []

    def after_a_concurrent_commit(table: DeltaTable, actions, *args, **kwargs):  # noqa: ANN001, ANN202
        commits.append(table.version())
        if len(commits) == 1:
            contract = delta_store.table_contract(root, CELL_TABLE)
            delta_store.write_partitions(root, CELL_TABLE, other.to_arrow(), ["12cd"], contract)
        return real_commit(table, actions, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", after_a_concurrent_commit)
    monkeypatch.setattr(delta_store, "BACKOFF_BASE_S", 0.0)
    encoded: list[int] = []
    real_encode = model.encode
    monkeypatch.setattr(model, "encode", lambda x: encoded.append(len(x)) or real_encode(x))
    files_before = set(delta_store.data_files(root, CELL_TABLE))
    result = write_embeddings(root, model, card, ["4693"], batch_size=4, device="cpu")["4693"]
    assert sum(encoded) == IMAGES["4693"] + 1  # each image once, plus the all-zero image
    assert commits[1] == commits[0] + 1  # the retry read the concurrent commit's version
    assert result["cell_table_version"] == commits[1] + 1
    files_after = set(delta_store.data_files(root, CELL_TABLE))
    assert len(files_after - files_before) == 2  # one new file per rewritten partition
    assert delta_store.read_partitions(root, CELL_TABLE).sort("cell_id").equals(want_cells)
    assert delta_store.read_partitions(root, IMAGE_TABLE).sort("cell_id").equals(want_images)


def test_cell_rows_are_written_in_row_groups_of_the_set_size(
    embedded, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, model, card = embedded
    monkeypatch.setattr(tables, "EMBEDDING_ROW_GROUP_ROWS", 1000)
    write_embeddings(root, model, card, ["4693"], batch_size=4, device="cpu")
    (path,) = [f for f in delta_store.data_files(root, CELL_TABLE) if "parent_l6=4693" in f]
    meta = pq.ParquetFile(path).metadata
    rows = IMAGES["4693"] * S * S
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1000, rows - 1000]
