"""Large-area extraction: memory bounded by a group of partitions, groups in parallel.

Public API: :func:`extract_partitions` (callback per partition), :func:`plan_groups`,
:func:`split_source`.

1. **Split** (C++): ``osmium extract --strategy smart`` cuts each source into one lz4 PBF per
   *group* of level-6 partitions: the partitions under one ancestor cell (level 5 for groups of
   4), so a group is compact. A group's region is its cells' outline (edges sampled along the
   geodesics) grown by a margin: groups barely overlap. ``smart`` keeps every way with a node
   in the region whole (all its nodes) and every multipolygon/boundary relation touching it
   complete, so each object a group sees has exactly the geometry the single-process path
   gives it. Above 32 groups the split goes in stages (cluster files by a coarser ancestor,
   then groups), each pass with bounded memory, clusters in parallel.
2. **Extract** each (source, group) file in a worker process (``spawn``: deltalake panics in
   forked children), with the same code as :func:`osm_extract.extract_features` and a
   file-backed node-location index. A worker keeps the rows that land in its own partitions,
   plus the rows an object it sees sends to another requested partition whose group may *not*
   see it (no vertex surely inside that group's region: a long segment, a large polygon). Such
   rows may then arrive twice; the merge drops identical duplicates by the table key
   (osm_type, osm_id, channel, cell_id), as the single-process path does across sources.
3. **Merge**: workers spill rows to Parquet by partition; once every worker is done, each
   partition is read, de-duplicated, sorted and handed to the caller's callback, one partition
   at a time. Peak memory: the largest group's extraction in each worker, one partition here.

Exactness: the rows of a requested partition equal the single-process path's whenever every
object feeding it has at least one vertex in some requested group's region. That holds for a
run over all the cells a source covers (the usual backfill); for a run of a few cells of a
larger source, an object with *no* vertex within ``margin_deg`` of the requested cells (a
single segment or polygon reaching over them from outside) is missed.

A worker that dies (signal, out of memory) is retried once in a fresh process; if it dies again
its partitions fail, and so do the requested partitions meeting its region (they could miss
rows of objects only it saw). The other partitions are delivered.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import polars as pl
import shapely

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL, ResolutionProfile
from s2vec_pipeline.errors import (
    InvalidSourceError,
    S2VecError,
    quiet_worker_interrupts,
    start_quietly,
)
from s2vec_pipeline.osm.extract import (
    OSM_FEATURES_SCHEMA,
    ExtractStats,
    _Collector,
    _read_source,
    _rows_from_collector,
    extract_features,
    validate_source,
)
from s2vec_pipeline.osm.taxonomy import Taxonomy
from s2vec_pipeline.settings import default_workers
from s2vec_pipeline.storage.locks import exclusive

OSMIUM_TOOL = "osmium"
#: Sources up to this many bytes in all are extracted in-process (faster: no split, no workers).
IN_PROCESS_MAX_BYTES = 64 * 1024 * 1024
#: Default number of level-6 partitions per group (one worker task, one split output file).
PARTITIONS_PER_GROUP = 4
#: Extracts per ``osmium extract`` pass: its memory grows with extracts x highest node id / 4.
MAX_EXTRACTS_PER_PASS = 32
#: Group files are temporary: lz4 writes ~2x faster than zlib at ~1.3x the size (measured).
SPLIT_FORMAT = "pbf,pbf_compression=lz4"
DEFAULT_MARGIN_DEG = 0.05
ROW_KEY = ["osm_type", "osm_id", "channel", "cell_id"]
SORT_KEY = ["parent_l6", "cell_id", "channel", "osm_type", "osm_id"]
_FIX = 10_000_000  # osmium stores coordinates as integers of 1e-7 degree


class OsmiumToolMissingError(S2VecError):
    """osmium-tool is needed to split a large source."""


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
            x0, y0, x1, y1 = (c / _FIX for c in self.box)
            return shapely.box(x0, y0, x1, y1)
        return shapely.MultiPolygon(
            [shapely.Polygon(rings[0], rings[1:]) for rings in self.polygons]
        )

    @property
    def name(self) -> str:
        return f"g{self.index:05d}"


@dataclass
class PartitionedResult:
    """What :func:`extract_partitions` delivered: partitions passed to the callback, failed
    partitions with the reason, and the summed statistics of the workers."""

    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stats: ExtractStats = field(default_factory=ExtractStats)
    groups: int = 0
    in_process: bool = False
    seconds_split: float = 0.0
    seconds_extract: float = 0.0
    seconds_merge: float = 0.0
    worker_peak_rss_bytes: int = 0  # the largest peak of any worker process


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
    level = _group_level(partitions_per_group)
    by_parent: dict[str, list[str]] = {}
    if tokens:
        parents = s2.to_token(s2.parent(s2.from_token(np.asarray(tokens)), level))
        for token, par in zip(tokens, parents.tolist(), strict=True):
            by_parent.setdefault(par, []).append(token)
    groups = []
    for n, chunk in enumerate(by_parent[p] for p in sorted(by_parent)):
        box = _region(chunk, margin_deg)
        polygons = _outline(chunk, margin_deg) if box[0] > -180 * _FIX else ()
        if polygons:
            x0, y0, x1, y1 = shapely.MultiPolygon(
                [shapely.Polygon(r[0], r[1:]) for r in polygons]
            ).bounds
            box = (
                math.floor(x0 * _FIX),
                math.floor(y0 * _FIX),
                math.ceil(x1 * _FIX),
                math.ceil(y1 * _FIX),
            )
        groups.append(PartitionGroup(n, tuple(chunk), box, polygons))
    return groups


def _group_level(partitions_per_group: int) -> int:
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
    level = _group_level(partitions_per_group)
    ancestors = np.unique(s2.parent(s2.from_token(np.asarray(tokens)), level))
    children = s2.to_token(s2.children_grid(ancestors, PARTITION_LEVEL).reshape(-1))
    return plan_groups(children.tolist(), partitions_per_group, margin_deg)


def _outline(tokens: Sequence[str], margin_deg: float, per_edge: int = 16) -> tuple:
    """The cells' union as lat/lng polygons: each edge (a geodesic) sampled ``per_edge`` times,
    grown by the margin plus 0.01° (the chord-vs-geodesic gap of a level-6 edge is far less)."""
    ids = s2.from_token(np.asarray(tokens))
    face, i, j = s2.face_ij(ids, PARTITION_LEVEL)
    u_lo, u_hi, v_lo, v_hi = s2._uv_bounds(i, j, PARTITION_LEVEL)
    t = np.linspace(0.0, 1.0, per_edge, endpoint=False)
    cells = []
    for k in range(len(tokens)):
        du, dv = u_hi[k] - u_lo[k], v_hi[k] - v_lo[k]
        u_lo_k, u_hi_k = np.full_like(t, u_lo[k]), np.full_like(t, u_hi[k])
        v_lo_k, v_hi_k = np.full_like(t, v_lo[k]), np.full_like(t, v_hi[k])
        # counter-clockwise around the cell: bottom, right, top, left edges
        u = np.concatenate([u_lo[k] + du * t, u_hi_k, u_hi[k] - du * t, u_lo_k])
        v = np.concatenate([v_lo_k, v_lo[k] + dv * t, v_hi_k, v_hi[k] - dv * t])
        lat, lng = s2._normalized_latlng_deg(*s2._face_uv_to_xyz(np.full(len(u), face[k]), u, v))
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
        np.degrees(a) for a in s2._cell_rect_bounds(face, i, j, PARTITION_LEVEL)
    )
    if np.any(lng_lo > lng_hi):  # a cell across the antimeridian: take every longitude
        lng_min, lng_max = -180.0, 180.0
    else:
        lng_min, lng_max = float(lng_lo.min()) - margin_deg, float(lng_hi.max()) + margin_deg
    lat_min, lat_max = float(lat_lo.min()) - margin_deg, float(lat_hi.max()) + margin_deg
    return (
        math.floor(max(lng_min, -180.0) * _FIX),
        math.floor(max(lat_min, -90.0) * _FIX),
        math.ceil(min(lng_max, 180.0) * _FIX),
        math.ceil(min(lat_max, 90.0) * _FIX),
    )


def osmium_tool() -> str:
    """Path of the ``osmium`` command, or an error naming how to install it."""
    path = shutil.which(OSMIUM_TOOL)
    if path is None:
        raise OsmiumToolMissingError(
            "osmium-tool is not installed, and sources above "
            f"{IN_PROCESS_MAX_BYTES // 2**20} MiB are split with it: "
            "install it with `apt-get install osmium-tool` (or `conda install osmium-tool`)"
        )
    return path


def split_source(
    source: str | os.PathLike,
    groups: Sequence[PartitionGroup],
    out_dir: str | os.PathLike,
    workers: int = 1,
    max_extracts_per_pass: int = MAX_EXTRACTS_PER_PASS,
) -> dict[int, Path]:
    """Cut ``source`` into one PBF per group (``<out_dir>/<group name>.osm.pbf``).

    Up to ``max_extracts_per_pass`` groups: one ``osmium extract`` pass. More: a pass first
    cuts the source into at most that many clusters (groups sharing a coarser S2 ancestor),
    then each cluster file is split further, clusters in parallel. Every object a group needs
    is complete in its cluster's file (a group's region lies inside its cluster's), so the
    result equals a direct split, while each pass keeps its memory bounded and reads less."""
    tool = osmium_tool()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _split(tool, Path(source), list(groups), out, max(1, workers), max(8, max_extracts_per_pass))
    return {g.index: out / f"{g.name}.osm.pbf" for g in groups}


#: Bump when what a split cache holds changes meaning (regions, file format): old ones are unused.
SPLIT_CACHE_FORMAT = 2


def _group_token(group: PartitionGroup, partitions_per_group: int) -> str:
    level = _group_level(partitions_per_group)
    return str(s2.to_token(s2.parent(s2.from_token(np.asarray(group.partitions[:1])), level))[0])


def _split_cache_dir(
    cache_root: Path, source: Path, partitions_per_group: int, margin_deg: float
) -> Path:
    """``<cache_root>/<source stem>-<path hash>/<version hash>``: one folder per source path,
    one sub-folder per version of the file (size, mtime, inode) and split parameters."""
    st = source.stat()
    where = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    # the inode too: a file replaced by rename can keep its size and mtime, never its inode
    version = [SPLIT_CACHE_FORMAT, st.st_size, st.st_mtime_ns, st.st_ino]
    version += [partitions_per_group, margin_deg]
    what = hashlib.sha256(json.dumps([*version, SPLIT_FORMAT]).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in source.name.split(".")[0])
    return cache_root / f"{stem[:40]}-{where}" / what


def cached_split(
    source: str | os.PathLike,
    partitions: Collection[str],
    cache_root: str | os.PathLike,
    *,
    workers: int = 1,
    partitions_per_group: int = PARTITIONS_PER_GROUP,
    margin_deg: float = DEFAULT_MARGIN_DEG,
    max_extracts_per_pass: int = MAX_EXTRACTS_PER_PASS,
) -> dict[str, Path]:
    """The split files of the :func:`whole_groups` holding ``partitions``, by ancestor token.

    The first call for a version of ``source`` cuts it into the files of EVERY group its header
    box covers (plus the requested ones), in one staged ``osmium extract`` read, and keeps them
    under ``cache_root``; later calls, from any process, reuse them. So a backfill that runs one
    partition per run reads a large source once, not once per partition. Processes serialize on
    a lock per source version: one cuts, the others wait and reuse. A group missing from the
    cache (a partition outside the header box) is cut on demand. Files are published only when
    complete; caches of older versions of the same path are deleted when a new one is made.
    """
    from s2vec_pipeline.osm.coverage import cells_covering_source

    src = Path(source)
    folder = _split_cache_dir(Path(cache_root), src, partitions_per_group, margin_deg)
    plan_file = folder / "plan.json"
    wanted = {_group_token(g, partitions_per_group) for g in whole_groups(partitions,
              partitions_per_group, margin_deg)}  # fmt: skip
    with exclusive(folder.parent / f"{folder.name}.lock"):
        have = set(json.loads(plan_file.read_text())["groups"]) if plan_file.exists() else set()
        if wanted - have:
            universe = set(partitions)
            if not have:
                universe |= set(cells_covering_source(src))
            groups = [
                g
                for g in whole_groups(universe, partitions_per_group, margin_deg)
                if _group_token(g, partitions_per_group) not in have
            ]
            staging = folder.parent / f"{folder.name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            files = split_source(src, groups, staging, workers, max_extracts_per_pass)
            folder.mkdir(parents=True, exist_ok=True)
            made = set()
            for g in groups:
                token = _group_token(g, partitions_per_group)
                os.replace(files[g.index], folder / f"{token}.osm.pbf")
                made.add(token)
            shutil.rmtree(staging, ignore_errors=True)
            tmp = plan_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"source": str(src), "groups": sorted(have | made)}))
            os.replace(tmp, plan_file)  # the files are complete before the plan names them
            if not have:  # a new version of this path: the older ones will not be read again
                for old in folder.parent.iterdir():
                    if old.is_dir() and old.name != folder.name:
                        shutil.rmtree(old, ignore_errors=True)
    return {token: folder / f"{token}.osm.pbf" for token in sorted(wanted)}


def _rings(shape: shapely.Geometry) -> list:
    polys = list(shape.geoms) if isinstance(shape, shapely.MultiPolygon) else [shape]
    return [
        [[[round(x, 7), round(y, 7)] for x, y in r.coords] for r in (p.exterior, *p.interiors)]
        for p in polys
    ]


def _split(
    tool: str, source: Path, groups: list[PartitionGroup], out: Path, workers: int, maxn: int
) -> None:
    if len(groups) <= maxn:
        _osmium_extract(
            tool,
            source,
            [
                (
                    f"{g.name}.osm.pbf",
                    {"multipolygon": _rings(g.shape())}
                    if g.polygons
                    else {"bbox": [c / _FIX for c in g.box]},
                )
                for g in groups
            ],
            out,
        )
        return
    first = s2.from_token(np.asarray([g.partitions[0] for g in groups]))
    level = PARTITION_LEVEL
    while True:  # the finest ancestor level with at most maxn clusters (>= 2 of them)
        level -= 1
        ancestors = s2.to_token(s2.parent(first, level)).tolist()
        if len(set(ancestors)) <= maxn:
            break
    clusters: dict[str, list[PartitionGroup]] = {}
    for g, anc in zip(groups, ancestors, strict=True):
        clusters.setdefault(anc, []).append(g)
    regions = [
        (
            f"c{level}-{anc}.osm.pbf",
            {"multipolygon": _rings(shapely.union_all([g.shape() for g in members]).buffer(0.01))},
        )
        for anc, members in sorted(clusters.items())
    ]
    _osmium_extract(tool, source, regions, out)
    from concurrent.futures import ThreadPoolExecutor  # threads: each waits on a subprocess

    def child(item: tuple[str, list[PartitionGroup]]) -> None:
        path = out / f"c{level}-{item[0]}.osm.pbf"
        try:
            _split(tool, path, item[1], out, 1, maxn)
        finally:
            path.unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(child, sorted(clusters.items())))


def _osmium_extract(tool: str, source: Path, regions: list[tuple[str, dict]], out: Path) -> None:
    """One ``osmium extract`` pass writing each (file name, region) under ``out``."""
    tag = regions[0][0].removesuffix(".osm.pbf")
    config = out / f"extract-{tag}.json"
    config.write_text(
        json.dumps(
            {
                "directory": str(out),
                "extracts": [
                    {"output": name, "output_format": SPLIT_FORMAT, **region}
                    for name, region in regions
                ],
            }
        )
    )
    # smart: ways complete, and multipolygon/boundary relations complete (pyosmium's area
    # assembler builds areas from both relation types).
    cmd = [tool, "extract", "--strategy=smart", "-S", "types=multipolygon,boundary",
           "--overwrite", "--no-progress", "-c", str(config), str(source)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split())[-300:]
        raise InvalidSourceError(
            f"osmium extract could not split {source}: {detail}; check the file with "
            f"`osmium fileinfo -e {source}`"
        )


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Task:
    source_index: int
    group: PartitionGroup
    pbf: str
    out_dir: str
    taxonomy: Taxonomy
    profile: ResolutionProfile
    location_store: str | None  # None: a sparse_file_array index in out_dir
    partition_group: dict[str, int]  # every requested partition -> its group index
    groups: dict[int, PartitionGroup]  # every group, for its region

    @property
    def name(self) -> str:
        return f"s{self.source_index:03d}-{self.group.name}"


#: Fault injection for tests: a worker whose task name is listed here (comma-separated) kills
#: itself with SIGKILL, as the kernel's OOM killer would.
ENV_KILL_WORKER = "S2VEC_TEST_KILL_WORKER"


def _run_chunk(tasks: Sequence[_Task]) -> None:
    """Worker process entry point: extract (source, group) files one after the other, spilling
    rows by partition. A task's exception is recorded and the next task runs."""
    if multiprocessing.parent_process() is not None:  # a spawned worker, not the in-process path
        quiet_worker_interrupts()
    for task in tasks:
        out = Path(task.out_dir)
        if task.name in os.environ.get(ENV_KILL_WORKER, "").split(","):
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            stats = _extract_task(task)
            (out / f"{task.name}.done.json").write_text(json.dumps(stats))
        except Exception as e:  # reported to the parent, which fails these partitions
            (out / f"{task.name}.error.txt").write_text(
                f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            )
        _release_memory()


