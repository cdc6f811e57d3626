"""The model's input path (tile cache, index sampler), the one training config and where it
is checked (trainer, CLI, a real Dagster launch), the registry module."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from s2vec_pipeline.cells.raster import tensor_array
from s2vec_pipeline.model.config import InvalidTrainConfigError, TrainConfig
from s2vec_pipeline.model.data import raster_partition_versions
from s2vec_pipeline.model.datamodule import (
    IndexBatchSampler,
    RasterTileDataModule,
    SparseTiles,
    _dense_on_device,
)
from s2vec_pipeline.model.synthetic import synthetic_raster_tiles
from s2vec_pipeline.model.tile_cache import TILE_CACHE_DIR, tile_cache
from s2vec_pipeline.model.train import model_version
from s2vec_pipeline.storage import delta_store

C, S = 8, 16
IMAGES = {"4693": 24, "12cd": 16}


# --- the one training config -----------------------------------------------------------------


def test_model_versions_are_those_of_the_previous_config_class() -> None:
    """The hashes below were computed by the dataclass TrainConfig this module replaced: the
    same data and settings keep naming the same model."""
    contract = {
        "profile": "city",
        "image_level": 13,
        "pixel_level": 17,
        "side": 16,
        "taxonomy_version": "t1",
        "channels": ["a", "b"],
    }
    parts = {"4693": "0123abcd", "12cd": "ffee0011"}
    assert model_version(TrainConfig(), contract, parts) == "bd3422e329306570"
    paper = TrainConfig.for_profile(
        "paper", epochs=3, lr=3e-3, embed_dim=32, num_heads=4, num_workers=2, pin_memory=True
    )
    assert model_version(paper, contract, parts) == "46016964e4d07d96"
    levers = TrainConfig(
        augment=True,
        held_out_channels=["a"],
        input_norm="global",
        empty_pixel_weight=0.5,
        max_steps=7,
    )
    assert model_version(levers, contract, parts, world_size=2) == "01ae1f1531b3bdbe"
    # Runtime settings (loader workers, pinned memory, logging) never enter the version.
    runtime = TrainConfig(num_workers=3, pin_memory=True, log_every_n_steps=5, devices=1)
    assert runtime.version_dict() == TrainConfig().version_dict()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -4}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"embed_dim": 100, "num_heads": 8}, "embed_dim 100 must be divisible by num_heads 8"),
        ({"decoder_embed_dim": 30, "decoder_num_heads": 3}, "divisible by 4"),
        ({"epochs": 0}, "epochs"),
        ({"devices": 0}, "devices"),
        ({"input_norm": "robust"}, "input_norm"),
        ({"seed": -1}, "seed"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_bad_settings_are_one_line_errors(settings: dict, named: str) -> None:
    with pytest.raises(InvalidTrainConfigError) as e:
        TrainConfig(**settings)
    message = str(e.value)
    assert named in message and "\n" not in message and "pydantic.dev" not in message


def test_cli_refuses_bad_settings_before_anything_is_written(
    tmp_path: Path, monaco_pbf: Path, capsys: pytest.CaptureFixture
) -> None:
    from s2vec_pipeline.cli import main

    root = tmp_path / "root"
    base = ["materialize", "--root", str(root), "--source", str(monaco_pbf)]
    for flags, named in (
        (["--epochs", "0"], "--epochs"),
        (["--devices", "-4"], "--devices"),
        (["--empty-pixel-weight", "nan"], "--empty-pixel-weight"),
    ):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and len(err.splitlines()) == 1
    assert not root.exists()


def test_launch_with_bad_settings_is_refused_before_the_run(tmp_path: Path) -> None:
    """A real launch of the train_model job (what the launchpad and the CLI do): bad settings
    fail when Dagster resolves the run config: no run is created, nothing is written."""
    from s2vec_pipeline.definitions import defs

    root = tmp_path / "root"
    synthetic_raster_tiles(root, IMAGES, channels=C)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    job = defs.resolve_job_def("train_model")
    resources = {"s2vec": {"config": {"root": str(root)}}}
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        for bad, named in (
            ({"batch_size": 0}, "batch_size"),
            ({"batch_size": -4}, "batch_size"),
            ({"lr": -1.0}, "lr"),
            ({"lr": math.nan}, "lr"),
            ({"embed_dim": 100}, "embed_dim 100 must be divisible by num_heads 8"),
        ):
            run_config = {"ops": {"mae_model": {"config": bad}}, "resources": resources}
            with pytest.raises(dg.DagsterInvalidConfigError, match=named):
                job.execute_in_process(run_config=run_config, instance=instance)
            with pytest.raises(dg.DagsterInvalidConfigError, match=named):
                dg.validate_run_config(job, run_config)
        assert instance.get_runs() == []  # refused before any run existed
        good = {"ops": {"mae_model": {"config": {"epochs": 1, "lr": 0.01}}}, "resources": resources}
        assert dg.validate_run_config(job, good)["ops"]["mae_model"]["config"]["lr"] == 0.01
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no .partial, lock


@pytest.mark.slow
def test_launchpad_launch_with_bad_settings_creates_no_run(tmp_path: Path) -> None:
    """The launchpad's path: the GraphQL launch mutation against the code location in its own
    code server process (workspace.yaml). Dagster builds the execution plan there before it
    creates a run; TrainConfig refuses the settings, so no run exists and nothing is written."""
    from dagster_graphql.client.query import LAUNCH_PIPELINE_EXECUTION_MUTATION
    from dagster_graphql.test.utils import (
        define_out_of_process_context,
        execute_dagster_graphql,
        infer_job_selector,
    )

    root = tmp_path / "root"
    synthetic_raster_tiles(root, IMAGES, channels=C)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    workspace = Path(__file__).resolve().parents[1] / "workspace.yaml"
    (tmp_path / "dagster").mkdir()
    with (
        dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance,
        define_out_of_process_context(str(workspace), None, instance) as context,
    ):
        params = {
            "selector": infer_job_selector(context, "train_model"),
            "runConfigData": {
                "ops": {"mae_model": {"config": {"batch_size": -4, "lr": 0.01}}},
                "resources": {"s2vec": {"config": {"root": str(root)}}},
            },
            "mode": "default",
        }
        result = execute_dagster_graphql(
            context, LAUNCH_PIPELINE_EXECUTION_MUTATION, {"executionParams": params}
        )
        launch = result.data["launchPipelineExecution"]
        assert launch["__typename"] != "LaunchRunSuccess"
        assert (
            "training settings: batch_size: input should be greater than or equal to 1 (got -4)"
            in (launch["message"])
        )
        assert instance.get_runs() == []
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_registry_has_its_own_module_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from s2vec_pipeline.model.registry import list_models, load_model, "
        "ModelCard; from s2vec_pipeline.model.config import TrainConfig; TrainConfig(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the tile cache ------------------------------------------------------------------------


def _table_tiles(root: Path) -> np.ndarray:
    """Every tile of the table, partitions sorted, rows by image id: an independent decode."""
    table = delta_store.read_partitions(root, "raster_tiles").sort(["parent_l6", "image_id"])
    return np.array(tensor_array(table["tensor"].to_arrow(), C, S))


def test_tile_cache_holds_the_snapshot_and_is_rebuilt_when_it_does_not_match(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    contract = synthetic_raster_tiles(tmp_path, IMAGES, channels=C)
    version = delta_store.table_version(tmp_path, "raster_tiles")
    parts = sorted(IMAGES)
    versions = raster_partition_versions(tmp_path, parts, version)
    cache = tile_cache(tmp_path, parts, version, versions, contract["channels"], S)
    assert cache.directory.parent == tmp_path / TILE_CACHE_DIR
    assert np.array_equal(cache.tiles(), _table_tiles(tmp_path))
    assert np.array_equal(cache.tiles([7, 0, 7]), _table_tiles(tmp_path)[[7, 0, 7]])
    # Found again, not rebuilt.
    stamp = (cache.directory / "values.bin").stat().st_mtime_ns
    assert tile_cache(tmp_path, parts, version, versions, contract["channels"], S) == cache
    assert (cache.directory / "values.bin").stat().st_mtime_ns == stamp

    # A cache folder whose key names another snapshot is rebuilt, never used.
    key_file = cache.directory / "key.json"
    key = json.loads(key_file.read_text())
    key["partitions"]["4693"] = "not-this-data"
    key_file.write_text(json.dumps(key))
    # ... and so is one whose value file was cut short (a crash, a full disk).
    again = tile_cache(tmp_path, parts, version, versions, contract["channels"], S)
    assert "does not match its snapshot" in caplog.text
    assert np.array_equal(again.tiles(), _table_tiles(tmp_path))
    with open(again.directory / "values.bin", "r+b") as f:
        f.truncate(1000)
    third = tile_cache(tmp_path, parts, version, versions, contract["channels"], S)
    assert np.array_equal(third.tiles(), _table_tiles(tmp_path))

    # Another snapshot (partition 4693 rewritten with half its images) has another cache.
    rows = delta_store.read_partitions(tmp_path, "raster_tiles", ["4693"]).head(12).to_arrow()
    delta_store.write_partitions(tmp_path, "raster_tiles", rows, ["4693"], contract)
    dm = RasterTileDataModule(tmp_path, TrainConfig(batch_size=8))
    dm.setup()
    assert dm.cache.directory != cache.directory and dm.cache.n == 12 + 16
    assert np.array_equal(dm.cache.tiles(), _table_tiles(tmp_path))
    assert not list((tmp_path / TILE_CACHE_DIR).glob(".*.building"))
    # A third snapshot: the two most recently used caches stay, the oldest is removed.
    rows = delta_store.read_partitions(tmp_path, "raster_tiles", ["12cd"]).head(5).to_arrow()
    delta_store.write_partitions(tmp_path, "raster_tiles", rows, ["12cd"], contract)
    latest = RasterTileDataModule(tmp_path, TrainConfig(batch_size=8))
    latest.setup()
    kept = {d for d in (tmp_path / TILE_CACHE_DIR).iterdir() if not d.name.startswith(".")}
    assert kept == {dm.cache.directory, latest.cache.directory}


def test_index_sampler_shards_like_a_distributed_sampler() -> None:
    indices = np.arange(100, 203)  # 103 training rows
    ranks = [IndexBatchSampler(indices, 8, shuffle=True, seed=5, rank=r, world=2) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(3)
    shards = [np.concatenate(list(s)) for s in ranks]
    assert [len(x) for x in shards] == [51, 51]  # equal shards: DDP ranks step in lockstep
    assert [len(s) for s in ranks] == [math.ceil(51 / 8)] * 2 == [len(list(s)) for s in ranks]
    both = np.concatenate(shards)
    assert len(set(both.tolist())) == 102 and set(both.tolist()) <= set(indices.tolist())
    # The same epoch gives the same batches; another epoch another order of the same rows.
    assert all(np.array_equal(a, b) for a, b in zip(ranks[0], ranks[0], strict=True))
    ranks[0].set_epoch(4)
    other = np.concatenate(list(ranks[0]))
    assert not np.array_equal(other, shards[0])
    one = IndexBatchSampler(indices, 8, shuffle=True, seed=5)
    assert sorted(np.concatenate(list(one)).tolist()) == indices.tolist()  # nothing dropped
    assert all(np.array_equal(b, np.sort(b)) for b in one)  # sorted: sequential reads


def test_loader_batches_are_table_tiles_and_pickle_without_the_array(tmp_path: Path) -> None:
    import pickle

    synthetic_raster_tiles(tmp_path, IMAGES, channels=C)
    dm = RasterTileDataModule(tmp_path, TrainConfig(batch_size=8, pin_memory=False))
    dm.setup()
    table = _table_tiles(tmp_path)
    batches = list(dm.train_dataloader())
    seen = torch.cat([dm.dense_batch(b) for b in batches]).numpy()
    expected = table[dm.train_indices]
    order = lambda a: np.lexsort(a.reshape(len(a), -1).T)  # noqa: E731
    assert np.array_equal(seen[order(seen)], expected[order(expected)])
    dataset = dm.train_dataloader().dataset
    assert len(pickle.dumps(dataset)) < 10_000  # a spawned worker maps the file itself
    # Sparse: 4 bytes per nonzero value and 2 per position (8×16×16 values fit in uint16).
    nonzero = np.count_nonzero(table)
    assert dm.cache.nnz == nonzero < table.size
    assert os.path.getsize(dm.cache.directory / "values.bin") == nonzero * 4
    assert os.path.getsize(dm.cache.directory / "positions.bin") == nonzero * 2


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("on_device", [False, True], ids=["mapped", "resident"])
@pytest.mark.parametrize("sparsity", [{}, {"empty_fraction": 0.995, "value_fraction": 0.5}])
def test_densified_batches_are_the_table_tiles(
    tmp_path: Path, dtype: str, on_device: bool, sparsity: dict
) -> None:
    """What the model gets from the sparse cache: the table's tiles (an independent decode)
    in the sampler's order, exactly (float16: as cast), so the same model as from dense
    tiles; the channel statistics from the nonzero values are those of the dense tiles."""
    synthetic_raster_tiles(tmp_path, IMAGES, channels=C, **sparsity)
    config = TrainConfig(
        batch_size=8, pin_memory=False, tile_dtype=dtype, tiles_on_device=on_device
    )
    dm = RasterTileDataModule(tmp_path, config)
    dm.setup()
    table = _table_tiles(tmp_path).astype(dtype)
    if sparsity:  # images without a single value are empty segments of the cache
        assert (~table.any(axis=(1, 2, 3))).sum() >= 3
    train = dm.train_dataloader()
    dm.set_epoch(1)
    for loader in (train, dm.val_dataloader()):
        order = np.concatenate(list(loader.batch_sampler))
        batches = [dm.dense_batch(b) for b in loader]
        assert {b.dtype for b in batches} == {getattr(torch, dtype)}
        assert np.array_equal(torch.cat(batches).numpy(), table[order])
        if on_device:  # counted on the host: the device gathers without a host sync
            assert all(b.nonzero == np.count_nonzero(table[b.rows.numpy()]) for b in loader)
        else:  # the GPU's densify (torch), run on the CPU here: the same tiles
            sparse = list(loader)
            assert all(isinstance(b, SparseTiles) for b in sparse)
            on_gpu = torch.cat([_dense_on_device(b, (C, S, S)) for b in sparse])
            assert np.array_equal(on_gpu.numpy(), table[order])
    if not on_device:
        assert np.array_equal(train.dataset[5].numpy(), table[5])
    dense = table[dm.train_indices].astype(np.float64)
    np.testing.assert_allclose(dm.channel_mean, dense.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(dm.channel_std, dense.std(axis=(0, 2, 3)), rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("on_device", [False, True], ids=["mapped", "resident"])
def test_sparse_batches_are_pinned_and_densified_on_the_gpu(
    tmp_path: Path, on_device: bool
) -> None:
    """The loader pins the batch (tensors in a tuple), Lightning's transfer moves it, and it
    is gathered (resident) and densified on the GPU: the table's tiles."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    synthetic_raster_tiles(tmp_path, IMAGES, channels=C)
    config = TrainConfig(batch_size=8, pin_memory=True, tiles_on_device=on_device)
    dm = RasterTileDataModule(tmp_path, config)
    dm.setup()
    loader = dm.train_dataloader()
    order = np.concatenate(list(loader.batch_sampler))
    tiles = []
    for batch in loader:
        assert all(t.is_pinned() for t in batch if isinstance(t, torch.Tensor))
        tiles.append(dm.dense_batch(move_data_to_device(batch, torch.device("cuda"))))
    assert {t.device.type for t in tiles} == {"cuda"}
    assert np.array_equal(torch.cat(tiles).cpu().numpy(), _table_tiles(tmp_path)[order])


