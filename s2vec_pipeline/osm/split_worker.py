"""The worker side of partitioned extraction (``osm.split``): one task extracts one (source,
group) file with the single-process code and a file-backed node-location index, spills its rows
to Parquet by partition, and records its statistics (``<task>.done.json``) or its error
(``<task>.error.txt``) for the coordinator."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import multiprocessing
import os
import resource
import signal
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import shapely

from s2vec_pipeline.cells.profiles import ResolutionProfile
from s2vec_pipeline.errors import quiet_worker_interrupts
from s2vec_pipeline.osm.extract import ExtractStats, _Collector, _read_source, _rows_from_collector
from s2vec_pipeline.osm.groups import FIX, PartitionGroup
from s2vec_pipeline.osm.taxonomy import Taxonomy


@dataclass(frozen=True)
class Task:
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


def run_chunk(tasks: Sequence[Task]) -> None:
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


def _extract_task(task: Task) -> dict[str, int]:
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


def _not_surely_seen(task: Task, col: _Collector, foreign: pl.DataFrame) -> np.ndarray:
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
            v = verts[o] = np.rint(xy * FIX) / FIX  # the coordinates osmium sees
        region = inner.get(g)
        if region is None:
            region = inner[g] = task.groups[g].shape().buffer(-2e-7)
            shapely.prepare(region)
        unseen[k] = not shapely.contains_xy(region, v[:, 0], v[:, 1]).any()
    return unseen[back.ravel()]
