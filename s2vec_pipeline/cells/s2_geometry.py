"""S2 cell geometry, bit-exact with the official S2 library: cell centres and corners in
lat/lng, and the exact level-N covering of a lat/lng box (``cover_bbox``; why it is computed
here rather than by ``S2RegionCoverer``: see ``cells/s2.py``'s docstring).

Built on ``cells/s2.py``'s cell ids and its internal checks (names with ``_``, shared within
this package only).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from s2vec_pipeline.cells.s2 import (  # noqa: F401 (internals shared within cells/)
    _DBL_EPSILON,
    _DEG_TO_RAD,
    _RAD_TO_DEG,
    _as_ids,
    _check_level,
    _decode,
    _require_valid,
    cell_id_from_face_ij,
)
from s2vec_pipeline.errors import InvalidBoundingBoxError

__all__ = [
    "FACE_C0",
    "FACE_CU",
    "FACE_CV",
    "cell_center_latlng",
    "cell_corners_latlng",
    "cell_rect_bounds",
    "cover_bbox",
    "face_uv_to_xyz",
    "normalized_latlng_deg",
    "st_to_uv",
    "uv_bounds",
]

# ---------------------------------------------------------------------------------------------
# Geometry: centers, corners
# ---------------------------------------------------------------------------------------------
# S2::FaceUVtoXYZ as coefficients: xyz[f] = C0[f] + CU[f] * u + CV[f] * v (each sum exact)
FACE_C0 = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, -1, 0], [0, 0, -1]], dtype=np.float64
)
FACE_CU = np.array(
    [[0, 1, 0], [-1, 0, 0], [-1, 0, 0], [0, 0, -1], [0, 0, -1], [0, 1, 0]], dtype=np.float64
)
FACE_CV = np.array(
    [[0, 0, 1], [0, 0, 1], [0, -1, 0], [0, -1, 0], [1, 0, 0], [1, 0, 0]], dtype=np.float64
)


def st_to_uv(s: np.ndarray) -> np.ndarray:
    """S2::STtoUV, quadratic projection."""
    t = 1 - s
    return np.where(s >= 0.5, (1 / 3.0) * (4 * s * s - 1), (1 / 3.0) * (1 - 4 * t * t))


def face_uv_to_xyz(
    face: np.ndarray, u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c0, cu, cv = FACE_C0[face], FACE_CU[face], FACE_CV[face]
    return tuple(c0[..., k] + cu[..., k] * u + cv[..., k] * v for k in range(3))  # type: ignore[return-value]


def _xyz_to_latlng_rad(
    x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """S2LatLng::Latitude / Longitude (the ``+ 0.0`` turns -0.0 into 0.0)."""
    lat = np.arctan2(z + 0.0, np.sqrt(x * x + y * y))
    lng = np.arctan2(y + 0.0, x + 0.0)
    return lat, lng


def normalized_latlng_deg(
    x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    norm = np.sqrt(x * x + y * y + z * z)
    inv = 1.0 / norm
    lat, lng = _xyz_to_latlng_rad(x * inv, y * inv, z * inv)
    return _RAD_TO_DEG * lat, _RAD_TO_DEG * lng


def cell_center_latlng(ids: object) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lng) in degrees of each cell's center (``S2Cell::GetCenter``)."""
    ids = _as_ids(ids)
    levels = _require_valid(ids)
    face, i, j = _decode(ids, levels)
    scale = np.ldexp(1.0, -(levels + 1))
    u = st_to_uv((2 * i + 1) * scale)
    v = st_to_uv((2 * j + 1) * scale)
    return normalized_latlng_deg(*face_uv_to_xyz(face, u, v))


def cell_corners_latlng(ids: object) -> np.ndarray:
    """Vertices of each cell, shape (n, 4, 2) of [lat, lng] degrees, in ``S2Cell::GetVertex``
    order (counter-clockwise: (u_lo, v_lo), (u_hi, v_lo), (u_hi, v_hi), (u_lo, v_hi))."""
    ids = np.ravel(_as_ids(ids))
    levels = _require_valid(ids)
    face, i, j = _decode(ids, levels)
    scale = np.ldexp(1.0, -levels)
    u_lo, u_hi = st_to_uv(i * scale), st_to_uv((i + 1) * scale)
    v_lo, v_hi = st_to_uv(j * scale), st_to_uv((j + 1) * scale)
    u = np.stack([u_lo, u_hi, u_hi, u_lo], axis=1)
    v = np.stack([v_lo, v_lo, v_hi, v_hi], axis=1)
    lat, lng = normalized_latlng_deg(*face_uv_to_xyz(face[:, None], u, v))
    return np.stack([lat, lng], axis=-1)


