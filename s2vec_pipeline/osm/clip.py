"""Exact per-pixel measures: polygons and lines cut along S2 cell boundaries, vectorized.

An S2 cell is bounded by geodesics, and on its cube face the gnomonic projection
``(u, v) = (p·e_u / p·n, p·e_v / p·n)`` (``n`` the face's axis, ``p`` a point on the sphere) maps
geodesics to straight lines. In a face's (u, v) plane the cells of a level are therefore exact
axis-aligned rectangles (``S2CellId::IJLevelToBoundUV``), and an OSM edge (taken as a geodesic,
as S2 and BigQuery do) is a straight segment. So:

- **areas** (:func:`polygon_cell_areas`): each polygon is projected to the (u, v) plane of each
  face it lies on, then cut by rectangles with GEOS' rectangle clipping (``clip_by_rect``)
  *hierarchically*: a piece lying in one cell of a level goes down to the deepest cell holding
  its bounding box without any clipping; a piece spanning several is clipped by the 2 or 4
  children it touches. A piece equal to its cell ("full") is not clipped further: every
  descendant pixel is full. A lake of 10^5 pixels therefore costs clips only along its outline,
  but still yields one entry per pixel it covers (the rows are the cost: ~4**11 level-17
  pixels for a polygon covering a level-6 cell; ``partitions`` skips unrequested level-6
  cells). Areas are measured on the sphere, edges as geodesics: a fan of geodesic triangles
  per ring (:func:`areas_m2`), agreeing with ``S2Polygon::GetArea`` to ~1e-12.
- **lengths** (:func:`line_cell_lengths`): each segment whose two ends lie in different pixel
  cells is cut where it crosses the pixel grid lines of its face (and the face edges), each
  piece measured as a great-circle arc; the pieces sum to the segment's length.
- **fast path**: S2 cells are convex on the sphere, so a polygon whose vertices all lie in one
  pixel cell lies in it, and so does a segment with both ends in one cell: those go to that
  cell whole, with no clipping (most buildings and most road segments at city pixel levels).

Every value is a function of the object alone (its geometry and the level), computed in the same
order whatever else is in the batch, so the rows of an object seen by two extraction workers are
identical.

Limit: an object must lie within ~84° of the centre of each face it touches (true of any OSM
feature short of a continent); others keep their whole area in the cell of their inner point
and are counted in ``fallbacks``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import shapely

from s2vec_pipeline.cells import s2, s2_geometry
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL
from s2vec_pipeline.osm import sphere
from s2vec_pipeline.osm.sphere import EARTH_RADIUS_M, areas_m2

__all__ = ["EARTH_RADIUS_M", "CellPieces", "areas_m2", "line_cell_lengths", "polygon_cell_areas"]

#: Smallest p·n for a vertex projected onto face n (cos 84°): beyond, (u, v) blows up.
_MIN_PROJECTION_DOT = 0.1
#: A piece covering this share of its cell's (u, v) rectangle is the whole cell.
_FULL_SHARE = 1.0 - 1e-9
#: Pieces clipped per GEOS call (bounds the temporaries of one call).
_CLIP_CHUNK = 1 << 16


@dataclass
class CellPieces:
    """One entry per (object, pixel cell) for areas, per (segment, pixel cell) for lengths.

    ``index``: the object's index in the input array; ``cell``: pixel cell id (uint64);
    ``value``: square metres or metres inside that cell; ``lat``/``lng``: a point of the piece
    inside the cell (degrees); ``clipped``: how many objects needed cutting; ``fallbacks``: how
    many could not be projected and went whole to their inner point's cell."""

    index: np.ndarray
    cell: np.ndarray
    value: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    clipped: int = 0
    fallbacks: int = 0


def _empty_pieces() -> CellPieces:
    f = np.empty(0, dtype=np.float64)
    return CellPieces(np.empty(0, np.int64), np.empty(0, np.uint64), f, f.copy(), f.copy())


def _concat(parts: list[CellPieces], clipped: int, fallbacks: int) -> CellPieces:
    parts = [p for p in parts if len(p.index)] or [_empty_pieces()]
    columns = {
        k: np.concatenate([getattr(p, k) for p in parts])
        for k in ("index", "cell", "value", "lat", "lng")
    }
    return CellPieces(**columns, clipped=clipped, fallbacks=fallbacks)


