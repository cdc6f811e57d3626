"""Large-area extraction: memory bounded by a group of partitions, groups in parallel.

Public API: :func:`extract_partitions` (callback per partition), :func:`split_source`,
:func:`cached_split`; the groups are planned by ``osm.groups``.

1. **Split** (C++): ``osmium extract --strategy smart`` cuts each source into one lz4 PBF per
   *group* of level-6 partitions: the partitions under one ancestor cell (level 5 for groups of
   4), so a group is compact. A group's region is its cells' outline (edges sampled along the
   geodesics) grown by a margin: groups barely overlap. ``smart`` keeps every way with a node
   in the region whole (all its nodes) and every multipolygon/boundary relation touching it
   complete, so each object a group sees has exactly the geometry the single-process path
   gives it. Above 32 groups the split goes in stages (cluster files by a coarser ancestor,
   then groups), each pass with bounded memory, clusters in parallel.
2. **Extract** each (source, group) file in a worker process (``spawn``: deltalake panics in
   forked children), with the same code as :func:`osm.extract.extract_features` and a
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

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import shapely

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL, ResolutionProfile
from s2vec_pipeline.errors import InvalidSourceError
from s2vec_pipeline.osm.coverage import cells_covering_source
from s2vec_pipeline.osm.extract import (
    OSM_FEATURES_SCHEMA,
    ExtractStats,
    extract_features,
    validate_source,
)
from s2vec_pipeline.osm.groups import (
    DEFAULT_MARGIN_DEG,
    FIX,
    PARTITIONS_PER_GROUP,
    PartitionGroup,
    affected_partitions,
    group_token,
    plan_groups,
    whole_groups,
)
from s2vec_pipeline.osm.osmium_tool import osmium_tool
from s2vec_pipeline.osm.split_worker import ENV_KILL_WORKER, Task, run_chunk
from s2vec_pipeline.osm.taxonomy import Taxonomy
from s2vec_pipeline.settings import default_workers
from s2vec_pipeline.storage import fs
from s2vec_pipeline.storage.file_identity import FileIdentity
from s2vec_pipeline.storage.locks import exclusive
from s2vec_pipeline.worker_pool import SpawnPool

#: Sources up to this many bytes in all are extracted in-process (faster: no split, no workers).
IN_PROCESS_MAX_BYTES = 64 * 1024 * 1024
#: Extracts per ``osmium extract`` pass: its memory grows with the extracts of a pass (and the
#: highest node id). 16, not 32: Helsinki x64 (31 groups) peaked at 694 MB in one 32-extract
#: pass, 316 MB in 16-extract stages, for 13.5 s -> 17.1 s of splitting (docs/benchmarks.md).
MAX_EXTRACTS_PER_PASS = 16
#: Group files are temporary: lz4 writes ~2x faster than zlib at ~1.3x the size (measured).
SPLIT_FORMAT = "pbf,pbf_compression=lz4"
ROW_KEY = ["osm_type", "osm_id", "channel", "cell_id"]
SORT_KEY = ["parent_l6", "cell_id", "channel", "osm_type", "osm_id"]


def needs_osmium_tool() -> str:
    """The ``osmium`` command, or an error saying which sources need it."""
    return osmium_tool(f"sources above {IN_PROCESS_MAX_BYTES // 2**20} MiB are split with it")


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
    tool = needs_osmium_tool()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _split(tool, Path(source), list(groups), out, max(1, workers), max(8, max_extracts_per_pass))
    return {g.index: out / f"{g.name}.osm.pbf" for g in groups}


#: Bump when what a split cache holds changes meaning (regions, file format): old ones are unused.
SPLIT_CACHE_FORMAT = 2


def split_cache_dir(
    cache_root: Path, source: Path, partitions_per_group: int, margin_deg: float
) -> Path:
    """``<cache_root>/<source path key>/<version hash>``: one folder per source path
    (``FileIdentity.path_key``), one sub-folder per version of the file (size, mtime, inode:
    a file replaced by rename can keep its size and mtime, never its inode) and split
    parameters."""
    identity = FileIdentity.of(source)
    version = [SPLIT_CACHE_FORMAT, identity.size, identity.mtime_ns, identity.inode]
    version += [partitions_per_group, margin_deg]
    what = hashlib.sha256(json.dumps([*version, SPLIT_FORMAT]).encode()).hexdigest()[:12]
    return cache_root / identity.path_key / what


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

    src = Path(source)
    folder = split_cache_dir(Path(cache_root), src, partitions_per_group, margin_deg)
    plan_file = folder / "plan.json"
    wanted = {group_token(g, partitions_per_group) for g in whole_groups(partitions,
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
                if group_token(g, partitions_per_group) not in have
            ]
            staging = folder.parent / f"{folder.name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            files = split_source(src, groups, staging, workers, max_extracts_per_pass)
            folder.mkdir(parents=True, exist_ok=True)
            made = set()
            for g in groups:
                token = group_token(g, partitions_per_group)
                os.replace(files[g.index], folder / f"{token}.osm.pbf")
                made.add(token)
            shutil.rmtree(staging, ignore_errors=True)
            # the files are complete before the plan names them
            fs.write_text(
                plan_file, json.dumps({"source": str(src), "groups": sorted(have | made)})
            )
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
                    else {"bbox": [c / FIX for c in g.box]},
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

    def child(item: tuple[str, list[PartitionGroup]]) -> None:
        path = out / f"c{level}-{item[0]}.osm.pbf"
        try:
            _split(tool, path, item[1], out, 1, maxn)
        finally:
            path.unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads: each waits on a subprocess
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
        _extract_in_process(paths, taxonomy, profile, tokens, on_partition, location_store, result)
        return result

    needs_osmium_tool()  # fail before any work
    if split_cache is None:
        groups = plan_groups(tokens, partitions_per_group, margin_deg)
    else:
        groups = whole_groups(tokens, partitions_per_group, margin_deg)
    result.groups = len(groups)
    with tempfile.TemporaryDirectory(prefix="s2vec-extract-", dir=tmp_dir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        split = _Split(groups, partitions_per_group, margin_deg, max_extracts_per_pass)
        group_files = split.files(paths, tokens, work, workers, split_cache)
        result.seconds_split = time.perf_counter() - t0
        requested = set(tokens)
        tasks = _tasks(paths, groups, group_files, requested, work, taxonomy, profile,
                       location_store)  # fmt: skip
        t0 = time.perf_counter()
        failed_tasks = _run_tasks(tasks, workers, work)
        result.seconds_extract = time.perf_counter() - t0
        _add_worker_stats(result, tasks, work)
        result.failed = _failed_partitions(tasks, failed_tasks, groups, requested)
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


def _tasks(
    paths: Sequence[Path],
    groups: Sequence[PartitionGroup],
    group_files: dict[int, dict[int, Path]],
    requested: set[str],
    work: Path,
    taxonomy: Taxonomy,
    profile: ResolutionProfile,
    location_store: str | None,
) -> list[Task]:
    """One task per (source, group) whose file holds data."""
    partition_group = {t: g.index for g in groups for t in g.partitions if t in requested}
    by_index = {g.index: g for g in groups}
    return [
        Task(
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


def _extract_in_process(
    paths: Sequence[Path],
    taxonomy: Taxonomy,
    profile: ResolutionProfile,
    tokens: Sequence[str],
    on_partition: Callable[[str, pl.DataFrame], None],
    location_store: str | None,
    result: PartitionedResult,
) -> None:
    """Small sources: one in-process extraction, then the partitions handed over in order."""
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


@dataclass(frozen=True)
class _Split:
    """How the sources are cut into group files for one ``extract_partitions`` call."""

    groups: Sequence[PartitionGroup]
    partitions_per_group: int
    margin_deg: float
    max_extracts_per_pass: int

    def files(
        self,
        paths: Sequence[Path],
        tokens: Sequence[str],
        work: Path,
        workers: int,
        split_cache: str | os.PathLike | None,
    ) -> dict[int, dict[int, Path]]:
        """Source index -> group index -> the group's file: cut now into ``work``, or taken
        from (and added to) the split cache."""
        if split_cache is None:
            return {
                n: split_source(
                    p, self.groups, work / f"split-{n}", workers, self.max_extracts_per_pass
                )  # fmt: skip
                for n, p in enumerate(paths)
            }
        out = {}
        for n, p in enumerate(paths):
            by_token = cached_split(
                p, tokens, split_cache, workers=max(workers, default_workers()),
                partitions_per_group=self.partitions_per_group, margin_deg=self.margin_deg,
                max_extracts_per_pass=self.max_extracts_per_pass,
            )  # fmt: skip
            out[n] = {
                g.index: by_token[group_token(g, self.partitions_per_group)] for g in self.groups
            }
        return out


def _add_worker_stats(result: PartitionedResult, tasks: Sequence[Task], work: Path) -> None:
    """Sum the statistics the finished tasks wrote (``<task>.done.json``) into ``result``."""
    for task in tasks:
        done = work / f"{task.name}.done.json"
        if not done.exists():
            continue
        s = json.loads(done.read_text())
        result.stats.objects_read += s["objects_read"]
        result.stats.objects_matched += s["objects_matched"]
        result.stats.geometry_failures += s["geometry_failures"]
        result.stats.objects_clipped += s["objects_clipped"]
        result.stats.seconds_clipping += s["seconds_clipping"]
        result.worker_peak_rss_bytes = max(result.worker_peak_rss_bytes, s["peak_rss_kib"] * 1024)


def _failed_partitions(
    tasks: Sequence[Task],
    failed_tasks: dict[str, str],
    groups: Sequence[PartitionGroup],
    requested: set[str],
) -> dict[str, str]:
    """Requested partitions that a failed task's partitions or region reach, with why."""
    failed: dict[str, str] = {}
    for task in tasks:
        reason = failed_tasks.get(task.name)
        if reason is None:
            continue
        for token in affected_partitions(task.group, groups):
            if token not in requested:
                continue
            why = "" if token in task.group.partitions else "its rows may come from "
            failed.setdefault(token, f"{why}worker {task.name} ({task.pbf}): {reason}")
    return failed


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


