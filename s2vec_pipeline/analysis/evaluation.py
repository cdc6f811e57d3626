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

This module chains the steps (``prepare`` → ``feature_sets`` → ``fold_plan`` →
``run_evaluation``); the pieces live in ``labels`` (label files, cells, targets),
``cell_matrices`` (embeddings, raw features, other sources per cell), ``probes`` (folds, ridge
and MLP probes, metrics) and ``evaluation_report`` (the report and its renderings).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from s2vec_pipeline.analysis.areas import (
    AreaCells,
    area_cells,
    check_embedded,
    check_geometries,
    is_area_file,
    read_areas,
)
from s2vec_pipeline.analysis.cell_matrices import (
    EmbeddingSourceError,
    RootGrid,
    embedding_matrix,
    partitions_of,
    raw_feature_matrix,
    raw_neighbourhood_matrix,
    read_embedding_file,
    resolve_model_version,
    root_grid,
    with_matrix,
)
from s2vec_pipeline.analysis.evaluation_report import EvaluationReport, MethodResult, write_report
from s2vec_pipeline.analysis.labels import (
    LabelError,
    UnembeddedCellsError,
    label_cells,
    read_table_file,
    target_columns,
    target_matrix,
)
from s2vec_pipeline.analysis.probes import Features, FoldPlan, assign_folds, run_probes
from s2vec_pipeline.cells import s2


@dataclass(frozen=True)
class ProbeInputs:
    """Checked label rows and where their features come from: what every method shares."""

    root: str
    grid: RootGrid
    block_level: int  # cells of this level are held out whole by the spatial protocol
    targets: list[str]
    y: np.ndarray  # (n, T) target values
    ids: np.ndarray  # each row's place: its pixel cell (an area: the cell holding most of it)
    cells: np.ndarray  # the pixel cells whose features are read (``ids`` without areas)
    pieces: AreaCells | None  # the (area, cell) pieces; None: one pixel cell per row
    pool: Any  # (rows, cells) area weights (scipy CSR) when rows are areas, else None
    model_version: str

    @property
    def channels(self) -> list[str]:
        """The raw channels of the ``raw*`` methods."""
        return self.grid.channels

    @property
    def unit(self) -> str:
        """What a label row is: a pixel "cell" or an "area" (polygon)."""
        return "cell" if self.pieces is None else "area"

    def pooled(self, x: np.ndarray) -> np.ndarray:
        """Per row, the values of its cells: for areas the area-weighted mean over the pixel
        cells covering each area."""
        return x if self.pool is None else np.asarray(self.pool @ x)


def prepare(
    root: str | os.PathLike,
    labels: pl.DataFrame,
    model_version: str | None = None,
    folds: int = 5,
    block_level: int | None = None,
    targets: Sequence[str] | None = None,
    areas: np.ndarray | None = None,
) -> ProbeInputs:
    """Check the settings and labels (before any feature is read) and resolve the model."""
    root = str(root)
    if isinstance(folds, bool) or not 2 <= int(folds) <= 100:
        raise LabelError(f"folds must be an integer in 2..100, got {folds}")
    grid = root_grid(root)
    block_level = grid.image_level if block_level is None else int(block_level)
    if not 0 <= block_level < grid.pixel_level:
        raise LabelError(
            f"block level must be in 0..{grid.pixel_level - 1} (coarser than the pixels), got "
            f"{block_level}"
        )
    target_names = target_columns(labels, targets)
    y = target_matrix(labels, target_names)
    ids, cells, pieces, pool = _label_places(labels, grid.pixel_level, areas)
    _check_rows(ids, folds, per_area=pieces is not None)
    version = resolve_model_version(root, partitions_of(cells), model_version)
    if pieces is not None:
        check_embedded(root, pieces, version)
    return ProbeInputs(root, grid, block_level, target_names, y, ids, cells, pieces, pool, version)


def _label_places(
    labels: pl.DataFrame, pixel_level: int, areas: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, AreaCells | None, Any]:
    """(each row's place, the pixel cells to read, the area pieces and weights or None)."""
    if areas is None:
        ids = label_cells(labels, pixel_level)
        return ids, ids, None, None
    if len(areas) != labels.height:
        raise LabelError(f"{len(areas)} areas for {labels.height} label rows")
    check_geometries(np.asarray(areas, dtype=object))
    pieces = area_cells(areas, pixel_level)
    cells, pool = pieces.weights()
    return pieces.representative(), cells, pieces, pool


def _check_rows(ids: np.ndarray, folds: int, per_area: bool) -> None:
    """Enough rows for the folds, and (cells) one row per cell."""
    n = len(ids)
    if n < folds:
        raise LabelError(
            f"the labels have {n} row(s); {folds}-fold evaluation needs at least {folds} "
            f"labelled {'areas' if per_area else 'cells'} (and many more for stable numbers)"
        )
    uniq, counts = np.unique(ids, return_counts=True)
    if not per_area and (counts > 1).any():
        dup = s2.to_token(uniq[counts > 1][:3]).tolist()
        raise LabelError(
            f"{int((counts > 1).sum())} cell(s) are labelled more than once (e.g. "
            f"{', '.join(dup)}): give one row per cell (aggregate duplicates first)"
        )


