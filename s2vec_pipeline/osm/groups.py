"""Extraction groups: level-6 partitions extracted together, the partitions under one
ancestor cell (level 5 for groups of 4), with the region osmium cuts for them (their cells'
outline, edges sampled along the geodesics, grown by a margin)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import shapely

from s2vec_pipeline.cells import s2, s2_geometry
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL

#: Default number of level-6 partitions per group (one worker task, one split output file).
PARTITIONS_PER_GROUP = 4
DEFAULT_MARGIN_DEG = 0.05
FIX = 10_000_000  # osmium stores coordinates as integers of 1e-7 degree


@dataclass(frozen=True)
class PartitionGroup:
    """Partitions extracted together. ``polygons``: the region osmium extracts, GeoJSON-like
    (polygons of rings of [lng, lat]), the cells' outlines grown by the margin; ``box`` =
    (min_lng, min_lat, max_lng, max_lat) of it in 1e-7°."""

    index: int
    partitions: tuple[str, ...]
    box: tuple[int, int, int, int]
    polygons: tuple = ()

    def shape(self) -> shapely.Geometry:
        if not self.polygons:
            x0, y0, x1, y1 = (c / FIX for c in self.box)
            return shapely.box(x0, y0, x1, y1)
        return shapely.MultiPolygon(
            [shapely.Polygon(rings[0], rings[1:]) for rings in self.polygons]
        )

    @property
    def name(self) -> str:
        return f"g{self.index:05d}"


def plan_groups(
    partitions: Collection[str],
    partitions_per_group: int = PARTITIONS_PER_GROUP,
    margin_deg: float = DEFAULT_MARGIN_DEG,
) -> list[PartitionGroup]:
    """Group the partitions by their ancestor cell holding at most ``partitions_per_group``
    level-6 cells (level 5 for 4, level 4 for 16): a group is one compact S2 cell, so its
    bounding box, and the data duplicated across groups, stay small."""
    if partitions_per_group < 1:
        raise ValueError(f"partitions_per_group must be >= 1, got {partitions_per_group}")
    tokens = sorted({str(t) for t in partitions})
    level = group_level(partitions_per_group)
    by_parent: dict[str, list[str]] = {}
    if tokens:
        parents = s2.to_token(s2.parent(s2.from_token(np.asarray(tokens)), level))
        for token, par in zip(tokens, parents.tolist(), strict=True):
            by_parent.setdefault(par, []).append(token)
    groups = []
    for n, chunk in enumerate(by_parent[p] for p in sorted(by_parent)):
        box = _region(chunk, margin_deg)
        polygons = _outline(chunk, margin_deg) if box[0] > -180 * FIX else ()
        if polygons:
            x0, y0, x1, y1 = shapely.MultiPolygon(
                [shapely.Polygon(r[0], r[1:]) for r in polygons]
            ).bounds
            box = (
                math.floor(x0 * FIX),
                math.floor(y0 * FIX),
                math.ceil(x1 * FIX),
                math.ceil(y1 * FIX),
            )
        groups.append(PartitionGroup(n, tuple(chunk), box, polygons))
    return groups


def group_level(partitions_per_group: int) -> int:
    """The ancestor level whose cells hold ``partitions_per_group`` level-6 cells (4: level 5)."""
    return PARTITION_LEVEL - int(math.log(partitions_per_group, 4) + 1e-9)


def whole_groups(
    partitions: Collection[str],
    partitions_per_group: int = PARTITIONS_PER_GROUP,
    margin_deg: float = DEFAULT_MARGIN_DEG,
) -> list[PartitionGroup]:
    """Like :func:`plan_groups`, but each group holds EVERY level-6 child of its ancestor cell,
    requested or not: its region then depends only on the ancestor, so the file cut for it can
    serve any later run (see :func:`cached_split`)."""
    if partitions_per_group < 1:
        raise ValueError(f"partitions_per_group must be >= 1, got {partitions_per_group}")
    tokens = sorted({str(t) for t in partitions})
    if not tokens:
        return []
    level = group_level(partitions_per_group)
    ancestors = np.unique(s2.parent(s2.from_token(np.asarray(tokens)), level))
    children = s2.to_token(s2.children_grid(ancestors, PARTITION_LEVEL).reshape(-1))
    return plan_groups(children.tolist(), partitions_per_group, margin_deg)


def _outline(tokens: Sequence[str], margin_deg: float, per_edge: int = 16) -> tuple:
    """The cells' union as lat/lng polygons: each edge (a geodesic) sampled ``per_edge`` times,
    grown by the margin plus 0.01° (the chord-vs-geodesic gap of a level-6 edge is far less)."""
    ids = s2.from_token(np.asarray(tokens))
    face, i, j = s2.face_ij(ids, PARTITION_LEVEL)
    u_lo, u_hi, v_lo, v_hi = s2_geometry.uv_bounds(i, j, PARTITION_LEVEL)
    t = np.linspace(0.0, 1.0, per_edge, endpoint=False)
    cells = []
    for k in range(len(tokens)):
        du, dv = u_hi[k] - u_lo[k], v_hi[k] - v_lo[k]
        u_lo_k, u_hi_k = np.full_like(t, u_lo[k]), np.full_like(t, u_hi[k])
        v_lo_k, v_hi_k = np.full_like(t, v_lo[k]), np.full_like(t, v_hi[k])
        # counter-clockwise around the cell: bottom, right, top, left edges
        u = np.concatenate([u_lo[k] + du * t, u_hi_k, u_hi[k] - du * t, u_lo_k])
        v = np.concatenate([v_lo_k, v_lo[k] + dv * t, v_hi_k, v_hi[k] - dv * t])
        lat, lng = s2_geometry.normalized_latlng_deg(
            *s2_geometry.face_uv_to_xyz(np.full(len(u), face[k]), u, v)
        )
        if np.ptp(lng) > 180:  # across the antimeridian: the caller falls back to the box
            return ()
        cells.append(shapely.Polygon(np.column_stack([lng, lat])))
    region = shapely.union_all(cells).buffer(margin_deg + 0.01, quad_segs=2)
    polys = list(region.geoms) if isinstance(region, shapely.MultiPolygon) else [region]
    return tuple(
        tuple(
            tuple((round(x, 7), round(y, 7)) for x, y in ring.coords)
            for ring in (p.exterior, *p.interiors)
        )
        for p in polys
    )


def _region(tokens: Sequence[str], margin_deg: float) -> tuple[int, int, int, int]:
    ids = s2.from_token(np.asarray(tokens))
    face, i, j = s2.face_ij(ids, PARTITION_LEVEL)
    lat_lo, lat_hi, lng_lo, lng_hi = (
        np.degrees(a) for a in s2_geometry.cell_rect_bounds(face, i, j, PARTITION_LEVEL)
    )
    if np.any(lng_lo > lng_hi):  # a cell across the antimeridian: take every longitude
        lng_min, lng_max = -180.0, 180.0
    else:
        lng_min, lng_max = float(lng_lo.min()) - margin_deg, float(lng_hi.max()) + margin_deg
    lat_min, lat_max = float(lat_lo.min()) - margin_deg, float(lat_hi.max()) + margin_deg
    return (
        math.floor(max(lng_min, -180.0) * FIX),
        math.floor(max(lat_min, -90.0) * FIX),
        math.ceil(min(lng_max, 180.0) * FIX),
        math.ceil(min(lat_max, 90.0) * FIX),
    )


def group_token(group: PartitionGroup, partitions_per_group: int) -> str:
    level = group_level(partitions_per_group)
    return str(s2.to_token(s2.parent(s2.from_token(np.asarray(group.partitions[:1])), level))[0])


def affected_partitions(group: PartitionGroup, groups: Sequence[PartitionGroup]) -> list[str]:
    """A failed group's partitions, then every other requested partition whose cell meets its
    region: an object only that group saw can have rows there (a long segment, a large area)."""
    x0, y0, x1, y1 = (c / FIX for c in group.box)
    near = set(s2.to_token(s2_geometry.cover_bbox(y0, x0, y1, x1, PARTITION_LEVEL)).tolist())
    others = [t for g in groups if g.index != group.index for t in g.partitions if t in near]
    return list(group.partitions) + others
