"""osm_changes on the real bundled extracts with hand-written osmChange files."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import osmium
import pytest

from s2vec_pipeline.cells import s2, s2_geometry
from s2vec_pipeline.osm import changes as oc
from s2vec_pipeline.osm.changes import base as changes_base
from s2vec_pipeline.osm.changes import region
from s2vec_pipeline.osm.changes.apply import merge
from s2vec_pipeline.osm.changes.cells import touched_cells
from s2vec_pipeline.osm.changes.files import ChangeFile
from s2vec_pipeline.osm.coverage import cells_covering_source
from s2vec_pipeline.osm.extract import source_bbox
from s2vec_pipeline.osm.osmium_tool import find_osmium_tool

HELSINKI_L6 = "4693"
MONACO_L6 = "12cd"
TS = "2019-05-01T00:00:00Z"  # after the newest object of the Helsinki extract (2019-04-21)
OLD_TS = "2010-01-01T00:00:00Z"  # before any object it holds
WAY_NODE = 241041531  # a node of a few Helsinki ways
STATION = 25389429  # Helsinki railway station: a tagged node used by no way
HOTEL = 55211772  # a hotel node used by no way
WAY = 4236349  # Erottajankatu, highway=unclassified


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def helsinki_objects(helsinki_pbf: Path) -> dict:
    """Current versions of the objects the tests edit, read from the real extract."""
    ids = osmium.filter.IdFilter([WAY_NODE, STATION, HOTEL, WAY])
    out: dict = {}
    for obj in osmium.FileProcessor(str(helsinki_pbf)).with_filter(ids):
        if obj.is_node():
            out[("n", obj.id)] = (obj.version, obj.location.lat, obj.location.lon)
        elif obj.is_way():
            out[("w", obj.id)] = (obj.version, [n.ref for n in obj.nodes], dict(obj.tags))
    assert len(out) == 4
    return out


def _node(nid: int, version: int, lat: float, lon: float, ts: str = TS) -> str:
    return (
        f'  <node id="{nid}" version="{version}" timestamp="{ts}" uid="1" user="t" '
        f'changeset="1" lat="{lat:.7f}" lon="{lon:.7f}"/>\n'
    )


def _way(wid: int, version: int, refs: list[int], tags: dict[str, str]) -> str:
    body = "".join(f'    <nd ref="{r}"/>\n' for r in refs)
    body += "".join(f'    <tag k="{k}" v="{v}"/>\n' for k, v in tags.items())
    return (
        f'  <way id="{wid}" version="{version}" timestamp="{TS}" uid="1" user="t" '
        f'changeset="1">\n{body}  </way>\n'
    )


def _osc(path: Path, modify: str = "", delete: str = "", create: str = "") -> Path:
    text = "<?xml version='1.0' encoding='UTF-8'?>\n<osmChange version=\"0.6\" generator=\"t\">\n"
    for action, body in (("create", create), ("modify", modify), ("delete", delete)):
        if body:
            text += f"<{action}>\n{body}</{action}>\n"
    text += "</osmChange>\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _read(pbf: Path, nodes: list[int] = (), ways: list[int] = ()) -> dict:
    out: dict = {}
    flt = osmium.filter.IdFilter([*nodes, *ways])
    for obj in osmium.FileProcessor(str(pbf)).with_filter(flt):
        if obj.is_node() and obj.id in nodes:
            out[("n", obj.id)] = (obj.version, obj.location.lat, obj.location.lon)
        elif obj.is_way() and obj.id in ways:
            out[("w", obj.id)] = (obj.version, dict(obj.tags))
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    sources = root / oc.SOURCES_DIR
    if not sources.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(sources.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_list_change_files_replication_and_natural_order(tmp_path: Path) -> None:
    rep = tmp_path / "rep"
    for rel in ["000/001/002.osc.gz", "000/000/010.osc.gz", "000/000/009.osc", "001/000/000.osc"]:
        _osc(rep / rel)
    (rep / "000/000/009.state.txt").write_text("sequenceNumber=9\n")
    (rep / "000/000/notes.txt").write_text("not a change file")
    got = [p.relative_to(rep).as_posix() for p in oc.list_change_files(rep)]
    assert got == ["000/000/009.osc", "000/000/010.osc.gz", "000/001/002.osc.gz", "001/000/000.osc"]
    assert oc.change_file_name(rep / "000/001/002.osc.gz") == "000/001/002.osc.gz"
    assert oc.replication_sequence(rep / "000/001/002.osc.gz") == 1002

    plain = tmp_path / "plain"
    for name in ["day-10.osc", "day-9.osc.gz", "day-100.osc", "Day-2.osc"]:
        _osc(plain / name)
    got = [p.name for p in oc.list_change_files(plain)]
    assert got == ["Day-2.osc", "day-9.osc.gz", "day-10.osc", "day-100.osc"]
    assert oc.change_file_name(plain / "day-10.osc") == "day-10.osc"
    assert oc.replication_sequence(plain / "day-10.osc") is None

    _osc(plain / "day-9.osc")  # the same change plain and gzipped
    with pytest.raises(oc.ChangeFileError, match=r"day-9\.osc.*day-9\.osc"):
        oc.list_change_files(plain)
    with pytest.raises(oc.ChangeFileError, match="does not exist"):
        oc.list_change_files(tmp_path / "missing")


def test_apply_changes_end_to_end(tmp_path: Path, helsinki_pbf: Path, helsinki_objects) -> None:
    root, changes = tmp_path / "root", tmp_path / "changes"
    original_sha = _sha(helsinki_pbf)
    nv = helsinki_objects[("n", WAY_NODE)][0]
    wv, refs, tags = helsinki_objects[("w", WAY)]
    new_tags = {**tags, "highway": "residential"}
    _osc(
        changes / "helsinki-0001.osc.gz",
        modify=_node(WAY_NODE, nv + 1, 60.1667, 24.9468) + _way(WAY, wv + 1, refs, new_tags),
    )

    res = oc.apply_changes(root, helsinki_pbf, changes)
    assert res.applied == [changes / "helsinki-0001.osc.gz"] and res.skipped == []
    assert res.touched_cells == [HELSINKI_L6]
    path_hash = hashlib.sha256(str(helsinki_pbf.resolve()).encode()).hexdigest()[:12]
    assert res.extract.parent == root / oc.SOURCES_DIR / f"helsinki-{path_hash}"
    assert res.extract.name.endswith(".osm.pbf") and res.extract != helsinki_pbf
    got = _read(res.extract, nodes=[WAY_NODE], ways=[WAY])
    assert got[("n", WAY_NODE)] == (nv + 1, pytest.approx(60.1667), pytest.approx(24.9468))
    assert got[("w", WAY)] == (wv + 1, new_tags)
    assert _sha(helsinki_pbf) == original_sha  # the user's file is never modified
    # Header: the box (partitions come from it) is carried over.
    assert source_bbox(res.extract) == pytest.approx(source_bbox(helsinki_pbf))
    assert cells_covering_source(res.extract) == [HELSINKI_L6]
    assert oc.current_extract(root, helsinki_pbf) == res.extract

    ledger = oc.read_ledger(root, helsinki_pbf)
    assert ledger["source"]["sha256"] == original_sha
    assert ledger["extract"] == res.extract.name
    (entry,) = ledger["applied"]
    f1 = changes / "helsinki-0001.osc.gz"
    assert entry["name"] == "helsinki-0001.osc.gz"
    assert (entry["sha256"], entry["size"]) == (_sha(f1), f1.stat().st_size)
    assert entry["cells"] == [HELSINKI_L6] and entry["applied_at"].endswith("Z")
    assert [a.name for a in oc.applied_changes(root, helsinki_pbf)] == ["helsinki-0001.osc.gz"]

    # Rerun on the same folder: nothing applied twice, nothing touched, ledger unchanged.
    before = _snapshot(root)
    again = oc.apply_changes(root, helsinki_pbf, changes)
    assert again.applied == [] and again.skipped == [f1] and again.touched_cells == []
    assert again.extract == res.extract
    assert _snapshot(root) == before

    # A later file applies on top of the first; the previous updated extract goes away.
    _osc(changes / "helsinki-0002.osc", modify=_node(WAY_NODE, nv + 2, 60.1668, 24.9469))
    second = oc.apply_changes(root, helsinki_pbf, oc.list_change_files(changes))
    assert second.applied == [changes / "helsinki-0002.osc"] and second.skipped == [f1]
    assert second.touched_cells == [HELSINKI_L6]
    got = _read(second.extract, nodes=[WAY_NODE], ways=[WAY])
    assert got[("n", WAY_NODE)] == (nv + 2, pytest.approx(60.1668), pytest.approx(24.9469))
    assert got[("w", WAY)] == (wv + 1, new_tags)  # the first file's change is still there
    assert not res.extract.exists()
    assert [e["name"] for e in oc.read_ledger(root, helsinki_pbf)["applied"]] == [
        "helsinki-0001.osc.gz",
        "helsinki-0002.osc",
    ]

    # The same name with other content is refused.
    _osc(changes / "helsinki-0002.osc", modify=_node(WAY_NODE, nv + 3, 60.1669, 24.947))
    before = _snapshot(root)
    with pytest.raises(oc.ChangeLedgerError, match="helsinki-0002.osc.*other content"):
        oc.apply_changes(root, helsinki_pbf, changes)
    assert _snapshot(root) == before


def test_node_moved_to_another_cell_and_deleted_node(
    tmp_path: Path, helsinki_pbf: Path, helsinki_objects
) -> None:
    sv, lat, lon = helsinki_objects[("n", STATION)]
    root = tmp_path / "root"
    moved = _osc(tmp_path / "c/1.osc", modify=_node(STATION, sv + 1, 43.735, 7.42))  # Monaco
    res = oc.apply_changes(root, helsinki_pbf, [moved])
    # The station left Helsinki's region (it is used by no way): it leaves Helsinki's extract,
    # and only Helsinki's cells are touched (Monaco's partition never reads this source).
    assert res.applied == [moved] and res.touched_cells == [HELSINKI_L6]
    assert _read(res.extract, nodes=[STATION]) == {}

    hv, hlat, hlon = helsinki_objects[("n", HOTEL)]
    deleted = _osc(tmp_path / "c/2.osc", delete=_node(HOTEL, hv + 1, hlat, hlon))
    res = oc.apply_changes(root, helsinki_pbf, [moved, deleted])
    assert res.applied == [deleted] and res.skipped == [moved]
    assert res.touched_cells == [HELSINKI_L6]
    assert _read(res.extract, nodes=[HOTEL, STATION]) == {}


def test_way_node_moved_across_cells_touches_the_ways_span(
    tmp_path: Path, helsinki_pbf: Path, helsinki_objects
) -> None:
    """The ways using a moved node now run from Helsinki to 468f: their segments' midpoints
    can land in any cell meeting their bounding box (468d, 468f and 4693). The ways keep other
    nodes inside Helsinki's region, so they stay whole in the extract, moved node included;
    only the cells of Helsinki's region are reported, as no other partition reads it."""
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    f = _osc(tmp_path / "c/1.osc", modify=_node(WAY_NODE, nv + 1, 61.0, 24.5))
    res = oc.apply_changes(tmp_path / "root", helsinki_pbf, [f])
    new_cell = str(s2.to_token(s2.latlng_to_cell_id(61.0, 24.5, 6)))
    assert new_cell == "468f" and cells_covering_source(helsinki_pbf) == [HELSINKI_L6]
    spanned = s2.to_token(s2_geometry.cover_bbox(lat, 24.5, 61.0, lon)).tolist()
    assert {"468d", "468f", HELSINKI_L6} <= set(spanned)
    assert res.touched_cells == [HELSINKI_L6]
    entry = oc.read_ledger(tmp_path / "root", helsinki_pbf)["applied"][0]
    assert entry["cells"] == res.touched_cells
    got = _read(res.extract, nodes=[WAY_NODE], ways=[WAY])
    assert got[("n", WAY_NODE)] == (nv + 1, pytest.approx(61.0), pytest.approx(24.5))
    assert ("w", WAY) in got


