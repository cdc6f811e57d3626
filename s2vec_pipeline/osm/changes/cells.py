"""Touched cells: the level-6 cells whose features a batch of change files may change.

Level-6 cells whose features may change: old and new locations of changed and deleted nodes;
for each affected way (changed, or in the base and using a changed node) the cells of its
vertices in the old and in the new state; for each affected relation (changed, or a
multipolygon/boundary relation using a changed node or an affected way) the cells of its member
nodes and of the vertices of its member ways, old and new (nested relations are not followed;
members missing from a clipped extract are skipped). A way or relation whose vertices span more
than one cell also touches every cell meeting their lat/lng bounding box, because its segment
midpoints and its area's representative point can lie in a cell holding none of its vertices.
Each file's cells are computed against the state after the files before it, so the batch's
cells are the union of the per-file cells recorded in the ledger. Only cells of the source's
region (the level-6 cover of its box) are kept (``region_cells``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from s2vec_pipeline.cells import s2, s2_geometry
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL
from s2vec_pipeline.osm.changes.base import Base
from s2vec_pipeline.osm.changes.files import ChangeFile, Loc, Member
from s2vec_pipeline.osm.changes.region import Box, Cut


def region_cells(box: Box) -> set[str]:
    """The level-6 cover of a region's box: no other partition reads its source."""
    return set(s2.to_token(s2_geometry.cover_bbox(*box, PARTITION_LEVEL)).tolist())


class Shapes:
    """Point sets ("shapes") per file; cells are computed in bulk at the end."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.lng: list[float] = []
        self.starts: list[int] = []
        self.file_of: list[int] = []

    def add(self, file_index: int, points: Iterable[Loc | None]) -> None:
        start = len(self.lat)
        for p in points:
            if p is not None:
                self.lat.append(p[0])
                self.lng.append(p[1])
        if len(self.lat) > start:
            self.starts.append(start)
            self.file_of.append(file_index)

    def cells_per_file(self, n_files: int) -> list[set[str]]:
        out: list[set[str]] = [set() for _ in range(n_files)]
        if not self.starts:
            return out
        lat = np.asarray(self.lat)
        lng = np.asarray(self.lng)
        ids = s2.latlng_to_cell_id(lat, lng, PARTITION_LEVEL)
        starts = np.asarray(self.starts)
        shape_of_point = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(lat))))
        file_of = np.asarray(self.file_of)
        tokens = s2.to_token(ids)
        for fi in range(n_files):
            out[fi].update(np.unique(tokens[file_of[shape_of_point] == fi]).tolist())
        multi = np.flatnonzero(np.minimum.reduceat(ids, starts) != np.maximum.reduceat(ids, starts))
        if len(multi):
            bounds = (
                np.minimum.reduceat(lat, starts),
                np.minimum.reduceat(lng, starts),
                np.maximum.reduceat(lat, starts),
                np.maximum.reduceat(lng, starts),
            )
            for k in multi.tolist():
                box = [float(b[k]) for b in bounds]
                if box[3] - box[1] > 180:  # crosses the antimeridian: the short way round
                    sel = slice(starts[k], starts[k + 1] if k + 1 < len(starts) else len(lat))
                    seg = lng[sel]
                    box[1], box[3] = float(seg[seg >= 0].min()), float(seg[seg < 0].max())
                # Edges are geodesics (clip.py): one bows poleward of its ends' latitudes by at
                # most sin(2 lat)/2 * dlng^2 / 8 (radians); pad both sides by twice that bound.
                dlng = math.radians((box[3] - box[1]) % 360.0)
                pad = math.degrees(dlng * dlng / 8.0) + 1e-7
                box[0], box[2] = max(box[0] - pad, -90.0), min(box[2] + pad, 90.0)
                out[int(file_of[k])].update(s2.to_token(s2_geometry.cover_bbox(*box)).tolist())
        return out


class _View:
    """Node locations, way node lists and relation members (with whether it is an area) in one
    state of the data; a missing object has no location, no nodes, no members."""

    def node(self, nid: int) -> Loc | None:
        raise NotImplementedError

    def way(self, wid: int) -> tuple[int, ...]:
        raise NotImplementedError

    def rel(self, rid: int) -> tuple[tuple[Member, ...], bool]:
        raise NotImplementedError

    def way_points(self, wid: int) -> list[Loc | None]:
        return [self.node(r) for r in self.way(wid)]

    def relation_points(self, rid: int) -> list[Loc | None]:
        """Member nodes and the vertices of member ways (nested relations are not followed)."""
        points: list[Loc | None] = []
        for kind, ref in self.rel(rid)[0]:
            if kind == "n":
                points.append(self.node(ref))
            elif kind == "w":
                points.extend(self.way_points(ref))
        return points


class _Applied(_View):
    """The base with the files processed so far applied (None = deleted)."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.nodes: dict[int, Loc | None] = {}
        self.ways: dict[int, tuple[int, ...] | None] = {}
        self.rels: dict[int, tuple[tuple[Member, ...], bool] | None] = {}

    def node(self, nid: int) -> Loc | None:
        return self.nodes[nid] if nid in self.nodes else self.base.node_loc(nid)

    def way(self, wid: int) -> tuple[int, ...]:
        if wid in self.ways:
            return self.ways[wid] or ()
        entry = self.base.ways.get(wid)
        return entry[1] if entry else ()

    def rel(self, rid: int) -> tuple[tuple[Member, ...], bool]:
        if rid in self.rels:
            return self.rels[rid] or ((), False)
        entry = self.base.rels.get(rid)
        return (entry[1], entry[2]) if entry else ((), False)

    def apply(self, cf: ChangeFile) -> None:
        for nid, (_, loc) in cf.nodes.items():
            self.nodes[nid] = loc
        for wid, (_, refs) in cf.ways.items():
            self.ways[wid] = refs
        for rid, (_, members, is_area) in cf.rels.items():
            self.rels[rid] = None if members is None else (members, is_area)


