"""The S2Vec MAE, its training (real Lightning Trainer on CPU, real Delta) and embeddings."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from deltalake import DeltaTable
from PIL import Image

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.raster import RASTER_SCHEMA, tensor_array
from s2vec_pipeline.errors import IncompatibleTableError, MissingInputError, S2VecError
from s2vec_pipeline.model.config import TrainConfig
from s2vec_pipeline.model.data import plan_split
from s2vec_pipeline.model.datamodule import RasterTileDataModule
from s2vec_pipeline.model.embed import (
    CELL_TABLE,
    IMAGE_TABLE,
    embed_partition,
    resolve_device,
    write_embeddings,
)
from s2vec_pipeline.model.loss_curve import loss_curve_caption
from s2vec_pipeline.model.mae import S2VecMAE
from s2vec_pipeline.model.registry import (
    IncompatibleModelError,
    InvalidModelCardError,
    ModelNotFoundError,
    list_models,
    load_model,
)
from s2vec_pipeline.model.synthetic import synthetic_raster_tiles
from s2vec_pipeline.model.train import model_version, train_model
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline.storage.versioning import frame_hash

TINY = {
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 4,
}
CONFIG = TrainConfig(epochs=4, batch_size=8, lr=3e-3, **TINY)
IMAGES = {"4693": 24, "12cd": 16}
C, S = 8, 16


def tiny_model(**kw) -> S2VecMAE:
    return S2VecMAE(in_chans=C, img_size=S, **{**TINY, **kw})


def sample(b: int = 2) -> torch.Tensor:
    return torch.rand(b, C, S, S, generator=torch.Generator().manual_seed(0))


# --- the MAE itself -----------------------------------------------------------------------


def test_masking_keeps_exactly_a_quarter() -> None:
    m = tiny_model()
    tokens = torch.randn(3, S * S, 32)
    kept, mask, ids_restore = m.random_masking(tokens, 0.75)
    assert kept.shape == (3, S * S // 4, 32)
    assert (mask.sum(1) == 0.75 * S * S).all()
    # The kept tokens are exactly the unmasked ones, per sample.
    for b in range(3):
        visible = tokens[b][mask[b] == 0]
        assert {tuple(r) for r in visible.tolist()} == {tuple(r) for r in kept[b].tolist()}
    # Per-sample shuffle: different samples get different masks.
    assert not torch.equal(mask[0], mask[1])


def test_loss_only_on_masked_tokens() -> None:
    m = tiny_model().eval()
    x = sample(1)
    noise = torch.rand(1, S * S, generator=torch.Generator().manual_seed(1))
    loss, pred, mask = m(x, noise=noise)
    target = m.patchify(m.normalize(x))
    visible = int(torch.nonzero(mask[0] == 0)[0])
    masked = int(torch.nonzero(mask[0] == 1)[0])
    changed = target.clone()
    changed[0, visible] += 10.0
    assert torch.allclose(m.forward_loss(changed, pred, mask), loss)
    changed = target.clone()
    changed[0, masked] += 10.0
    assert m.forward_loss(changed, pred, mask) > loss + 0.1
    # The encoder never sees masked pixels: changing one leaves every prediction unchanged.
    row, col = divmod(masked, S)
    x2 = x.clone()
    x2[0, :, row, col] += 5.0
    _, pred2, _ = m(x2, noise=noise)
    assert torch.allclose(pred, pred2)


def test_encode_shape_and_patch_size_two() -> None:
    x = sample(2)
    z = tiny_model().eval().encode(x)
    assert z.shape == (2, S * S, 32)
    m2 = tiny_model(patch_size=2).eval()
    z2 = m2.encode(x).reshape(2, S, S, 32)
    assert z2.shape == (2, S, S, 32)
    # Every pixel of a 2×2 patch carries its patch's token; neighbouring patches differ.
    assert torch.equal(z2[:, 0, 0], z2[:, 1, 1]) and torch.equal(z2[:, 2, 3], z2[:, 3, 2])
    assert not torch.allclose(z2[:, 0, 0], z2[:, 0, 2])
    loss, pred, mask = m2(x)
    assert pred.shape == (2, (S // 2) ** 2, 4 * C) and (mask.sum(1) == 48).all()
    assert torch.allclose(m2.unpatchify(m2.patchify(x)), x)
    with pytest.raises(ValueError, match="divide"):
        tiny_model(patch_size=3)


# --- data ---------------------------------------------------------------------------------


def test_tensor_decoder_one_for_every_reader() -> None:
    x = np.arange(3 * C * 4 * 4, dtype=np.float32).reshape(3, C, 4, 4)
    offsets = pa.array(np.arange(0, x.size + 1, C * 16, dtype=np.int32))
    col = pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))
    table = pa.table({"tensor": col})
    frame = __import__("polars").from_arrow(table)
    for tiles in (col, table, table.to_batches()[0], frame, frame["tensor"]):
        assert np.array_equal(tensor_array(tiles, C, 4), x)
    assert np.array_equal(tensor_array(col.slice(1), C, 4), x[1:])  # honours slice offsets
    short = pa.array([[0.0] * (C * 16), [0.0] * 5], pa.list_(pa.float32()))
    with pytest.raises(IncompatibleTableError, match="5 values"):
        tensor_array(short, C, 4)
    with pytest.raises(IncompatibleTableError, match="null"):
        tensor_array(pa.array([None], pa.list_(pa.float32())), C, 4)


def test_split_and_stats(tmp_path: Path) -> None:
    synthetic_raster_tiles(tmp_path, IMAGES, channels=C)
    rule, n_train, n_val = plan_split(tmp_path, list(IMAGES), 0.1)
    assert n_train + n_val == 40 and n_val >= 1
    assert plan_split(tmp_path, list(IMAGES), 0.1) == (rule, n_train, n_val)  # deterministic
    dm = RasterTileDataModule(tmp_path, TrainConfig(batch_size=8, seed=3))
    dm.setup()
    assert (dm.n_train, dm.n_val) == (n_train, n_val)
    # The validation images are those plan_split's rule names (what reconstruction holds out).
    val_tokens = set(dm.cache.tokens()[dm.val_indices].tolist())
    table = delta_store.read_partitions(tmp_path, "raster_tiles")
    tokens = table["image_token"].to_list()
    assert val_tokens == {t for t, v in zip(tokens, rule.is_val(tokens), strict=True) if v}
    loader = dm.train_dataloader()
    first = torch.cat([dm.dense_batch(b) for b in loader])
    assert first.shape == (n_train, C, S, S) and len(loader) == -(-n_train // 8)
    dm.set_epoch(1)
    second = torch.cat([dm.dense_batch(b) for b in loader])
    assert not torch.equal(first, second)  # reshuffled per epoch...
    assert torch.allclose(first.sum(0), second.sum(0))  # ...over the same tiles
    # Every training tile is one of the table's tiles (an independent decode of the table).
    decoded = torch.from_numpy(np.array(tensor_array(table["tensor"].to_arrow(), C, S)))
    by_sum = {round(float(t.sum()), 3) for t in decoded}
    assert {round(float(t.sum()), 3) for t in first} <= by_sum
    flat = first.permute(1, 0, 2, 3).reshape(C, -1).double()
    assert np.allclose(dm.channel_mean, flat.mean(1).numpy(), atol=1e-5)
    assert np.allclose(dm.channel_std, flat.std(1, unbiased=False).numpy(), atol=1e-5)
    # Two tiles: one each; one tile: train only.
    tiny = tmp_path / "tiny"
    synthetic_raster_tiles(tiny, {"4693": 2}, channels=C)
    assert plan_split(tiny, ["4693"], 0.1)[1:] == (1, 1)


@pytest.mark.slow
def test_spawned_workers_read_every_tile_once(tmp_path: Path) -> None:
    synthetic_raster_tiles(tmp_path, IMAGES, channels=C)
    dm = RasterTileDataModule(tmp_path, TrainConfig(batch_size=8, num_workers=2))
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    batches = list(loader)
    assert len(batches) == len(loader)
    tiles = torch.cat([dm.dense_batch(b) for b in batches])
    single = RasterTileDataModule(tmp_path, TrainConfig(batch_size=8))
    single.setup()
    expected = torch.cat([single.dense_batch(b) for b in single.train_dataloader()])
    # The same permutation with or without workers: the same batches in the same order.
    assert torch.equal(tiles, expected)


# --- training -----------------------------------------------------------------------------


class Grab(L.Callback):
    """Keeps the in-memory trained module, to compare with the checkpoint."""

    module: S2VecMAE | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.module = pl_module


class Interrupt(L.Callback):
    """Simulates a crash at the start of epoch ``at`` (after the previous epoch's checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.at:
            raise RuntimeError("simulated crash")


def embeddings(model: S2VecMAE) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval().encode(sample(4) * 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("trained")
    synthetic_raster_tiles(root, IMAGES, channels=C)
    grab = Grab()
    card = train_model(root, config=CONFIG, callbacks=[grab])
    return root, card, grab.module


@pytest.mark.slow
def test_training_learns_and_writes_a_complete_model(trained) -> None:
    root, card, module = trained
    h = card.loss_history
    assert len(h["train_loss"]) == card.steps == 4 * -(-card.n_train // 8)
    # 4 epochs trained: the card says 4 (not Lightning's 0-based index of the last one), and
    # the CSV log has losses of 4 epochs.
    assert card.epochs_completed == CONFIG.epochs == 4 and len(h["epoch"]) == 4
    assert card.train_loss < 0.75 * h["train_loss"][0]  # the loss falls
    assert h["val_loss"][-1] < h["val_loss"][0]
    d = Path(card.directory)
    assert d == root / "models" / card.model_version
    assert {p.name for p in d.iterdir()} == {
        "model.ckpt",
        "last.ckpt",
        "model_card.json",
        "loss_curve.png",
        "logs",  # CSVLogger: one folder per attempt
    }
    assert [p.parent.name for p in (d / "logs").glob("*/metrics.csv")] == ["version_0"]
    with Image.open(d / "loss_curve.png") as png:
        assert png.size == (800, 480)
    saved = json.loads((d / "model_card.json").read_text())
    assert saved["model_version"] == card.model_version and saved["channels"] == card.channels
    assert saved["images_seen"] == 4 * card.n_train and saved["images_per_s"] > 0
    assert saved["hardware"]["accelerator"] == "cpu" and saved["world_size"] == 1
    # The snapshot read, and each partition's data version there computed the way Dagster
    # computes raster_tiles' (content hash of the partition's rows, sorted by image id).
    # the table's only write so far (after its creation commit)
    assert saved["raster_tiles_version"] == delta_store.table_version(root, "raster_tiles") == 1
    table = delta_store.read_partitions(root, "raster_tiles")
    assert saved["partitions"] == {
        k: frame_hash(table.filter(table["parent_l6"] == k), ["image_id"]) for k in IMAGES
    }
    assert len(saved["normalization"]["mean"]) == C
    assert list_models(root) == [card.model_version]
    assert not list((root / "models").glob(".*.partial"))


@pytest.mark.slow
def test_checkpoint_reload_gives_identical_embeddings(trained) -> None:
    root, card, module = trained
    model, card2 = load_model(root, card.model_version)
    assert card2 == card
    assert torch.equal(embeddings(model), embeddings(module))
    assert torch.equal(model.channel_std, torch.tensor(card.normalization["std"]))


def copy_raster_reordered(src: Path, dst: Path) -> None:
    """The same raster rows in another table layout: rows reversed, partitions written in
    reverse order in separate commits (so other files and another Delta version)."""
    table = delta_store.read_partitions(src, "raster_tiles").to_arrow()
    contract = delta_store.table_contract(src, "raster_tiles")
    for k in sorted(IMAGES, reverse=True):
        rows = table.filter(pc.equal(table["parent_l6"], k))
        rows = rows.take(pa.array(np.arange(rows.num_rows)[::-1]))
        rows = rows.select(RASTER_SCHEMA.names).cast(RASTER_SCHEMA)
        delta_store.write_partitions(dst, "raster_tiles", rows, [k], contract)


@pytest.mark.slow
def test_same_seed_same_model_and_no_retraining(trained, tmp_path: Path) -> None:
    root, card, _ = trained
    # Same content in another root, another layout and Delta version: same model version and
    # bit-identical weights (the tiles stream in an order fixed by their content).
    copy_raster_reordered(root, tmp_path)
    again = train_model(tmp_path, config=CONFIG)
    assert again.model_version == card.model_version and again.partitions == card.partitions
    # the copy: a creation commit, then one write per partition
    assert again.raster_tiles_version == card.raster_tiles_version + 1
    a, _ = load_model(root, card.model_version)
    b, _ = load_model(tmp_path, card.model_version)
    assert torch.equal(embeddings(a), embeddings(b))
    # A finished model is returned as it is, not retrained.
    card_file = Path(card.directory) / "model_card.json"
    before = card_file.stat().st_mtime_ns
    assert train_model(root, config=CONFIG) == card
    assert card_file.stat().st_mtime_ns == before
    # Another seed is another model.
    other = CONFIG.replace(seed=1, epochs=1)
    assert train_model(tmp_path, config=other).model_version != card.model_version


@pytest.mark.slow
def test_training_reads_one_snapshot(
    trained, tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    root, card, _ = trained
    work = tmp_path / "root"
    shutil.copytree(root, work)
    # A refresh rewrites partition 4693 (10 of its 24 images left) after the model was trained.
    rows = delta_store.read_partitions(work, "raster_tiles", ["4693"]).head(10).to_arrow()
    contract = delta_store.table_contract(work, "raster_tiles")
    rows = rows.select(RASTER_SCHEMA.names).cast(RASTER_SCHEMA)
    v0 = card.raster_tiles_version
    assert delta_store.write_partitions(work, "raster_tiles", rows, ["4693"], contract) == v0 + 1
    # Pinned to the trained version: the same inputs, so the finished model, not a new one.
    assert train_model(work, config=CONFIG, raster_version=v0) == card
    # The latest version: new data, a new model trained on 10 + 16 images.
    one_epoch = CONFIG.replace(epochs=1)
    latest = train_model(work, config=one_epoch)
    assert latest.raster_tiles_version == v0 + 1 and latest.n_train + latest.n_val == 26
    assert latest.partitions["12cd"] == card.partitions["12cd"]
    assert latest.partitions["4693"] != card.partitions["4693"]
    # The trained version again with that config: the 40 images of that snapshot.
    pinned = train_model(work, config=one_epoch, raster_version=v0)
    assert pinned.raster_tiles_version == v0 and pinned.n_train + pinned.n_val == 40
    assert pinned.partitions == card.partitions and pinned.model_version != latest.model_version
    with pytest.raises(MissingInputError, match="no version 7"):
        train_model(work, config=CONFIG, raster_version=7)
    # A vacuum removed that version's files of partition 4693: a clear error, not a crash.
    DeltaTable(str(work / "raster_tiles")).vacuum(
        retention_hours=0, enforce_retention_duration=False, dry_run=False
    )
    with pytest.raises(MissingInputError, match="vacuum removed its files"):
        train_model(work, config=one_epoch, raster_version=v0)
    # Quiet training: no Lightning advertising tips, no deprecation from Lightning's internals.
    assert not [r for r in caplog.records if "Tip" in r.getMessage()]
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]


@pytest.mark.slow
def test_two_process_ddp_training_on_cpu(tmp_path: Path) -> None:
    """DDP (gloo) with two CPU processes through ddp_spawn: the caller holds the lock."""
    synthetic_raster_tiles(tmp_path, {"4693": 8, "12cd": 4}, channels=C)
    ddp = CONFIG.replace(epochs=2, batch_size=4, devices=2, accelerator="cpu")
    card = train_model(tmp_path, config=ddp)
    assert card.world_size == 2 and card.hardware["device_count"] == 2
    assert (card.n_train, card.n_val) == (11, 1)
    per_rank = card.n_train // 2  # each rank reads its own half (remainder dropped)
    assert card.steps == 2 * math.ceil(per_rank / 4)
    assert card.images_seen == 2 * 2 * per_rank
    losses = card.loss_history["train_loss"]
    assert len(losses) == card.steps and all(map(math.isfinite, losses))
    # One validation image and two ranks: both validate on it, it is not lost.
    assert len(card.loss_history["val_loss"]) == 2
    assert all(v is not None and math.isfinite(v) for v in card.loss_history["val_loss"])
    # Several processes train another model than one process on the same data and config.
    contract = delta_store.table_contract(tmp_path, "raster_tiles")
    single = ddp.replace(devices=1)
    assert model_version(single, contract, card.partitions) != card.model_version
    model, _ = load_model(tmp_path, card.model_version)
    assert torch.isfinite(embeddings(model)).all()
    assert not list((tmp_path / "models").glob(".*.partial"))


def test_loss_curve_says_how_many_images() -> None:
    assert loss_curve_caption(36, 4) == (
        "training set: 36 images; validation set: 4 images",
        "validation loss from only 4 images: noisy, not a measure of generalization",
    )
    sizes, warning = loss_curve_caption(1200, 1)
    assert sizes == "training set: 1,200 images; validation set: 1 image"
    assert warning is not None and "only 1 image" in warning
    assert loss_curve_caption(30, 0)[1] == "no validation images: no validation loss"
    assert loss_curve_caption(900, 100)[1] is None


@pytest.mark.slow
def test_interrupted_training_resumes_from_last_checkpoint(trained, tmp_path: Path) -> None:
    root, card, _ = trained
    synthetic_raster_tiles(tmp_path, IMAGES, channels=C)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_model(tmp_path, config=CONFIG, callbacks=[Interrupt(at=2)])
    partial = tmp_path / "models" / f".{card.model_version}.partial"
    assert (partial / "last.ckpt").is_file()
    assert not (tmp_path / "models" / card.model_version).exists()  # never looks finished
    with pytest.raises(ModelNotFoundError, match="partial training"):
        load_model(tmp_path, card.model_version)

    resumed = train_model(tmp_path, config=CONFIG)
    assert resumed.model_version == card.model_version
    assert resumed.resumed_from == {"epoch": 2, "step": 2 * -(-card.n_train // 8)}
    assert resumed.loss_history == card.loss_history and resumed.images_seen == card.images_seen
    assert not partial.exists()
    logs = Path(resumed.directory) / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1"]  # two attempts
    a, _ = load_model(root, card.model_version)
    b, _ = load_model(tmp_path, card.model_version)
    assert torch.equal(embeddings(a), embeddings(b))  # same as the uninterrupted run


# --- embeddings ---------------------------------------------------------------------------


@pytest.mark.slow
def test_embeddings_rows_ids_and_means(trained) -> None:
    root, card, _ = trained
    model, card = load_model(root, card.model_version)
    cells, images = embed_partition(root, model, card, "4693", device="cpu")
    n = IMAGES["4693"]
    assert images.num_rows == n and cells.num_rows == n * S * S
    emb = np.asarray(cells.column("embedding").to_pylist(), dtype=np.float32)
    assert emb.shape == (n * S * S, 32)
    cell_ids = s2.from_signed(cells.column("cell_id").to_numpy())
    assert (s2.cell_level(cell_ids) == card.pixel_level).all()
    assert set(cells.column("level").to_pylist()) == {card.pixel_level}
    assert (s2.to_token(cell_ids) == np.asarray(cells.column("cell_token").to_pylist())).all()
    parents = s2.to_token(s2.parent(cell_ids, card.image_level))
    assert (parents == np.asarray(cells.column("image_token").to_pylist())).all()
    assert len(set(cells.column("cell_token").to_pylist())) == n * S * S  # empty pixels too
    assert set(cells.column("model_version").to_pylist()) == {card.model_version}
    assert set(images.column("level").to_pylist()) == {card.image_level}
    assert images.column("cell_token").equals(images.column("image_token"))
    # Row order is encode order (index = row*S + col) and the image row is the pixel mean.
    raster = delta_store.read_partitions(root, "raster_tiles", ["4693"]).sort("image_token")
    first = images.column("image_token")[0].as_py()
    x = np.asarray(raster.filter(raster["image_token"] == first)["tensor"].to_list()[0])
    with torch.inference_mode():
        z = model.encode(torch.tensor(x, dtype=torch.float32).reshape(1, C, S, S))[0].numpy()
    rows = np.flatnonzero(np.asarray(cells.column("image_token").to_pylist()) == first)
    grid = s2.children_grid(s2.from_token(np.array([first])), card.pixel_level).reshape(-1)
    assert (cell_ids[rows] == grid).all()
    assert np.allclose(emb[rows], z, atol=1e-5)
    img_emb = np.asarray(images.column("embedding").to_pylist(), dtype=np.float32)
    by_image = emb.reshape(n, S * S, 32).mean(1)
    assert np.allclose(img_emb, by_image, atol=1e-5)


@pytest.mark.slow
def test_write_embeddings_replaces_partitions(trained, tmp_path: Path) -> None:
    root, card, _ = trained
    work = tmp_path / "root"
    shutil.copytree(root, work)
    # An image without data in the raster table gets no embedding rows.
    raster = delta_store.read_partitions(work, "raster_tiles", ["12cd"]).to_arrow()
    blank = raster.slice(0, 1).to_pylist()[0]
    taken = set(raster.column("image_token").to_pylist())
    siblings = s2.children_grid(s2.parent(s2.from_token(np.array([blank["image_token"]])), 9), 13)
    free = next(t for t in s2.to_token(siblings.reshape(-1)) if t not in taken)
    blank.update(image_token=str(free), image_id=int(s2.to_signed(s2.from_token([free]))[0]))
    blank.update(nonempty_pixels=0, tensor=[0.0] * len(blank["tensor"]))
    raster = pa.concat_tables([raster, pa.Table.from_pylist([blank], schema=raster.schema)])
    contract = delta_store.table_contract(work, "raster_tiles")
    raster = raster.select(RASTER_SCHEMA.names).cast(RASTER_SCHEMA)
    v0 = card.raster_tiles_version
    assert delta_store.write_partitions(work, "raster_tiles", raster, ["12cd"], contract) == v0 + 1
    model, card = load_model(work, card.model_version)
    # Small batches: deltalake pulls them from its own threads.
    counts = write_embeddings(work, model, card, list(IMAGES), batch_size=5, device="cpu")
    assert counts["12cd"]["cells"] == IMAGES["12cd"] * S * S
    # What was read is recorded: the raster snapshot (result and commit info) and the
    # partition's data version there, computed as Dagster computes raster_tiles' versions.
    latest = delta_store.read_partitions(work, "raster_tiles", ["12cd"])
    assert counts["12cd"]["raster_tiles_version"] == v0 + 1
    assert counts["12cd"]["raster_data_version"] == frame_hash(latest, ["image_id"])
    assert counts["4693"]["raster_data_version"] == card.partitions["4693"]  # unchanged
    for table in (CELL_TABLE, IMAGE_TABLE):
        commit = DeltaTable(str(work / table)).history(1)[0]
        assert commit["s2vec.raster_tiles_version"] == str(v0 + 1)
        assert commit["s2vec.model_version"] == card.model_version
    # Pinned to the trained version: the 12cd partition as the model was trained on it.
    pinned = write_embeddings(work, model, card, ["12cd"], device="cpu", raster_version=v0)
    assert pinned["12cd"]["raster_tiles_version"] == v0
    assert pinned["12cd"]["raster_data_version"] == card.partitions["12cd"]
    write_embeddings(work, model, card, ["12cd"])  # a rerun replaces, never duplicates
    cells = delta_store.read_partitions(work, CELL_TABLE, columns=["parent_l6"])
    assert cells.height == sum(IMAGES.values()) * S * S
    imgs = delta_store.read_partitions(work, IMAGE_TABLE)
    assert imgs.height == sum(IMAGES.values())
    # Same embeddings as one in-memory batch.
    _, ref = embed_partition(work, model, card, "4693")
    got = imgs.filter(imgs["parent_l6"] == "4693").sort("image_token")
    ref_sorted = ref.sort_by("image_token")
    assert np.allclose(
        np.asarray(got["embedding"].to_list()),
        np.asarray(ref_sorted.column("embedding").to_pylist()),
        atol=1e-5,
    )
    assert imgs.schema["embedding"].inner == __import__("polars").Float32


@pytest.mark.slow
def test_embedding_device_choice(trained) -> None:
    root, card, _ = trained
    cuda = torch.cuda.is_available()
    assert resolve_device("auto").type == ("cuda" if cuda else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(S2VecError, match="'auto', 'cpu' or 'cuda"):
        resolve_device("tpu")
    if not cuda:  # this machine: asking for a GPU is a clear error, not a crash
        with pytest.raises(S2VecError, match="no CUDA GPU"):
            resolve_device("cuda")
    model, card = load_model(root, card.model_version)
    assert next(model.parameters()).device.type == "cpu"  # loaded on the CPU, moved by embed
    # Batch size changes nothing: one big batch equals many small ones.
    _, big = embed_partition(root, model, card, "12cd", batch_size=64, device="cpu")
    _, small = embed_partition(root, model, card, "12cd", batch_size=3, device="auto")
    assert big.column("image_token").equals(small.column("image_token"))
    assert np.allclose(
        np.asarray(big.column("embedding").to_pylist()),
        np.asarray(small.column("embedding").to_pylist()),
        atol=1e-5,
    )


# --- bad input ----------------------------------------------------------------------------


def test_no_raster_tiles_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        MissingInputError, match=r"s2vec materialize --stages extract,features,raster first"
    ) as e:
        train_model(tmp_path, config=CONFIG)
    assert str(tmp_path) in str(e.value)
    assert not (tmp_path / "models").exists()
    synthetic_raster_tiles(tmp_path, {"4693": 3}, channels=C)
    with pytest.raises(MissingInputError, match="12cd"):
        train_model(tmp_path, partitions=["12cd"], config=CONFIG)


@pytest.mark.slow
def test_missing_and_incompatible_models(trained, tmp_path: Path) -> None:
    root, card, _ = trained
    with pytest.raises(ModelNotFoundError, match=card.model_version):  # lists what exists
        load_model(root, "0123456789abcdef")
    # Another taxonomy, or another channel count: refused, and nothing is written.
    for name, kw in {
        "taxonomy": {"taxonomy_version": "other"},
        "channels": {"channels": 5},
    }.items():
        other = tmp_path / name
        synthetic_raster_tiles(other, {"4693": 2}, **{"channels": C, **kw})
        shutil.copytree(Path(card.directory), other / "models" / card.model_version)
        with pytest.raises(IncompatibleModelError, match=r"s2vec materialize --stages train"):
            load_model(other, card.model_version)
        model, _ = load_model(other, card.model_version, table=None)
        with pytest.raises(IncompatibleModelError):
            write_embeddings(other, model, card, ["4693"])
        assert not delta_store.table_exists(other, CELL_TABLE)
        assert not delta_store.table_exists(other, IMAGE_TABLE)


#: The keys of model_card.json as the dataclass card wrote them (format unchanged).
CARD_KEYS = {
    "model_version", "config", "profile", "image_level", "pixel_level", "side",
    "taxonomy_version", "channels", "partitions", "normalization", "n_train", "n_val",
    "train_loss", "val_loss", "loss_history", "hardware", "duration_s", "images_seen",
    "images_per_s", "epochs_completed", "steps", "resumed_from", "created",
    "raster_tiles_version", "world_size", "code_version",
}  # fmt: skip


def test_damaged_or_foreign_model_cards_are_named(trained, tmp_path: Path) -> None:
    root, card, _ = trained
    saved = json.loads((Path(card.directory) / "model_card.json").read_text())
    assert set(saved) == CARD_KEYS
    version = card.model_version
    cases = {
        "truncated": (lambda t: t[: len(t) // 2], "not a readable model card"),
        "foreign": (lambda t: '{"name": "some other tool"}', "model_version: field required"),
        "wrong type": (lambda t: t.replace('"n_train": ', '"n_train": "many", "x": '), "n_train"),
    }
    for name, (damage, what) in cases.items():
        other = tmp_path / name
        shutil.copytree(root, other, ignore=shutil.ignore_patterns("_tile_cache"))
        card_file = other / "models" / version / "model_card.json"
        card_file.write_text(damage(card_file.read_text()))
        with pytest.raises(InvalidModelCardError, match=what) as info:
            load_model(other, version)
        message = str(info.value)
        assert str(card_file) in message and "train again" in message and "\n" not in message
    # A card copied into another model's folder is not taken for that model.
    other = tmp_path / "copied"
    shutil.copytree(Path(card.directory), other / "models" / "0123456789abcdef")
    with pytest.raises(InvalidModelCardError, match=f"describes model {version}"):
        load_model(other, "0123456789abcdef", table=None)


def test_loss_curve_png(tmp_path: Path) -> None:
    from s2vec_pipeline.model.loss_curve import draw_loss_curve

    history = {
        "step": [1, 2, 3, 4],
        "train_loss": [1.0, 0.8, 0.7, 0.6],
        "epoch": [0, 1],
        "epoch_step": [2, 4],
        "val_loss": [0.9, 0.65],
    }
    draw_loss_curve(history, tmp_path / "curve.png", title="t", n_train=36, n_val=4)
    with Image.open(tmp_path / "curve.png") as png:
        assert png.size == (800, 480)
        colors = {c for _, c in png.convert("RGB").getcolors(800 * 480)}

    def near(rgb: tuple[int, int, int]) -> bool:
        return any(sum(abs(a - b) for a, b in zip(c, rgb, strict=True)) < 30 for c in colors)

    assert near((31, 119, 180)) and near((255, 127, 14))  # the train line, the val dots
    assert near((200, 0, 0))  # the warning about 4 validation images
    draw_loss_curve({}, tmp_path / "empty.png")  # nothing logged: still a picture
    with Image.open(tmp_path / "empty.png") as png:
        assert png.size == (800, 480)


def _train_in_child(root: str, out: str) -> None:
    card = train_model(root, config=CONFIG)
    Path(out).write_text(card.model_version)


@pytest.mark.slow
def test_concurrent_trainings_of_one_model_wait_and_share_it(tmp_path: Path) -> None:
    """A second process asking for the model another is training waits and gets that model:
    no error, trained once (one attempt in its logs)."""
    import multiprocessing as mp
    import time

    synthetic_raster_tiles(tmp_path, IMAGES, channels=C)
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_train_in_child, args=(str(tmp_path), str(tmp_path / "child")))
    child.start()
    deadline = time.monotonic() + 120
    while not list((tmp_path / "models").glob(".*.partial")):  # the child holds the lock
        assert child.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    card = train_model(tmp_path, config=CONFIG)  # waits for the child instead of failing
    child.join(timeout=120)
    assert child.exitcode == 0
    assert (tmp_path / "child").read_text() == card.model_version
    assert list_models(tmp_path) == [card.model_version]
    logs = Path(card.directory) / "logs"
    assert [p.parent.name for p in logs.glob("*/metrics.csv")] == ["version_0"]