@pytest.mark.slow
def test_tiles_on_device_train_the_same_model(tmp_path: Path) -> None:
    """Gathering batches from a resident copy (the GPU path) instead of the mapped files: the
    same batches, so bit-identical weights (CPU, deterministic) and the same version."""
    from s2vec_pipeline.model.registry import load_model
    from s2vec_pipeline.model.train import train_model

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 4, "decoder_embed_dim": 32}
    config = TrainConfig(epochs=2, batch_size=8, decoder_depth=1, decoder_num_heads=4, **tiny)
    cards = []
    for name, on_device in (("mapped", False), ("resident", True)):
        root = tmp_path / name
        synthetic_raster_tiles(root, IMAGES, channels=C)
        cards.append(train_model(root, config=config.replace(tiles_on_device=on_device)))
    assert cards[0].model_version == cards[1].model_version
    assert cards[0].loss_history["train_loss"] == cards[1].loss_history["train_loss"]
    a, _ = load_model(tmp_path / "mapped", cards[0].model_version)
    b, _ = load_model(tmp_path / "resident", cards[1].model_version)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_float16_cache_halves_the_bytes_and_is_another_model(tmp_path: Path) -> None:
    from s2vec_pipeline.model.train import train_model

    contract = synthetic_raster_tiles(tmp_path, IMAGES, channels=C)
    version = delta_store.table_version(tmp_path, "raster_tiles")
    parts = sorted(IMAGES)
    versions = raster_partition_versions(tmp_path, parts, version)
    half = tile_cache(tmp_path, parts, version, versions, contract["channels"], S, "float16")
    full = tile_cache(tmp_path, parts, version, versions, contract["channels"], S)
    assert half.directory != full.directory
    table = _table_tiles(tmp_path)
    nonzero = np.count_nonzero(table.astype(np.float16))  # float16 may round a value to zero
    assert os.path.getsize(half.directory / "values.bin") == nonzero * 2
    assert os.path.getsize(full.directory / "values.bin") == np.count_nonzero(table) * 4
    assert np.array_equal(half.tiles(), _table_tiles(tmp_path).astype(np.float16))
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 4, "decoder_embed_dim": 32}
    config = TrainConfig(epochs=1, batch_size=8, decoder_depth=1, decoder_num_heads=4, **tiny)
    card = train_model(tmp_path, config=config.replace(tile_dtype="float16"))
    assert all(math.isfinite(v) for v in card.loss_history["train_loss"])
    assert card.model_version != model_version(config, contract, versions)


def test_raster_partition_rows_and_version_do_not_depend_on_the_stored_order(
    tmp_path: Path,
) -> None:
    """Rows come back by image id, and the partition's data version is the same, whether the
    table holds them in image order (as the raster stage writes) or not (the generator)."""
    import polars as pl

    from s2vec_pipeline.model.data import read_raster_partition

    contract = synthetic_raster_tiles(tmp_path, {"4693": 12}, channels=2)
    shuffled = delta_store.read_partitions(tmp_path, "raster_tiles")
    assert not shuffled["image_id"].is_sorted()  # the generator's order
    got = read_raster_partition(tmp_path, "4693", 1)
    want = shuffled.sort("image_id")
    assert got.equals(want) and got["image_id"].flags["SORTED_ASC"]
    version = raster_partition_versions(tmp_path, ["4693"], 1)
    table = want.to_arrow(compat_level=pl.CompatLevel.oldest())
    delta_store.write_partitions(tmp_path, "raster_tiles", table, ["4693"], contract)
    assert delta_store.read_partitions(tmp_path, "raster_tiles")["image_id"].is_sorted()
    assert read_raster_partition(tmp_path, "4693", 2).equals(want)
    assert raster_partition_versions(tmp_path, ["4693"], 2) == version
