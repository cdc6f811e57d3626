"""Model layer through Dagster and the CLI on the bundled extracts: train on CPU with a real
Lightning Trainer, embed every pixel, query with SQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cli import main
from s2vec_pipeline.model.config import TrainConfig
from s2vec_pipeline.model.registry import ModelCard, list_models
from s2vec_pipeline.model.train import train_model
from s2vec_pipeline.service.runner import materialize, parse_stages
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6, TINY_MODEL
from s2vec_pipeline_tests.contract_checks import model_problems

TINY = TINY_MODEL  # a tiny MAE (conftest)


@pytest.fixture(scope="module")
def embedded(materialized: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("model_root")
    shutil.copytree(materialized[0], root, dirs_exist_ok=True)
    settings = PipelineSettings(root=str(root))
    # A copy of the data layer's instance: training and embedding see its records.
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(materialized[1], home, dirs_exist_ok=True)
    instance = dg.DagsterInstance.local_temp(str(home))
    report = materialize(
        settings,
        [HELSINKI_L6, MONACO_L6],
        parse_stages(["train", "embed"]),
        instance,
        op_config={"mae_model": TINY},
    )
    yield root, instance, report
    instance.dispose()


@pytest.mark.slow
def test_embeddings_cover_every_pixel(embedded) -> None:
    root, _, report = embedded
    assert len(report.run_ids) == 3  # one training run, one embedding run per partition
    (version,) = list_models(root)
    raster = delta_store.read_partitions(root, "raster_tiles")
    cells = delta_store.read_partitions(root, "cell_embeddings")
    images = delta_store.read_partitions(root, "image_embeddings")
    assert cells.height == 256 * raster.height and images.height == raster.height
    assert set(cells["model_version"]) == {version} == set(images["model_version"])
    assert set(cells["level"]) == {17} and set(images["level"]) == {13}
    # every image's 256 S2 children, each at its own cell id
    for token in raster["image_token"].to_list()[:4]:
        kids = s2.children_grid(s2.from_token(np.array([token])), 17)[0].ravel()
        got = cells.filter(pl.col("image_token") == token)
        assert set(got["cell_token"]) == set(s2.to_token(kids))
        assert set(got["cell_id"]) == set(s2.to_signed(kids).tolist())
    emb = np.asarray(cells["embedding"].to_list(), dtype=np.float32)
    assert emb.shape == (cells.height, 32) and np.isfinite(emb).all()


@pytest.mark.slow
def test_dagster_records_model_and_partition_versions(embedded) -> None:
    root, instance, _ = embedded
    (version,) = list_models(root)
    model_event = instance.get_latest_materialization_event(dg.AssetKey("mae_model"))
    meta = model_event.asset_materialization.metadata
    assert meta["model_version"].value == version
    assert meta["val_loss"].value > 0 and meta["loss_curve"].value.startswith("![loss curve]")
    assert meta["epochs"].value == TINY["epochs"] == 3  # epochs trained, not the last's index
    assert model_event.asset_materialization.tags["dagster/data_version"] == version
    # One raster-partition hash: the card's training partitions carry exactly the data
    # versions Dagster recorded for raster_tiles, read at one Delta version of the table.
    card = ModelCard.load(root / "models" / version)
    raster = instance.fetch_materializations(dg.AssetKey("raster_tiles"), limit=50).records
    recorded: dict[str, str] = {}
    for r in sorted(raster, key=lambda r: r.storage_id):  # the latest per partition wins
        if r.partition_key:
            recorded[r.partition_key] = r.asset_materialization.tags["dagster/data_version"]
    assert card.partitions == recorded
    assert card.raster_tiles_version == delta_store.table_version(root, "raster_tiles")
    # The same training launched from Python names the same model, and reuses it.
    card_file = root / "models" / version / "model_card.json"
    before = card_file.stat().st_mtime_ns
    from_python = train_model(root, config=TrainConfig.for_profile("city", **TINY))
    assert from_python.model_version == version and card_file.stat().st_mtime_ns == before
    records = instance.fetch_materializations(dg.AssetKey("cell_embeddings"), limit=10).records
    latest = {r.partition_key: r for r in sorted(records, key=lambda r: r.storage_id)}
    assert sorted(latest) == sorted([HELSINKI_L6, MONACO_L6])  # (another test may re-embed)
    for r in latest.values():
        m = r.asset_materialization
        assert m.tags["dagster/data_version"] == f"{version}-{recorded[r.partition_key]}"
        raster = delta_store.read_partitions(root, "raster_tiles", [r.partition_key])
        assert m.metadata["dagster/row_count"].value == 256 * raster.height
        assert m.metadata["embedding_width"].value == TINY["embed_dim"]
        assert m.metadata["map"].value.startswith(f"![embeddings of {r.partition_key}](data:")
    # the model's and the embeddings' checks, per partition for the embeddings
    checks = {
        (e.asset_key.to_user_string(), e.check_name, e.partition): e.passed
        for run in instance.get_runs()
        for entry in instance.all_logs(
            run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        )
        for e in [entry.dagster_event.event_specific_data]
    }
    assert checks[("mae_model", "finite_loss", None)]
    assert ("mae_model", "reconstruction_beats_channel_mean", None) in checks
    assert not checks[("mae_model", "enough_validation_images", None)]  # 18 images: 1 held out
    for k in (HELSINKI_L6, MONACO_L6):
        for table in ("cell_embeddings", "image_embeddings"):
            for check in ("one_row_per_pixel", "no_nan", "width"):
                assert checks[(table, check, k)], (table, check, k)


@pytest.mark.slow
def test_failed_model_checks_say_why(embedded) -> None:
    """Two small city extracts give 18 images: the validation checks cannot pass, and the
    warning the CLI prints says so and what would (not only the check's name)."""
    _, _, report = embedded
    assert "mae_model:enough_validation_images" in report.warnings_raised
    reason = report.reasons["mae_model:enough_validation_images"]
    assert reason.startswith("1 of 18 images held out for validation: too few to validate")
    assert "at least 8, better hundreds" in reason
    if "mae_model:reconstruction_beats_channel_mean" in report.warnings_raised:
        why = report.reasons["mae_model:reconstruction_beats_channel_mean"]
        assert "held-out image(s) is not below the channel mean's" in why
        assert "too few to validate a model" in why


@pytest.mark.slow
def test_embed_step_writes_the_empty_image_rows(embedded) -> None:
    """Through Dagster: each embedded partition gets S*S empty-image rows of its model."""
    root, _, _ = embedded
    (version,) = list_models(root)
    empty = delta_store.read_partitions(root, "empty_image_embeddings")
    for k in (HELSINKI_L6, MONACO_L6):
        mine = empty.filter(pl.col("parent_l6") == k)
        assert sorted(mine["pixel"].to_list()) == list(range(256))
        assert set(mine["model_version"]) == {version}


@pytest.mark.slow
def test_independent_model_check(embedded) -> None:
    """The embedding tables' contract, checked with the official S2 library."""
    root, _, _ = embedded
    assert model_problems(root, 17) == []


@pytest.mark.slow
def test_cli_embeds_with_existing_model_and_rejects_unknown(
    embedded, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, instance, _ = embedded
    monkeypatch.setenv("DAGSTER_HOME", str(instance.root_directory))  # the fixture's records
    (version,) = list_models(root)
    before = delta_store.table_version(root, "cell_embeddings")
    args = ["materialize", "--root", str(root), "--cells", MONACO_L6]
    assert main([*args, "--model-version", "0123456789abcdef"]) == 2
    err = capsys.readouterr().err
    assert "0123456789abcdef" in err and version in err
    assert delta_store.table_version(root, "cell_embeddings") == before
    # The partition is already embedded by that model from the same tiles: nothing to do.
    assert main([*args, "--stages", "embed", "--model-version", version]) == 0
    assert f"up to date, skipped (embed): {MONACO_L6}" in capsys.readouterr().out
    assert delta_store.table_version(root, "cell_embeddings") == before
    assert main([*args, "--stages", "embed", "--model-version", version, "--force"]) == 0
    assert delta_store.table_version(root, "cell_embeddings") == before + 1


@pytest.mark.slow
def test_cli_sql_recipes(embedded, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, _, _ = embedded
    from s2vec_pipeline.analysis.sql import similar_cells

    token = delta_store.read_partitions(root, "cell_features")["cell_token"][0]
    top = pl.from_arrow(similar_cells(root, token, k=3))
    assert top.height == 3 and top["cell_token"][0] == token
    assert top["similarity"][0] == pytest.approx(1.0, abs=1e-5)
    out = tmp_path / "region.parquet"
    query = f"SELECT cell_token, embedding FROM cell_embeddings WHERE parent_l6 = '{MONACO_L6}'"
    assert main(["sql", query, "--root", str(root), "--out", str(out)]) == 0
    assert (
        pl.read_parquet(out).height
        == 256 * delta_store.read_partitions(root, "raster_tiles", [MONACO_L6]).height
    )
    assert main(["sql", "SELECT * FROM cell_embeddings WHERE false", "--root", str(root)]) == 0
    capsys.readouterr()
    assert main(["sql", "SELEC nonsense", "--root", str(root)]) == 2
    assert "Tables you can query" in capsys.readouterr().err


def test_devices_flag_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["materialize", "--root", str(tmp_path), "--cells", MONACO_L6, "--stages", "train"]
    assert main([*args, "--devices", "0"]) == 2
    assert "--devices: must be 'auto', -1 or at least 1 (got 0)" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_train_without_raster_tiles(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["materialize", "--root", str(tmp_path), "--cells", MONACO_L6, "--stages", "train"])
        == 2
    )
    assert "raster_tiles" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not list_models(tmp_path)