def _release_memory() -> None:
    """Give freed heap back to the system between tasks, so a process's peak stays that of its
    largest task instead of creeping up with fragmentation."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _extract_task(task: _Task) -> dict[str, int]:
    stats = ExtractStats()
    col = _Collector()
    index = Path(task.out_dir) / f"{task.name}.nodes.idx"
    store = task.location_store or f"sparse_file_array,{index}"
    try:
        _read_source(Path(task.pbf), task.taxonomy, col, stats, store)
    finally:
        index.unlink(missing_ok=True)
    rows = _rows_from_collector(
        col, task.taxonomy, task.profile, True, list(task.partition_group), stats
    )
    rows = rows.filter(pl.col("parent_l6").is_in(list(task.partition_group)))
    own = set(task.group.partitions)
    keep = rows["parent_l6"].is_in(list(own)).to_numpy().copy()
    foreign = np.flatnonzero(~keep)
    if len(foreign):
        keep[foreign] = _not_surely_seen(task, col, rows[foreign])
    rows = rows.filter(pl.Series(keep)).drop("obj")
    for (token,), part in rows.partition_by("parent_l6", as_dict=True).items():
        part_dir = Path(task.out_dir) / "rows" / str(token)
        part_dir.mkdir(parents=True, exist_ok=True)
        part.write_parquet(part_dir / f"{task.name}.parquet")
    return {
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "objects_read": stats.objects_read,
        "objects_matched": stats.objects_matched,
        "geometry_failures": stats.geometry_failures,
        "objects_clipped": stats.objects_clipped,
        "seconds_clipping": stats.seconds_clipping,
        "rows": rows.height,
    }


def _not_surely_seen(task: _Task, col: _Collector, foreign: pl.DataFrame) -> np.ndarray:
    """For rows landing in another group's partition: True where that group may not see the
    object (no vertex strictly inside its region), so this worker must deliver the row.
    Decided once per (object, group): a large area sends rows to many cells of one group."""
    objs = foreign["obj"].to_numpy()
    target = np.asarray([task.partition_group[t] for t in foreign["parent_l6"].to_list()])
    pairs, back = np.unique(np.column_stack((objs, target)), axis=0, return_inverse=True)
    unseen = np.ones(len(pairs), dtype=bool)
    verts: dict[int, np.ndarray] = {}
    # shrunk by 2e-7°: a vertex inside it is inside osmium's region whatever its border rule
    inner: dict[int, shapely.Geometry] = {}
    for k, (o, g) in enumerate(pairs.tolist()):
        v = verts.get(o)
        if v is None:
            wkb = col.wkb[o]
            if wkb is None:
                xy = np.array([[col.lon[o], col.lat[o]]])
            else:
                xy = shapely.get_coordinates(shapely.from_wkb(wkb))
            v = verts[o] = np.rint(xy * _FIX) / _FIX  # the coordinates osmium sees
        region = inner.get(g)
        if region is None:
            region = inner[g] = task.groups[g].shape().buffer(-2e-7)
            shapely.prepare(region)
        unseen[k] = not shapely.contains_xy(region, v[:, 0], v[:, 1]).any()
    return unseen[back.ravel()]


# --------------------------------------------------------------------------- coordinator


def _has_data(pbf: Path) -> bool:
    """False for an extract holding only its header (the group lies outside the source)."""
    if pbf.stat().st_size > 4096:
        return True
    return b"OSMData" in pbf.read_bytes()


def _total_bytes(sources: Sequence[str | os.PathLike]) -> int:
    return sum(Path(s).stat().st_size for s in sources)


def extract_partitions(
    sources: Sequence[str | os.PathLike],
    taxonomy: Taxonomy,
    profile: ResolutionProfile,
    partitions: Collection[str],
    on_partition: Callable[[str, pl.DataFrame], None],
    *,
    workers: int | None = None,
    tmp_dir: str | os.PathLike | None = None,
    partitions_per_group: int = PARTITIONS_PER_GROUP,
    margin_deg: float = DEFAULT_MARGIN_DEG,
    in_process_max_bytes: int = IN_PROCESS_MAX_BYTES,
    location_store: str | None = None,
    max_extracts_per_pass: int = MAX_EXTRACTS_PER_PASS,
    split_cache: str | os.PathLike | None = None,
) -> PartitionedResult:
    """Extract ``osm_features`` for ``partitions``, calling ``on_partition(token, rows)`` once
    per partition, in token order, with that partition's rows (sorted like
    :func:`extract_features`; possibly empty). Memory is bounded by a group of
    ``partitions_per_group`` partitions per worker and by one partition in this process.

    Sources up to ``in_process_max_bytes`` in all are extracted in this process instead.
    ``location_store``: pyosmium's node-location index; default: ``flex_mem`` in-process, and
    in workers a ``sparse_file_array`` file next to the group's file (as fast here, and the
    index lives in the page cache, not the heap).
    ``split_cache``: a folder where large sources are cut once per source version and the
    group files kept for later runs (:func:`cached_split`); groups are then whole ancestor cells
    (:func:`whole_groups`). Without it, each call cuts the sources for its own groups into a
    temporary folder.
    Failed partitions (their worker died twice) are returned, not raised; an exception from
    ``on_partition`` propagates. Bad sources raise :class:`InvalidSourceError` before any
    callback; a missing osmium-tool raises :class:`OsmiumToolMissingError`.
    """
    paths = [validate_source(s) for s in sources]
    tokens = sorted({str(t) for t in partitions})
    result = PartitionedResult()
    result.stats.sources = [str(p) for p in paths]
    workers = workers or default_workers()
    if _total_bytes(paths) <= in_process_max_bytes:
        result.in_process = True
        t0 = time.perf_counter()
        df, stats = extract_features(paths, taxonomy, profile, tokens, location_store or "flex_mem")
        result.stats = stats
        result.seconds_extract = time.perf_counter() - t0
        by_token = df.partition_by("parent_l6", as_dict=True)
        del df
        for token in tokens:
            on_partition(token, by_token.pop((token,), _empty()))
            result.delivered.append(token)
        return result

    tool_check = osmium_tool()  # fail before any work
    del tool_check
    if split_cache is None:
        groups = plan_groups(tokens, partitions_per_group, margin_deg)
    else:
        groups = whole_groups(tokens, partitions_per_group, margin_deg)
    result.groups = len(groups)
    with tempfile.TemporaryDirectory(prefix="s2vec-extract-", dir=tmp_dir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if split_cache is None:
            group_files = {
                n: split_source(p, groups, work / f"split-{n}", workers, max_extracts_per_pass)
                for n, p in enumerate(paths)
            }
        else:
            group_files = {}
            for n, p in enumerate(paths):
                by_token = cached_split(
                    p, tokens, split_cache, workers=max(workers, default_workers()),
                    partitions_per_group=partitions_per_group, margin_deg=margin_deg,
                    max_extracts_per_pass=max_extracts_per_pass,
                )  # fmt: skip
                group_files[n] = {
                    g.index: by_token[_group_token(g, partitions_per_group)] for g in groups
                }
        result.seconds_split = time.perf_counter() - t0
        requested = set(tokens)
        partition_group = {t: g.index for g in groups for t in g.partitions if t in requested}
        by_index = {g.index: g for g in groups}
        tasks = [
            _Task(
                n,
                g,
                str(group_files[n][g.index]),
                str(work),
                taxonomy,
                profile,
                location_store,
                partition_group,
                by_index,
            )  # fmt: skip
            for g in groups
            for n in range(len(paths))
            if _has_data(group_files[n][g.index])
        ]
        t0 = time.perf_counter()
        failed_tasks = _run_tasks(tasks, workers, work)
        result.seconds_extract = time.perf_counter() - t0
        for task in tasks:
            done = work / f"{task.name}.done.json"
            if done.exists():
                s = json.loads(done.read_text())
                result.stats.objects_read += s["objects_read"]
                result.stats.objects_matched += s["objects_matched"]
                result.stats.geometry_failures += s["geometry_failures"]
                result.stats.objects_clipped += s["objects_clipped"]
                result.stats.seconds_clipping += s["seconds_clipping"]
                result.worker_peak_rss_bytes = max(
                    result.worker_peak_rss_bytes, s["peak_rss_kib"] * 1024
                )
        for task in tasks:
            reason = failed_tasks.get(task.name)
            if reason is None:
                continue
            for token in _affected(task.group, groups):
                if token not in requested:
                    continue
                why = "" if token in task.group.partitions else "its rows may come from "
                result.failed.setdefault(token, f"{why}worker {task.name} ({task.pbf}): {reason}")
        t0 = time.perf_counter()
        for token in tokens:
            if token in result.failed:
                continue
            rows = _merge_partition(work / "rows" / token)
            result.stats.rows += rows.height
            on_partition(token, rows)
            result.delivered.append(token)
        result.seconds_merge = time.perf_counter() - t0
    return result


def _affected(group: PartitionGroup, groups: Sequence[PartitionGroup]) -> list[str]:
    """A failed group's partitions, then every other requested partition whose cell meets its
    region: an object only that group saw can have rows there (a long segment, a large area)."""
    x0, y0, x1, y1 = (c / _FIX for c in group.box)
    near = set(s2.to_token(s2.cover_bbox(y0, x0, y1, x1, PARTITION_LEVEL)).tolist())
    others = [t for g in groups if g.index != group.index for t in g.partitions if t in near]
    return list(group.partitions) + others


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=OSM_FEATURES_SCHEMA)


def _merge_partition(part_dir: Path) -> pl.DataFrame:
    """One partition's spilled rows, in (source, group) order, duplicates dropped (keep first,
    as the single-process path across sources), sorted."""
    files = sorted(part_dir.glob("*.parquet")) if part_dir.exists() else []
    if not files:
        return _empty()
    df = pl.concat([pl.read_parquet(f) for f in files])
    return df.unique(subset=ROW_KEY, keep="first", maintain_order=True).sort(SORT_KEY)


def _run_tasks(tasks: Sequence[_Task], workers: int, work: Path) -> dict[str, str]:
    """Run the tasks in spawned processes, ``workers`` at a time, a few tasks per process (each
    start imports the stack again). When a process dies, its unfinished tasks are retried one
    per process; a task whose process dies again, or that raised, fails. Returns the failed
    tasks' names with the reason."""
    if len(tasks) == 1 and workers <= 1 and not os.environ.get(ENV_KILL_WORKER):
        # One group for one worker (a Dagster run of one partition): extract it here, sparing
        # a process start (~1.5 s of imports); memory is still bounded by the group.
        _run_chunk(tasks)
        task = tasks[0]
        if (work / f"{task.name}.done.json").exists():
            return {}
        for f in (work / "rows").glob(f"*/{task.name}.parquet"):
            f.unlink()
        return {task.name: (work / f"{task.name}.error.txt").read_text().splitlines()[0]}
    ctx = multiprocessing.get_context("spawn")
    per_process = max(1, min(8, len(tasks) // (2 * max(1, workers))))
    queue = [(list(tasks[k : k + per_process]), 1) for k in range(0, len(tasks), per_process)]
    running: dict[object, tuple[multiprocessing.process.BaseProcess, list[_Task], int]] = {}
    failed: dict[str, str] = {}  # task name -> reason
    try:
        while queue or running:
            while queue and len(running) < max(1, workers):
                chunk, attempt = queue.pop(0)
                proc = ctx.Process(target=_run_chunk, args=(chunk,), name=f"s2vec-{chunk[0].name}")
                start_quietly(proc)
                running[proc.sentinel] = (proc, chunk, attempt)
            for sentinel in wait(list(running)):
                proc, chunk, attempt = running.pop(sentinel)
                proc.join()
                for task in chunk:
                    if (work / f"{task.name}.done.json").exists():
                        continue
                    # it raised, or its process died during (or before) it: drop partial spill files
                    for f in (work / "rows").glob(f"*/{task.name}.parquet"):
                        f.unlink()
                    err = work / f"{task.name}.error.txt"
                    if err.exists():
                        failed[task.name] = err.read_text().splitlines()[0]
                    elif attempt == 1:
                        queue.append(([task], 2))
                    else:
                        failed[task.name] = f"worker process died (exit code {proc.exitcode})"
    finally:  # interrupted (or failing) here: stop our workers, never leave them behind
        for proc, _, _ in running.values():
            proc.kill()
            proc.join()
    return failed
