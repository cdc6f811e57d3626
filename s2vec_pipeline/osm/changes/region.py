"""The region of a source and the cut back to it.

Extracts stay regional: the region is the original source's header box (or its nodes' extent),
recorded in the ledger on first use. A change file is applied only if it concerns the region
(``files_in_region``); the merged file is cut back to the box by the rule of ``osmium extract
--strategy smart``, in pyosmium (``cut``: no osmium-tool needed). See the package docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import osmium
import osmium.io

from s2vec_pipeline.osm.changes.base import Base
from s2vec_pipeline.osm.changes.files import ChangeFile, Loc
from s2vec_pipeline.osm.changes.ledger import TMP_MARK
from s2vec_pipeline.osm.extract import source_bbox

GENERATOR = "s2vec_pipeline.osm.changes"
COORDINATE_PRECISION = 10_000_000  # osmium's fixed-point coordinates: 1e-7 degrees
Box = tuple[float, float, float, float]  # (min_lat, min_lng, max_lat, max_lng)


def source_region(source: Path) -> Box:
    """The region of a source: its header box, or the extent of its nodes without one."""
    min_lat, min_lng, max_lat, max_lng = source_bbox(source)
    return (min_lat, min_lng, max_lat, max_lng)


def inside(box: Box, loc: Loc | None) -> bool:
    if loc is None:
        return False
    min_lat, min_lng, max_lat, max_lng = box
    if not min_lat <= loc[0] <= max_lat:
        return False
    if min_lng <= max_lng:
        return min_lng <= loc[1] <= max_lng
    return loc[1] >= min_lng or loc[1] <= max_lng  # a box across the antimeridian


def files_in_region(files: Sequence[ChangeFile], base: Base, box: Box) -> list[bool]:
    """Whether each (effective) file holds something for the region, in order.

    A file concerns the region when one of its objects is held by the extract (a change or
    deletion of it must apply: the object may also leave the region), or is a node whose new
    location is inside the box, a way with a node inside the box (locations after the file),
    or a relation with such a node or way, or a held object, as member. That is what
    ``osmium extract --strategy smart`` starts from (nodes inside, ways and relations using
    them); files concerning the region are merged and the result is cut back to it, files
    that do not are not applied at all.
    """
    held: set[tuple[str, int]] = set()  # added by earlier files of this batch
    nodes_new: dict[int, Loc | None] = {}
    ways_new: dict[int, tuple[int, ...] | None] = {}
    out: list[bool] = []

    def node_loc(nid: int) -> Loc | None:
        return nodes_new[nid] if nid in nodes_new else base.node_loc(nid)

    def way_refs(wid: int) -> tuple[int, ...]:
        if wid in ways_new:
            return ways_new[wid] or ()
        entry = base.ways.get(wid)
        return entry[1] if entry else ()

    def is_held(kind: str, oid: int) -> bool:
        if (kind, oid) in held:
            return True
        if kind == "n":
            return oid in base.node_stamps or base.node_loc(oid) is not None
        return oid in (base.ways if kind == "w" else base.rels)

    for cf in files:
        for nid, (_, loc) in cf.nodes.items():
            nodes_new[nid] = loc
        for wid, (_, refs) in cf.ways.items():
            ways_new[wid] = refs

        def wayinside(wid: int) -> bool:
            return any(inside(box, node_loc(r)) for r in way_refs(wid))

        concerned = [("n", n) for n, (_, loc) in cf.nodes.items() if inside(box, loc)]
        concerned += [("w", w) for w, (_, refs) in cf.ways.items() if refs and wayinside(w)]
        for rid, (_, members, _) in cf.rels.items():
            for kind, ref in members or ():
                if (
                    is_held(kind, ref)
                    or (kind == "n" and inside(box, node_loc(ref)))
                    or (kind == "w" and wayinside(ref))
                ):
                    concerned.append(("r", rid))
                    break
        touches_held = any(
            is_held(kind, oid)
            for kind, table in (("n", cf.nodes), ("w", cf.ways), ("r", cf.rels))
            for oid in table
        )
        out.append(bool(concerned) or touches_held)
        if out[-1]:
            held.update(concerned)
    return out


def osm_file(path: Path) -> osmium.io.File:
    """``path`` for osmium: the format from its name, PBF for our temp names (``…tmp-…``)."""
    return osmium.io.File(str(path), "pbf" if TMP_MARK in path.name else "")


def _fixed(box: Box) -> tuple[int, int, int, int]:
    """The box in osmium's fixed-point coordinates (1e-7 degrees): min_x, min_y, max_x, max_y."""
    min_lat, min_lng, max_lat, max_lng = (round(v * COORDINATE_PRECISION) for v in box)
    return min_lng, min_lat, max_lng, max_lat


