"""One partition's ``osm_features`` rows, with each source extracted once per version.

The Dagster layer materializes one level-6 partition per run. Reading a whole source in every
run makes a backfill of N partitions read the source N times (quadratic in the source's size).
Here, a source covering more than one partition is extracted once per *group* (the level-6
cells under one level-5 ancestor, :func:`osm.groups.whole_groups`) and the rows of every
partition of the group are kept; the group's later runs read only their partition's rows.

- With osmium-tool the source is first cut into group files, once per source version
  (:func:`osm.split.cached_split`); a group's first run extracts only its group's file, so
  memory is bounded by a group whatever the source's size.
- Without osmium-tool, a source up to ``osm.split.IN_PROCESS_MAX_BYTES`` is extracted whole, once,
  in the first run (memory then follows the source, as the in-process path always did), and
  the rows of every partition it covers are kept. Larger sources need osmium-tool.
- A source covering at most one partition is read in the run itself, as before: the read is
  that partition's own share.

Rows are kept under ``<split cache>/<source>/<source version>/rows-<settings>/<token>.parquet``:
the source version is its path, size, mtime and inode (a replaced file is a new version: cut
and extracted again, never mixed with the old one's files or rows), the settings are the
taxonomy, the profile and the extraction code version. Each file is written to a temporary
name and renamed, so a worker killed mid-write leaves no partial file; a group's marker
``<group>.done`` is written after all its partitions' files, and a group without it is
extracted again. Processes
serialize on one lock per (source version, group): one extracts, the others wait and read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL, ResolutionProfile
from s2vec_pipeline.osm.coverage import cells_covering_source
from s2vec_pipeline.osm.extract import (
    OSM_FEATURES_CODE_VERSION,
    OSM_FEATURES_SCHEMA,
    ExtractStats,
    extract_features,
    validate_source,
)
from s2vec_pipeline.osm.groups import DEFAULT_MARGIN_DEG, PARTITIONS_PER_GROUP, group_level
from s2vec_pipeline.osm.osmium_tool import OsmiumToolMissingError
from s2vec_pipeline.osm.split import (
    IN_PROCESS_MAX_BYTES,
    ROW_KEY,
    SORT_KEY,
    extract_partitions,
    needs_osmium_tool,
    split_cache_dir,
)
from s2vec_pipeline.osm.taxonomy import Taxonomy
from s2vec_pipeline.storage.locks import exclusive

#: Bump when the layout or meaning of the kept rows changes: older rows are then unused.
ROWS_CACHE_FORMAT = 1


@dataclass
class PartitionExtract:
    """One partition's rows and what this call did to get them."""

    rows: pl.DataFrame
    stats: ExtractStats = field(default_factory=ExtractStats)
    #: per source: "read" (read in this call, its own share), "extracted" (this call
    #: extracted the source's group or whole file and kept the rows of its partitions), or
    #: "cached" (rows another run kept)
    how: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def extract_partition(
    sources: Sequence[str | os.PathLike],
    taxonomy: Taxonomy,
    profile: ResolutionProfile,
    token: str,
    cache_root: str | os.PathLike,
    *,
    partitions_per_group: int = PARTITIONS_PER_GROUP,
    margin_deg: float = DEFAULT_MARGIN_DEG,
    in_process_max_bytes: int = IN_PROCESS_MAX_BYTES,
) -> PartitionExtract:
    """The ``osm_features`` rows of partition ``token`` from ``sources`` (sorted like
    :func:`osm.extract.extract_features`; objects in several sources kept once), reading each
    source covering several partitions once per version (module docstring)."""
    t0 = time.perf_counter()
    out = PartitionExtract(rows=_empty())
    frames = []
    for src in sources:
        path = validate_source(src)
        out.stats.sources.append(str(path))
        covered = cells_covering_source(path)
        if len(set(covered) | {token}) <= 1 and path.stat().st_size <= in_process_max_bytes:
            df, stats = extract_features([path], taxonomy, profile, [token])
            out.how[str(path)] = "read"
        else:
            df, stats, how = _cached_rows(
                path, covered, taxonomy, profile, token, Path(cache_root),
                partitions_per_group, margin_deg, in_process_max_bytes,
            )  # fmt: skip
            out.how[str(path)] = how
        _add_stats(out.stats, stats)
        frames.append(df)
    df = pl.concat(frames) if frames else _empty()
    if len(frames) > 1:
        df = df.unique(subset=ROW_KEY, keep="first", maintain_order=True)
    out.rows = df.sort(SORT_KEY)
    out.stats.rows = out.rows.height
    out.seconds = time.perf_counter() - t0
    return out


