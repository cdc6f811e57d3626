"""Which level-6 partitions each OSM source covers, and which sources a partition reads.

A source covers the level-6 cells meeting its header bounding box (or its nodes' extent when
the header has none: ``extract.source_bbox``). The cover of one version of a file is computed
once per process (keyed by ``FileIdentity``: a replaced file is read again), so asking often,
as the CLI and the Dagster definitions do, costs a ``stat`` per source.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence

from s2vec_pipeline.cells import s2, s2_geometry
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL
from s2vec_pipeline.errors import CellOutsideSourcesError
from s2vec_pipeline.osm.changes import current_extract
from s2vec_pipeline.osm.extract import source_bbox
from s2vec_pipeline.storage.file_identity import FileIdentity


def cells_covering_source(path: str | os.PathLike) -> list[str]:
    """Level-6 tokens covering a source's header bounding box, sorted."""
    try:
        identity = FileIdentity.of(path)
    except OSError:  # missing or unreadable: source_bbox names the problem
        return _cover(path)
    return list(_cached_cover(identity))


@functools.lru_cache(maxsize=256)
def _cached_cover(identity: FileIdentity) -> tuple[str, ...]:
    return tuple(_cover(identity.path))


def _cover(path: str | os.PathLike) -> list[str]:
    min_lat, min_lng, max_lat, max_lng = source_bbox(path)
    cover = s2_geometry.cover_bbox(min_lat, min_lng, max_lat, max_lng, PARTITION_LEVEL)
    return sorted(s2.to_token(cover).tolist())  # plain str: messages show 12cd, not np.str_


def source_cells(sources: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Level-6 token -> the sources (in the given order) whose bounding box touches that cell,
    by token."""
    cells: dict[str, list[str]] = {}
    for src in sources:
        for token in cells_covering_source(src):
            cells.setdefault(token, []).append(src)
    return {k: tuple(v) for k, v in sorted(cells.items())}


def sources_for(sources: Sequence[str], partitions: Iterable[str]) -> list[str]:
    """The sources to read for these partitions, in the given order; every partition must be
    covered (``CellOutsideSourcesError`` naming the others)."""
    covered = source_cells(sources)
    partitions = list(partitions)
    outside = [p for p in partitions if p not in covered]
    if outside:
        raise CellOutsideSourcesError(
            f"cells {', '.join(outside)} are outside every configured source; the sources "
            f"cover {', '.join(covered)}. Add a source covering them (--source) "
            f"or pick covered cells"
        )
    wanted = {s for p in partitions for s in covered[p]}
    return [s for s in sources if s in wanted]


def current_sources_for(
    root: str | os.PathLike, sources: Sequence[str], partitions: Iterable[str]
) -> list[str]:
    """Like ``sources_for``, but each source replaced by its current extract: the copy under
    the root with the applied change files, or the source itself when none was applied.
    The user's files are never modified."""
    return [str(current_extract(root, s)) for s in sources_for(sources, partitions)]