@dataclass
class Cut:
    """What the smart cut keeps (ids by kind) and the objects it removes, as read."""

    nodes: set[int] = field(default_factory=set)
    ways: set[int] = field(default_factory=set)
    rels: set[int] = field(default_factory=set)
    removed_nodes: dict[int, Loc] = field(default_factory=dict)
    removed_ways: dict[int, list[int]] = field(default_factory=dict)
    removed_rels: list[list[tuple[str, int]]] = field(default_factory=list)


def _smart_selection(merged: Path, box: Box) -> Cut:
    """The objects ``osmium extract --strategy smart`` keeps (default ``types=multipolygon``):
    nodes inside the box; ways with a node inside, with all their nodes; relations with a
    member node inside or a member way kept, and recursively their parent relations; for
    those of type multipolygon, all member nodes and ways, with the ways' nodes."""
    min_x, min_y, max_x, max_y = _fixed(box)
    inside: set[int] = set()
    ways: set[int] = set()
    way_nodes: dict[int, list[int]] = {}  # every way's node list: completion needs them
    members: dict[int, list[tuple[str, int]]] = {}
    matched: set[int] = set()
    extra_nodes: set[int] = set()
    extra_ways: set[int] = set()
    for obj in osmium.FileProcessor(osm_file(merged)):
        if obj.is_node():
            loc = obj.location
            if loc.valid() and min_x <= loc.x <= max_x and min_y <= loc.y <= max_y:
                inside.add(obj.id)
        elif obj.is_way():
            refs = [n.ref for n in obj.nodes]
            way_nodes[obj.id] = refs
            if any(r in inside for r in refs):
                ways.add(obj.id)
        else:
            mem = [(m.type, m.ref) for m in obj.members]
            members[obj.id] = mem
            if any((t == "n" and r in inside) or (t == "w" and r in ways) for t, r in mem):
                matched.add(obj.id)
                if obj.tags.get("type") == "multipolygon":
                    extra_nodes.update(r for t, r in mem if t == "n")
                    extra_ways.update(r for t, r in mem if t == "w")
    parents: dict[int, set[int]] = {}
    for rid, mem in members.items():
        for t, r in mem:
            if t == "r":
                parents.setdefault(r, set()).add(rid)
    rels, todo = set(matched), list(matched)
    while todo:  # parent relations, recursively
        for parent in parents.get(todo.pop(), ()):
            if parent not in rels:
                rels.add(parent)
                todo.append(parent)
    nodes = inside | extra_nodes
    for wid in ways | extra_ways:
        nodes.update(way_nodes.get(wid, ()))
    return Cut(nodes=nodes, ways=ways | extra_ways, rels=rels)


def cut(merged: Path, out: Path, box: Box, options: dict[str, str]) -> Cut:
    """The smart cut of ``merged`` to the region box (``_smart_selection``, in pyosmium: no
    osmium-tool needed), with the header ``options`` and the box as header bounds, as PBF
    whatever ``out`` is named.
    Returns the selection with the objects it removed."""
    selection = _smart_selection(merged, box)
    header = osmium.io.Header()
    min_lat, min_lng, max_lat, max_lng = box
    header.add_box(osmium.osm.Box(min_lng, min_lat, max_lng, max_lat))
    header.set("generator", GENERATOR)
    for key, value in options.items():
        header.set(key, value)
    writer = osmium.SimpleWriter(osmium.io.File(str(out), "pbf"), header=header, overwrite=True)
    try:
        for obj in osmium.FileProcessor(osm_file(merged)):
            if obj.is_node():
                if obj.id in selection.nodes:
                    writer.add_node(obj)
                elif obj.location.valid():
                    selection.removed_nodes[obj.id] = (obj.location.lat, obj.location.lon)
            elif obj.is_way():
                if obj.id in selection.ways:
                    writer.add_way(obj)
                else:
                    selection.removed_ways[obj.id] = [n.ref for n in obj.nodes]
            elif obj.id in selection.rels:
                writer.add_relation(obj)
            else:
                selection.removed_rels.append([(m.type, m.ref) for m in obj.members])
    finally:
        writer.close()
    return selection


def cut_is_a_no_op(files: Sequence[ChangeFile], box: Box) -> bool:
    """Whether cutting the merge would keep every object, so the cut can be skipped: the files
    only create or move nodes to locations inside the box (no deletion, no way or relation).

    Holds when the current extract came out of a cut (a cut is idempotent): inside nodes stay
    inside, so every kept way still has a node inside, every matched relation still matches,
    and the new nodes are inside. The original source may hold more than its box: its first
    batch is always cut.
    """
    return all(
        not cf.ways and not cf.rels and all(inside(box, loc) for _, loc in cf.nodes.values())
        for cf in files
    )
