"""Named regions: sets of level-6 S2 cells (the pipeline's partitions) with a name.

A region is made from a lat/lng box, a GeoJSON area or an OSM source's header box, and is kept
in ``<root>/regions.yaml`` so that "materialize region X" means the same cells every time,
even if the box, GeoJSON or source file later changes or disappears.

GeoJSON cells
-------------
``region_from_geojson`` returns exactly the level-6 cells whose area meets the geometry (closed
sets: touching counts). Candidates are the cells meeting each polygon's lat/lng bounds
(``s2_geometry.cover_bbox``, exact); each candidate's outline is then tested against the
geometry with shapely in the lng/lat plane. GeoJSON edges are straight lines in lng/lat (RFC
7946 §3.1.1), but S2 cell edges are geodesics, which in lng/lat bow away from the straight line
between the corners: drawn with its 4 corners a level-6 cell is off by up to ~0.3 km at 45°
latitude, ~0.6 km at 60° and ~2.3 km at 80° (measured). Each cell edge is therefore densified
with ``EDGE_POINTS`` points on the geodesic itself (cell edges are great-circle arcs, so
normalised chords between the corners lie exactly on them), which leaves ~0.15 m at 60°, ~0.6 m
at 80° and ~1.3 m at 85°: the approximation only matters for geometry within a metre of a cell
edge. Cells crossing the antimeridian are unwrapped to longitudes beyond 180 and tested against
the geometry shifted by 360°; a cell vertex at a pole is replaced by the pole's segment of
latitude ±90 between its neighbours' longitudes. Tests check the result against s2geometry's
exact S2Polygon/S2Cell intersection and, for lng/lat rectangles, against ``cover_bbox``."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import shapely
import shapely.affinity
import shapely.errors
import yaml
from shapely.geometry import shape

from s2vec_pipeline.cells import s2, s2_geometry
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL
from s2vec_pipeline.errors import (
    CellOutsideSourcesError,
    InvalidBoundingBoxError,
    InvalidCellError,
    S2VecError,
    validation_problem,
)
from s2vec_pipeline.osm.coverage import cells_covering_source
from s2vec_pipeline.osm.extract import validate_source
from s2vec_pipeline.storage import fs
from s2vec_pipeline.storage.locks import exclusive

__all__ = [
    "EDGE_POINTS",
    "KINDS",
    "REGIONS_FILE",
    "InvalidGeoJSONError",
    "Region",
    "RegionError",
    "RegionRegistry",
    "cell_outlines",
    "cells_intersecting_geometry",
    "region_from_bbox",
    "region_from_geojson",
    "region_from_source",
    "validate_region_name",
]

REGIONS_FILE = "regions.yaml"
REGISTRY_FORMAT = 1
KINDS = ("bbox", "geojson", "source")
EDGE_POINTS = 64  # points per cell edge (see the module docstring)
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_POLE_LAT = 90.0 - 1e-9


class RegionError(S2VecError):
    """A region name, definition or the region registry is invalid."""


class InvalidGeoJSONError(RegionError):
    """A GeoJSON file cannot be used as a region: unreadable, malformed, or not an area."""


def validate_region_name(name: object) -> str:
    """Region names become partition-set keys and file names: keep them plain."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RegionError(
            f"region name {name!r} is invalid: use 1-64 lower-case letters, digits, '_' or '-', "
            f"starting with a letter or digit (e.g. 'helsinki-center')"
        )
    return name