def interleave_groups(
    partitions: Sequence[str], partitions_per_group: int = PARTITIONS_PER_GROUP
) -> list[str]:
    """The partitions in an order that takes one partition of each extraction group in turn:
    runs going at once then extract different groups instead of waiting for one another."""
    level = group_level(partitions_per_group)
    by_group: dict[str, list[str]] = {}
    for t in sorted(set(partitions)):
        by_group.setdefault(_ancestor(t, level), []).append(t)
    rounds = [list(g) for g in by_group.values()]
    return [g[i] for i in range(max(map(len, rounds), default=0)) for g in rounds if i < len(g)]


def _cached_rows(
    path: Path,
    covered: Sequence[str],
    taxonomy: Taxonomy,
    profile: ResolutionProfile,
    token: str,
    cache_root: Path,
    partitions_per_group: int,
    margin_deg: float,
    in_process_max_bytes: int,
) -> tuple[pl.DataFrame, ExtractStats, str]:
    version_dir = split_cache_dir(cache_root, path, partitions_per_group, margin_deg)
    rows_dir = version_dir / f"rows-{_settings_hash(taxonomy, profile)}"
    level = group_level(partitions_per_group)
    group = _ancestor(token, level)
    stats = ExtractStats()
    how = "cached"
    with exclusive(version_dir.parent / f"{version_dir.name}.{group}.rows.lock"):
        if not (rows_dir / f"{group}.done").exists():
            rows_dir.mkdir(parents=True, exist_ok=True)
            keep = _keeper(rows_dir)
            if _has_osmium_tool(path, in_process_max_bytes):
                # cut once per version (a lock of its own), then extract this group's file
                result = extract_partitions(
                    [path], taxonomy, profile, _children(group), keep, workers=1,
                    in_process_max_bytes=0, split_cache=cache_root,
                    partitions_per_group=partitions_per_group, margin_deg=margin_deg,
                )  # fmt: skip
                if result.failed:
                    raise RuntimeError(f"extraction of {path} failed: {result.failed}")
                stats, groups = result.stats, [group]
            else:  # the whole (small) source once: every partition it covers
                _drop_older_versions(version_dir)
                wanted = sorted(set(covered) | set(_children(group)))
                df, stats = extract_features([path], taxonomy, profile, wanted)
                by_token = df.partition_by("parent_l6", as_dict=True)
                for t in wanted:
                    keep(t, by_token.pop((t,), _empty()))
                groups = sorted({_ancestor(t, level) for t in wanted})
            for g in groups:  # after every partition file of the group: complete
                (rows_dir / f"{g}.done").touch()
            how = "extracted"
    file = rows_dir / f"{token}.parquet"
    return pl.read_parquet(file), stats, how


def _has_osmium_tool(path: Path, in_process_max_bytes: int) -> bool:
    """Whether to cut with osmium-tool; without it only a small source can be read whole."""
    try:
        needs_osmium_tool()
        return True
    except OsmiumToolMissingError:
        if path.stat().st_size > in_process_max_bytes:
            raise
        return False


def _drop_older_versions(version_dir: Path) -> None:
    """Rows of earlier versions of this source path will not be read again (as in
    ``cached_split``, which does the same when it cuts a new version)."""
    if version_dir.exists():
        return
    for old in version_dir.parent.glob("*"):
        if old.is_dir() and old.name != version_dir.name:
            shutil.rmtree(old, ignore_errors=True)


def _keeper(rows_dir: Path):  # noqa: ANN202 - a callback for extract_partitions
    def keep(token: str, rows: pl.DataFrame) -> None:
        tmp = rows_dir / f".{token}.parquet.{os.getpid()}"
        rows.write_parquet(tmp)
        os.replace(tmp, rows_dir / f"{token}.parquet")

    return keep


def _settings_hash(taxonomy: Taxonomy, profile: ResolutionProfile) -> str:
    """What the rows depend on besides the file (its version folder): taxonomy, levels, code."""
    what = [
        ROWS_CACHE_FORMAT,
        taxonomy.version,
        profile.image_level,
        profile.pixel_level,
        OSM_FEATURES_CODE_VERSION,
    ]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:12]


def _ancestor(token: str, level: int) -> str:
    return str(s2.to_token(s2.parent(s2.from_token(np.asarray([token])), level))[0])


def _children(group: str) -> list[str]:
    ids = s2.children_grid(s2.from_token(np.asarray([group])), PARTITION_LEVEL).reshape(-1)
    return sorted(s2.to_token(ids).tolist())


def _add_stats(total: ExtractStats, part: ExtractStats) -> None:
    total.objects_read += part.objects_read
    total.objects_matched += part.objects_matched
    total.geometry_failures += part.geometry_failures
    total.objects_clipped += part.objects_clipped
    total.seconds_clipping += part.seconds_clipping


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=OSM_FEATURES_SCHEMA)
