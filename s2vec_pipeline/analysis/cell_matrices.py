"""Per-cell matrices the probes read, one row per pixel cell (uint64 S2 id): embeddings of any
cell of an embedded partition, raw ``cell_features`` values, their 3×3 neighbourhood sums, and
another embedding source keyed by cell token; plus which model versions embedded which
partitions, and what to run where none did."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from s2vec_pipeline.analysis.labels import KEY_COLUMNS, UnembeddedCellsError, read_table_file
from s2vec_pipeline.cells import s2
from s2vec_pipeline.errors import MissingInputError, S2VecError
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline.storage.tables import (
    CELL_EMBEDDINGS,
    CELL_FEATURES,
    EMPTY_IMAGE_EMBEDDINGS,
    RASTER_TILES,
)


class EmbeddingSourceError(S2VecError):
    """The embeddings to evaluate (a model version, or a ``--with`` file) are missing or bad."""


@dataclass(frozen=True)
class RootGrid:
    """The cell grid of a materialized root (from its ``cell_features`` contract)."""

    pixel_level: int
    image_level: int
    channels: list[str]


def root_grid(root: str | os.PathLike) -> RootGrid:
    """Pixel and image levels and channel names of a materialized root."""
    contract = delta_store.table_contract(root, CELL_FEATURES)
    if contract is None:
        raise MissingInputError(
            f"no cell_features table under {root}: materialize the pipeline there first "
            f"(s2vec materialize --root {root})"
        )
    return RootGrid(
        int(contract["pixel_level"]), int(contract["image_level"]), list(contract["channels"])
    )


def partitions_of(ids: np.ndarray) -> list[str]:
    """The level-6 partitions (tokens, sorted) holding the cells ``ids``."""
    return sorted(set(s2.to_token(s2.parent(ids, 6)).tolist()))


def available_model_versions(root: str | os.PathLike, partitions: Sequence[str]) -> list[str]:
    """Model versions that embedded these partitions (cell rows or empty-image rows)."""
    found: set[str] = set()
    for table in (CELL_EMBEDDINGS, EMPTY_IMAGE_EMBEDDINGS):
        if not delta_store.table_exists(root, table):
            continue
        df = (
            delta_store.scan_table(root, table)
            .filter(pl.col("parent_l6").is_in(list(partitions)))
            .select(pl.col("model_version").unique())
            .collect()
        )
        found.update(df["model_version"].to_list())
    return sorted(found)


def resolve_model_version(
    root: str | os.PathLike, partitions: Sequence[str], model_version: str | None
) -> str:
    """The requested model version, checked, or the newest one with embeddings here."""
    from s2vec_pipeline.model.registry import list_models

    trained = list_models(root)
    embedded = available_model_versions(root, partitions)
    if model_version is not None:
        if model_version not in trained and model_version not in embedded:
            hint = ", ".join(trained) if trained else "none trained yet"
            raise EmbeddingSourceError(
                f"unknown model version {model_version!r} under {root} (available: {hint})"
            )
        if model_version not in embedded:
            raise EmbeddingSourceError(
                f"model {model_version} has no cell embeddings in partitions {list(partitions)}: "
                f"run s2vec materialize --root {root} --stages embed --model-version "
                f"{model_version}"
            )
        return model_version
    if not embedded:
        raise EmbeddingSourceError(
            f"no cell embeddings under {root} for partitions {list(partitions)}: materialize "
            f"the embed stage first (s2vec materialize --root {root})"
        )
    order = {v: k for k, v in enumerate(trained)}
    return max(embedded, key=lambda v: order.get(v, -1))


def _lookup(keys: np.ndarray, table_keys: np.ndarray) -> np.ndarray:
    """Row of each key in ``table_keys`` (-1 where absent)."""
    out = np.full(len(keys), -1, dtype=np.int64)
    if len(table_keys) == 0:
        return out
    order = np.argsort(table_keys, kind="stable")
    pos = np.minimum(np.searchsorted(table_keys[order], keys), len(order) - 1)
    found = table_keys[order][pos] == keys
    out[found] = order[pos[found]]
    return out


def _list_matrix(series: pl.Series) -> np.ndarray:
    width = series.list.len().unique().to_list()
    if len(width) != 1:
        raise EmbeddingSourceError(f"embeddings have mixed widths {sorted(width)}")
    return np.asarray(series.list.to_array(width[0]).to_numpy(), dtype=np.float64)


def _examples(ids: np.ndarray, k: int = 3) -> str:
    return ", ".join(s2.to_token(ids[:k]).tolist()) + (", ..." if len(ids) > k else "")


def _by_partition(ids: np.ndarray) -> str:
    """``12cf: 256 cell(s) (e.g. ...)`` per level-6 partition of ``ids``."""
    parts = s2.to_token(s2.parent(ids, 6))
    out = []
    for p in sorted(set(parts.tolist())):
        mine = ids[parts == p]
        out.append(f"{p}: {len(mine)} cell(s) (e.g. {_examples(mine)})")
    return "; ".join(out)


def embedded_partitions(
    root: str | os.PathLike, partitions: Sequence[str], model_version: str
) -> list[str]:
    """The partitions among ``partitions`` embedded with ``model_version`` (those holding the
    empty image's rows in ``empty_image_embeddings``: every embed run writes them)."""
    if not delta_store.table_exists(root, EMPTY_IMAGE_EMBEDDINGS):
        return []
    df = (
        delta_store.scan_table(root, EMPTY_IMAGE_EMBEDDINGS)
        .filter(
            pl.col("parent_l6").is_in(list(partitions)) & (pl.col("model_version") == model_version)
        )
        .select(pl.col("parent_l6").unique())
        .collect()
    )
    return sorted(df["parent_l6"].to_list())


def embedding_matrix(root: str | os.PathLike, ids: np.ndarray, model_version: str) -> np.ndarray:
    """(n, D) embeddings of any pixel cells ``ids`` (uint64) of partitions embedded with
    ``model_version``: the cell's row of ``cell_embeddings`` when its image has data, else the
    empty image's embedding at the cell's position (``empty_image_embeddings``).

    The one lookup behind ``s2vec evaluate`` and area pooling. Cells outside every partition
    embedded with this model raise ``UnembeddedCellsError`` naming them and their partitions.
    """
    ids = np.asarray(ids, dtype=np.uint64)
    signed = s2.to_signed(ids)
    df = (
        delta_store.scan_table(root, CELL_EMBEDDINGS)
        .filter(
            pl.col("parent_l6").is_in(partitions_of(ids))
            & (pl.col("model_version") == model_version)
            & pl.col("cell_id").is_in(np.unique(signed).tolist())
        )
        .select("cell_id", "embedding")
        .collect()
    )
    rows = _lookup(signed, df["cell_id"].to_numpy())
    stored = _list_matrix(df["embedding"]) if df.height else None
    missing = np.flatnonzero(rows < 0)
    if len(missing) == 0 and stored is not None:
        return stored[rows]
    pixel_level = int(s2.cell_level(ids[:1])[0])
    image_level = root_grid(root).image_level
    side = 1 << (pixel_level - image_level)
    empty = _empty_matrices(root, partitions_of(ids[missing]), model_version, side)
    parents = s2.to_token(s2.parent(ids[missing], 6))
    outside = np.array([p not in empty for p in parents.tolist()], dtype=bool)
    if outside.any():
        raise UnembeddedCellsError(
            f"{int(outside.sum())} of {len(ids)} label cell(s) lie outside every partition "
            f"embedded with model {model_version} under {root}, by partition: "
            f"{_by_partition(ids[missing][outside])}. "
            + materialize_hint(root, sorted(set(parents[outside].tolist())), model_version)
        )
    row, col = s2.child_position(ids[missing], image_level)
    pixel = row * side + col
    width = next(iter(empty.values())).shape[1]
    if stored is not None and stored.shape[1] != width:
        raise EmbeddingSourceError(f"embeddings have mixed widths {[stored.shape[1], width]}")
    out = np.empty((len(ids), width), dtype=np.float64)
    if stored is not None:
        out[rows >= 0] = stored[rows[rows >= 0]]
    for p in set(parents.tolist()):
        sel = parents == p
        out[missing[sel]] = empty[p][pixel[sel]]
    return out


def materialize_hint(root: str | os.PathLike, partitions: list[str], model_version: str) -> str:
    """What to run for partitions not embedded with the model: embed the ones with raster
    tiles, materialize the others; or drop the labels there."""
    tiled = set(delta_store.partition_keys(root, RASTER_TILES))
    embed = [p for p in partitions if p in tiled]
    build = [p for p in partitions if p not in tiled]
    hints = []
    if build:
        hints.append(
            f"materialize {','.join(build)} (s2vec materialize --root {root} --cells "
            f"{','.join(build)} --model-version {model_version})"
        )
    if embed:
        hints.append(
            f"embed {','.join(embed)}, materialized but not embedded with this model "
            f"(s2vec materialize --root {root} --cells {','.join(embed)} --stages embed "
            f"--model-version {model_version})"
        )
    return "Either " + ", or ".join(hints) + ", or drop those labels"


def _empty_matrices(
    root: str | os.PathLike, partitions: Sequence[str], model_version: str, side: int
) -> dict[str, np.ndarray]:
    """Per partition embedded with ``model_version``: its (S*S, D) empty-image embeddings."""
    if not delta_store.table_exists(root, EMPTY_IMAGE_EMBEDDINGS):
        return {}
    df = (
        delta_store.scan_table(root, EMPTY_IMAGE_EMBEDDINGS)
        .filter(
            pl.col("parent_l6").is_in(list(partitions)) & (pl.col("model_version") == model_version)
        )
        .select("parent_l6", "pixel", "embedding")
        .collect()
    )
    out = {}
    for (p,), group in df.group_by("parent_l6"):
        rows = group.sort("pixel")
        if rows["pixel"].to_list() != list(range(side * side)):
            raise EmbeddingSourceError(
                f"empty_image_embeddings of partition {p}, model {model_version}: "
                f"{rows.height} rows, expected {side * side}: re-embed that partition"
            )
        out[str(p)] = _list_matrix(rows["embedding"])
    return out


def raw_feature_matrix(
    root: str | os.PathLike, ids: np.ndarray, channels: Sequence[str]
) -> np.ndarray:
    """(n, C) ``cell_features`` values (not log-scaled) of ``ids``; zero where no row."""
    signed = s2.to_signed(ids)
    df = (
        delta_store.scan_table(root, CELL_FEATURES)
        .filter(
            pl.col("parent_l6").is_in(partitions_of(ids))
            & pl.col("cell_id").is_in(np.unique(signed).tolist())
        )
        .select("cell_id", *channels)
        .collect()
    )
    values = df.select(list(channels)).to_numpy().astype(np.float64)
    rows = _lookup(signed, df["cell_id"].to_numpy())
    out = np.zeros((len(ids), len(channels)), dtype=np.float64)
    out[rows >= 0] = values[rows[rows >= 0]]
    return out


def neighbourhood_ids(ids: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 9) ids of each cell's 3×3 block by S2 (i, j) on its face, and a validity mask
    (False where the neighbour would lie across the cube-face edge)."""
    face, i, j = s2.face_ij(ids, level)
    i, j = i.astype(np.int64), j.astype(np.int64)
    di, dj = np.meshgrid([-1, 0, 1], [-1, 0, 1], indexing="ij")
    ii = i[:, None] + di.ravel()[None, :]
    jj = j[:, None] + dj.ravel()[None, :]
    size = 1 << level
    valid = (ii >= 0) & (ii < size) & (jj >= 0) & (jj < size)
    ii = np.where(valid, ii, i[:, None])
    jj = np.where(valid, jj, j[:, None])
    ff = np.broadcast_to(face[:, None], ii.shape)
    return s2.cell_id_from_face_ij(ff, ii, jj, level), valid


def raw_neighbourhood_matrix(
    root: str | os.PathLike, ids: np.ndarray, level: int, channels: Sequence[str]
) -> np.ndarray:
    """(n, C) sum of ``cell_features`` values over each cell's 3×3 neighbourhood."""
    nbr, valid = neighbourhood_ids(ids, level)
    values = raw_feature_matrix(root, nbr.ravel(), channels).reshape(len(ids), 9, len(channels))
    return (values * valid[:, :, None]).sum(axis=1)


def read_embedding_file(path: str | os.PathLike) -> pl.DataFrame:
    """An embedding source keyed by cell token: a ``cell_token`` column and either one list
    column (e.g. ``embedding``) or numeric columns. Returns ``cell_token`` + ``embedding``."""
    df = read_table_file(path, "--with embeddings")
    if "cell_token" not in df.columns:
        raise EmbeddingSourceError(
            f"--with file {path} needs a cell_token column (columns: {df.columns})"
        )
    lists = [c for c, t in df.schema.items() if isinstance(t, pl.List | pl.Array)]
    numeric = [c for c, t in df.schema.items() if t.is_numeric() and c not in KEY_COLUMNS]
    if len(lists) == 1:
        emb = df[lists[0]].cast(pl.List(pl.Float64))
    elif not lists and numeric:
        emb = df.select(pl.concat_list([pl.col(c).cast(pl.Float64) for c in numeric]))
        emb = emb.to_series()
    else:
        raise EmbeddingSourceError(
            f"--with file {path} needs exactly one list column or numeric columns next to "
            f"cell_token (list columns: {lists})"
        )
    return pl.DataFrame({"cell_token": df["cell_token"].cast(pl.String), "embedding": emb})


def with_matrix(other: pl.DataFrame, ids: np.ndarray) -> np.ndarray:
    """(n, D') rows of another embedding source for the label cells. Its tokens may be pixel
    cells or coarser cells of one level (e.g. image tokens): each applies to the cells inside."""
    if other.height == 0:
        raise EmbeddingSourceError("the --with embeddings are empty")
    other_ids = s2.from_token(other["cell_token"].to_numpy().astype(str))
    levels = np.unique(s2.cell_level(other_ids))
    if len(levels) != 1:
        raise EmbeddingSourceError(
            f"--with cell tokens mix levels {levels.tolist()}: give one level"
        )
    level = int(levels[0])
    if level > int(s2.cell_level(ids[:1])[0]):
        raise EmbeddingSourceError(
            f"--with cells are level {level}, finer than the label cells: give pixel or coarser "
            f"cells"
        )
    if len(np.unique(other_ids)) != len(other_ids):
        raise EmbeddingSourceError("--with has duplicate cell tokens")
    rows = _lookup(s2.to_signed(s2.parent(ids, level)), s2.to_signed(other_ids))
    missing = rows < 0
    if missing.any():
        tokens = s2.to_token(ids[missing][:3]).tolist()
        raise EmbeddingSourceError(
            f"{int(missing.sum())} of {len(ids)} label cell(s) have no row in the --with "
            f"embeddings (e.g. {', '.join(tokens)})"
        )
    mat = _list_matrix(other["embedding"])
    if not np.isfinite(mat).all():
        raise EmbeddingSourceError("--with embeddings hold NaN or infinite values")
    return mat[rows]
