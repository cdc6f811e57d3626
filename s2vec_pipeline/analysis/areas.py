"""Areas (polygons with attributes): reading, cutting into pixel cells, area-weighted pooling.

Users hold labels per area (census tracts, districts, postcodes). An area's embedding is the
mean of the pixel embeddings covering it, each weighted by the square metres of the area
inside that pixel's S2 cell: the exact spherical areas ``clip.polygon_cell_areas`` computes for
the ``area_m2`` channels (edges as geodesics, S2's convention). Pixels of images without data
count with the empty image's embedding (``cell_matrices.embedding_matrix``), so an area inside
embedded partitions is never short of cells; an area reaching a partition that was not embedded
is refused, naming its rows and those partitions.

Files: GeoJSON (a FeatureCollection; properties become columns) or GeoParquet (a ``geo``
metadata key naming a WKB geometry column), coordinates in WGS84 degrees (lng, lat).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from s2vec_pipeline.analysis.cell_matrices import (
    embedded_partitions,
    embedding_matrix,
    materialize_hint,
    resolve_model_version,
    root_grid,
)
from s2vec_pipeline.analysis.labels import LabelError
from s2vec_pipeline.cells import s2
from s2vec_pipeline.osm import clip
from s2vec_pipeline.storage import fs

GEOJSON_SUFFIXES = (".geojson", ".json")


class AreaError(LabelError):
    """An area file cannot be used: format, geometries, or areas outside embedded partitions."""


@dataclass
class Areas:
    """Polygons (shapely, lng/lat degrees) and their attributes, one row per area."""

    geoms: np.ndarray
    attributes: pl.DataFrame
    source: str = ""


@dataclass
class AreaCells:
    """One entry per (area, pixel cell) it covers: ``area`` row, ``cell`` id (uint64) and
    ``area_m2`` of the area inside the cell."""

    area: np.ndarray
    cell: np.ndarray
    area_m2: np.ndarray
    n_areas: int

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(unique cells, (n_areas, n_cells) row-normalized weight matrix, scipy CSR)."""
        from scipy.sparse import csr_matrix

        cells, col = np.unique(self.cell, return_inverse=True)
        total = np.bincount(self.area, weights=self.area_m2, minlength=self.n_areas)
        w = self.area_m2 / total[self.area]
        return cells, csr_matrix((w, (self.area, col)), shape=(self.n_areas, len(cells)))

    def representative(self) -> np.ndarray:
        """Per area, the pixel cell holding most of it (uint64): its place for spatial folds."""
        order = np.lexsort((-self.area_m2, self.area))
        first = np.unique(self.area[order], return_index=True)[1]
        return self.cell[order][first]


def _rows(rows: np.ndarray, k: int = 8) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:k])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > k else "")