# ---------------------------------------------------------------------------------------------
# Covering a lat/lng rectangle
# ---------------------------------------------------------------------------------------------
_PI = math.pi
_HALF_PI = math.pi / 2  # M_PI_2
_QUARTER_PI = math.pi / 4  # M_PI_4
_POLE_MIN_LAT = math.asin(math.sqrt(1.0 / 3)) - 0.5 * _DBL_EPSILON
_U_AXIS_Z_IS_ZERO = np.array([True, True, True, False, False, True])  # S2::GetUAxis(f)[2] == 0
_V_AXIS_Z_IS_ZERO = np.array([False, False, True, True, True, True])  # S2::GetVAxis(f)[2] == 0

Vec3 = tuple[np.ndarray, np.ndarray, np.ndarray]


class _Rect:
    """An S2LatLngRect in radians (longitude as an S1Interval: lo > hi means inverted)."""

    def __init__(self, lat_lo: float, lat_hi: float, lng_lo: float, lng_hi: float) -> None:
        self.lat_lo, self.lat_hi, self.lng_lo, self.lng_hi = lat_lo, lat_hi, lng_lo, lng_hi

    def contains_latlng(self, lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
        lat_ok = (lat >= self.lat_lo) & (lat <= self.lat_hi)
        return lat_ok & _s1_contains(self.lng_lo, self.lng_hi, lng)

    def center_point(self) -> tuple[float, float, float]:
        lat = 0.5 * (self.lat_lo + self.lat_hi)
        lng = 0.5 * (self.lng_lo + self.lng_hi)
        if self.lng_lo > self.lng_hi:  # S1Interval::GetCenter of an inverted interval
            lng = lng + _PI if lng <= 0 else lng - _PI
        return _latlng_to_point(lat, lng)

    def vertex_points(self) -> list[tuple[float, float, float]]:
        lats = (self.lat_lo, self.lat_hi)
        lngs = (self.lng_lo, self.lng_hi)
        return [_latlng_to_point(lats[k >> 1], lngs[(k >> 1) ^ (k & 1)]) for k in range(4)]


def _latlng_to_point(lat: float, lng: float) -> tuple[float, float, float]:
    """S2LatLng::ToPoint (radians)."""
    cos_lat = math.cos(lat)
    return math.cos(lng) * cos_lat, math.sin(lng) * cos_lat, math.sin(lat)


def _s1_contains(lo: object, hi: object, p: object) -> np.ndarray:
    """S1Interval(lo, hi).Contains(p), broadcasting."""
    p = np.where(np.equal(p, -_PI), _PI, p)
    inverted = np.greater(lo, hi)
    empty = np.equal(lo, _PI) & np.equal(hi, -_PI)
    return np.where(inverted, ((p >= lo) | (p <= hi)) & ~empty, (p >= lo) & (p <= hi))


def _s1_remainder(x: np.ndarray) -> np.ndarray:
    """IEEE remainder(x, 2*pi) for |x| < 3*pi (exact, like the C library)."""
    return np.where(x > _PI, x - 2 * _PI, np.where(x < -_PI, x + 2 * _PI, x))


def _s1_from_point_pair(p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p1 = np.where(p1 == -_PI, _PI, p1)
    p2 = np.where(p2 == -_PI, _PI, p2)
    d = p2 - p1
    dist = np.where(d >= 0, d, (p2 + _PI) - (p1 - _PI))  # PositiveDistance(p1, p2)
    keep = dist <= _PI
    return np.where(keep, p1, p2), np.where(keep, p2, p1)


def _s1_expanded(lo: np.ndarray, hi: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """S1Interval::Expanded for margin >= 0 on non-empty intervals."""
    length = hi - lo
    length = np.where(length >= 0, length, length + 2 * _PI)
    length = np.where(length > 0, length, -1.0)
    full = length + 2 * margin + 2 * _DBL_EPSILON >= 2 * _PI
    new_lo = _s1_remainder(lo - margin)
    new_hi = _s1_remainder(hi + margin)
    # S1Interval(lo, hi) constructor normalisation of -pi, then "if (lo <= -pi) lo = pi".
    fixed_lo = np.where((new_lo == -_PI) & (new_hi != _PI), _PI, new_lo)
    fixed_hi = np.where((new_hi == -_PI) & (new_lo != _PI), _PI, new_hi)
    fixed_lo = np.where(fixed_lo <= -_PI, _PI, fixed_lo)
    return np.where(full, -_PI, fixed_lo), np.where(full, _PI, fixed_hi)


def _s1_intersects(lo: float, hi: float, y_lo: np.ndarray, y_hi: np.ndarray) -> np.ndarray:
    """S1Interval(lo, hi).Intersects(y) for non-empty intervals y."""
    y_inverted = y_lo > y_hi
    if lo > hi:  # inverted: every non-empty inverted interval contains pi
        return y_inverted | (y_lo <= hi) | (y_hi >= lo)
    return np.where(y_inverted, (y_lo <= hi) | (y_hi >= lo), (y_lo <= hi) & (y_hi >= lo))


def _r1_intersects(lo: float, hi: float, y_lo: np.ndarray, y_hi: np.ndarray) -> np.ndarray:
    """R1Interval(lo, hi).Intersects(y)."""
    return np.where(lo <= y_lo, (y_lo <= hi) & (y_lo <= y_hi), (lo <= y_hi) & (lo <= hi))


def _face_rect_bounds() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """S2Cell::GetRectBound for the 6 face cells, expanded by (DBL_EPSILON, 0)."""
    q, h, p = _QUARTER_PI, _HALF_PI, _POLE_MIN_LAT
    lat = [(-q, q), (-q, q), (p, h), (-q, q), (-q, q), (-h, -p)]
    lng = [(-q, q), (q, 3 * q), (-_PI, _PI), (3 * q, -3 * q), (-3 * q, -q), (-_PI, _PI)]
    lat_lo = np.maximum(np.array([a for a, _ in lat]) - _DBL_EPSILON, -_HALF_PI)
    lat_hi = np.minimum(np.array([b for _, b in lat]) + _DBL_EPSILON, _HALF_PI)
    lng_lo, lng_hi = _s1_expanded(np.array([a for a, _ in lng]), np.array([b for _, b in lng]), 0.0)
    return lat_lo, lat_hi, lng_lo, lng_hi


def uv_bounds(
    i: np.ndarray, j: np.ndarray, level: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """S2CellId::IJLevelToBoundUV: (u_lo, u_hi, v_lo, v_hi)."""
    scale = math.ldexp(1.0, -level)  # IJtoSTMin, exact
    return (
        st_to_uv(i * scale),
        st_to_uv((i + 1) * scale),
        st_to_uv(j * scale),
        st_to_uv((j + 1) * scale),
    )


def cell_rect_bounds(
    face: np.ndarray, i: np.ndarray, j: np.ndarray, level: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """S2Cell::GetRectBound for cells at ``level`` >= 1 (same floating-point steps)."""
    u_lo, u_hi, v_lo, v_hi = uv_bounds(i, j, level)
    u = u_lo + u_hi
    v = v_lo + v_hi
    ci = np.where(_U_AXIS_Z_IS_ZERO[face], u < 0, u > 0)
    cj = np.where(_V_AXIS_Z_IS_ZERO[face], v < 0, v > 0)
    ua, ub = np.where(ci, u_hi, u_lo), np.where(ci, u_lo, u_hi)  # u[i], u[1-i]
    va, vb = np.where(cj, v_hi, v_lo), np.where(cj, v_lo, v_hi)  # v[j], v[1-j]
    lat1, _ = _xyz_to_latlng_rad(*face_uv_to_xyz(face, ua, va))
    lat2, _ = _xyz_to_latlng_rad(*face_uv_to_xyz(face, ub, vb))
    _, lng1 = _xyz_to_latlng_rad(*face_uv_to_xyz(face, ua, vb))
    _, lng2 = _xyz_to_latlng_rad(*face_uv_to_xyz(face, ub, va))
    margin = 2 * _DBL_EPSILON
    lat_lo = np.maximum(np.minimum(lat1, lat2) - margin, -_HALF_PI)
    lat_hi = np.minimum(np.maximum(lat1, lat2) + margin, _HALF_PI)
    lng_lo, lng_hi = _s1_expanded(*_s1_from_point_pair(lng1, lng2), margin)
    polar = (lat_lo == -_HALF_PI) | (lat_hi == _HALF_PI)  # PolarClosure
    return lat_lo, lat_hi, np.where(polar, -_PI, lng_lo), np.where(polar, _PI, lng_hi)


def _cross(a: Vec3, b: Vec3) -> Vec3:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a: Vec3, b: Vec3) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _normalize(a: Vec3) -> Vec3:
    norm = np.sqrt(_dot(a, a))
    inv = np.where(norm != 0, 1.0 / norm, 0.0)
    return a[0] * inv, a[1] * inv, a[2] * inv


def _cell_contains_point(
    face: np.ndarray, uv: tuple[np.ndarray, ...], p: tuple[float, float, float]
) -> np.ndarray:
    """S2Cell::Contains(p) for one point and many cells: S2::FaceXYZtoUV, then the (u, v) bound
    expanded by DBL_EPSILON."""
    x, y, z = p
    main = np.array([x, y, z, x, y, z])[face]
    num_u = np.array([y, -x, -x, z, z, -y])[face]
    num_v = np.array([z, z, -y, y, -x, -x])[face]
    on_face = np.where(face < 3, main > 0, main < 0)
    u = num_u / np.where(on_face, main, 1.0)
    v = num_v / np.where(on_face, main, 1.0)
    u_lo, u_hi, v_lo, v_hi = uv
    eps = _DBL_EPSILON
    return on_face & (u >= u_lo - eps) & (u <= u_hi + eps) & (v >= v_lo - eps) & (v <= v_hi + eps)


def _crosses(a: Vec3, b: Vec3, c: Vec3, d: Vec3) -> np.ndarray:
    """S2::CrossingSign(a, b, c, d) > 0: the edges AB and CD cross at an interior point (plain
    floating-point orientation tests; ties count as no crossing)."""
    ab = _cross(a, b)
    cd = _cross(c, d)
    acb = -np.sign(_dot(ab, c))
    bda = np.sign(_dot(ab, d))
    cbd = -np.sign(_dot(cd, b))
    dac = np.sign(_dot(cd, a))
    return (acb != 0) & (acb == bda) & (acb == cbd) & (acb == dac)


def _intersects_lat_edge(a: Vec3, b: Vec3, lat: float, rect: _Rect) -> np.ndarray:
    """S2LatLngRect::IntersectsLatEdge: does the geodesic edge AB cross the line of latitude
    ``lat`` inside the rectangle's longitude interval?"""
    n = _cross(_add(b, a), _sub(b, a))  # RobustCrossProd(a, b) for distinct a, b
    z = _normalize(n)
    flip = np.where(z[2] < 0, -1.0, 1.0)
    z = (z[0] * flip, z[1] * flip, z[2] * flip)
    y = _normalize((z[1], -z[0], np.zeros_like(z[0])))  # z x (0, 0, 1)
    x = _cross(y, z)
    sin_lat = math.sin(lat)
    reaches = abs(sin_lat) < x[2]  # False when the great circle stays below the latitude
    cos_theta = sin_lat / np.where(reaches, x[2], 1.0)
    sin_theta = np.sqrt(np.maximum(1 - cos_theta * cos_theta, 0.0))
    theta = np.arctan2(sin_theta, cos_theta)
    ab_lo, ab_hi = _s1_from_point_pair(
        np.arctan2(_dot(a, y), _dot(a, x)), np.arctan2(_dot(b, y), _dot(b, x))
    )
    hit = np.zeros(theta.shape, dtype=bool)
    for sign in (1.0, -1.0):
        isect_x = x[0] * cos_theta + sign * (y[0] * sin_theta)
        isect_y = x[1] * cos_theta + sign * (y[1] * sin_theta)
        lng = np.arctan2(isect_y, isect_x)
        hit |= _s1_contains(ab_lo, ab_hi, sign * theta) & _s1_contains(
            rect.lng_lo, rect.lng_hi, lng
        )
    return reaches & hit


def _add(a: Vec3, b: Vec3) -> Vec3:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _sub(a: Vec3, b: Vec3) -> Vec3:
    return a[0] - b[0], a[1] - b[1], a[2] - b[2]


def _rect_intersects_cells(
    rect: _Rect, face: np.ndarray, i: np.ndarray, j: np.ndarray, level: int
) -> np.ndarray:
    """S2LatLngRect::Intersects(S2Cell) -- the exact test -- for cells at ``level`` whose bound
    is already known to intersect the rectangle."""
    uv = uv_bounds(i, j, level)
    u_lo, u_hi, v_lo, v_hi = uv
    scale = math.ldexp(1.0, -(level + 1))
    # The rectangle contains the cell's center, or the cell contains the rectangle's center.
    center = face_uv_to_xyz(face, st_to_uv((2 * i + 1) * scale), st_to_uv((2 * j + 1) * scale))
    hit = rect.contains_latlng(*_xyz_to_latlng_rad(*center))
    hit |= _cell_contains_point(face, uv, rect.center_point())
    # A vertex of one lies in the other.
    verts = [
        _normalize(face_uv_to_xyz(face, uu, vv))
        for uu, vv in ((u_lo, v_lo), (u_hi, v_lo), (u_hi, v_hi), (u_lo, v_hi))
    ]
    lls = [_xyz_to_latlng_rad(*vert) for vert in verts]
    for k in range(4):
        hit |= rect.contains_latlng(*lls[k])
    for p in rect.vertex_points():
        hit |= _cell_contains_point(face, uv, p)
    # The boundaries cross.
    lng_edge_ends = [
        (lng, _latlng_to_point(rect.lat_lo, lng), _latlng_to_point(rect.lat_hi, lng))
        for lng in (rect.lng_lo, rect.lng_hi)
    ]
    for k in range(4):
        a, b = verts[k], verts[(k + 1) & 3]
        edge_lo, edge_hi = _s1_from_point_pair(lls[k][1], lls[(k + 1) & 3][1])
        near = ~hit & _s1_intersects(rect.lng_lo, rect.lng_hi, edge_lo, edge_hi)
        if not near.any():
            continue
        for lng, c, d in lng_edge_ends:
            cc = tuple(np.full(face.shape, t) for t in c)
            dd = tuple(np.full(face.shape, t) for t in d)
            hit |= near & _s1_contains(edge_lo, edge_hi, lng) & _crosses(a, b, cc, dd)
        for lat in (rect.lat_lo, rect.lat_hi):
            hit |= near & _intersects_lat_edge(a, b, lat, rect)
    return hit


def _bbox_value(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidBoundingBoxError(f"{name} must be a number of degrees, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidBoundingBoxError(f"{name} must be a finite number of degrees, got {out!r}")
    return out


def cover_bbox(
    min_lat: float,
    min_lng: float,
    max_lat: float,
    max_lng: float,
    level: int = 6,
    *,
    max_cells: int = 100_000,
) -> np.ndarray:
    """Sorted uint64 ids of exactly the cells at ``level`` that intersect a lat/lng rectangle.

    Corners are in degrees; ``min_lng > max_lng`` means the box crosses the antimeridian; a
    point (min == max) or a box touching a pole is fine. The rectangle is the official
    ``S2LatLngRect(FromDegrees(min_lat, min_lng), FromDegrees(max_lat, max_lng))`` and boxes
    sharing an edge both get the cells on that edge (closed sets).

    Approach: starting from the 6 face cells, cells are subdivided level by level and kept
    while their lat/lng bound (``S2Cell::GetRectBound``, same floating-point steps and safety
    margins) intersects the rectangle -- a conservative test, exactly the one the official
    ``S2RegionCoverer`` uses (``S2LatLngRect::MayIntersect``). The cells left at ``level`` then
    get the official exact test, ``S2LatLngRect::Intersects(S2Cell)`` (center and vertex
    containment both ways, then edge crossings), vectorized. The official coverer with
    ``min_level = max_level = level`` returns the same cells except that it may keep a cell near
    a corner of the box whose bound, but not the cell itself, reaches the box.

    Raises InvalidBoundingBoxError for malformed boxes or more than ``max_cells`` cells.
    """
    level = _check_level(level)
    rect, box = _checked_rect(min_lat, min_lng, max_lat, max_lng)
    _check_expected_cells(rect, box, level, max_cells)
    face, i, j = _cells_meeting(rect, box, level, max_cells)
    if face.size > max_cells:
        raise InvalidBoundingBoxError(
            f"box {box} intersects {face.size:,} level-{level} "
            f"cells, more than max_cells = {max_cells:,}: use a smaller box or a coarser level"
        )
    return np.sort(cell_id_from_face_ij(face, i, j, level))


def _checked_rect(
    min_lat: float, min_lng: float, max_lat: float, max_lng: float
) -> tuple[_Rect, str]:
    """The official ``S2LatLngRect`` of a box in degrees, and the box as text for messages."""
    lat0 = _bbox_value("min_lat", min_lat)
    lng0 = _bbox_value("min_lng", min_lng)
    lat1 = _bbox_value("max_lat", max_lat)
    lng1 = _bbox_value("max_lng", max_lng)
    for name, value in (("min_lat", lat0), ("max_lat", lat1)):
        if not -90.0 <= value <= 90.0:
            raise InvalidBoundingBoxError(f"{name} = {value} is outside [-90, 90] degrees")
    for name, value in (("min_lng", lng0), ("max_lng", lng1)):
        if not -180.0 <= value <= 180.0:
            raise InvalidBoundingBoxError(
                f"{name} = {value} is outside [-180, 180] degrees (for a box crossing the "
                f"antimeridian pass min_lng > max_lng, e.g. 170 and -170)"
            )
    if lat0 > lat1:
        raise InvalidBoundingBoxError(
            f"min_lat = {lat0} is greater than max_lat = {lat1}: pass the southern edge first "
            f"(min_lat <= max_lat)"
        )
    a, b = _DEG_TO_RAD * lng0, _DEG_TO_RAD * lng1
    # S1Interval(lo, hi) constructor: -180 stands for 180 unless the interval is full.
    rect = _Rect(
        _DEG_TO_RAD * lat0,
        _DEG_TO_RAD * lat1,
        _PI if (a == -_PI and b != _PI) else a,
        _PI if (b == -_PI and a != _PI) else b,
    )
    if rect.lng_lo == _PI and rect.lng_hi == -_PI:
        raise InvalidBoundingBoxError(
            "min_lng = 180 with max_lng = -180 is an empty longitude range: pass -180 and 180 "
            "for all longitudes, or 180 and 180 for the antimeridian line"
        )
    return rect, f"({lat0}, {lng0}) - ({lat1}, {lng1})"


def _check_expected_cells(rect: _Rect, box: str, level: int, max_cells: int) -> None:
    """Refuse at once a box whose area alone needs more than ``max_cells`` cells."""
    lng_span = rect.lng_hi - rect.lng_lo
    if lng_span < 0:
        lng_span += 2 * _PI
    area = lng_span * (math.sin(rect.lat_hi) - math.sin(rect.lat_lo))
    avg_cell_area = 4 * _PI / (6 * 4.0**level)
    if area > avg_cell_area * max_cells:
        fits = level + math.floor(math.log(max_cells * avg_cell_area / area, 4))
        raise InvalidBoundingBoxError(
            f"box {box} needs about {area / avg_cell_area:,.0f} "
            f"level-{level} cells, more than max_cells = {max_cells:,}: use a smaller box or a "
            f"coarser level (level {max(fits, 0)} or less)"
        )


def _cells_meeting(
    rect: _Rect, box: str, level: int, max_cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(face, i, j) of the cells at ``level`` that intersect ``rect``: subdivided from the faces
    while their bound may intersect (``MayIntersect``), then the exact ``Intersects`` test."""

    def keep(bounds: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        lat_lo, lat_hi, lng_lo, lng_hi = bounds
        return _r1_intersects(rect.lat_lo, rect.lat_hi, lat_lo, lat_hi) & _s1_intersects(
            rect.lng_lo, rect.lng_hi, lng_lo, lng_hi
        )

    with np.errstate(invalid="ignore", divide="ignore"):
        face = np.arange(6, dtype=np.int64)
        i = np.zeros(6, dtype=np.int64)
        j = np.zeros(6, dtype=np.int64)
        sel = keep(_face_rect_bounds())
        face, i, j = face[sel], i[sel], j[sel]
        for k in range(1, level + 1):
            face = np.repeat(face, 4)
            i = np.repeat(2 * i, 4) + np.tile([0, 0, 1, 1], i.size)
            j = np.repeat(2 * j, 4) + np.tile([0, 1, 0, 1], j.size)
            sel = keep(cell_rect_bounds(face, i, j, k))
            face, i, j = face[sel], i[sel], j[sel]
            if face.size > 4 * max_cells:
                raise InvalidBoundingBoxError(
                    f"box {box} needs more than max_cells = "
                    f"{max_cells:,} cells at level {level}: use a smaller box or a coarser level"
                )
        sel = _rect_intersects_cells(rect, face, i, j, level)
    return face[sel], i[sel], j[sel]