def _normalize_cells(cells: Iterable[str], where: str) -> tuple[str, ...]:
    """Sorted unique lower-case level-6 tokens; anything else is an error naming ``where``."""
    tokens: list[str] = []
    for c in cells:
        if not isinstance(c, str):
            raise RegionError(
                f"{where}: cell {c!r} is not a token string (write S2 tokens in quotes, "
                f"e.g. '4693': unquoted YAML reads 0123 as a number)"
            )
        tokens.append(c.strip().lower())
    if not tokens:
        raise RegionError(f"{where}: a region needs at least one level-6 cell")
    try:
        levels = s2.cell_level(s2.from_token(np.array(tokens)))
    except InvalidCellError as e:
        raise RegionError(f"{where}: {e}") from e
    bad = [t for t, lv in zip(tokens, levels.tolist(), strict=True) if lv != PARTITION_LEVEL]
    if bad:
        raise RegionError(
            f"{where}: cells {bad} are not level-{PARTITION_LEVEL} cells; regions are sets of "
            f"level-{PARTITION_LEVEL} partition cells"
        )
    return tuple(sorted(set(tokens)))


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Region:
    """A named set of level-6 cells and what it was made from.

    ``spec`` records the user's input: ``{"min_lat", "min_lng", "max_lat", "max_lng"}`` for a
    box, ``{"path", "sha256"}`` for GeoJSON, ``{"path"}`` for a source.
    """

    name: str
    cells: tuple[str, ...]
    kind: str
    spec: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        validate_region_name(self.name)
        if self.kind not in KINDS:
            raise RegionError(
                f"region {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}"
            )
        object.__setattr__(self, "cells", _normalize_cells(self.cells, f"region {self.name!r}"))

    def __hash__(self) -> int:  # spec is a dict: hash what identifies the region
        return hash((self.name, self.cells, self.kind, self.created_at))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "spec": dict(self.spec),
            "created_at": self.created_at,
            "cells": list(self.cells),
        }

    @classmethod
    def from_dict(cls, name: str, data: Any) -> Region:
        try:
            entry = RegionEntry.model_validate(data)
        except pydantic.ValidationError as e:
            raise RegionError(f"region {name!r}: {validation_problem(e)}") from e
        return cls(name, tuple(entry.cells), entry.kind, entry.spec, entry.created_at)


class RegionEntry(pydantic.BaseModel):
    """One region as ``regions.yaml`` stores it (the file's ``regions`` mapping: name -> this)."""

    model_config = pydantic.ConfigDict(extra="ignore")

    kind: str
    cells: list[Any]  # each token is checked by Region (a number: "keep it quoted")
    spec: dict[str, Any] = {}
    created_at: str = ""

    @pydantic.field_validator("spec", mode="before")
    @classmethod
    def _no_spec(cls, value: Any) -> Any:
        return {} if value is None else value

    @pydantic.field_validator("created_at", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        return "" if value is None else str(value)  # YAML reads an unquoted time as a datetime


class RegionsFile(pydantic.BaseModel):
    """``regions.yaml``: its format and the regions by name (values checked by ``RegionEntry``
    one by one, so an error names the region)."""

    format: int = REGISTRY_FORMAT
    regions: dict[str, Any] = {}

    @pydantic.field_validator("regions", mode="before")
    @classmethod
    def _no_regions(cls, value: Any) -> Any:
        return {} if value is None else value


# ---------------------------------------------------------------------------------------------
# Making regions
# ---------------------------------------------------------------------------------------------
def region_from_bbox(
    name: str, min_lat: float, min_lng: float, max_lat: float, max_lng: float
) -> Region:
    """The level-6 cells meeting a lat/lng box (degrees; ``min_lng > max_lng`` crosses the
    antimeridian). Raises InvalidBoundingBoxError for malformed boxes."""
    validate_region_name(name)
    ids = s2_geometry.cover_bbox(min_lat, min_lng, max_lat, max_lng, PARTITION_LEVEL)
    spec = {"min_lat": min_lat, "min_lng": min_lng, "max_lat": max_lat, "max_lng": max_lng}
    return Region(
        name, tuple(s2.to_token(ids).tolist()), "bbox", {k: float(v) for k, v in spec.items()}
    )


def parse_bbox(value: str) -> tuple[float, float, float, float]:
    """``MIN_LAT,MIN_LNG,MAX_LAT,MAX_LNG`` as four floats (InvalidBoundingBoxError otherwise)."""
    parts = [p.strip() for p in value.split(",")]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) != 4:
        raise InvalidBoundingBoxError(
            f"a bounding box is MIN_LAT,MIN_LNG,MAX_LAT,MAX_LNG (4 numbers), got {value!r}"
        )
    return nums[0], nums[1], nums[2], nums[3]


def regions_markdown(regions: Iterable[Region], source_cells: dict[str, Iterable[str]]) -> str:
    """A Markdown table region -> cell -> its centre -> the sources covering it."""
    rows = ["| region | cell | centre (lat, lng) | sources |", "|---|---|---|---|"]
    for r in regions:
        lats, lngs = s2_geometry.cell_center_latlng(s2.from_token(np.array(r.cells)))
        for cell, lat, lng in zip(r.cells, lats, lngs, strict=True):
            names = ", ".join(Path(s).name for s in source_cells.get(cell, ())) or "(none)"
            rows.append(f"| {r.name} | `{cell}` | {lat:.3f}, {lng:.3f} | {names} |")
    return "\n".join(rows) if len(rows) > 2 else "no region registered"