def is_area_file(path: str | os.PathLike) -> bool:
    """GeoJSON by suffix, or Parquet with GeoParquet ``geo`` metadata."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in GEOJSON_SUFFIXES:
        return True
    if suffix == ".parquet" and p.is_file():
        try:
            meta = pq.read_schema(p).metadata or {}
        except Exception:  # unreadable: read_table_file reports it
            return False
        return b"geo" in meta
    return False


def _read_geojson(p: Path) -> tuple[list, pl.DataFrame]:
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise AreaError(f"cannot read GeoJSON {p}: {e}") from e
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        raise AreaError(f"GeoJSON {p} must be a FeatureCollection of polygon features")
    features = doc.get("features") or []
    geoms: list = []
    props: list[dict] = []
    bad: list[int] = []
    for k, f in enumerate(features):
        g = f.get("geometry") if isinstance(f, dict) else None
        try:
            geoms.append(shapely.geometry.shape(g) if g else None)
        except Exception:  # shapely raises several types for malformed geometry objects
            geoms.append(None)
            bad.append(k)
        props.append((f.get("properties") if isinstance(f, dict) else None) or {})
    if bad:
        raise AreaError(f"GeoJSON {p}: malformed geometry in feature row(s) {_rows(np.array(bad))}")
    try:
        attrs = pl.DataFrame(props, infer_schema_length=None) if props else pl.DataFrame()
    except Exception as e:  # mixed property types
        raise AreaError(f"GeoJSON {p}: properties do not form a table: {e}") from e
    return geoms, attrs


def _read_geoparquet(p: Path) -> tuple[list, pl.DataFrame]:
    try:
        table = pq.read_table(p)
    except Exception as e:  # arrow raises many types for a malformed file
        raise AreaError(f"cannot read GeoParquet {p}: {e}") from e
    meta = json.loads((table.schema.metadata or {}).get(b"geo", b"{}"))
    column = meta.get("primary_column", "geometry")
    encoding = meta.get("columns", {}).get(column, {}).get("encoding", "WKB")
    if column not in table.column_names or encoding.upper() != "WKB":
        raise AreaError(
            f"GeoParquet {p}: needs a WKB geometry column {column!r} (found columns "
            f"{table.column_names}, encoding {encoding})"
        )
    try:
        geoms = list(shapely.from_wkb(table.column(column).to_numpy(zero_copy_only=False)))
    except shapely.errors.ShapelyError as e:
        raise AreaError(f"GeoParquet {p}: geometry column {column!r} is not WKB: {e}") from e
    return geoms, pl.from_arrow(table.drop_columns([column]))


def check_geometries(geoms: np.ndarray, what: str = "areas") -> None:
    """Refuse missing, empty, non-polygon, invalid or out-of-range geometries, naming rows."""
    missing = np.array([g is None for g in geoms], dtype=bool)
    problems = []
    if missing.any():
        problems.append(f"no geometry in row(s) {_rows(np.flatnonzero(missing))}")
    ok = np.flatnonzero(~missing)
    arr = np.asarray([geoms[k] for k in ok], dtype=object)
    if len(arr):
        kind = shapely.get_type_id(arr)
        empty = shapely.is_empty(arr)
        not_poly = ~np.isin(kind, (3, 6)) & ~empty  # Polygon, MultiPolygon
        if empty.any():
            problems.append(f"empty geometry in row(s) {_rows(ok[empty])}")
        if not_poly.any():
            k = int(np.flatnonzero(not_poly)[0])
            problems.append(
                f"not a polygon in row(s) {_rows(ok[not_poly])} (row {ok[k]} is {arr[k].geom_type})"
            )
        check = ~empty & ~not_poly
        invalid = np.zeros(len(arr), dtype=bool)
        invalid[check] = ~shapely.is_valid(arr[check])
        if invalid.any():
            k = int(np.flatnonzero(invalid)[0])
            problems.append(
                f"invalid geometry in row(s) {_rows(ok[invalid])} (row {ok[k]}: "
                f"{shapely.is_valid_reason(arr[k])})"
            )
        bounds = shapely.bounds(arr[check]) if check.any() else np.empty((0, 4))
        out = (np.abs(bounds[:, [0, 2]]) > 180).any(axis=1) | (np.abs(bounds[:, [1, 3]]) > 90).any(
            axis=1
        )
        if out.any():
            problems.append(
                f"coordinates outside lng -180..180 / lat -90..90 in row(s) "
                f"{_rows(ok[check][out])} (give WGS84 degrees, lng first)"
            )
    if problems:
        raise AreaError(f"bad {what} (rows count from 0): " + "; ".join(problems))


def read_areas(path: str | os.PathLike) -> Areas:
    """Polygons and attributes of a GeoJSON or GeoParquet file, checked (``check_geometries``)."""
    p = Path(path)
    if not p.is_file():
        raise AreaError(f"areas file {p} does not exist: give a .geojson or GeoParquet file")
    if p.suffix.lower() in GEOJSON_SUFFIXES:
        geoms, attrs = _read_geojson(p)
    elif p.suffix.lower() == ".parquet":
        geoms, attrs = _read_geoparquet(p)
    else:
        raise AreaError(f"areas file {p} must be .geojson, .json or GeoParquet (.parquet)")
    if not geoms:
        raise AreaError(f"areas file {p} holds no areas")
    arr = np.empty(len(geoms), dtype=object)
    arr[:] = geoms
    check_geometries(arr)
    return Areas(arr, attrs, str(p))


def area_cells(geoms: np.ndarray, pixel_level: int) -> AreaCells:
    """Every (area, pixel cell at ``pixel_level``) with the area's m² inside the cell."""
    pieces = clip.polygon_cell_areas(np.asarray(geoms, dtype=object), pixel_level)
    keep = pieces.value > 0
    area, cell, value = pieces.index[keep], pieces.cell[keep], pieces.value[keep]
    # A polygon cut on two cube faces or a multipolygon can give one cell twice: sum them.
    key = np.stack([area.astype(np.uint64), cell])
    uniq, inverse = np.unique(key, axis=1, return_inverse=True)
    total = np.bincount(inverse.ravel(), weights=value, minlength=uniq.shape[1])
    out = AreaCells(uniq[0].astype(np.int64), uniq[1], total, len(geoms))
    none = np.setdiff1d(np.arange(len(geoms)), out.area)
    if len(none):
        raise AreaError(f"area row(s) {_rows(none)} cover no area (degenerate polygons)")
    return out


