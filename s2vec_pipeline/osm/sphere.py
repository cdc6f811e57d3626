"""Geometry on the unit sphere and on S2's cube faces, vectorized: unit vectors of lat/lng
points, the gnomonic (u, v) projection of a face and its pixel grid, and areas of polygons
whose edges are geodesics (S2's convention; a fan of geodesic triangles per ring, agreeing with
``S2Polygon::GetArea`` to ~1e-12). Used by ``osm.clip``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import shapely

from s2vec_pipeline.cells import s2_geometry

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG), as used by S2's S2Earth

# Face frames (S2::GetNorm, GetUAxis, GetVAxis): p = n + u * e_u + v * e_v on face f.
NORM, U_AXIS, V_AXIS = s2_geometry.FACE_C0, s2_geometry.FACE_CU, s2_geometry.FACE_CV


def xyz(lat_deg: np.ndarray, lng_deg: np.ndarray) -> np.ndarray:
    """Unit vectors, shape (n, 3), of points in degrees."""
    phi, theta = np.radians(lat_deg), np.radians(lng_deg)
    cos_phi = np.cos(phi)
    return np.column_stack((cos_phi * np.cos(theta), cos_phi * np.sin(theta), np.sin(phi)))


def uv_to_xyz(face: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Points (not normalized), shape (n, 3), of (u, v) coordinates on each point's face."""
    return NORM[face] + U_AXIS[face] * u[:, None] + V_AXIS[face] * v[:, None]