def region_from_source(name: str, pbf: str | os.PathLike) -> Region:
    """The level-6 cells covering an OSM source's header box: the partitions it feeds."""
    validate_region_name(name)
    path = validate_source(pbf).resolve()
    return Region(name, tuple(cells_covering_source(path)), "source", {"path": str(path)})


def region_from_geojson(name: str, path: str | os.PathLike) -> Region:
    """Exactly the level-6 cells meeting a GeoJSON area (Polygon, MultiPolygon, Feature,
    FeatureCollection or GeometryCollection of those). Invalid rings (self-intersections) are
    repaired with ``shapely.make_valid``; points and lines are refused: a region is an area."""
    validate_region_name(name)
    p = Path(path)
    geom, digest = _read_geojson(p)
    try:
        cells = cells_intersecting_geometry(geom)
    except InvalidBoundingBoxError as e:
        raise InvalidGeoJSONError(f"GeoJSON {p}: {e}") from e
    return Region(name, tuple(cells), "geojson", {"path": str(p.resolve()), "sha256": digest})


def _read_geojson(path: Path) -> tuple[shapely.Geometry, str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise InvalidGeoJSONError(f"GeoJSON file {path} does not exist") from e
    except OSError as e:
        raise InvalidGeoJSONError(f"GeoJSON file {path} cannot be read: {e}") from e
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as e:
        raise InvalidGeoJSONError(f"GeoJSON file {path} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise InvalidGeoJSONError(
            f"GeoJSON file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    parts = _geojson_polygons(doc, path, "the document")
    if not parts:
        raise InvalidGeoJSONError(f"GeoJSON file {path} holds no polygon")
    geom = shapely.union_all(parts)
    if geom.is_empty:
        raise InvalidGeoJSONError(f"GeoJSON file {path}: its polygons have no area")
    return geom, hashlib.sha256(raw).hexdigest()


def _geojson_polygons(obj: Any, path: Path, where: str) -> list[shapely.Geometry]:
    """Polygons of a GeoJSON object, checked; errors name the file and the object."""
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise InvalidGeoJSONError(f"GeoJSON file {path}: {where} is not a GeoJSON object")
    kind = obj["type"]
    if kind == "FeatureCollection":
        features = obj.get("features")
        if not isinstance(features, list):
            raise InvalidGeoJSONError(f"GeoJSON file {path}: {where} has no 'features' list")
        out: list[shapely.Geometry] = []
        for k, feat in enumerate(features):
            out += _geojson_polygons(feat, path, f"feature {k}")
        return out
    if kind == "Feature":
        if obj.get("geometry") is None:
            raise InvalidGeoJSONError(f"GeoJSON file {path}: {where} has no geometry")
        return _geojson_polygons(obj["geometry"], path, f"{where}'s geometry")
    if kind == "GeometryCollection":
        geoms = obj.get("geometries")
        if not isinstance(geoms, list):
            raise InvalidGeoJSONError(f"GeoJSON file {path}: {where} has no 'geometries' list")
        out = []
        for k, g in enumerate(geoms):
            out += _geojson_polygons(g, path, f"{where}, geometry {k}")
        return out
    if kind not in ("Polygon", "MultiPolygon"):
        raise InvalidGeoJSONError(
            f"GeoJSON file {path}: {where} is a {kind}; a region needs an area (Polygon or "
            f"MultiPolygon). Buffer points or lines into polygons first"
        )
    try:
        geom = shape(obj)
    except (KeyError, TypeError, ValueError, IndexError, shapely.errors.GEOSException) as e:
        raise InvalidGeoJSONError(
            f"GeoJSON file {path}: {where} ({kind}) has malformed coordinates ({e}); a polygon "
            f"is a list of rings, each a closed list of [lng, lat] positions"
        ) from e
    if geom.is_empty:
        raise InvalidGeoJSONError(f"GeoJSON file {path}: {where} ({kind}) is empty")
    xy = shapely.get_coordinates(geom)
    if not np.isfinite(xy).all():
        raise InvalidGeoJSONError(f"GeoJSON file {path}: {where} has non-finite coordinates")
    bad_lng, bad_lat = np.abs(xy[:, 0]) > 180, np.abs(xy[:, 1]) > 90
    if bad_lng.any() or bad_lat.any():
        k = int(np.flatnonzero(bad_lng | bad_lat)[0])
        raise InvalidGeoJSONError(
            f"GeoJSON file {path}: {where} has position [{xy[k, 0]}, {xy[k, 1]}] outside "
            f"[-180, 180] x [-90, 90]; GeoJSON positions are [longitude, latitude] in degrees "
            f"(WGS 84), check for swapped or projected coordinates"
        )
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
        geom = shapely.union_all(
            [
                g
                for g in shapely.get_parts(geom)
                if isinstance(g, shapely.Polygon | shapely.MultiPolygon)
            ]
        )
    if geom.area == 0:
        raise InvalidGeoJSONError(f"GeoJSON file {path}: {where} ({kind}) has no area")
    return [geom]


# ---------------------------------------------------------------------------------------------
# Cells meeting a geometry
# ---------------------------------------------------------------------------------------------
def _unit_vectors(latlng: np.ndarray) -> np.ndarray:
    lat, lng = np.radians(latlng[..., 0]), np.radians(latlng[..., 1])
    return np.stack([np.cos(lat) * np.cos(lng), np.cos(lat) * np.sin(lng), np.sin(lat)], -1)


def cell_outlines(ids: np.ndarray, edge_points: int = EDGE_POINTS) -> list[shapely.Polygon]:
    """Cell outlines as lng/lat polygons with geodesic edges densified (module docstring);
    longitudes of antimeridian cells run past 180."""
    corners = s2_geometry.cell_corners_latlng(ids)  # (n, 4, 2) lat, lng
    xyz = _unit_vectors(corners)  # (n, 4, 3)
    t = np.arange(edge_points) / edge_points
    a = xyz[:, :, None, :]
    b = np.roll(xyz, -1, axis=1)[:, :, None, :]
    pts = (1 - t)[None, None, :, None] * a + t[None, None, :, None] * b
    pts /= np.linalg.norm(pts, axis=-1, keepdims=True)
    pts = pts.reshape(len(ids), 4 * edge_points, 3)
    lat = np.degrees(np.arctan2(pts[..., 2], np.hypot(pts[..., 0], pts[..., 1])))
    lng = np.degrees(np.arctan2(pts[..., 1], pts[..., 0]))
    wraps = lng.max(axis=1) - lng.min(axis=1) > 180  # crosses the antimeridian: unwrap
    lng[wraps] = np.where(lng[wraps] < 0, lng[wraps] + 360, lng[wraps])
    polar = (np.abs(lat) >= _POLE_LAT).any(axis=1)
    out = np.empty(len(ids), dtype=object)
    plain = np.flatnonzero(~polar)
    if len(plain):
        out[plain] = shapely.polygons(np.stack([lng[plain], lat[plain]], axis=-1))
    for k in np.flatnonzero(polar).tolist():  # a pole vertex is a segment of latitude +-90
        la, ln = lat[k], lng[k]
        ring: list[tuple[float, float]] = []
        n = len(la)
        for i in range(n):
            if abs(la[i]) >= _POLE_LAT:
                pole = math.copysign(90.0, la[i])
                ring.append((float(ln[i - 1]), pole))
                ring.append((float(ln[(i + 1) % n]), pole))
            else:
                ring.append((float(ln[i]), float(la[i])))
        out[k] = shapely.Polygon(ring)
    return list(out)


def cells_intersecting_geometry(geom: shapely.Geometry) -> list[str]:
    """Sorted level-6 tokens of the cells meeting a lng/lat (multi)polygon."""
    candidates: set[int] = set()
    for part in shapely.get_parts(geom):
        min_lng, min_lat, max_lng, max_lat = part.bounds
        candidates.update(
            s2_geometry.cover_bbox(min_lat, min_lng, max_lat, max_lng, PARTITION_LEVEL).tolist()
        )
    if not candidates:
        return []
    ids = np.array(sorted(candidates), dtype=np.uint64)
    outlines = np.asarray(cell_outlines(ids), dtype=object)
    shifted = shapely.affinity.translate(geom, xoff=360.0)
    shapely.prepare(geom)
    shapely.prepare(shifted)
    hit = shapely.intersects(outlines, geom) | shapely.intersects(outlines, shifted)
    return sorted(s2.to_token(ids[hit]).tolist())


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
_HEADER = (
    "# S2Vec named regions: each is a set of level-6 S2 cells (the pipeline's partitions).\n"
    "# Written by s2vec_pipeline.cells.regions. Cells are S2 tokens: keep them quoted ('4693'),\n"
    "# as YAML reads an unquoted 4693 as a number.\n"
)


class _Token(str):
    """A cell token, always written quoted."""


class _Cells(list):
    """A region's cells, written as one flow list wrapped at the line width."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Cells,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)
_Dumper.add_representer(
    _Token, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data, style="'")
)


class RegionRegistry:
    """Named regions stored in ``<root>/regions.yaml`` (human-readable, written atomically under
    a lock so that two processes adding regions do not lose one)."""

    def __init__(self, root: str | os.PathLike) -> None:
        # a local root keeps Path attributes; an object-store root (s3://…) its URI strings
        self.root: Path | str = root if fs.is_object_store(root) else Path(root)
        self.path: Path | str = fs.join(self.root, REGIONS_FILE)
        if isinstance(self.root, Path):
            self.path = Path(self.path)

    # -- reading ---------------------------------------------------------------------------
    def _load(self) -> dict[str, Region]:
        try:
            raw = fs.read_bytes(self.path)
            if raw is None:
                return {}
            doc = yaml.safe_load(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RegionError(
                f"region registry {self.path} cannot be read ({e}); fix or restore the file"
            ) from e
        if doc is None:
            return {}
        try:
            registry = RegionsFile.model_validate(doc)
        except pydantic.ValidationError as e:
            raise RegionError(
                f"region registry {self.path} must be a mapping with a 'regions' mapping of "
                f"name -> region ({validation_problem(e)}); fix or restore the file"
            ) from e
        if registry.format != REGISTRY_FORMAT:
            raise RegionError(
                f"region registry {self.path} has format {registry.format!r}; this version reads "
                f"format {REGISTRY_FORMAT}"
            )
        out: dict[str, Region] = {}
        for name, data in registry.regions.items():
            try:
                out[str(name)] = Region.from_dict(str(name), data)
            except RegionError as e:
                raise RegionError(f"region registry {self.path}: {e}") from e
        return out

    def _save(self, regions: dict[str, Region]) -> None:
        doc = {
            "format": REGISTRY_FORMAT,
            "regions": {
                name: {
                    **regions[name].to_dict(),
                    "cells": _Cells(_Token(c) for c in regions[name].cells),
                }
                for name in sorted(regions)
            },
        }
        text = _HEADER + yaml.dump(
            doc, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100
        )
        fs.write_text(self.path, text)  # locally renamed into place, one PUT on a bucket

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # an OS lock: on an object-store root it serializes the writers of one host
        with exclusive(fs.local_cache(self.root, f".{REGIONS_FILE}.lock")):
            yield

    # -- API -------------------------------------------------------------------------------
    def add(self, region: Region, replace: bool = False) -> Region:
        """Store a region; an existing name is an error unless ``replace``."""
        with self._locked():
            regions = self._load()
            if region.name in regions and not replace:
                raise RegionError(
                    f"region {region.name!r} already exists ({regions[region.name].kind}, "
                    f"{len(regions[region.name].cells)} cells); pick another name or replace it"
                )
            regions[region.name] = region
            self._save(regions)
        return region

    def remove(self, name: str) -> Region:
        """Forget a region (its cells' data stays in the tables). Returns what was removed."""
        with self._locked():
            regions = self._load()
            if name not in regions:
                raise RegionError(self._unknown(name, regions))
            region = regions.pop(name)
            self._save(regions)
        return region

    def get(self, name: str) -> Region:
        regions = self._load()
        if name not in regions:
            raise RegionError(self._unknown(name, regions))
        return regions[name]

    def list(self) -> list[Region]:
        """All regions, by name."""
        regions = self._load()
        return [regions[n] for n in sorted(regions)]

    def all_cells(self) -> list[str]:
        """Sorted union of every region's cells: the partitions regions ask for."""
        return sorted({c for r in self._load().values() for c in r.cells})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._load()

    def check_covered(self, region: Region | str, covered_cells: Iterable[str]) -> None:
        """Raise CellOutsideSourcesError naming the region's cells that no source covers
        (``covered_cells``: the level-6 tokens the configured sources cover)."""
        reg = self.get(region) if isinstance(region, str) else region
        covered = {c.strip().lower() for c in covered_cells}
        missing = [c for c in reg.cells if c not in covered]
        if missing:
            raise CellOutsideSourcesError(
                f"region {reg.name!r}: {len(missing)} of its {len(reg.cells)} cells are outside "
                f"every configured source: {', '.join(missing)}. The sources cover "
                f"{', '.join(sorted(covered))}; add "
                f"an OSM source covering the missing cells, or shrink the region"
            )

    @staticmethod
    def _unknown(name: str, regions: dict[str, Region]) -> str:
        known = ", ".join(sorted(regions)) or "none yet"
        return f"no region named {name!r} (known: {known}); add it first"