# --------------------------------------------------------------------------- polygons


def polygon_cell_areas(
    geoms: np.ndarray, level: int, partitions: Collection[str] | None = None
) -> CellPieces:
    """Per (polygon, pixel cell at ``level``) the area of the polygon inside the cell.

    ``geoms``: (multi)polygons in (lng, lat) degrees. ``partitions``: level-6 tokens; when given,
    pieces in other level-6 cells may be left out (work saved on polygons reaching far beyond
    the requested cells; the caller filters anyway). A polygon inside one pixel cell gives one
    entry with its whole area (:func:`areas_m2`) at its :func:`shapely.point_on_surface`."""
    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) == 0:
        return _empty_pieces()
    coords, owner = shapely.get_coordinates(geoms, return_index=True)
    vertices = _Vertices(coords, owner, len(geoms), level)
    lo, hi = vertices.reduce(vertices.cell)
    has = vertices.count > 0
    single = np.flatnonzero(has & (lo == hi))
    multi = np.flatnonzero(has & (lo != hi))

    parts = []
    if len(single):
        inside = shapely.point_on_surface(geoms[single])
        parts.append(
            CellPieces(
                single,
                lo[single],
                areas_m2(geoms[single]),
                shapely.get_y(inside),
                shapely.get_x(inside),
            )
        )
    fallbacks = 0
    if len(multi):
        item_obj, item_face, to_face, failed = _faces_of(multi, vertices)
        if len(item_obj):
            # Each item's object projected onto its face (the transform sees the items'
            # coordinates concatenated in item order).
            pieces = geoms[item_obj]
            src = vertices.of(item_obj)
            counts = vertices.count[item_obj]
            u, v, _ = sphere.project(vertices.xyz[src], np.repeat(item_face, counts))
            uv = np.column_stack((u, v))
            pieces = shapely.transform(pieces, lambda _: uv)
            items = _Items(item_obj, item_face, pieces, level, partitions)
            parts.append(items.run(to_face))
        if len(failed):
            fallbacks = len(failed)
            inside = shapely.point_on_surface(geoms[failed])
            lat, lng = shapely.get_y(inside), shapely.get_x(inside)
            parts.append(
                CellPieces(
                    failed,
                    s2.latlng_to_cell_id(lat, lng, level),
                    areas_m2(geoms[failed]),
                    lat,
                    lng,
                )
            )
    return _concat(parts, clipped=len(multi), fallbacks=fallbacks)