def test_corrupt_change_file_applies_nothing(
    tmp_path: Path, helsinki_pbf: Path, helsinki_objects
) -> None:
    root, changes = tmp_path / "root", tmp_path / "changes"
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    good = _osc(changes / "1.osc.gz", modify=_node(WAY_NODE, nv + 1, lat, lon + 1e-4))
    oc.apply_changes(root, helsinki_pbf, changes)
    before = _snapshot(root)

    good2 = _osc(changes / "2.osc", modify=_node(WAY_NODE, nv + 2, lat, lon + 2e-4))
    truncated = changes / "3.osc.gz"
    truncated.write_bytes(gzip.compress(good2.read_bytes())[:60])
    with pytest.raises(oc.ChangeFileError, match=r"3\.osc\.gz.*(truncated|corrupt)"):
        oc.apply_changes(root, helsinki_pbf, changes)
    assert _snapshot(root) == before  # neither 2.osc nor 3.osc.gz applied, no new extract

    truncated.write_text("this is not XML")
    with pytest.raises(oc.ChangeFileError, match=r"3\.osc\.gz"):
        oc.apply_changes(root, helsinki_pbf, changes)
    truncated.unlink()
    xml_cut = changes / "3.osc"
    xml_cut.write_bytes(good2.read_bytes()[:150])
    with pytest.raises(oc.ChangeFileError, match=r"3\.osc .*(truncated|corrupt)"):
        oc.apply_changes(root, helsinki_pbf, changes)
    xml_cut.write_text('<osm version="0.6"><node id="1" version="1" lat="1" lon="1"/></osm>')
    with pytest.raises(oc.ChangeFileError, match="not an osmChange"):
        oc.apply_changes(root, helsinki_pbf, changes)
    assert _snapshot(root) == before
    assert good.exists()