def _task_outcome(task: Task, work: Path) -> str | None:
    """None for a finished task; else, its partial spill files removed, the error it raised,
    or "" when its process died during (or before) it."""
    if (work / f"{task.name}.done.json").exists():
        return None
    for f in (work / "rows").glob(f"*/{task.name}.parquet"):
        f.unlink()
    err = work / f"{task.name}.error.txt"
    return err.read_text().splitlines()[0] if err.exists() else ""


def _run_tasks(tasks: Sequence[Task], workers: int, work: Path) -> dict[str, str]:
    """Run the tasks in spawned processes (``worker_pool``), ``workers`` at a time, a few tasks
    per process (each start imports the stack again). When a process dies, its unfinished tasks
    are retried one per process; a task whose process dies again, or that raised, fails.
    Returns the failed tasks' names with the reason."""
    if len(tasks) == 1 and workers <= 1 and not os.environ.get(ENV_KILL_WORKER):
        # One group for one worker (a Dagster run of one partition): extract it here, sparing
        # a process start (~1.5 s of imports); memory is still bounded by the group.
        run_chunk(tasks)
        reason = _task_outcome(tasks[0], work)
        return {} if reason is None else {tasks[0].name: reason}
    per_process = max(1, min(8, len(tasks) // (2 * max(1, workers))))
    queue = [(list(tasks[k : k + per_process]), 1) for k in range(0, len(tasks), per_process)]
    running: dict[object, tuple[multiprocessing.process.BaseProcess, list[Task], int]] = {}
    failed: dict[str, str] = {}  # task name -> reason
    with SpawnPool() as pool:  # interrupted (or failing) here: our workers are stopped
        while queue or running:
            while queue and len(running) < max(1, workers):
                chunk, attempt = queue.pop(0)
                proc = pool.start(run_chunk, (chunk,), name=f"s2vec-{chunk[0].name}")
                running[proc.sentinel] = (proc, chunk, attempt)
            for sentinel in pool.wait(p for p, _, _ in running.values()):
                proc, chunk, attempt = running.pop(sentinel)
                exit_code = pool.reap(proc)
                for task in chunk:
                    reason = _task_outcome(task, work)
                    if reason:
                        failed[task.name] = reason
                    elif reason == "" and attempt == 1:
                        queue.append(([task], 2))
                    elif reason == "":
                        failed[task.name] = f"worker process died (exit code {exit_code})"
    return failed