def uv_to_latlng(face: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = uv_to_xyz(face, u, v)
    return s2_geometry.normalized_latlng_deg(p[:, 0], p[:, 1], p[:, 2])


def project(p: np.ndarray, face: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, p·n) of unit vectors ``p`` on the plane of ``face`` (one face per point)."""
    dot = np.einsum("ij,ij->i", p, NORM[face])
    u = np.einsum("ij,ij->i", p, U_AXIS[face]) / dot
    v = np.einsum("ij,ij->i", p, V_AXIS[face]) / dot
    return u, v, dot


def uv_to_ij(u: np.ndarray, level: int) -> np.ndarray:
    """floor(2**level * UVtoST(u)) clamped to the face, int64 (S2::UVtoST, quadratic)."""
    w = 0.5 * np.sqrt(1 + 3 * np.abs(u))
    st = np.where(u >= 0, w, 1 - w)
    return np.clip(np.floor(st * (1 << level)), 0, (1 << level) - 1).astype(np.int64)


def grid_uv(k: np.ndarray, level: np.ndarray | int) -> np.ndarray:
    """u (or v) of grid line ``k`` at ``level``: STtoUV(k / 2**level). Every rectangle edge
    comes from here with an exact dyadic argument, so neighbours share edges bit for bit."""
    return s2_geometry.st_to_uv(np.ldexp(np.asarray(k, dtype=np.float64), -np.asarray(level)))


def solid_angles(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Signed areas (steradians) of the geodesic triangles (a, b, c) of unit vectors given as
    (3, n) component arrays, positive counter-clockwise (Van Oosterom & Strackee). The
    numerator is computed from differences to ``a``: exact for triangles of a few metres as
    for large ones."""
    ab, ac = b - a, c - a
    num = (
        a[0] * (ab[1] * ac[2] - ab[2] * ac[1])
        + a[1] * (ab[2] * ac[0] - ab[0] * ac[2])
        + a[2] * (ab[0] * ac[1] - ab[1] * ac[0])
    )
    den = 1 + (a * b).sum(axis=0) + (b * c).sum(axis=0) + (c * a).sum(axis=0)
    return 2 * np.arctan2(num, den)


def polygon_rings(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(coordinates, ring of each coordinate, geometry of each ring, whether each ring is an
    exterior) of (multi)polygons. Polygons without holes (most of them) are one ring each,
    read straight from their coordinates; the others go through one ragged-array export."""
    geoms = np.where(  # single-part multipolygons (as osmium writes every area): their part
        (shapely.get_type_id(geoms) == shapely.GeometryType.MULTIPOLYGON)
        & (shapely.get_num_geometries(geoms) == 1),
        shapely.get_geometry(geoms, 0),
        geoms,
    )
    simple = (shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON) & (
        shapely.get_num_interior_rings(geoms) == 0
    )
    simple_idx = np.flatnonzero(simple)
    coords, k = shapely.get_coordinates(geoms[simple_idx], return_index=True)
    parts = [(coords, k, simple_idx, np.ones(len(simple_idx), dtype=bool))]
    rest = np.flatnonzero(~simple & ~shapely.is_empty(geoms))
    if len(rest):
        try:
            kind, coords, offsets = shapely.to_ragged_array(geoms[rest])
            part_geom = rest
        except ValueError:  # a geometry collection among them: part by part
            sub, sub_geom = shapely.get_parts(geoms[rest], return_index=True)
            kind, coords, offsets = shapely.to_ragged_array(sub)
            part_geom = rest[sub_geom]
        if kind == shapely.GeometryType.MULTIPOLYGON:
            part_geom = np.repeat(part_geom, np.diff(offsets[2]))
        ring_off, part_off = offsets[0], offsets[1]
        rings_per_part = np.diff(part_off)
        exterior = np.zeros(len(ring_off) - 1, dtype=bool)
        exterior[part_off[:-1][rings_per_part > 0]] = True
        coord_ring = np.repeat(np.arange(len(ring_off) - 1), np.diff(ring_off))
        parts.append((coords, coord_ring, np.repeat(part_geom, rings_per_part), exterior))
    offset = np.cumsum([0] + [len(p[2]) for p in parts])
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] + o for p, o in zip(parts, offset, strict=False)]),
        np.concatenate([p[2] for p in parts]),
        np.concatenate([p[3] for p in parts]),
    )


def polygon_areas_m2(
    geoms: np.ndarray, to_xyz: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """Areas on the sphere of (multi)polygons whose edges are geodesics (S2's convention):
    each ring a fan of geodesic triangles from its first vertex, holes subtracted.
    ``to_xyz(coords, geometry index)`` gives the unit vectors of coordinates, shape (3, n)."""
    out = np.zeros(len(geoms))
    if len(geoms) == 0:
        return out
    coords, coord_ring, ring_geom, exterior = polygon_rings(geoms)
    if len(coords) < 3:
        return out
    xyz = to_xyz(coords, ring_geom[coord_ring])
    count = np.bincount(coord_ring, minlength=len(ring_geom))
    first = np.repeat(np.cumsum(count) - count, count)
    edge = np.flatnonzero(coord_ring[1:] == coord_ring[:-1])  # (closing vertex included)
    tri = solid_angles(xyz[:, first[edge]], xyz[:, edge], xyz[:, edge + 1])
    ring_area = np.abs(np.bincount(coord_ring[edge], weights=tri, minlength=len(ring_geom)))
    signed = np.where(exterior, ring_area, -ring_area)
    out += np.bincount(ring_geom, weights=signed, minlength=len(geoms))
    return out * EARTH_RADIUS_M**2


def xyz_components(lat_deg: np.ndarray, lng_deg: np.ndarray) -> np.ndarray:
    phi, theta = np.radians(lat_deg), np.radians(lng_deg)
    cos_phi = np.cos(phi)
    return np.stack((cos_phi * np.cos(theta), cos_phi * np.sin(theta), np.sin(phi)))


def areas_m2(geoms: np.ndarray) -> np.ndarray:
    """Areas on the sphere of (multi)polygons in (lng, lat) degrees, edges geodesics."""
    return polygon_areas_m2(
        np.asarray(geoms, dtype=object), lambda xy, _: xyz_components(xy[:, 1], xy[:, 0])
    )


def uv_areas_m2(pieces: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Areas on the sphere of polygons given in (u, v) of ``face`` (one face per piece)."""

    def to_xyz(uv: np.ndarray, owner: np.ndarray) -> np.ndarray:
        f = face[owner]
        u, v = uv[:, 0], uv[:, 1]
        p = np.stack([NORM[f, k] + U_AXIS[f, k] * u + V_AXIS[f, k] * v for k in range(3)])
        return p / np.sqrt((p * p).sum(axis=0))

    return polygon_areas_m2(pieces, to_xyz)


def cell_areas_m2(face: np.ndarray, i: np.ndarray, j: np.ndarray, level: int) -> np.ndarray:
    """The area :func:`uv_areas_m2` gives a piece equal to the whole cell (two triangles)."""
    u0, u1 = grid_uv(i, level), grid_uv(i + 1, level)
    v0, v1 = grid_uv(j, level), grid_uv(j + 1, level)
    c = []
    for u, v in ((u0, v0), (u1, v0), (u1, v1), (u0, v1)):
        p = uv_to_xyz(face, u, v)
        c.append(p / np.linalg.norm(p, axis=1)[:, None])
    c = [x.T for x in c]
    tri = solid_angles(c[0], c[1], c[2]) + solid_angles(c[0], c[2], c[3])
    return np.abs(tri) * EARTH_RADIUS_M**2