def test_stale_change_file_is_refused(tmp_path: Path, helsinki_pbf: Path, helsinki_objects) -> None:
    """Rule: refused when no object it shares with the extract is newer (greater version, or
    the same version with a later timestamp, as the merge orders them)."""
    root = tmp_path / "root"
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    sv, slat, slon = helsinki_objects[("n", STATION)]
    stale = _osc(
        tmp_path / "c/old.osc",
        modify=_node(WAY_NODE, nv, lat + 0.01, lon, OLD_TS) + _node(STATION, sv - 1, slat, slon),
    )
    with pytest.raises(oc.StaleChangeError, match=r"old\.osc is older than the extract"):
        oc.apply_changes(root, helsinki_pbf, [stale])
    assert _snapshot(root) == {}

    # Overlapping the extract in part (one object newer) is fine; the stale object is ignored.
    overlap = _osc(
        tmp_path / "c/overlap.osc",
        modify=_node(WAY_NODE, nv + 1, lat + 1e-4, lon) + _node(STATION, sv - 1, 43.7, 7.4),
    )
    res = oc.apply_changes(root, helsinki_pbf, [overlap])
    assert res.touched_cells == [HELSINKI_L6]  # the stale move to Monaco takes no effect
    got = _read(res.extract, nodes=[WAY_NODE, STATION])
    assert got[("n", STATION)] == (sv, pytest.approx(slat), pytest.approx(slon))
    assert got[("n", WAY_NODE)][0] == nv + 1

    # Same version, later timestamp: the merge keeps this copy, so it is newer and applies.
    same_version = _osc(tmp_path / "c/same.osc", modify=_node(STATION, sv, slat + 0.002, slon))
    res = oc.apply_changes(root, helsinki_pbf, [same_version])
    assert res.applied == [same_version] and res.touched_cells == [HELSINKI_L6]
    assert _read(res.extract, nodes=[STATION])[("n", STATION)][1] == pytest.approx(slat + 0.002)

    # Once applied, the same changes under another name are stale against the new extract.
    renamed = tmp_path / "c/overlap-copy.osc"
    renamed.write_text(overlap.read_text() + "\n")
    with pytest.raises(oc.StaleChangeError, match="overlap-copy.osc"):
        oc.apply_changes(root, helsinki_pbf, [renamed])
    shutil.copy(overlap, renamed)  # byte-identical copy: recognised as already applied content
    with pytest.raises(oc.ChangeLedgerError, match="same content"):
        oc.apply_changes(root, helsinki_pbf, [renamed])


