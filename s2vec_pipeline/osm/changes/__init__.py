"""Nightly refresh of an OSM source from change files (``.osc`` / ``.osc.gz``).

The user's source file is never modified. Updated extracts live under the storage root::

    <root>/_sources/<id>/ledger.json               what was applied; the current extract
    <root>/_sources/<id>/<stem>.<batch>.osm.pbf    the current updated extract

``<id>`` is ``<stem>-<hash of the source's resolved absolute path>`` (``source_id``, that is
``storage.file_identity.path_key``): sources with the same file name in different folders
never share a folder, and nothing is written outside ``<root>/_sources/<id>/``.

``apply_changes`` merges every change file not applied yet onto the current extract in one pass
(``osmium.MergeInputReader.apply_to_reader``: C++ end to end, the newest version of each object
wins, deletions remove objects) and writes a new PBF atomically (temp file, fsync, rename). The
ledger is then rewritten atomically to point at it and only after that is the previous updated
extract deleted. A batch is all or nothing: every new file is read in full and checked before
anything is written, so a corrupt or stale file leaves the ledger and the extracts untouched.

Rules
-----
* Order: ``list_change_files`` sorts by the numbers in the path relative to the folder, compared
  as numbers ("natural" order), so the replication layout ``000/123/456.osc.gz`` sorts by its
  sequence number 123456 and ``day-9.osc`` comes before ``day-10.osc``. ``apply_changes`` applies
  the files in the order it is given.
* Identity: a change file is known by its *name*: the last three path parts for the replication
  layout (``000/123/456.osc.gz``), otherwise its file name. The same name with the same sha256 is
  skipped; the same name with other content is an error, as is the same content under a new name.
* Staleness (``StaleChangeError``): a change file is refused as older than the extract when
  (1) its replication sequence number (from ``<n>.state.txt`` beside it, else from the
  replication path) is not greater than the extract's ``osmosis_replication_sequence_number``
  header (or the previous file's in the same batch), or, when either number is unknown,
  (2) it holds at least one object that the extract also holds (both with a version) and none of
  those objects is newer than the extract's: a greater version, or the same version with a
  later timestamp (the order libosmium's merge uses to pick the copy it keeps). Objects the
  extract lacks (creations, objects outside the extract) do not count either way: a file
  overlapping the extract in part (normal at the start of a replication stream) is applied,
  and the merge keeps the newer copy of each object. Timestamps alone are not compared with
  the extract's date: edits committed late carry timestamps older than the replication
  cut-off, so such a rule would refuse valid minutely diffs.
* Header: the new PBF has the region's box as its bounding box (partitions are derived from
  it), keeps the base's replication base URL, and gets the sequence number and
  ``osmosis_replication_timestamp`` of the last applied file when its ``state.txt`` (or
  replication path, for the number) tells them.

Regions
-------
Extracts stay regional, as Geofabrik-style regional updates (a fresh ``osmium extract`` of the
updated data) do. The region is the original source's header box, or its nodes' extent when
the header has none (``osm.extract.source_bbox``), recorded in the ledger on first use.

1. A new change file is applied to a source only if it concerns the region
   (``region.files_in_region``): one of its objects is held by the extract (its change or
   deletion must apply, it may also move out), or is a node whose new location is inside the
   box, a way with a node inside the box (locations after the file), or a relation with such a
   node or way, or a held object, as member. Otherwise it is recorded in the ledger's
   ``outside`` list and in ``ChangeResult.outside`` (skipped, not reconsidered, on later runs);
   the extract is not rewritten. ``files_outside_every_source`` names the files no source took.
2. The files that concern it are merged onto the current extract (below) and the merged file
   is cut back to the box by the rule of ``osmium extract --strategy smart``, done in pyosmium
   (``region.cut``: no osmium-tool needed): nodes inside the box; ways
   with at least one node inside, with all their nodes (a way crossing the border is kept
   whole); relations with a member kept so far and their parent relations; multipolygon
   relations with such a member complete. Created objects wholly outside are therefore not
   added, and an object moved out of the region (a node used by no kept way) leaves it.
   Cutting after merging, rather than filtering the change objects, is exact by construction:
   the same rule as an extract made from scratch, including effects on objects the change
   files do not hold (a way whose only inside node moved out). Both bundled extracts are fixed
   points of this cut (checked against osmium-tool's cut, and by the tests against the cut
   here), so a first refresh changes nothing else; an extract holding more than the smart box
   cut keeps (data beyond its header box) loses that at its first refresh, and the cells of
   everything the cut removed are touched (``cells.removed_by_cut``, from the objects the cut's
   writing pass left out).
3. Touched cells are reported only within the region's level-6 cover: no other partition
   reads this source.

Touched cells
-------------
Level-6 cells whose features may change, per file, within the region's cover: see ``cells``.

Performance
-----------
The merge is libosmium's, in C++ end to end (``apply_to_reader`` streams the base and the sorted
changes into an ``osmium.io.Writer``): no Python object is written, so the ~1 MB/s of
``SimpleWriter`` does not apply and osmium-tool's ``apply-changes`` (the same libosmium code)
would not be faster. Python work: one read of the base's relations, one read of its nodes and
ways (node locations go to a C++ ``flex_mem`` index; Python sees every way's node list and,
unless the changed nodes are too scattered for a small C++ id filter, only the changed nodes),
and the change files. Measured on this machine: a few-object change on the bundled 0.7 MB
extracts ~0.35-0.45 s; 3,000 moved nodes and 500 changed ways on Helsinki ~1.1 s, ~110 MB
peak RSS for the whole process. Scaling those rates (~2-3 MB/s of PBF for the way pass and
the merge), an extract of tens of MB takes tens of seconds and ~16 B per node of index memory.
For continent-sized files (GBs) the Python way pass and the in-memory index are too slow and
big: run ``osmium apply-changes`` (osmium-tool) for the merge, find affected ways and relations
with ``osmium getparents`` and node locations from a persistent on-disk index
(``sparse_file_array``), and keep this ledger.

The region cut (two reads of the merged file, Python id sets) dominates small updates:
measured on this shared 2-core machine (load ~6), a one-node change took 1.4 s on Helsinki and
1.6 s on Monaco in all, at ~155 MiB peak RSS for the whole process (osmium-tool's cut, used
before, took ~1.2 s for the cut alone but peaked at 1.7-2.5 GB: its dense id sets grow with the
spread of the ids). It grows with the extract: 14 s (9.7 s selection, 4.5 s writing) for
Helsinki tiled 16 times (8.2 MB) at load 9; C++ id sets (``osmium.IdTracker``) would be the
next step. A batch that only moves or creates nodes inside the region, on an extract that
came out of a cut, skips it (``region.cut_is_a_no_op``): the nightly case of small edits pays the
cut once, at the first batch. A change file
outside the region costs no cut.

Modules: ``files`` (listing, names, sequence numbers, reading a change file), ``ledger`` (the
ledger's model and folder, object-store sync, the public queries), ``base`` (what the changes
need of the extract; staleness), ``region`` (the region and the smart cut), ``cells`` (touched
cells), ``apply`` (``apply_changes`` in steps). The public names are importable from here.
"""

from s2vec_pipeline.osm.changes.apply import ChangeResult, apply_changes, files_outside_every_source
from s2vec_pipeline.osm.changes.base import StaleChangeError
from s2vec_pipeline.osm.changes.files import (
    ChangeFileError,
    change_file_name,
    list_change_files,
    replication_sequence,
)
from s2vec_pipeline.osm.changes.ledger import (
    LEDGER_FORMAT,
    SOURCES_DIR,
    AppliedChange,
    ChangeLedgerError,
    applied_changes,
    cell_source_version,
    current_extract,
    outside_changes,
    read_ledger,
    reset_source,
    source_dir,
    source_id,
)

__all__ = [
    "LEDGER_FORMAT",
    "SOURCES_DIR",
    "AppliedChange",
    "ChangeFileError",
    "ChangeLedgerError",
    "ChangeResult",
    "StaleChangeError",
    "apply_changes",
    "applied_changes",
    "cell_source_version",
    "change_file_name",
    "current_extract",
    "files_outside_every_source",
    "list_change_files",
    "outside_changes",
    "read_ledger",
    "replication_sequence",
    "reset_source",
    "source_dir",
    "source_id",
]