class _Vertices:
    """The coordinates of many geometries (contiguous per geometry), with their pixel cells and
    unit vectors, and per-geometry reductions."""

    def __init__(self, coords: np.ndarray, owner: np.ndarray, n: int, level: int) -> None:
        self.coords = coords
        self.cell = s2.latlng_to_cell_id(coords[:, 1], coords[:, 0], level)
        self.face = (self.cell >> np.uint64(61)).astype(np.int64)
        self.xyz = sphere.xyz(coords[:, 1], coords[:, 0])
        self.count = np.bincount(owner, minlength=n)
        self.start = np.cumsum(self.count) - self.count

    def of(self, objs: np.ndarray) -> np.ndarray:
        """Indices of the coordinates of ``objs``, object after object."""
        return np.repeat(self.start[objs], self.count[objs]) + _ramp(self.count[objs])

    def reduce(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per geometry, (min, max) of per-coordinate ``values`` (a geometry without
        coordinates gets (max, min) of the dtype)."""
        has = self.count > 0
        info = np.iinfo(values.dtype) if values.dtype.kind in "iu" else np.finfo(values.dtype)
        lo = np.full(len(self.count), info.max, dtype=values.dtype)
        hi = np.full(len(self.count), info.min, dtype=values.dtype)
        if len(values):
            lo[has] = np.minimum.reduceat(values, self.start[has])
            hi[has] = np.maximum.reduceat(values, self.start[has])
        return lo, hi


def _faces_of(
    multi: np.ndarray, vertices: _Vertices
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Items (object, face) to cut, whether each item must first be clipped to its face's
    square, and the objects that cannot be projected. An object whose vertices lie on one face
    is projected on that face only (a face is convex on the sphere, so the object lies in it);
    otherwise on every face where all its vertices are within ~84° of the face's centre (an
    edge may cross a face holding none of its vertices, near a cube corner); if a face holding
    one of its vertices is not among them, the object cannot be cut."""
    fmin, fmax = vertices.reduce(vertices.face)
    one_face = multi[fmin[multi] == fmax[multi]]
    several = multi[fmin[multi] != fmax[multi]]
    item_obj, item_face, to_face = [one_face], [fmin[one_face]], [np.zeros(len(one_face), bool)]
    failed = np.empty(0, dtype=np.int64)
    if len(several):
        src = vertices.of(several)
        local = np.repeat(np.arange(len(several)), vertices.count[several])
        starts = np.cumsum(vertices.count[several]) - vertices.count[several]
        xyz = vertices.xyz[src]
        # (6, k): the smallest p·n over each object's vertices, and which faces hold a vertex
        min_dot = np.stack([np.minimum.reduceat(xyz @ sphere.NORM[f], starts) for f in range(6)])
        holds = np.zeros((6, len(several)), dtype=bool)
        holds[vertices.face[src], local] = True
        ok = min_dot > _MIN_PROJECTION_DOT
        good = ~np.any(holds & ~ok, axis=0)
        failed = several[~good]
        k_idx, f_idx = np.nonzero((ok & good[None, :]).T)  # by object, then face
        item_obj.append(several[k_idx])
        item_face.append(f_idx)
        to_face.append(np.ones(len(k_idx), dtype=bool))
    order = np.argsort(np.concatenate(item_obj), kind="stable")
    return (
        np.concatenate(item_obj)[order],
        np.concatenate(item_face)[order],
        np.concatenate(to_face)[order],
        failed,
    )


def _ramp(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c-1 for each count c, concatenated."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.arange(total) - np.repeat(ends - counts, counts)


class _Items:
    """Pieces of polygons in the (u, v) plane of a face, each inside a cell (face, lvl, i, j)
    (level 0: the face); :meth:`run` cuts them down to the pixel level."""

    def __init__(
        self,
        obj: np.ndarray,
        face: np.ndarray,
        geom: np.ndarray,
        level: int,
        partitions: Collection[str] | None,
    ) -> None:
        self.level = level
        self.wanted = None if partitions is None else np.asarray(sorted(partitions), dtype=str)
        self.obj, self.face, self.geom = obj, face, geom
        self.lvl = np.zeros(len(obj), dtype=np.int64)
        self.i = np.zeros(len(obj), dtype=np.int64)
        self.j = np.zeros(len(obj), dtype=np.int64)
        self.done: list[tuple[np.ndarray, ...]] = []  # (obj, face, i, j, geom) at the pixel level
        self.full: list[tuple[np.ndarray, ...]] = []  # (obj, face, lvl, i, j): whole cells

    def run(self, to_face: np.ndarray) -> CellPieces:
        """Items flagged ``to_face`` (objects on several faces) are first clipped to their face's
        square; then every item goes down to the pixel level."""
        if to_face.any():
            k = np.flatnonzero(to_face)
            self.geom[k] = shapely.lib.clip_by_rect(self.geom[k], -1.0, -1.0, 1.0, 1.0)
            keep = np.ones(len(self.obj), dtype=bool)
            keep[k] = shapely.area(self.geom[k]) > 0
            self._take(keep)
        self._settle()
        self._prune()
        while len(self.obj):
            at_pixel = self.lvl == self.level
            if at_pixel.any():
                k = np.flatnonzero(at_pixel)
                self.done.append((self.obj[k], self.face[k], self.i[k], self.j[k], self.geom[k]))
                self._take(~at_pixel)
            if len(self.obj):
                self._split()
                self._settle()
                self._prune()
        return self._result()

    def _take(self, keep: np.ndarray) -> None:
        for name in ("obj", "face", "geom", "lvl", "i", "j"):
            setattr(self, name, getattr(self, name)[keep])

    def _settle(self) -> None:
        """Move every item down to the deepest cell holding its bounding box (no clipping)."""
        x0, y0, x1, y1 = shapely.bounds(self.geom).T
        shift = self.level - self.lvl
        base_i, base_j = self.i << shift, self.j << shift
        top = (np.int64(1) << shift) - 1
        i0 = np.clip(sphere.uv_to_ij(x0, self.level), base_i, base_i + top)
        i1 = np.clip(sphere.uv_to_ij(x1, self.level), base_i, base_i + top)
        j0 = np.clip(sphere.uv_to_ij(y0, self.level), base_j, base_j + top)
        j1 = np.clip(sphere.uv_to_ij(y1, self.level), base_j, base_j + top)
        spread = np.maximum(i0 ^ i1, j0 ^ j1)
        up = np.zeros(len(spread), dtype=np.int64)  # levels above the pixel level: bit length
        nz = spread > 0
        up[nz] = np.floor(np.log2(spread[nz])).astype(np.int64) + 1
        self.lvl = self.level - up
        self.i, self.j = i0 >> up, j0 >> up

    def _prune(self) -> None:
        """Drop items in unrequested level-6 cells."""
        keep = _in_partitions(self.face, self.lvl, self.i, self.j, self.wanted)
        if keep is not None:
            self._take(keep)

    def _split(self) -> None:
        """Clip each item by the children (one level down) its bounding box touches: two or
        four of them, since the item was settled."""
        child = self.lvl + 1
        x0, y0, x1, y1 = shapely.bounds(self.geom).T
        u_mid = sphere.grid_uv(2 * self.i + 1, child)
        v_mid = sphere.grid_uv(2 * self.j + 1, child)
        item_l, di_l, dj_l = [], [], []
        for di in (0, 1):
            for dj in (0, 1):
                touch_u = x0 < u_mid if di == 0 else x1 > u_mid
                touch_v = y0 < v_mid if dj == 0 else y1 > v_mid
                k = np.flatnonzero(touch_u & touch_v)
                item_l.append(k)
                di_l.append(np.full(len(k), di))
                dj_l.append(np.full(len(k), dj))
        item = np.concatenate(item_l)
        order = np.argsort(item, kind="stable")  # children of one item together, fixed order
        item = item[order]
        di, dj = np.concatenate(di_l)[order], np.concatenate(dj_l)[order]
        ci, cj, cl = 2 * self.i[item] + di, 2 * self.j[item] + dj, child[item]
        u0, u1 = sphere.grid_uv(ci, cl), sphere.grid_uv(ci + 1, cl)
        v0, v1 = sphere.grid_uv(cj, cl), sphere.grid_uv(cj + 1, cl)
        geom = np.empty(len(item), dtype=object)
        for s in range(0, len(item), _CLIP_CHUNK):
            t = slice(s, s + _CLIP_CHUNK)
            geom[t] = shapely.lib.clip_by_rect(self.geom[item[t]], u0[t], v0[t], u1[t], v1[t])
        area = shapely.area(geom)
        full = area >= _FULL_SHARE * (u1 - u0) * (v1 - v0)
        if full.any():
            f = np.flatnonzero(full)
            self.full.append((self.obj[item[f]], self.face[item[f]], cl[f], ci[f], cj[f]))
        keep = (area > 0) & ~full
        self.obj, self.face = self.obj[item[keep]], self.face[item[keep]]
        self.geom, self.lvl, self.i, self.j = geom[keep], cl[keep], ci[keep], cj[keep]

    def _result(self) -> CellPieces:
        level = self.level
        parts = []
        if self.done:
            obj, face, i, j, geom = (np.concatenate(c) for c in zip(*self.done, strict=True))
            inside = shapely.point_on_surface(geom)
            lat, lng = sphere.uv_to_latlng(face, shapely.get_x(inside), shapely.get_y(inside))
            ids = s2.cell_id_from_face_ij(face, i, j, level)
            parts.append(CellPieces(obj, ids, sphere.uv_areas_m2(geom, face), lat, lng))
        if self.full:
            obj, face, lvl, i, j = (np.concatenate(c) for c in zip(*self.full, strict=True))
            if self.wanted is not None:  # whole cells above level 6: their wanted level-6 cells
                obj, face, lvl, i, j = _descend(obj, face, lvl, i, j, PARTITION_LEVEL)
                keep = _in_partitions(face, lvl, i, j, self.wanted)
                obj, face, lvl, i, j = obj[keep], face[keep], lvl[keep], i[keep], j[keep]
            obj, face, _, i, j = _descend(obj, face, lvl, i, j, level)
            ids = s2.cell_id_from_face_ij(face, i, j, level)
            lat, lng = s2_geometry.cell_center_latlng(ids)
            parts.append(CellPieces(obj, ids, sphere.cell_areas_m2(face, i, j, level), lat, lng))
        return _concat(parts, 0, 0)


def _in_partitions(
    face: np.ndarray, lvl: np.ndarray, i: np.ndarray, j: np.ndarray, wanted: np.ndarray | None
) -> np.ndarray | None:
    """True for cells above level 6 or inside a wanted level-6 cell; None if all are wanted."""
    if wanted is None:
        return None
    deep = lvl >= PARTITION_LEVEL
    shift = np.where(deep, lvl - PARTITION_LEVEL, 0)
    ids = s2.cell_id_from_face_ij(face, i >> shift, j >> shift, PARTITION_LEVEL)
    return ~deep | np.isin(s2.to_token(ids), wanted)


def _descend(
    obj: np.ndarray, face: np.ndarray, lvl: np.ndarray, i: np.ndarray, j: np.ndarray, level: int
) -> tuple[np.ndarray, ...]:
    """Whole cells replaced by their descendants at ``level`` (cells at or below it kept)."""
    up = np.maximum(level - lvl, 0)
    side = np.int64(1) << up
    n = side * side
    rep = np.repeat(np.arange(len(obj)), n)
    k = _ramp(n)
    s = side[rep]
    return (
        obj[rep],
        face[rep],
        np.maximum(lvl, level)[rep],
        (i[rep] << up[rep]) + k // s,
        (j[rep] << up[rep]) + k % s,
    )


# --------------------------------------------------------------------------- lines


def line_cell_lengths(lines: np.ndarray, level: int) -> CellPieces:
    """Per piece of segment inside one pixel cell at ``level``, in line order then along each
    line: the line's index, the cell, the piece's great-circle length in metres and its
    midpoint. ``lines``: linestrings in (lng, lat) degrees. A segment with both ends in one cell
    is one piece (the fast path); the others are cut where they cross the pixel grid."""
    lines = np.asarray(lines, dtype=object)
    coords, line_idx = shapely.get_coordinates(lines, return_index=True)
    if len(coords) < 2:
        return _empty_pieces()
    same = line_idx[1:] == line_idx[:-1]
    seg_line = line_idx[:-1][same]
    a, b = np.flatnonzero(same), np.flatnonzero(same) + 1
    vcell = s2.latlng_to_cell_id(coords[:, 1], coords[:, 0], level)
    p = sphere.xyz(coords[:, 1], coords[:, 0])
    whole = vcell[a] == vcell[b]
    seg = np.arange(len(a))
    # fast path: the segment in its ends' cell (convex), its length, its geodesic midpoint
    w = seg[whole]
    mid = p[a[w]] + p[b[w]]
    mlat, mlng = s2_geometry.normalized_latlng_deg(mid[:, 0], mid[:, 1], mid[:, 2])
    order_seg, order_t = [w], [np.zeros(len(w))]
    values = [(vcell[a[w]], _arc_m(p[a[w]], p[b[w]]), mlat, mlng)]
    cut = seg[~whole]
    if len(cut):
        piece_seg, piece_t, piece_vals = _cut_segments(
            p[a[cut]], p[b[cut]], vcell[a[cut]], vcell[b[cut]], level
        )
        order_seg.append(cut[piece_seg])
        order_t.append(piece_t)
        values.append(piece_vals)
    seg_all = np.concatenate(order_seg)
    order = np.lexsort((np.concatenate(order_t), seg_all))
    cell, value, lat, lng = (np.concatenate([v[k] for v in values])[order] for k in range(4))
    return CellPieces(
        seg_line[seg_all[order]],
        cell,
        value,
        lat,
        lng,
        clipped=len(np.unique(seg_line[cut])),
    )


def _arc_m(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """Great-circle distances (m) between unit vectors, from the chord (precise at any
    length up to a half circle, like the haversine)."""
    d = (pb - pa).T
    chord = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
    return 2 * EARTH_RADIUS_M * np.arcsin(np.minimum(chord / 2, 1.0))


def _cut_segments(
    pa: np.ndarray, pb: np.ndarray, ca: np.ndarray, cb: np.ndarray, level: int
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """Pieces of segments (unit-vector ends ``pa``, ``pb``; end cells ``ca``, ``cb``): their
    segment, a sort key along the segment, and (cell, length m, midpoint lat, lng)."""
    fa = (ca >> np.uint64(61)).astype(np.int64)
    fb = (cb >> np.uint64(61)).astype(np.int64)
    # Per segment the faces it is cut on: its own face, or for a face-crossing segment every
    # face both ends project onto, clipped to the face's square [-1, 1]^2 (Liang-Barsky).
    one = fa == fb
    seg = [np.flatnonzero(one)]
    face = [fa[one]]
    t_lo, t_hi = [np.zeros(int(one.sum()))], [np.ones(int(one.sum()))]
    cross = np.flatnonzero(~one)
    for f in range(6):
        if not len(cross):
            break
        ff = np.full(len(cross), f)
        ua, va, da = sphere.project(pa[cross], ff)
        ub, vb, db = sphere.project(pb[cross], ff)
        ok = (da > _MIN_PROJECTION_DOT) & (db > _MIN_PROJECTION_DOT)
        lo, hi = np.zeros(len(cross)), np.ones(len(cross))
        for start, delta in ((ua, ub - ua), (va, vb - va)):
            for sign in (-1.0, 1.0):
                # sign * (start + t * delta) <= 1  <=>  t * sign * delta <= 1 - sign * start
                q = sign * delta
                r = 1.0 - sign * start
                with np.errstate(divide="ignore", invalid="ignore"):
                    t = r / q
                lo = np.where(q < 0, np.maximum(lo, t), lo)
                hi = np.where(q > 0, np.minimum(hi, t), hi)
                ok &= (q != 0) | (r >= 0)
        ok &= hi > lo
        seg.append(cross[ok])
        face.append(ff[ok])
        t_lo.append(lo[ok])
        t_hi.append(hi[ok])
    seg_i, face_i = np.concatenate(seg), np.concatenate(face)
    t0, t1 = np.concatenate(t_lo), np.concatenate(t_hi)
    # the face pieces in (u, v): a straight segment from t0 to t1 of the ends' projections
    ua, va, _ = sphere.project(pa[seg_i], face_i)
    ub, vb, _ = sphere.project(pb[seg_i], face_i)
    du, dv = ub - ua, vb - va
    # grid lines crossed inside the piece, at the pixel level: parameters t along (u, v)
    s_u0, s_u1 = ua + t0 * du, ua + t1 * du
    s_v0, s_v1 = va + t0 * dv, va + t1 * dv
    breaks_piece, breaks_t = [np.arange(len(seg_i)), np.arange(len(seg_i))], [t0, t1]
    for c0, c1, start, delta in ((s_u0, s_u1, ua, du), (s_v0, s_v1, va, dv)):
        k0, k1 = sphere.uv_to_ij(c0, level), sphere.uv_to_ij(c1, level)
        first, count = np.minimum(k0, k1) + 1, np.abs(k1 - k0)
        piece = np.repeat(np.arange(len(seg_i)), count)
        line = sphere.grid_uv(np.repeat(first, count) + _ramp(count), level)
        t = (line - start[piece]) / delta[piece]
        inside = (t > t0[piece]) & (t < t1[piece])
        breaks_piece.append(piece[inside])
        breaks_t.append(t[inside])
    bp, bt = np.concatenate(breaks_piece), np.concatenate(breaks_t)
    order = np.lexsort((bt, bp))
    bp, bt = bp[order], bt[order]
    nxt = np.flatnonzero((bp[1:] == bp[:-1]) & (bt[1:] > bt[:-1]))
    piece, ta, tb = bp[nxt], bt[nxt], bt[nxt + 1]
    fc = face_i[piece]
    qa = sphere.uv_to_xyz(fc, ua[piece] + ta * du[piece], va[piece] + ta * dv[piece])
    qb = sphere.uv_to_xyz(fc, ua[piece] + tb * du[piece], va[piece] + tb * dv[piece])
    qa /= np.linalg.norm(qa, axis=1)[:, None]
    qb /= np.linalg.norm(qb, axis=1)[:, None]
    length = _arc_m(qa, qb)
    mid = qa + qb
    lat, lng = s2_geometry.normalized_latlng_deg(mid[:, 0], mid[:, 1], mid[:, 2])
    cell = s2.latlng_to_cell_id(lat, lng, level)
    # sort key along the segment (t differs between faces): the chord from its start
    along = np.linalg.norm(qa - pa[seg_i[piece]], axis=1)
    return seg_i[piece], along, (cell, length, lat, lng)
