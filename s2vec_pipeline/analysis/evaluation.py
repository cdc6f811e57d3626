"""Linear probes of the embeddings on per-cell labels, against raw-feature baselines.

``evaluate(root, labels)`` predicts each numeric target of a label table from several feature
sets with a ridge probe (standardized features, regularization chosen by inner
cross-validation on the training folds only) under two protocols, as in the S2Vec paper:

* ``random``: k folds of cells drawn at random (interpolation);
* ``spatial``: k folds of whole coarser cells (the image cells by default, or any level-N
  parents), so no test cell shares its block with a training cell (geographic adaptation).

Every method sees exactly the same folds. Methods:

* ``mean``: the training fold's mean (a floor: R² ≈ 0);
* ``s2vec``: the cell's embedding (``cell_embeddings``, one model version);
* ``raw``: log1p of the cell's ``cell_features`` values (zero for cells without a row);
* ``raw_3x3``: ``raw`` plus log1p of the summed values of the cell's 3×3 neighbourhood
  (neighbours by S2 (i, j) on the same face; one across a cube-face edge counts as empty);
* ``raw_pca``: the standardized ``raw`` features projected on their first D principal
  components (D = the embedding width), fitted on the training fold;
* ``s2vec+raw``: fusion, the embedding next to ``raw``;
* ``with`` / ``s2vec+with``: another embedding source (``with_embeddings``, keyed by cell
  token) alone and next to the embedding;
* ``s2vec_mlp`` / ``raw_mlp`` (``mlp=True``): a small MLP probe instead of ridge.

Metrics per fold: R², MAE, RMSE (scikit-learn); the report gives their mean and standard
deviation over folds for each (target, protocol, method), and keeps every fold's values and
the chosen ridge alpha.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from s2vec_pipeline.cells import s2
from s2vec_pipeline.errors import MissingInputError, S2VecError
from s2vec_pipeline.storage import delta_store, fs

CELL_EMBEDDINGS = "cell_embeddings"
CELL_FEATURES = "cell_features"
EMPTY_EMBEDDINGS = "empty_image_embeddings"  # model.embed.EMPTY_TABLE (no torch import here)
PROTOCOLS = ("random", "spatial")
#: Ridge penalties tried by the inner cross-validation (on standardized features).
RIDGE_ALPHAS = tuple(10.0**k for k in range(-3, 6))
INNER_FOLDS = 3
#: Label columns that are keys, never targets.
KEY_COLUMNS = ("cell_token", "cell_id", "lat", "lon", "lng", "parent_l6", "image_token")


class LabelError(S2VecError):
    """A label file or label table cannot be evaluated (format, keys, targets, rows)."""


class UnembeddedCellsError(LabelError):
    """Labelled cells or areas lie outside every partition embedded with the model."""


class EmbeddingSourceError(S2VecError):
    """The embeddings to evaluate (a model version, or a ``--with`` file) are missing or bad."""


# --- inputs ------------------------------------------------------------------------------


def read_table_file(path: str | os.PathLike, what: str = "labels") -> pl.DataFrame:
    """A Parquet or CSV file as a DataFrame, with a one-line error when it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise LabelError(f"{what} file {p} does not exist: give a .parquet or .csv file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(p)
        if suffix == ".csv":
            # Tokens like "4693" look numeric: keep key columns as strings.
            return pl.read_csv(p, schema_overrides={"cell_token": pl.String}, infer_schema=True)
    except Exception as e:  # polars/arrow raise many types for a malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LabelError(f"cannot read {what} file {p}: {first}") from e
    raise LabelError(f"{what} file {p} must end in .parquet or .csv, got {p.suffix or 'none'}")


def _pixel_level(root: str | os.PathLike) -> tuple[int, int, list[str]]:
    contract = delta_store.table_contract(root, CELL_FEATURES)
    if contract is None:
        raise MissingInputError(
            f"no cell_features table under {root}: materialize the pipeline there first "
            f"(s2vec materialize --root {root})"
        )
    return int(contract["pixel_level"]), int(contract["image_level"]), list(contract["channels"])


def label_cells(labels: pl.DataFrame, pixel_level: int) -> np.ndarray:
    """The pixel cell (uint64 id) of each label row: from ``cell_token``, else ``lat``/``lon``."""
    if labels.height == 0:
        raise LabelError("the labels have no rows")
    if "cell_token" in labels.columns:
        col = labels["cell_token"]
        if col.null_count():
            raise LabelError(f"column cell_token has {col.null_count()} empty value(s)")
        ids = s2.from_token(col.cast(pl.String).to_numpy().astype(str))
        levels = s2.cell_level(ids)
        bad = levels != pixel_level
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise LabelError(
                f"{int(bad.sum())} label cell token(s) are not at the root's pixel level "
                f"{pixel_level} (e.g. {col[k]!r} is level {int(levels[k])}): label pixel cells, "
                f"or give lat/lon columns instead"
            )
        return ids
    lon_col = "lon" if "lon" in labels.columns else "lng" if "lng" in labels.columns else None
    if "lat" not in labels.columns or lon_col is None:
        raise LabelError(
            f"the labels need a cell_token column or lat and lon columns; columns are "
            f"{labels.columns}"
        )
    try:
        lat = labels["lat"].cast(pl.Float64).to_numpy()
        lon = labels[lon_col].cast(pl.Float64).to_numpy()
    except pl.exceptions.PolarsError as e:
        raise LabelError(f"lat/{lon_col} columns must be numbers: {e}") from e
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise LabelError(
            f"{int(bad.sum())} label row(s) have missing or out-of-range lat/{lon_col} "
            f"(first: row {k}: {lat[k]}, {lon[k]})"
        )
    return s2.latlng_to_cell_id(lat, lon, pixel_level)


def target_columns(labels: pl.DataFrame, targets: Sequence[str] | None = None) -> list[str]:
    """The numeric, non-key columns (or the requested ones, checked)."""
    numeric = [c for c, t in labels.schema.items() if t.is_numeric() and c not in KEY_COLUMNS]
    if targets:
        unknown = [t for t in targets if t not in labels.columns]
        if unknown:
            raise LabelError(f"target column(s) {unknown} not in the labels ({labels.columns})")
        not_num = [t for t in targets if t not in numeric]
        if not_num:
            raise LabelError(f"target column(s) {not_num} are not numeric")
        return list(targets)
    if not numeric:
        raise LabelError(
            f"the labels have no numeric target column (columns: {labels.columns}; keys "
            f"{list(KEY_COLUMNS)} are not targets)"
        )
    return numeric


def _target_matrix(labels: pl.DataFrame, targets: list[str]) -> np.ndarray:
    y = labels.select([pl.col(t).cast(pl.Float64) for t in targets]).to_numpy()
    bad = ~np.isfinite(y)
    if bad.any():
        counts = {t: int(n) for t, n in zip(targets, bad.sum(axis=0), strict=True) if n}
        raise LabelError(
            f"target values are missing, NaN or infinite: {counts} row(s); drop or fill them"
        )
    constant = [t for t, col in zip(targets, y.T, strict=True) if len(col) > 1 and np.ptp(col) == 0]
    if constant:
        raise LabelError(f"target column(s) {constant} hold one value only: nothing to predict")
    return y


# --- features ----------------------------------------------------------------------------


def _partitions_of(ids: np.ndarray) -> list[str]:
    return sorted(set(s2.to_token(s2.parent(ids, 6)).tolist()))


def available_model_versions(root: str | os.PathLike, partitions: Sequence[str]) -> list[str]:
    """Model versions that embedded these partitions (cell rows or empty-image rows)."""
    found: set[str] = set()
    for table in (CELL_EMBEDDINGS, EMPTY_EMBEDDINGS):
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
    if not delta_store.table_exists(root, EMPTY_EMBEDDINGS):
        return []
    df = (
        delta_store.scan_table(root, EMPTY_EMBEDDINGS)
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
            pl.col("parent_l6").is_in(_partitions_of(ids))
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
    image_level, side = _image_level_and_side(root, pixel_level)
    empty = _empty_matrices(root, _partitions_of(ids[missing]), model_version, side)
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
    tiled = set(delta_store.partition_keys(root, "raster_tiles"))
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


def _image_level_and_side(root: str | os.PathLike, pixel_level: int) -> tuple[int, int]:
    contract = delta_store.table_contract(root, CELL_FEATURES) or {}
    image_level = int(contract.get("image_level", pixel_level))
    return image_level, 1 << (pixel_level - image_level)


def _empty_matrices(
    root: str | os.PathLike, partitions: Sequence[str], model_version: str, side: int
) -> dict[str, np.ndarray]:
    """Per partition embedded with ``model_version``: its (S*S, D) empty-image embeddings."""
    if not delta_store.table_exists(root, EMPTY_EMBEDDINGS):
        return {}
    df = (
        delta_store.scan_table(root, EMPTY_EMBEDDINGS)
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
            pl.col("parent_l6").is_in(_partitions_of(ids))
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


# --- folds -------------------------------------------------------------------------------


def assign_folds(
    ids: np.ndarray, folds: int, seed: int, block_level: int | None = None
) -> np.ndarray:
    """Fold number of each cell: random k-fold, or (with ``block_level``) whole level-N
    parents per fold, balanced in size (scikit-learn's ``KFold`` / ``GroupKFold``)."""
    from sklearn.model_selection import GroupKFold, KFold

    out = np.full(len(ids), -1, dtype=np.int64)
    if block_level is None:
        splitter = KFold(folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(ids)))
    else:
        groups = s2.to_signed(s2.parent(ids, block_level))
        splitter = GroupKFold(folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(ids)), groups=groups)
    for k, (_, test) in enumerate(splits):
        out[test] = k
    return out


# --- the probe ---------------------------------------------------------------------------


def select_alphas(
    x: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Ridge penalty per target column of ``y`` with the least squared error over ``splits``.

    Each inner split standardizes on its own training rows (as the final pipeline does), and
    one SVD of those rows gives the ridge solution for every alpha at once: the grouped inner
    cross-validation scikit-learn's ``RidgeCV`` lacks (its fast path is leave-one-out, which
    leaks neighbouring cells into the spatial protocol's model selection).
    """
    alphas = np.asarray(RIDGE_ALPHAS)
    errors = np.zeros((len(alphas), y.shape[1]))
    for tr, va in splits:
        mean, std = x[tr].mean(axis=0), x[tr].std(axis=0)
        std[std == 0] = 1.0  # StandardScaler's rule for constant columns
        xt, xv = (x[tr] - mean) / std, (x[va] - mean) / std
        y_mean = y[tr].mean(axis=0)
        try:
            u, sv, vt = np.linalg.svd(xt, full_matrices=False)
        except np.linalg.LinAlgError:  # LAPACK's divide and conquer can fail; QR-based won't
            import scipy.linalg

            u, sv, vt = scipy.linalg.svd(xt, full_matrices=False, lapack_driver="gesvd")
        uty = u.T @ (y[tr] - y_mean)
        xv_v = xv @ vt.T
        for k, alpha in enumerate(alphas):
            pred = xv_v @ ((sv / (sv**2 + alpha))[:, None] * uty) + y_mean
            errors[k] += ((pred - y[va]) ** 2).sum(axis=0)
    return alphas[errors.argmin(axis=0)]


def _inner_splits(
    n_train: int, groups: np.ndarray | None, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold, KFold

    n_groups = len(np.unique(groups)) if groups is not None else 0
    if groups is not None and n_groups >= 2:
        splitter = GroupKFold(min(INNER_FOLDS, n_groups), shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(n_train), groups=groups))
    k = min(INNER_FOLDS, n_train)
    return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(n_train)))


def fit_predict(
    x: np.ndarray | None,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    inner_groups: np.ndarray | None,
    seed: int,
    pca_components: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(predictions for ``test``, ridge alpha per target) of a probe fitted on ``train``.

    ``y`` is (n, T). The probe is scikit-learn's standardize (→ PCA → standardize) → ridge,
    with one alpha per target chosen by ``select_alphas`` on inner folds of ``train`` (grouped
    like the outer folds when ``inner_groups`` is given). ``x`` None: the training mean.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if x is None:
        return np.broadcast_to(y[train].mean(axis=0), (len(test), y.shape[1])).copy(), None
    x_train = x[train]
    reduce = None
    keep = slice(None)
    if pca_components is not None:
        # PCA is fitted on the outer training fold only; the alpha search runs on its scores.
        # Components without variance (more requested than the features' rank) are dropped:
        # standardizing their rounding noise would swamp the solve.
        reduce = make_pipeline(StandardScaler(), PCA(pca_components, random_state=0))
        x_train = reduce.fit_transform(x_train)
        variance = reduce[-1].explained_variance_
        keep = variance > 1e-9 * max(float(variance.max()), 1e-300)
        x_train = x_train[:, keep]
        if x_train.shape[1] == 0:  # constant features on this fold: the probe is the mean
            return fit_predict(None, y, train, test, inner_groups, seed)
    alphas = select_alphas(x_train, y[train], _inner_splits(len(train), inner_groups, seed))
    probe = make_pipeline(StandardScaler(), Ridge(alpha=alphas))
    probe.fit(x_train, y[train])
    x_test = x[test] if reduce is None else reduce.transform(x[test])[:, keep]
    return probe.predict(x_test).reshape(len(test), -1), alphas


def fit_predict_mlp(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int
) -> np.ndarray:
    """A small MLP probe: standardized features → 64 ReLU units → standardized targets
    (scikit-learn's ``MLPRegressor``, L-BFGS, L2 penalty 1.0, at most 300 iterations: the
    full-batch solver suits these few-thousand-row probes far better than Adam)."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    net = MLPRegressor(
        hidden_layer_sizes=(64,), solver="lbfgs", alpha=1.0, max_iter=300, random_state=seed
    )
    probe = TransformedTargetRegressor(
        regressor=make_pipeline(StandardScaler(), net), transformer=StandardScaler()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: the fit is used as is
        probe.fit(x[train], y[train])
    return np.asarray(probe.predict(x[test])).reshape(len(test), -1)


def fold_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    return {
        # R² needs two test rows (sklearn warns and returns NaN): say NaN without the warning
        "r2": float(r2_score(y_true, y_pred)) if len(y_true) >= 2 else float("nan"),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "rmse": float(root_mean_squared_error(y_true, y_pred)),
    }


# --- the report --------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One (target, protocol, method): metrics per fold and their mean / std over folds."""

    target: str
    protocol: str
    method: str
    n_features: int
    folds: list[dict[str, float | int | None]]

    def stat(self, metric: str) -> tuple[float, float]:
        """(mean, standard deviation) over the folds where the metric is defined."""
        vals = np.array([f[metric] for f in self.folds], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if len(vals) == 0:
            return float("nan"), float("nan")
        return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "target": self.target,
            "protocol": self.protocol,
            "method": self.method,
            "n_features": self.n_features,
        }
        for m in ("r2", "mae", "rmse"):
            mean, std = self.stat(m)
            d[m] = {"mean": mean, "std": std}
        d["folds"] = self.folds
        return d


@dataclass
class EvaluationReport:
    """Everything ``evaluate`` measured; ``table()`` for people, ``to_dict()`` for JSON."""

    root: str
    model_version: str
    pixel_level: int
    block_level: int
    n_rows: int
    targets: list[str]
    methods: list[str]
    folds: dict[str, int]
    n_blocks: int
    embedding_dim: int
    n_channels: int
    seed: int
    results: list[MethodResult] = field(default_factory=list)
    fold_of_row: dict[str, list[int]] = field(default_factory=dict, repr=False)
    notes: list[str] = field(default_factory=list)
    unit: str = "cell"  # what a label row is: a pixel "cell" or an "area" (polygon)

    def result(self, target: str, protocol: str, method: str) -> MethodResult:
        for r in self.results:
            if (r.target, r.protocol, r.method) == (target, protocol, method):
                return r
        raise KeyError((target, protocol, method))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results"] = [r.summary() for r in self.results]
        return d

    def to_json(self) -> str:
        """Strict JSON: undefined values (NaN R² of a one-row fold) become null."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not np.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return json.dumps(clean(self.to_dict()), indent=2, allow_nan=False)

    def _rows(self) -> list[tuple[str, str, list[list[str]]]]:
        out = []
        for target in self.targets:
            for protocol in PROTOCOLS:
                res = [r for r in self.results if r.target == target and r.protocol == protocol]
                if not res:
                    continue
                scored = [r for r in res if np.isfinite(r.stat("r2")[0])]
                best = max(scored, key=lambda r: r.stat("r2")[0]).method if scored else None
                rows = []
                for r in res:
                    cells = [r.method + (" *" if r.method == best else ""), str(r.n_features)]
                    for m in ("r2", "mae", "rmse"):
                        mean, std = r.stat(m)
                        cells.append(f"{mean:.3f} ± {std:.3f}")
                    rows.append(cells)
                out.append((target, protocol, rows))
        return out

    def _protocol_title(self, protocol: str) -> str:
        k = self.folds[protocol]
        if protocol == "random":
            return f"random {k}-fold"
        return f"spatial {k}-fold, whole level-{self.block_level} cells held out"

    def table(self) -> str:
        """A plain-text table per target and protocol (* = best mean R²)."""
        head = ["method", "features", "R²", "MAE", "RMSE"]
        lines = [
            f"model {self.model_version}: {self.n_rows} labelled {self.unit}s (level "
            f"{self.pixel_level} pixels), {self.n_blocks} level-{self.block_level} blocks; "
            f"mean ± std over folds"
        ]
        for target, protocol, rows in self._rows():
            widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
            lines.append("")
            lines.append(f"{target} — {self._protocol_title(protocol)}")
            fmt = [str.ljust, str.rjust, str.rjust, str.rjust, str.rjust]
            for r in [head, *rows]:
                lines.append(
                    "  ".join(f(c, w) for f, c, w in zip(fmt, r, widths, strict=True)).rstrip()
                )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The same tables as Markdown (for Dagster metadata)."""
        lines = [
            f"Model `{self.model_version}`, {self.n_rows} labelled {self.unit}s, mean ± std over "
            "folds"
            " (**bold** = best mean R²)."
        ]
        for target, protocol, rows in self._rows():
            lines += [
                "",
                f"**{target}**, {self._protocol_title(protocol)}",
                "",
                "| method | features | R² | MAE | RMSE |",
                "|---|---:|---:|---:|---:|",
            ]
            for r in rows:
                name = f"**{r[0][:-2]}**" if r[0].endswith(" *") else r[0]
                lines.append(f"| {name} | {' | '.join(r[1:])} |")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def evaluate(
    root: str | os.PathLike,
    labels: pl.DataFrame,
    model_version: str | None = None,
    with_embeddings: pl.DataFrame | None = None,
    folds: int = 5,
    seed: int = 0,
    block_level: int | None = None,
    targets: Sequence[str] | None = None,
    mlp: bool = False,
    areas: np.ndarray | None = None,
) -> EvaluationReport:
    """Ridge probes of every target under both protocols; see the module docstring.

    ``labels``: a ``cell_token`` (pixel level) or ``lat``/``lon`` key and numeric targets.
    ``with_embeddings``: ``cell_token`` + ``embedding`` (``read_embedding_file``).
    ``block_level``: level of the cells held out whole by the spatial protocol (default: the
    image level). ``mlp``: also a small MLP probe on the embeddings (``s2vec_mlp``) and on the
    raw features (``raw_mlp``), on the same folds. ``areas``: one polygon (shapely, lng/lat
    degrees) per label row; every feature is then pooled over the pixel cells covering the
    area, weighted by the area inside each (``areas.py``), and ``labels`` need no cell key.
    """
    root = str(root)
    if isinstance(folds, bool) or not 2 <= int(folds) <= 100:
        raise LabelError(f"folds must be an integer in 2..100, got {folds}")
    pixel_level, image_level, channels = _pixel_level(root)
    block_level = image_level if block_level is None else int(block_level)
    if not 0 <= block_level < pixel_level:
        raise LabelError(
            f"block level must be in 0..{pixel_level - 1} (coarser than the pixels), got "
            f"{block_level}"
        )
    target_names = target_columns(labels, targets)
    y_all = _target_matrix(labels, target_names)
    pool = None
    if areas is None:
        ids = label_cells(labels, pixel_level)
        cells = ids
    else:
        from s2vec_pipeline.analysis.areas import area_cells, check_embedded, check_geometries

        if len(areas) != labels.height:
            raise LabelError(f"{len(areas)} areas for {labels.height} label rows")
        check_geometries(np.asarray(areas, dtype=object))
        pieces = area_cells(areas, pixel_level)
        cells, pool = pieces.weights()
        ids = pieces.representative()  # each area's place, for the spatial folds
    n = len(ids)
    if n < folds:
        raise LabelError(
            f"the labels have {n} row(s); {folds}-fold evaluation needs at least {folds} "
            f"labelled {'cells' if areas is None else 'areas'} (and many more for stable numbers)"
        )
    uniq, counts = np.unique(ids, return_counts=True)
    if areas is None and (counts > 1).any():
        dup = s2.to_token(uniq[counts > 1][:3]).tolist()
        raise LabelError(
            f"{int((counts > 1).sum())} cell(s) are labelled more than once (e.g. "
            f"{', '.join(dup)}): give one row per cell (aggregate duplicates first)"
        )
    version = resolve_model_version(root, _partitions_of(cells), model_version)
    if areas is not None:
        check_embedded(root, pieces, version)

    def pooled(x: np.ndarray) -> np.ndarray:
        # Areas: the area-weighted mean over the pixel cells covering each area.
        return x if pool is None else np.asarray(pool @ x)

    emb = pooled(embedding_matrix(root, cells, version))
    raw_cells = np.log1p(raw_feature_matrix(root, cells, channels))
    raw = pooled(raw_cells)
    nbr = np.log1p(raw_neighbourhood_matrix(root, cells, pixel_level, channels))
    raw3 = pooled(np.hstack([raw_cells, nbr]))
    dim = emb.shape[1]
    features: dict[str, tuple[np.ndarray | None, int | None]] = {
        "mean": (None, None),
        "s2vec": (emb, None),
        "raw": (raw, None),
        "raw_3x3": (raw3, None),
        "raw_pca": (raw, dim),
        "s2vec+raw": (np.hstack([emb, raw]), None),
    }
    if with_embeddings is not None:
        other = pooled(with_matrix(with_embeddings, cells))
        features["with"] = (other, None)
        features["s2vec+with"] = (np.hstack([emb, other]), None)
    if mlp:
        features["s2vec_mlp"] = (emb, None)
        features["raw_mlp"] = (raw, None)

    groups = s2.to_signed(s2.parent(ids, block_level))
    n_blocks = len(np.unique(groups))
    notes: list[str] = []
    if areas is not None:
        notes.append(
            f"{n} areas: each feature is the area-weighted mean over the {len(cells)} "
            f"level-{pixel_level} cells covering them; spatial folds place an area by the "
            f"cell holding most of it"
        )
    if dim >= len(channels):
        notes.append(
            f"raw_pca: the embedding width {dim} is not below the {len(channels)} channels, so "
            f"the PCA keeps every component (a rotation of raw)"
        )
    fold_plan: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "random": (assign_folds(ids, folds, seed), None)
    }
    if n_blocks >= 2:
        k_spatial = min(folds, n_blocks)
        if k_spatial < folds:
            notes.append(
                f"only {n_blocks} level-{block_level} blocks: spatial protocol uses "
                f"{k_spatial} folds"
            )
        fold_plan["spatial"] = (assign_folds(ids, k_spatial, seed, block_level), groups)
    else:
        notes.append(
            f"all labelled cells lie in one level-{block_level} cell: no spatial protocol "
            f"(label a larger area or pass a finer block level)"
        )
    for protocol, (fold_of, _) in fold_plan.items():
        smallest = int(np.bincount(fold_of).min())
        if smallest < 2:
            notes.append(
                f"{protocol}: a test fold holds {smallest} cell: R² is undefined there and "
                f"left out of its mean (label more cells)"
            )
    report = EvaluationReport(
        root=root,
        model_version=version,
        pixel_level=pixel_level,
        block_level=block_level,
        n_rows=n,
        targets=target_names,
        methods=list(features),
        folds={p: int(f.max()) + 1 for p, (f, _) in fold_plan.items()},
        n_blocks=n_blocks,
        embedding_dim=dim,
        n_channels=len(channels),
        seed=seed,
        fold_of_row={p: f.tolist() for p, (f, _) in fold_plan.items()},
        notes=notes,
        unit="cell" if areas is None else "area",
    )
    from threadpoolctl import threadpool_limits

    # The matrices are small: BLAS threads cost more than they give unless there are many rows.
    with threadpool_limits(max(1, min(os.cpu_count() or 1, n // 20_000))):
        _run_probes(report, features, fold_plan, y_all, seed)
    return report


def _run_probes(
    report: EvaluationReport,
    features: dict[str, tuple[np.ndarray | None, int | None]],
    fold_plan: dict[str, tuple[np.ndarray, np.ndarray | None]],
    y_all: np.ndarray,
    seed: int,
) -> None:
    target_names = report.targets
    for protocol, (fold_of, grp) in fold_plan.items():
        for method, (x, pca) in features.items():
            per_fold: list[list[dict[str, Any]]] = [[] for _ in target_names]
            for k in range(int(fold_of.max()) + 1):
                train, test = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
                n_comp = None if pca is None else max(1, min(pca, x.shape[1], len(train) - 1))
                inner_groups = None if grp is None else grp[train]
                if method.endswith("_mlp"):
                    pred, alphas = fit_predict_mlp(x, y_all, train, test, seed), None
                else:
                    pred, alphas = fit_predict(x, y_all, train, test, inner_groups, seed, n_comp)
                for t in range(len(target_names)):
                    per_fold[t].append(
                        {
                            **fold_metrics(y_all[test, t], pred[:, t]),
                            "alpha": None if alphas is None else float(alphas[t]),
                            "n_test": len(test),
                        }
                    )
            width = 0 if x is None else min(pca or x.shape[1], x.shape[1])
            for t, target in enumerate(target_names):
                report.results.append(MethodResult(target, protocol, method, width, per_fold[t]))
    report.results.sort(key=lambda r: target_names.index(r.target))  # stable: keeps order


def evaluate_files(
    root: str | os.PathLike,
    labels_path: str | os.PathLike,
    with_path: str | os.PathLike | None = None,
    **options: Any,
) -> EvaluationReport:
    """``evaluate`` on a label file (and a ``--with`` file): what the CLI and a Dagster
    ``evaluation`` asset call. ``options``: model_version, folds, seed, block_level, targets."""
    labels, areas = read_labels(labels_path)
    other = read_embedding_file(with_path) if with_path else None
    return evaluate(root, labels, with_embeddings=other, areas=areas, **options)


def read_labels(path: str | os.PathLike) -> tuple[pl.DataFrame, np.ndarray | None]:
    """(label table, polygons or None): per-cell labels (.parquet/.csv) or per-area labels
    (GeoJSON, GeoParquet: the polygons' attributes are the label table)."""
    from s2vec_pipeline.analysis.areas import is_area_file, read_areas

    if is_area_file(path):
        found = read_areas(path)
        return found.attributes, found.geoms
    return read_table_file(path, "labels"), None


def write_report(report: EvaluationReport, path: str | os.PathLike) -> None:
    """JSON with every fold's numbers (written whole, then renamed into place)."""
    fs.write_text(Path(path), report.to_json())


__all__ = [
    "EmbeddingSourceError",
    "EvaluationReport",
    "LabelError",
    "MethodResult",
    "UnembeddedCellsError",
    "assign_folds",
    "evaluate",
    "embedding_matrix",
    "evaluate_files",
    "read_labels",
    "read_embedding_file",
    "read_table_file",
    "write_report",
]