def feature_sets(
    inputs: ProbeInputs, others: Mapping[str, pl.DataFrame] | None = None, mlp: bool = False
) -> Features:
    """The methods of the module docstring over ``inputs``; ``others``: further embedding
    sources by name (``read_embedding_file``), each alone and next to the embedding."""
    cells, pooled = inputs.cells, inputs.pooled
    emb = pooled(embedding_matrix(inputs.root, cells, inputs.model_version))
    raw_cells = np.log1p(raw_feature_matrix(inputs.root, cells, inputs.channels))
    raw = pooled(raw_cells)
    nbr = raw_neighbourhood_matrix(inputs.root, cells, inputs.grid.pixel_level, inputs.channels)
    raw3 = pooled(np.hstack([raw_cells, np.log1p(nbr)]))
    features: Features = {
        "mean": (None, None),
        "s2vec": (emb, None),
        "raw": (raw, None),
        "raw_3x3": (raw3, None),
        "raw_pca": (raw, emb.shape[1]),
        "s2vec+raw": (np.hstack([emb, raw]), None),
    }
    for name, source in (others or {}).items():
        other = pooled(with_matrix(source, cells))
        features[name] = (other, None)
        features[f"s2vec+{name}"] = (np.hstack([emb, other]), None)
    if mlp:
        features["s2vec_mlp"] = (emb, None)
        features["raw_mlp"] = (raw, None)
    return features


def fold_plan(inputs: ProbeInputs, folds: int, seed: int) -> tuple[FoldPlan, list[str]]:
    """(the folds of both protocols, notes on them): the spatial protocol needs two blocks and
    uses fewer folds when there are fewer blocks than ``folds``."""
    ids, block_level = inputs.ids, inputs.block_level
    groups = s2.to_signed(s2.parent(ids, block_level))
    n_blocks = len(np.unique(groups))
    notes: list[str] = []
    plan: FoldPlan = {"random": (assign_folds(ids, folds, seed), None)}
    if n_blocks >= 2:
        k_spatial = min(folds, n_blocks)
        if k_spatial < folds:
            notes.append(
                f"only {n_blocks} level-{block_level} blocks: spatial protocol uses "
                f"{k_spatial} folds"
            )
        plan["spatial"] = (assign_folds(ids, k_spatial, seed, block_level), groups)
    else:
        notes.append(
            f"all labelled cells lie in one level-{block_level} cell: no spatial protocol "
            f"(label a larger area or pass a finer block level)"
        )
    for protocol, (fold_of, _) in plan.items():
        smallest = int(np.bincount(fold_of).min())
        if smallest < 2:
            notes.append(
                f"{protocol}: a test fold holds {smallest} cell: R² is undefined there and "
                f"left out of its mean (label more cells)"
            )
    return plan, notes


def input_notes(inputs: ProbeInputs, embedding_dim: int) -> list[str]:
    """Notes on how the features were built (areas pooled, a PCA that keeps everything)."""
    notes = []
    if inputs.pieces is not None:
        notes.append(
            f"{len(inputs.ids)} areas: each feature is the area-weighted mean over the "
            f"{len(inputs.cells)} level-{inputs.grid.pixel_level} cells covering them; spatial "
            f"folds place an area by the cell holding most of it"
        )
    n_channels = len(inputs.channels)
    if embedding_dim >= n_channels:
        notes.append(
            f"raw_pca: the embedding width {embedding_dim} is not below the {n_channels} "
            f"channels, so the PCA keeps every component (a rotation of raw)"
        )
    return notes


def run_evaluation(
    inputs: ProbeInputs, features: Features, plan: FoldPlan, notes: list[str], seed: int
) -> EvaluationReport:
    """Every method of ``features`` on the folds of ``plan``: the report."""
    from threadpoolctl import threadpool_limits

    n = len(inputs.ids)
    report = EvaluationReport(
        root=inputs.root,
        model_version=inputs.model_version,
        pixel_level=inputs.grid.pixel_level,
        block_level=inputs.block_level,
        n_rows=n,
        targets=inputs.targets,
        methods=list(features),
        folds={p: int(f.max()) + 1 for p, (f, _) in plan.items()},
        n_blocks=len(np.unique(s2.parent(inputs.ids, inputs.block_level))),
        embedding_dim=features["s2vec"][0].shape[1],
        n_channels=len(inputs.channels),
        seed=seed,
        fold_of_row={p: f.tolist() for p, (f, _) in plan.items()},
        notes=notes,
        unit=inputs.unit,
    )
    # The matrices are small: BLAS threads cost more than they give unless there are many rows.
    with threadpool_limits(max(1, min(os.cpu_count() or 1, n // 20_000))):
        run_probes(report, features, plan, inputs.y, seed)
    return report


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
    inputs = prepare(root, labels, model_version, folds, block_level, targets, areas)
    others = None if with_embeddings is None else {"with": with_embeddings}
    features = feature_sets(inputs, others, mlp)
    plan, fold_notes = fold_plan(inputs, folds, seed)
    notes = input_notes(inputs, features["s2vec"][0].shape[1]) + fold_notes
    return run_evaluation(inputs, features, plan, notes, seed)


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
    if is_area_file(path):
        found = read_areas(path)
        return found.attributes, found.geoms
    return read_table_file(path, "labels"), None


# What the CLI, the Dagster asset and the benchmarks use, defined in the modules named above.
__all__ = [
    "EmbeddingSourceError",
    "EvaluationReport",
    "LabelError",
    "MethodResult",
    "ProbeInputs",
    "UnembeddedCellsError",
    "embedding_matrix",
    "evaluate",
    "evaluate_files",
    "feature_sets",
    "fold_plan",
    "input_notes",
    "prepare",
    "read_embedding_file",
    "read_labels",
    "run_evaluation",
    "write_report",
]
