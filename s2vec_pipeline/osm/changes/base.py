"""What a batch of change files needs from the extract it updates (``Base``: versions of the
changed objects, node locations, the ways and relations they affect), and the staleness rule
that refuses a change file older than that extract."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import osmium

from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.osm.changes.files import (
    AREA_RELATION_TYPES,
    ChangeFile,
    Loc,
    Member,
    Stamp,
    stamp_of,
)

LOCATION_STORE = "flex_mem"  # node location index: sparse for extracts, dense for planets
DENSE_FILTER_BLOCKS = 64  # IdFilter for changed nodes if it costs at most 64 x 512 KB


class StaleChangeError(S2VecError):
    """A change file is older than (or already contained in) the extract it would update."""


class Base:
    """What the changes need from the base extract: versions of changed objects, node
    locations (a C++ index of every node), the ways that are changed, use a changed node or
    belong to an area or changed relation, and the area and changed relations."""

    def __init__(self) -> None:
        self.node_stamps: dict[int, Stamp] = {}
        self.ways: dict[int, tuple[Stamp, tuple[int, ...]]] = {}
        self.rels: dict[int, tuple[Stamp, tuple[Member, ...], bool]] = {}
        self.locations: Any = None  # osmium.index.LocationTable

    def node_loc(self, nid: int) -> Loc | None:
        try:
            loc = self.locations.get(nid)
        except KeyError:  # not in the extract (clipped)
            return None
        return (loc.lat, loc.lon) if loc.valid() else None


def load_base(path: Path, files: Sequence[ChangeFile]) -> Base:
    """Two reads of the base: its relations (few), then nodes and ways.

    osmium's ``IdTracker`` is not used: its id sets are dense bitmaps allocated in 512 KB blocks
    of 2^22 ids, and node ids (up to ~1.2e10) scattered over OSM's history touch a block each:
    tracking the 30k nodes of the Monaco extract took 1.2 GB. Here node locations go to a
    ``flex_mem`` location index (~16 B per node) filled in C++, and Python sees the ways (to find
    those using changed nodes) and only the changed nodes when they fall in at most
    ``DENSE_FILTER_BLOCKS`` blocks (a C++ ``IdFilter``), else every node id.
    """
    changed_nodes = {nid for cf in files for nid in cf.nodes}
    changed_ways = {wid for cf in files for wid in cf.ways}
    changed_rels = {rid for cf in files for rid in cf.rels}
    base = Base()
    for rel in osmium.FileProcessor(str(path), osmium.osm.RELATION):
        is_area = rel.tags.get("type") in AREA_RELATION_TYPES
        if is_area or rel.id in changed_rels:
            members = tuple((m.type, m.ref) for m in rel.members)
            base.rels[rel.id] = (stamp_of(rel), members, is_area)
    member_ways = {
        ref for _, members, _ in base.rels.values() for kind, ref in members if kind == "w"
    }
    for cf in files:
        for _, members, _ in cf.rels.values():
            member_ways.update(ref for kind, ref in members or () if kind == "w")

    processor = osmium.FileProcessor(str(path), osmium.osm.NODE | osmium.osm.WAY).with_locations(
        LOCATION_STORE
    )
    if len({nid >> 22 for nid in changed_nodes}) <= DENSE_FILTER_BLOCKS:
        processor.with_filter(osmium.filter.IdFilter(changed_nodes).enable_for(osmium.osm.NODE))
    stamps, ways = base.node_stamps, base.ways
    for obj in processor:  # the location index sees every node before the filter
        if obj.is_node():
            if obj.id in changed_nodes:
                stamps[obj.id] = stamp_of(obj)
        else:
            refs = tuple(n.ref for n in obj.nodes)
            wid = obj.id
            if wid in changed_ways or wid in member_ways or not changed_nodes.isdisjoint(refs):
                ways[wid] = (stamp_of(obj), refs)
    base.locations = processor.node_location_storage
    return base


# ---------------------------------------------------------------------------------------------
# Staleness
# ---------------------------------------------------------------------------------------------
def effective_changes(
    files: Sequence[ChangeFile], base: Base, header_sequence: int | None
) -> list[ChangeFile]:
    """Apply the staleness rule of the module docstring to each file in order, and return the
    files reduced to the objects that take effect: the merge keeps the greater (version,
    timestamp) of each object, so an object not newer than the extract's changes nothing and
    touches no cell."""
    seq = header_sequence
    stamps: dict[tuple[str, int], Stamp] = {}  # written by earlier files of the batch
    out: list[ChangeFile] = []
    for cf in files:
        kept = ChangeFile(cf.path, cf.name, cf.sha256, cf.size, cf.sequence, cf.state_timestamp)
        compared = newer = 0
        example = ""
        for kind, table, kept_table in (
            ("n", cf.nodes, kept.nodes),
            ("w", cf.ways, kept.ways),
            ("r", cf.rels, kept.rels),
        ):
            for oid, entry in table.items():
                old = stamps.get((kind, oid))
                if old is None:
                    if kind == "n":
                        old = base.node_stamps.get(oid)
                    elif oid in (base.ways if kind == "w" else base.rels):
                        old = (base.ways if kind == "w" else base.rels)[oid][0]
                new = entry[0]
                if old is not None and old[0] and new[0]:  # both have a version
                    compared += 1
                    if new <= old:
                        example = example or f"{kind}{oid} v{new[0]} (extract has v{old[0]})"
                        continue
                    newer += 1
                kept_table[oid] = entry
        if cf.sequence is not None and seq is not None:
            if cf.sequence <= seq:
                raise StaleChangeError(
                    f"change file {cf.path} has replication sequence {cf.sequence}, not after "
                    f"the extract's {seq}: it is already contained in the extract. Remove it from "
                    f"the change folder (or pass only newer files)"
                )
        elif compared and not newer:
            raise StaleChangeError(
                f"change file {cf.path} is older than the extract: none of the {compared} "
                f"objects it shares with the extract is newer there, e.g. {example}. It was "
                f"probably applied already or belongs before the extract's date; remove it"
            )
        if cf.sequence is not None:
            seq = cf.sequence
        for kind, table in (("n", kept.nodes), ("w", kept.ways), ("r", kept.rels)):
            for oid, entry in table.items():
                stamps[(kind, oid)] = entry[0]
        out.append(kept)
    return out