def test_replication_sequence_and_header(tmp_path: Path, monaco_pbf: Path) -> None:
    """Monaco's header says replication sequence 3919: a replication file must come after it;
    the new extract's header gets the sequence and timestamp of the state file."""
    for node in osmium.FileProcessor(str(monaco_pbf), osmium.osm.NODE):
        nid, version, lat, lon = node.id, node.version, node.location.lat, node.location.lon
        break
    root, rep = tmp_path / "root", tmp_path / "rep"
    old = _osc(rep / "000/003/919.osc", modify=_node(nid, version + 1, lat, lon + 1e-4))
    with pytest.raises(oc.StaleChangeError, match="sequence 3919, not after the extract's 3919"):
        oc.apply_changes(root, monaco_pbf, [old])
    old.unlink()

    new = _osc(rep / "000/003/920.osc.gz", modify=_node(nid, version + 1, lat, lon + 1e-4))
    (rep / "000/003/920.state.txt").write_text(
        "#Wed Dec 27 21:21:22 UTC 2023\nsequenceNumber=3920\ntimestamp=2023-12-27T21\\:21\\:22Z\n"
    )
    res = oc.apply_changes(root, monaco_pbf, rep)
    assert res.applied == [new] and res.touched_cells == [MONACO_L6]
    reader = osmium.io.Reader(str(res.extract), osmium.osm.osm_entity_bits.NOTHING)
    header = reader.header()
    reader.close()
    assert header.get("osmosis_replication_sequence_number") == "3920"
    assert header.get("osmosis_replication_timestamp") == "2023-12-27T21:21:22Z"
    assert header.get("osmosis_replication_base_url").startswith("http")
    assert source_bbox(res.extract) == pytest.approx(source_bbox(monaco_pbf))
    entry = oc.read_ledger(root, monaco_pbf)["applied"][0]
    assert (entry["name"], entry["sequence"]) == ("000/003/920.osc.gz", 3920)


def test_changed_source_is_refused_until_reset(
    tmp_path: Path, helsinki_pbf: Path, monaco_pbf: Path, helsinki_objects
) -> None:
    src = tmp_path / "src" / "city.osm.pbf"
    src.parent.mkdir()
    shutil.copy(helsinki_pbf, src)
    root = tmp_path / "root"
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    f = _osc(tmp_path / "c/1.osc", modify=_node(WAY_NODE, nv + 1, lat, lon + 1e-4))
    first = oc.apply_changes(root, src, [f])
    shutil.copy(monaco_pbf, src)  # the user replaced the file
    with pytest.raises(oc.ChangeLedgerError, match="reset_source"):
        oc.apply_changes(root, src, [f])
    assert first.extract.exists()
    oc.reset_source(root, src)
    assert oc.read_ledger(root, src) is None and oc.current_extract(root, src) == src
    shutil.copy(helsinki_pbf, src)
    assert oc.apply_changes(root, src, [f]).applied == [f]
    ledger = json.loads((oc.source_dir(root, src) / "ledger.json").read_text())
    assert ledger["batches"] == 1 and np.size(ledger["applied"]) == 1


