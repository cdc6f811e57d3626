"""Independent checks of the table contracts on a materialized root, written without the
project's S2 or raster code: positions and parents come from the official S2 library
(s2geometry), tensors are rebuilt from ``cell_features`` with plain numpy, tables are read with
polars. Each function returns the list of problems found (empty: the contract holds).

A second statement of the contracts on purpose: the pipeline's own (``storage.tables``, the
writers' schemas, ``delta_store``'s stored contract) is the one home; this is the tests'
oracle, so it must not import any of it (a shared bug would then pass unseen)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import s2geometry as s2g

ID_COLUMNS = {"parent_l6", "image_token", "cell_token", "cell_id", "row", "col", "taxonomy_version"}


def _official(signed_id: int) -> s2g.S2CellId:
    return s2g.S2CellId(signed_id & ((1 << 64) - 1))


def _signed(unsigned: int) -> int:
    return unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned


def data_layer_problems(root: Path, image_level: int, pixel_level: int) -> list[str]:
    side = 1 << (pixel_level - image_level)
    cells = pl.read_delta(str(root / "cell_features"))
    raster = pl.read_delta(str(root / "raster_tiles"))
    features = pl.read_delta(str(root / "osm_features"))
    problems: list[str] = []
    if not (cells.height and raster.height and features.height):
        return [f"empty tables: {features.height} {cells.height} {raster.height}"]
    channels = [c for c, t in cells.schema.items() if c not in ID_COLUMNS and t.is_numeric()]
    for row in cells.select("cell_token", "cell_id", "image_token", "parent_l6", "row", "col").rows(
        named=True
    ):
        cid = s2g.S2CellId.FromToken(row["cell_token"])
        if cid.level() != pixel_level:
            problems.append(f"{row['cell_token']} is at level {cid.level()}")
            continue
        if _signed(cid.id()) != row["cell_id"]:
            problems.append(f"{row['cell_token']}: cell_id {row['cell_id']} != signed S2 id")
        if cid.parent(image_level).ToToken() != row["image_token"]:
            problems.append(f"{row['cell_token']}: image {row['image_token']}")
        if cid.parent(6).ToToken() != row["parent_l6"]:
            problems.append(f"{row['cell_token']}: parent_l6 {row['parent_l6']}")
        _, i, j, _ = cid.ToFaceIJOrientation()
        _, ii, jj, _ = cid.parent(image_level).ToFaceIJOrientation()
        want = (
            (i >> (30 - pixel_level)) - (ii >> (30 - image_level)) * side,
            (j >> (30 - pixel_level)) - (jj >> (30 - image_level)) * side,
        )
        if want != (row["row"], row["col"]):
            problems.append(f"{row['cell_token']} at {(row['row'], row['col'])}, S2 says {want}")
    by_image = cells.partition_by("image_token", as_dict=True)
    for r in raster.rows(named=True):
        tensor = np.asarray(r["tensor"], dtype=np.float64)
        if tensor.size != len(channels) * side * side:
            problems.append(f"image {r['image_token']}: tensor of {tensor.size} values")
            continue
        pixels = by_image.get((r["image_token"],))
        if pixels is None:
            problems.append(f"image {r['image_token']} has no cell_features rows")
            continue
        want = np.zeros((len(channels), side, side))
        values = pixels.select(channels).to_numpy().astype(np.float64)
        want[:, pixels["row"].to_numpy(), pixels["col"].to_numpy()] = np.log1p(values).T
        if not np.allclose(tensor.reshape(want.shape), want, rtol=1e-4, atol=1e-5):
            problems.append(f"image {r['image_token']}: tensor != log1p(cell_features)")
        if r["nonempty_pixels"] != pixels.height:
            problems.append(f"image {r['image_token']}: nonempty_pixels {r['nonempty_pixels']}")
    if set(cells["image_token"].unique()) != set(raster["image_token"]):
        problems.append("images with data differ between cell_features and raster_tiles")
    if cells.height != cells["cell_token"].n_unique():
        problems.append("duplicate cell rows in cell_features")
    return problems


def model_problems(root: Path, pixel_level: int, sample_images: int = 6) -> list[str]:
    cells = pl.read_delta(str(root / "cell_embeddings"))
    images = pl.read_delta(str(root / "image_embeddings"))
    raster = pl.read_delta(str(root / "raster_tiles")).select("image_token")
    problems: list[str] = []
    tokens = sorted(set(raster["image_token"]))
    side_sq = 4 ** (pixel_level - s2g.S2CellId.FromToken(tokens[0]).level())
    if set(cells["image_token"].unique()) != set(tokens):
        problems.append("cell_embeddings' images differ from raster_tiles' images")
    if cells.height != side_sq * len(tokens) or images.height != len(tokens):
        problems.append(f"rows: {cells.height} cells, {images.height} images for {len(tokens)}")
    if cells["cell_token"].n_unique() != cells.height:
        problems.append("duplicate cell tokens in cell_embeddings")
    for token in tokens[:sample_images]:  # every S2 child of the image, and only those
        image = s2g.S2CellId.FromToken(token)
        child, end, kids = image.child_begin(pixel_level), image.child_end(pixel_level), set()
        while child != end:
            kids.add(child.ToToken())
            child = child.next()
        got = set(cells.filter(pl.col("image_token") == token)["cell_token"])
        if got != kids:
            problems.append(f"image {token}: {len(got ^ kids)} cells differ from its S2 children")
    emb = np.asarray(cells["embedding"].to_list(), dtype=np.float32)
    if emb.ndim != 2 or not np.isfinite(emb).all():
        return [*problems, "embeddings are ragged or not finite"]
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    pick = np.random.default_rng(0).choice(len(unit), size=min(200, len(unit)), replace=False)
    sims = unit[pick] @ unit.T
    if float(sims.mean()) > 0.99:
        problems.append(f"embeddings collapsed: mean cosine {sims.mean():.4f}")
    return problems