def check_embedded(root: str | os.PathLike, cells: AreaCells, model_version: str) -> None:
    """Refuse areas that reach a partition not embedded with ``model_version``."""
    parents = s2.to_token(s2.parent(cells.cell, 6))
    wanted = sorted(set(parents.tolist()))
    done = set(embedded_partitions(root, wanted, model_version))
    outside = np.array([p not in done for p in parents.tolist()], dtype=bool)
    if outside.any():
        rows = np.unique(cells.area[outside])
        missing = sorted(set(parents[outside].tolist()))
        raise AreaError(
            f"area row(s) {_rows(rows)} (rows count from 0) reach partition(s) "
            f"{', '.join(missing)}, not embedded with model {model_version} under {root}. "
            + materialize_hint(root, missing, model_version).replace("labels", "areas")
        )


def pool_areas(
    root: str | os.PathLike, areas: Areas, model_version: str | None = None
) -> tuple[str, np.ndarray, AreaCells]:
    """(model version, (n_areas, D) area-weighted mean pixel embeddings, the area cells)."""
    cells = area_cells(areas.geoms, root_grid(root).pixel_level)
    unique, weights = cells.weights()
    parts = sorted(set(s2.to_token(s2.parent(unique, 6)).tolist()))
    version = resolve_model_version(root, parts, model_version)
    check_embedded(root, cells, version)
    return version, np.asarray(weights @ embedding_matrix(root, unique, version)), cells


def _list_column(emb: np.ndarray) -> pa.ListArray:
    n, d = emb.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(emb).ravel()))


def write_pooled(
    root: str | os.PathLike,
    areas_path: str | os.PathLike,
    out: str | os.PathLike,
    model_version: str | None = None,
    cells_out: str | os.PathLike | None = None,
) -> dict[str, object]:
    """``s2vec pool``: one row per area (its attributes, ``area_index``, ``area_m2``,
    ``cells``, ``model_version``, ``embedding``) to ``out`` (Parquet, written whole then
    renamed); ``cells_out``: the (area_index, cell_token, area_m2) pieces, the input of the
    SQL recipe ``sql.AREA_POOL_SQL``."""
    for target in (out, cells_out):
        if target is not None and not str(target).endswith(".parquet"):
            raise AreaError(f"output {target} must end in .parquet")
    areas = read_areas(areas_path)
    version, emb, cells = pool_areas(root, areas, model_version)
    n = len(areas.geoms)
    frame = pl.DataFrame(
        {
            "area_index": np.arange(n, dtype=np.int64),
            "area_m2": np.bincount(cells.area, weights=cells.area_m2, minlength=n),
            "cells": np.bincount(cells.area, minlength=n).astype(np.int64),
            "model_version": [version] * n,
        }
    )
    # The output's own columns win over same-named attributes of the input.
    own = [*frame.columns, "embedding"]
    attrs = areas.attributes.drop([c for c in own if c in areas.attributes.columns])
    table = pl.concat([attrs, frame], how="horizontal") if attrs.width else frame
    arrow = table.to_arrow().append_column("embedding", _list_column(emb.astype(np.float32)))
    _write_parquet(arrow, Path(out))
    if cells_out is not None:
        pieces = pa.table(
            {
                "area_index": cells.area,
                "cell_token": s2.to_token(cells.cell),
                "area_m2": cells.area_m2,
            }
        )
        _write_parquet(pieces, Path(cells_out))
    return {"areas": n, "cells": len(cells.cell), "model_version": version, "dim": emb.shape[1]}


def _write_parquet(table: pa.Table, path: Path) -> None:
    with fs.replacing(path) as tmp:
        pq.write_table(table, tmp)


__all__ = [
    "AreaCells",
    "AreaError",
    "Areas",
    "area_cells",
    "check_embedded",
    "check_geometries",
    "is_area_file",
    "pool_areas",
    "read_areas",
    "write_pooled",
]