class _After(_View):
    """One more file over a state, without changing it."""

    def __init__(self, before: _View, cf: ChangeFile) -> None:
        self.before, self.cf = before, cf

    def node(self, nid: int) -> Loc | None:
        return self.cf.nodes[nid][1] if nid in self.cf.nodes else self.before.node(nid)

    def way(self, wid: int) -> tuple[int, ...]:
        return (self.cf.ways[wid][1] or ()) if wid in self.cf.ways else self.before.way(wid)

    def rel(self, rid: int) -> tuple[tuple[Member, ...], bool]:
        if rid in self.cf.rels:
            _, members, is_area = self.cf.rels[rid]
            return (members or (), is_area)
        return self.before.rel(rid)


def _users(
    files: Sequence[ChangeFile], base: Base
) -> tuple[dict[int, set[int]], dict[Member, set[int]]]:
    """Ways using each node and relations having each member, in the base or any file."""
    node_ways: dict[int, set[int]] = defaultdict(set)
    member_rels: dict[Member, set[int]] = defaultdict(set)
    way_lists = [base.ways.items(), *(cf.ways.items() for cf in files)]
    rel_lists = [base.rels.items(), *(cf.rels.items() for cf in files)]
    for ways in way_lists:
        for wid, (_, refs) in ways:
            for ref in refs or ():
                node_ways[ref].add(wid)
    for rels in rel_lists:
        for rid, (_, members, _) in rels:
            for m in members or ():
                member_rels[m].add(rid)
    return node_ways, member_rels


def _affected_ways(
    cf: ChangeFile, node_ways: dict[int, set[int]], old: _View, new: _View
) -> set[int]:
    """The file's ways, and the ways using one of its nodes before or after it."""
    ways = set(cf.ways)
    for nid in cf.nodes:
        for wid in node_ways.get(nid, ()):
            if nid in old.way(wid) or nid in new.way(wid):
                ways.add(wid)
    return ways


def _affected_rels(
    cf: ChangeFile, ways: set[int], member_rels: dict[Member, set[int]], old: _View, new: _View
) -> set[int]:
    """The file's relations, and the area relations having one of its nodes or an affected
    way as member, before or after it."""
    rels = set(cf.rels)
    for member in [("n", nid) for nid in cf.nodes] + [("w", wid) for wid in ways]:
        for rid in member_rels.get(member, ()):
            (old_m, old_area), (new_m, new_area) = old.rel(rid), new.rel(rid)
            if (old_area and member in old_m) or (new_area and member in new_m):
                rels.add(rid)
    return rels


def touched_cells(files: Sequence[ChangeFile], base: Base) -> list[set[str]]:
    """Level-6 cells each file touches (see the module docstring)."""
    node_ways, member_rels = _users(files, base)
    old = _Applied(base)
    shapes = Shapes()
    for fi, cf in enumerate(files):
        new = _After(old, cf)
        for nid in cf.nodes:
            shapes.add(fi, [old.node(nid)])
            shapes.add(fi, [new.node(nid)])
        ways = _affected_ways(cf, node_ways, old, new)
        for wid in ways:
            shapes.add(fi, old.way_points(wid))
            shapes.add(fi, new.way_points(wid))
        for rid in _affected_rels(cf, ways, member_rels, old, new):
            shapes.add(fi, old.relation_points(rid))
            shapes.add(fi, new.relation_points(rid))
        old.apply(cf)
    return shapes.cells_per_file(len(files))


def removed_by_cut(cut: Cut, files: Sequence[ChangeFile], base: Base) -> set[str]:
    """Level-6 cells of the objects the cut removed (in the merged file, not in the cut).

    Most are objects the change files moved out or created outside, already counted; the rest
    are objects of an extract that the smart box cut would not have kept (an extract made with
    another rule): their features go too, so their cells are touched. Locations come from the
    removed nodes, the change files and the base index.
    """
    changed_locs: dict[int, Loc | None] = {}
    for cf in files:
        changed_locs.update((nid, loc) for nid, (_, loc) in cf.nodes.items())

    def loc(nid: int) -> Loc | None:
        if nid in cut.removed_nodes:
            return cut.removed_nodes[nid]
        return changed_locs[nid] if nid in changed_locs else base.node_loc(nid)

    def way_refs(wid: int) -> list[int]:
        if wid in cut.removed_ways:
            return cut.removed_ways[wid]
        entry = base.ways.get(wid)
        return list(entry[1]) if entry else []

    shapes = Shapes()
    for point in cut.removed_nodes.values():
        shapes.add(0, [point])
    for refs in cut.removed_ways.values():
        shapes.add(0, [loc(r) for r in refs])
    for members in cut.removed_rels:
        points: list[Loc | None] = []
        for kind, ref in members:
            if kind == "n":
                points.append(loc(ref))
            elif kind == "w":
                points.extend(loc(r) for r in way_refs(ref))
        shapes.add(0, points)
    return shapes.cells_per_file(1)[0]