def test_scattered_changed_nodes_take_the_python_path(
    tmp_path: Path, helsinki_pbf: Path, helsinki_objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the C++ id filter off (as for node ids in too many 4M-id blocks) Python reads the
    changed nodes' versions itself: same staleness decisions, same cells."""
    monkeypatch.setattr(changes_base, "DENSE_FILTER_BLOCKS", -1)
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    sv = helsinki_objects[("n", STATION)][0]
    stale = _osc(tmp_path / "c/old.osc", modify=_node(WAY_NODE, nv, lat, lon, OLD_TS))
    with pytest.raises(oc.StaleChangeError, match="old.osc"):
        oc.apply_changes(tmp_path / "root", helsinki_pbf, [stale])
    moved = _osc(tmp_path / "c/new.osc", modify=_node(STATION, sv + 1, 43.735, 7.42))
    res = oc.apply_changes(tmp_path / "root", helsinki_pbf, [moved])
    assert res.touched_cells == [HELSINKI_L6]


def test_touched_cells_follow_area_relations_not_other_relations() -> None:
    """Synthetic base: moving a node of way 1 touches multipolygon 10 (ways 1 and 2, the latter
    in cell 468f), so every cell meeting the multipolygon's box; route 11 (ways 1 and 3, the
    latter in Monaco) makes no area and adds nothing."""
    base = changes_base.Base()
    base.locations = osmium.index.create_map("flex_mem")
    coords = {1: (60.17, 24.94), 2: (60.171, 24.95), 3: (61.0, 24.5), 4: (61.01, 24.51)}
    coords |= {5: (43.735, 7.42), 6: (43.736, 7.421)}
    for nid, (lat, lon) in coords.items():
        base.locations.set(nid, osmium.osm.Location(lon, lat))
        base.node_stamps[nid] = (1, 0.0)
    v1 = (1, 0.0)
    base.ways = {1: (v1, (1, 2)), 2: (v1, (3, 4)), 3: (v1, (5, 6))}
    base.rels = {10: (v1, (("w", 1), ("w", 2)), True), 11: (v1, (("w", 1), ("w", 3)), False)}
    change = ChangeFile(Path("x.osc"), "x.osc", "0" * 64, 0, None, None)
    change.nodes[1] = ((2, 0.0), (60.1701, 24.9401))
    (cells,) = touched_cells([change], base)
    box = set(s2.to_token(s2_geometry.cover_bbox(60.17, 24.5, 61.01, 24.95)).tolist())
    assert cells == box | {HELSINKI_L6}
    assert "468f" in cells and MONACO_L6 not in cells


# ---------------------------------------------------------------------------------------------
# Source identity: the full path, never the file name
# ---------------------------------------------------------------------------------------------
def _walk(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (an independent look, not ``_snapshot``)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def test_same_file_name_in_two_folders_gets_two_ledgers(
    tmp_path: Path, helsinki_pbf: Path, monaco_pbf: Path, helsinki_objects
) -> None:
    a, b = tmp_path / "a" / "x.osm.pbf", tmp_path / "b" / "x.osm.pbf"
    for src, dst in ((helsinki_pbf, a), (monaco_pbf, b)):
        dst.parent.mkdir()
        shutil.copy(src, dst)
    root = tmp_path / "root"
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    fa = _osc(tmp_path / "c/a.osc", modify=_node(WAY_NODE, nv + 1, lat, lon + 1e-4))
    mid, mv, mlat, mlon = _first_node(monaco_pbf)
    fb = _osc(tmp_path / "c/b.osc", modify=_node(mid, mv + 1, mlat, mlon + 1e-4))

    ra = oc.apply_changes(root, a, [fa])
    rb = oc.apply_changes(root, b, [fb])
    da, db = oc.source_dir(root, a), oc.source_dir(root, b)
    assert da != db and da.parent == db.parent == root / oc.SOURCES_DIR
    assert da.name.startswith("x-") and db.name.startswith("x-")
    assert ra.extract.parent == da and rb.extract.parent == db
    assert oc.read_ledger(root, a)["source"]["path"] == str(a.resolve())
    assert oc.read_ledger(root, b)["source"]["path"] == str(b.resolve())
    assert [e.name for e in oc.applied_changes(root, a)] == ["a.osc"]
    assert [e.name for e in oc.applied_changes(root, b)] == ["b.osc"]
    # b's extract is Monaco with b's change, not a's updated Helsinki
    got_b = _read(oc.current_extract(root, b), nodes=[mid, WAY_NODE])
    assert got_b == {("n", mid): (mv + 1, pytest.approx(mlat), pytest.approx(mlon + 1e-4))}
    got_a = _read(oc.current_extract(root, a), nodes=[mid, WAY_NODE])
    assert got_a.keys() == {("n", WAY_NODE)} and got_a[("n", WAY_NODE)][0] == nv + 1


@pytest.mark.parametrize("name", ["...osm.pbf", ".osm.pbf", "..pbf"])
def test_dotted_source_name_writes_only_under_its_source_folder(
    tmp_path: Path, helsinki_pbf: Path, helsinki_objects, name: str
) -> None:
    """A source named ``...osm.pbf`` once put its ledger into the root itself, and the next
    refresh deleted a user's ``*.osm.pbf`` there."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "mine.osm.pbf").write_bytes(b"the user's own file")
    (root / "ledger.json").write_text("{}")  # a user's file that a root-level ledger would hit
    src = tmp_path / "src" / name
    src.parent.mkdir()
    shutil.copy(helsinki_pbf, src)
    before = _walk(root)
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    f1 = _osc(tmp_path / "c/1.osc", modify=_node(WAY_NODE, nv + 1, lat, lon + 1e-4))
    f2 = _osc(tmp_path / "c/2.osc", modify=_node(WAY_NODE, nv + 2, lat, lon + 2e-4))
    oc.apply_changes(root, src, [f1])
    res = oc.apply_changes(root, src, [f1, f2])  # a second batch removes the first extract
    assert res.applied == [f2]
    after = _walk(root)
    prefix = f"{oc.SOURCES_DIR}/{oc.source_dir(root, src).name}/"
    assert oc.source_dir(root, src).name not in ("", ".", "..")
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed and all(k.startswith(prefix) and "/" not in k[len(prefix) :] for k in changed)
    assert {k: after[k] for k in before} == before  # the user's files are intact
    oc.reset_source(root, src)
    assert {k: v for k, v in _walk(root).items() if not k.startswith(prefix)} == before


def _first_node(pbf: Path) -> tuple[int, int, float, float]:
    for node in osmium.FileProcessor(str(pbf), osmium.osm.NODE):
        return node.id, node.version, node.location.lat, node.location.lon
    raise AssertionError(f"no node in {pbf}")


# ---------------------------------------------------------------------------------------------
# Regional extracts stay regional
# ---------------------------------------------------------------------------------------------
NEW_NODE = 90_000_000_001  # ids far above any in the extracts: new objects
NEW_WAY = 90_000_000_001


def _inside(pbf: Path, lat: float, lon: float) -> bool:
    min_lat, min_lng, max_lat, max_lng = source_bbox(pbf)
    return min_lat <= lat <= max_lat and min_lng <= lon <= max_lng


def test_change_in_one_city_applies_to_that_city_only(
    tmp_path: Path, helsinki_pbf: Path, monaco_pbf: Path, helsinki_objects
) -> None:
    root = tmp_path / "root"
    monaco_sha = _sha(monaco_pbf)
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    assert _inside(helsinki_pbf, lat, lon + 1e-4) and not _inside(monaco_pbf, lat, lon + 1e-4)
    f = _osc(tmp_path / "c/1.osc", modify=_node(WAY_NODE, nv + 1, lat, lon + 1e-4))

    rh = oc.apply_changes(root, helsinki_pbf, [f])
    rm = oc.apply_changes(root, monaco_pbf, [f])
    assert rh.applied == [f] and rh.outside == [] and rh.touched_cells == [HELSINKI_L6]
    assert rm.applied == [] and rm.outside == [f] and rm.touched_cells == []
    assert oc.files_outside_every_source([rh, rm]) == []
    # Monaco: still the original file, byte-identical; no extract written, the file recorded
    assert rm.extract == monaco_pbf and oc.current_extract(root, monaco_pbf) == monaco_pbf
    assert _sha(monaco_pbf) == monaco_sha
    mdir = oc.source_dir(root, monaco_pbf)
    assert sorted(p.name for p in mdir.iterdir() if p.name != ".lock") == ["ledger.json"]
    ledger = oc.read_ledger(root, monaco_pbf)
    assert ledger["applied"] == [] and [e["name"] for e in ledger["outside"]] == ["1.osc"]
    assert ledger["outside"][0]["sha256"] == _sha(f)
    assert ledger["region"] == pytest.approx(list(source_bbox(monaco_pbf)))
    assert oc.applied_changes(root, monaco_pbf) == []
    assert oc.outside_changes(root, monaco_pbf) == ["1.osc"]
    assert oc.outside_changes(root, helsinki_pbf) == []
    # The next run knows the file: skipped in both sources, nothing rewritten
    before = _snapshot(root)
    again = [oc.apply_changes(root, s, [f]) for s in (helsinki_pbf, monaco_pbf)]
    assert [(r.applied, r.outside, r.skipped) for r in again] == [([], [], [f])] * 2
    assert _snapshot(root) == before


def test_change_outside_every_source_is_applied_to_none(
    tmp_path: Path, helsinki_pbf: Path, monaco_pbf: Path, helsinki_objects
) -> None:
    root = tmp_path / "root"
    far = (48.8566, 2.3522)  # Paris
    assert not _inside(helsinki_pbf, *far) and not _inside(monaco_pbf, *far)
    f = _osc(
        tmp_path / "c/paris.osc",
        create=_node(NEW_NODE, 1, *far)
        + _node(NEW_NODE + 1, 1, far[0] + 1e-3, far[1])
        + _way(NEW_WAY, 1, [NEW_NODE, NEW_NODE + 1], {"highway": "footway"}),
    )
    sources = (helsinki_pbf, monaco_pbf)
    shas = [_sha(s) for s in sources]
    results = [oc.apply_changes(root, s, [f]) for s in sources]
    assert [(r.applied, r.outside, r.touched_cells) for r in results] == [([], [f], [])] * 2
    assert [r.extract for r in results] == list(sources)
    assert oc.files_outside_every_source(results) == [f]
    assert [_sha(s) for s in sources] == shas
    assert not list((root / oc.SOURCES_DIR).rglob("*.osm.pbf"))
    for s in sources:
        assert [e["name"] for e in oc.read_ledger(root, s)["outside"]] == ["paris.osc"]


def test_way_crossing_the_region_border_is_kept_whole(
    tmp_path: Path, helsinki_pbf: Path, monaco_pbf: Path, helsinki_objects
) -> None:
    """osmium extract's smart strategy: a way with a node inside the region is kept with all
    its nodes; a way and nodes wholly outside are not added."""
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    out = (61.0, 24.5)  # north of Helsinki's box, in level-6 cell 468f
    far = (61.1, 24.6)
    assert not _inside(helsinki_pbf, *out) and not _inside(helsinki_pbf, *far)
    assert str(s2.to_token(s2.latlng_to_cell_id(*out, 6))) != HELSINKI_L6
    crossing = [WAY_NODE, NEW_NODE]
    f = _osc(
        tmp_path / "c/1.osc",
        create=_node(NEW_NODE, 1, *out)
        + _node(NEW_NODE + 1, 1, *far)
        + _node(NEW_NODE + 2, 1, far[0], far[1] + 1e-3)
        + _way(NEW_WAY, 1, crossing, {"highway": "footway"})
        + _way(NEW_WAY + 1, 1, [NEW_NODE + 1, NEW_NODE + 2], {"highway": "footway"}),
    )
    root = tmp_path / "root"
    res = oc.apply_changes(root, helsinki_pbf, [f])
    assert res.applied == [f] and res.touched_cells == [HELSINKI_L6]  # its region's cells only
    new_ids = [NEW_NODE, NEW_NODE + 1, NEW_NODE + 2]
    got = _read(res.extract, nodes=[WAY_NODE, *new_ids], ways=[NEW_WAY, NEW_WAY + 1])
    assert got.keys() == {("n", WAY_NODE), ("n", NEW_NODE), ("w", NEW_WAY)}
    assert got[("n", NEW_NODE)] == (1, pytest.approx(out[0]), pytest.approx(out[1]))
    refs = {
        w.id: [n.ref for n in w.nodes]
        for w in osmium.FileProcessor(str(res.extract), osmium.osm.WAY)
        if w.id == NEW_WAY
    }
    assert refs == {NEW_WAY: crossing}
    # Every object of the original extract is still there (nothing else was cut away).
    kinds = {"n": osmium.osm.NODE, "w": osmium.osm.WAY, "r": osmium.osm.RELATION}
    for kind, bit in kinds.items():
        old = {o.id for o in osmium.FileProcessor(str(helsinki_pbf), bit)}
        new = {o.id for o in osmium.FileProcessor(str(res.extract), bit)}
        assert new - old == ({NEW_NODE} if kind == "n" else {NEW_WAY} if kind == "w" else set())
        assert old <= new
    assert oc.apply_changes(root, monaco_pbf, [f]).outside == [f]


def test_extract_larger_than_its_box_is_cut_and_its_removed_cells_reported(
    tmp_path: Path, monaco_pbf: Path
) -> None:
    """An extract holding data beyond its header box (here Monaco's data under a box reaching
    only 43.73 N, so its northern streets lie outside): the first change applied cuts it back
    to the box, and the cells of what the cut removed are touched too. The change is a new
    node in 12cf; the removed streets are in 12cd."""
    box = (43.45, 7.38, 43.73, 7.52)
    src = tmp_path / "src" / "shrunk.osm.pbf"
    src.parent.mkdir()
    header = osmium.io.Header()
    header.add_box(osmium.osm.Box(box[1], box[0], box[3], box[2]))
    merge(monaco_pbf, [], src, header)  # Monaco's objects, the smaller box
    assert source_bbox(src) == pytest.approx(box)
    region_cells = s2.to_token(s2_geometry.cover_bbox(*box)).tolist()
    new_at = (43.55, 7.42)
    assert sorted(region_cells) == [MONACO_L6, "12cf"]
    assert str(s2.to_token(s2.latlng_to_cell_id(*new_at, 6))) == "12cf"
    north = {
        n.id
        for n in osmium.FileProcessor(str(monaco_pbf), osmium.osm.NODE)
        if n.location.lat > 43.74
    }
    assert north

    f = _osc(tmp_path / "c/1.osc", create=_node(NEW_NODE, 1, *new_at))
    res = oc.apply_changes(tmp_path / "root", src, [f])
    assert res.applied == [f]
    kept = {n.id: n.location.lat for n in osmium.FileProcessor(str(res.extract), osmium.osm.NODE)}
    assert NEW_NODE in kept
    assert north - kept.keys()  # northern nodes used by no kept way went
    assert res.touched_cells == [MONACO_L6, "12cf"]


def test_source_without_header_box_uses_its_nodes_extent(tmp_path: Path, monaco_pbf: Path) -> None:
    src = tmp_path / "src" / "nobox.osm.pbf"
    src.parent.mkdir()
    merge(monaco_pbf, [], src, osmium.io.Header())  # Monaco's objects, no header box
    reader = osmium.io.Reader(str(src), osmium.osm.osm_entity_bits.NOTHING)
    assert not reader.header().box().valid()
    reader.close()
    locs = np.array(
        [(n.location.lat, n.location.lon) for n in osmium.FileProcessor(str(src), osmium.osm.NODE)]
    )
    extent = [*locs.min(axis=0), *locs.max(axis=0)]
    root = tmp_path / "root"
    far = _osc(tmp_path / "c/1.osc", create=_node(NEW_NODE, 1, 43.9, 7.42))  # north of all nodes
    assert oc.apply_changes(root, src, [far]).outside == [far]
    assert oc.read_ledger(root, src)["region"] == pytest.approx(extent)
    near = _osc(tmp_path / "c/2.osc", create=_node(NEW_NODE + 1, 1, 43.6, 7.45))  # inside it
    res = oc.apply_changes(root, src, [far, near])
    assert res.applied == [near] and res.skipped == [far]
    assert _read(res.extract, nodes=[NEW_NODE, NEW_NODE + 1]).keys() == {("n", NEW_NODE + 1)}
    assert source_bbox(res.extract) == pytest.approx(extent, abs=1e-7)  # the region, kept


def _rel(rid: int, members: list[tuple[str, int]], rel_type: str) -> str:
    kinds = {"n": "node", "w": "way", "r": "relation"}
    body = "".join(f'    <member type="{kinds[t]}" ref="{r}" role=""/>\n' for t, r in members)
    return (
        f'  <relation id="{rid}" version="1" timestamp="{TS}" uid="1" user="t" changeset="1">\n'
        f'{body}    <tag k="type" v="{rel_type}"/>\n  </relation>\n'
    )


def test_region_cut_follows_osmium_smart_strategy(tmp_path: Path) -> None:
    """The region cut in pyosmium (no osmium-tool) keeps what `osmium extract --strategy smart`
    documents: nodes inside; ways with a node inside, whole; relations with a member node inside
    or a kept way, and their parents recursively; multipolygons with all their members (and
    those ways' nodes). Everything else is removed, and reported as removed."""
    box = (60.0, 24.0, 60.1, 24.1)  # min_lat, min_lng, max_lat, max_lng
    inside, out = (60.05, 24.05), (60.5, 24.5)
    nodes = {1: inside, 2: out, 3: out, 4: (60.6, 24.6), 5: out, 6: out, 7: out, 8: out}
    nodes[9] = (60.1, 24.1)  # on the box's corner: inside (the bounds are inclusive)
    body = "".join(_node(n, 1, *loc) for n, loc in nodes.items())
    body += _way(11, 1, [1, 2], {"highway": "path"})  # crosses the border: kept whole
    body += _way(12, 1, [3, 4], {"natural": "water"})  # outside, in a kept multipolygon
    body += _way(15, 1, [7, 8], {"highway": "path"})  # outside, only in a route
    body += _rel(21, [("w", 11), ("w", 12), ("n", 6)], "multipolygon")  # completed
    body += _rel(23, [("w", 11), ("w", 15)], "route")  # kept, not completed
    body += _rel(24, [("r", 23)], "superroute")  # parent of a kept relation
    body += _rel(25, [("r", 24)], "collection")  # grandparent
    body += _rel(26, [("w", 15)], "route")  # wholly outside
    merged = tmp_path / "in.osm"
    merged.write_text(f"<?xml version='1.0'?>\n<osm version=\"0.6\">\n{body}</osm>\n")
    cut = region.cut(merged, tmp_path / "cut.osm.pbf", box, {"osmosis_replication_timestamp": TS})
    got = {(o.type_str(), o.id) for o in osmium.FileProcessor(str(tmp_path / "cut.osm.pbf"))}
    kept_nodes = {1, 2, 3, 4, 6, 9}
    assert got == {("n", n) for n in kept_nodes} | {("w", 11), ("w", 12)} | {
        ("r", r) for r in (21, 23, 24, 25)
    }
    assert cut.removed_nodes.keys() == {5, 7, 8}
    assert cut.removed_ways == {15: [7, 8]}
    assert cut.removed_rels == [[("w", 15)]]
    reader = osmium.io.Reader(str(tmp_path / "cut.osm.pbf"), osmium.osm.osm_entity_bits.NOTHING)
    header = reader.header()
    assert header.get("osmosis_replication_timestamp") == TS
    b = header.box()
    assert (b.bottom_left.lat, b.bottom_left.lon, b.top_right.lat, b.top_right.lon) == (
        pytest.approx(box)
    )
    reader.close()


@pytest.mark.parametrize("city", ["helsinki", "monaco"])
def test_bundled_extracts_are_fixed_points_of_the_cut(city: str, tmp_path: Path) -> None:
    """A first refresh changes nothing else: cutting a bundled extract to its own region keeps
    every object, unchanged (as osmium-tool's smart cut did)."""
    from s2vec_pipeline.settings import bundled_source

    src = bundled_source(city)
    out = tmp_path / "cut.osm.pbf"
    cut = region.cut(src, out, region.source_region(src), {})

    def objects(path: Path) -> list[tuple]:
        return [(o.type_str(), o.id, o.version) for o in osmium.FileProcessor(str(path))]

    assert objects(out) == objects(src)
    assert not (cut.removed_nodes or cut.removed_ways or cut.removed_rels)


def test_refresh_needs_no_osmium_tool(
    tmp_path: Path, helsinki_pbf: Path, helsinki_objects, monkeypatch
) -> None:
    """Applying a change (merge and region cut) runs with no `osmium` program on the PATH."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_osmium_tool() is None
    v, lat, lon = helsinki_objects[("n", STATION)]
    f = _osc(tmp_path / "c/1.osc", modify=_node(STATION, v + 1, lat + 0.001, lon))
    res = oc.apply_changes(tmp_path / "root", helsinki_pbf, [f])
    assert res.applied == [f] and res.touched_cells == [HELSINKI_L6]
    assert _read(res.extract, nodes=[STATION])[("n", STATION)] == (
        v + 1,
        pytest.approx(lat + 0.001),
        pytest.approx(lon),
    )


@pytest.mark.slow
def test_later_node_moves_inside_skip_the_cut_with_the_same_result(
    tmp_path: Path, helsinki_pbf: Path, helsinki_objects, monkeypatch
) -> None:
    """After a first batch (always cut), a batch that only moves nodes within the region gives
    the same extract as merging and cutting it (computed here with the cut forced), header box
    included; a node moved out of the region still goes."""
    v, lat, lon = helsinki_objects[("n", STATION)]
    first = _osc(tmp_path / "c/1.osc", modify=_node(STATION, v + 1, lat + 0.001, lon))
    second = _osc(tmp_path / "c/2.osc", modify=_node(STATION, v + 2, lat + 0.002, lon))
    fast, full = tmp_path / "fast", tmp_path / "full"

    def objects(path: Path) -> list[tuple]:
        return [
            (o.type_str(), o.id, o.version, o.location.lat if o.is_node() else None)
            for o in osmium.FileProcessor(str(path))
        ]

    for root in (fast, full):
        oc.apply_changes(root, helsinki_pbf, [first])
    skipped = oc.apply_changes(fast, helsinki_pbf, [first, second])
    with monkeypatch.context() as m:
        m.setattr(region, "cut_is_a_no_op", lambda files, box: False)
        cut = oc.apply_changes(full, helsinki_pbf, [first, second])
    assert skipped.touched_cells == cut.touched_cells == [HELSINKI_L6]
    assert objects(skipped.extract) == objects(cut.extract)
    assert source_bbox(skipped.extract) == pytest.approx(source_bbox(cut.extract), abs=1e-7)
    # out of the region (Helsinki's box ends below 60.18 N): the node goes, as the cut says
    third = _osc(tmp_path / "c/3.osc", modify=_node(STATION, v + 3, 61.0, lon))
    res = oc.apply_changes(fast, helsinki_pbf, [first, second, third])
    assert res.applied == [third] and _read(res.extract, nodes=[STATION]) == {}


# ---------------------------------------------------------------------------------------------
# The ledger file: its on-disk format, and broken or foreign ledgers
# ---------------------------------------------------------------------------------------------
LEDGER_KEYS = [
    "format",
    "source",
    "extract",
    "extract_sha256",
    "batches",
    "replication",
    "applied",
    "outside",
    "region",
    "updated_at",
]


def test_ledger_file_keeps_its_format_and_reads_older_ledgers(
    tmp_path: Path, helsinki_pbf: Path, helsinki_objects
) -> None:
    """ledger.json keeps the documented keys, in order; a ledger written before ``outside`` and
    ``region`` existed still reads, and the next batch adds them."""
    root = tmp_path / "root"
    nv, lat, lon = helsinki_objects[("n", WAY_NODE)]
    first = _osc(tmp_path / "c/1.osc", modify=_node(WAY_NODE, nv + 1, lat, lon + 1e-4))
    oc.apply_changes(root, helsinki_pbf, [first])
    path = oc.source_dir(root, helsinki_pbf) / "ledger.json"
    stored = json.loads(path.read_text())
    assert list(stored) == LEDGER_KEYS
    assert list(stored["source"]) == ["path", "sha256", "size", "mtime_ns"]
    assert list(stored["applied"][0]) == [
        "name",
        "sha256",
        "size",
        "applied_at",
        "cells",
        "sequence",
        "batch",
        "path",
    ]
    older = {k: v for k, v in stored.items() if k not in ("outside", "region")}
    path.write_text(json.dumps(older, indent=2))
    assert [e.name for e in oc.applied_changes(root, helsinki_pbf)] == ["1.osc"]
    second = _osc(tmp_path / "c/2.osc", modify=_node(WAY_NODE, nv + 2, lat, lon + 2e-4))
    res = oc.apply_changes(root, helsinki_pbf, [first, second])
    assert res.applied == [second] and res.skipped == [first]
    again = json.loads(path.read_text())
    assert list(again) == LEDGER_KEYS and again["batches"] == 2
    assert again["region"] == pytest.approx(list(source_bbox(helsinki_pbf)))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"format": 1, "source": {', "cannot be read"),
        ('["a", "list"]', "is not a format-1 ledger"),
        ('{"format": 2, "source": {}}', "is not a format-1 ledger"),
        ('{"format": 1, "source": {"path": "x"}}', r"is damaged \(source\.sha256: field required"),
        ('{"format": 1, "source": null}', r"is damaged \(source: "),
    ],
)
def test_broken_or_foreign_ledger_is_refused_naming_the_way_out(
    tmp_path: Path, helsinki_pbf: Path, content: str, problem: str
) -> None:
    """A ledger that is truncated, not a format-1 ledger or missing a field stops every use of
    the source with one error naming the file and how to start again."""
    root = tmp_path / "root"
    sdir = oc.source_dir(root, helsinki_pbf)
    sdir.mkdir(parents=True)
    (sdir / "ledger.json").write_text(content)
    for use in (oc.current_extract, oc.read_ledger, oc.applied_changes):
        with pytest.raises(oc.ChangeLedgerError, match=problem) as err:
            use(root, helsinki_pbf)
        assert str(sdir / "ledger.json") in str(err.value)
        assert f"delete {sdir}" in str(err.value)
