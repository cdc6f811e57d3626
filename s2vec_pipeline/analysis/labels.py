"""Label tables for the probes: reading a Parquet/CSV file, the pixel cell of each row, the
target columns and their values, each checked with a one-line error naming what to fix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from s2vec_pipeline.cells import s2
from s2vec_pipeline.errors import S2VecError

#: Label columns that are keys, never targets.
KEY_COLUMNS = ("cell_token", "cell_id", "lat", "lon", "lng", "parent_l6", "image_token")


class LabelError(S2VecError):
    """A label file or label table cannot be evaluated (format, keys, targets, rows)."""


class UnembeddedCellsError(LabelError):
    """Labelled cells or areas lie outside every partition embedded with the model."""


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


def target_matrix(labels: pl.DataFrame, targets: list[str]) -> np.ndarray:
    """(n, T) float64 target values; missing, non-finite or constant targets are refused."""
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
