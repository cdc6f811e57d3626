"""Shared fixtures: the bundled real extracts and one real pipeline run reused by many tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from s2vec_pipeline.settings import PipelineSettings, bundled_source

HELSINKI_L6 = "4693"
MONACO_L6 = "12cd"
DATA_STAGES = ["extract", "features", "raster"]


@pytest.fixture(scope="session")
def helsinki_pbf() -> Path:
    return bundled_source("helsinki")


@pytest.fixture(scope="session")
def monaco_pbf() -> Path:
    return bundled_source("monaco")


@pytest.fixture(scope="session")
def materialized_root(materialized: tuple[Path, Path]) -> Path:
    return materialized[0]


@pytest.fixture(scope="session")
def materialized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Both bundled extracts through extract -> features -> raster with the city profile, via a
    real Dagster instance (temporary DAGSTER_HOME) running real materializations. Returns the
    storage root and the Dagster home holding the runs' records (copy both to change them)."""
    import dagster as dg

    from s2vec_pipeline.service.runner import materialize, parse_stages

    root = tmp_path_factory.mktemp("s2vec_root")
    home = tmp_path_factory.mktemp("dagster_home")
    settings = PipelineSettings(root=str(root), profile_name="city")
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        report = materialize(
            settings, [HELSINKI_L6, MONACO_L6], parse_stages(DATA_STAGES), instance
        )
    assert report.checks_failed == []
    return root, home


#: A tiny MAE: a few seconds on 2 CPU cores, enough for embeddings with structure.
TINY_MODEL = {
    "epochs": 3,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 4,
    "decoder_embed_dim": 16,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
    "batch_size": 8,
}


@pytest.fixture(scope="session")
def embedded_root(materialized_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``materialized_root`` with a tiny model trained by the real Lightning Trainer
    (``train_model``) and every partition embedded (``write_embeddings``). Read-only for tests:
    copy it to change it."""
    import shutil

    from s2vec_pipeline.model.config import TrainConfig
    from s2vec_pipeline.model.embed import write_embeddings
    from s2vec_pipeline.model.registry import load_model
    from s2vec_pipeline.model.train import train_model

    root = tmp_path_factory.mktemp("embedded_root")
    shutil.copytree(materialized_root, root, dirs_exist_ok=True)
    card = train_model(root, config=TrainConfig(**TINY_MODEL))
    model, card = load_model(root, card.model_version)
    write_embeddings(root, model, card, [HELSINKI_L6, MONACO_L6])
    return root
