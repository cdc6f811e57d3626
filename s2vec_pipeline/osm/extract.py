"""OSM extraction: one row per (OSM object, matched channel, pixel cell).

pyosmium reads the file with node locations and area assembly; ``KeyFilter`` drops objects that
carry none of the taxonomy's keys on the C++ side, so Python only sees candidates. The loop
collects ids, matched channels and WKB; geometry work (lengths, areas, representative points,
S2 cells) then happens in bulk with shapely and numpy.

Measures follow the object kind (cutting along pixel cells: ``clip.py``):
- nodes feed ``count`` channels at their location;
- ways feed ``length_m`` channels per pixel cell: each segment is cut where it crosses the pixel
  grid and each piece's great-circle length goes to the pixel holding it, so a row holds the
  metres of the way inside that pixel's S2 cell; its point is the midpoint of the way's first
  piece there. Open ways also feed ``count`` channels at their middle point;
- areas (closed ways and multipolygon relations, assembled by osmium) feed ``area_m2``
  channels per pixel cell: the area on the sphere (edges as geodesics, S2's convention) of the
  polygon's intersection with the pixel's S2 cell, at a point of that piece; and ``count``
  channels once, at a point inside the polygon. A closed way is seen both as a way and as an
  area, so it gives lengths as a way and counts/areas as an area, never both.
Objects inside one pixel (all vertices in one cell: cells are convex) are not cut. So a pixel's
area row never exceeds its cell's area, and an object's rows sum to its area or length.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import osmium
import polars as pl
import shapely

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL, ResolutionProfile
from s2vec_pipeline.errors import InvalidSourceError
from s2vec_pipeline.osm import clip
from s2vec_pipeline.osm.clip import EARTH_RADIUS_M
from s2vec_pipeline.osm.taxonomy import Taxonomy
from s2vec_pipeline.storage.versioning import exact_sum

__all__ = [
    "EARTH_RADIUS_M",
    "OSM_FEATURES_CODE_VERSION",
    "OSM_FEATURES_SCHEMA",
    "ExtractStats",
    "extract_features",
]

#: Dagster code version of ``osm_features``: bump it whenever the rows an object yields change,
#: so Dagster marks every materialized partition stale ("Unsynced") and a refresh recomputes it.
#: 3: areas and lengths cut per pixel cell (issue 9); before, an area went whole to the pixel of
#: its inner point and a segment whole to the pixel of its midpoint.
OSM_FEATURES_CODE_VERSION = "3"

OSM_FEATURES_SCHEMA: dict[str, pl.DataType] = {
    "parent_l6": pl.String(),
    "osm_type": pl.String(),
    "osm_id": pl.Int64(),
    "channel": pl.String(),
    "lat": pl.Float64(),
    "lon": pl.Float64(),
    "length_m": pl.Float64(),
    "area_m2": pl.Float64(),
    "cell_id": pl.Int64(),
    "image_id": pl.Int64(),
    "taxonomy_version": pl.String(),
}

# Object kinds as small ints in the read loop; osm_type strings are derived in bulk afterwards.
_KIND_NODE, _KIND_WAY, _KIND_AREA_WAY, _KIND_AREA_RELATION = 0, 1, 2, 3
_OSM_TYPE_OF_KIND = np.array(["node", "way", "way", "relation"], dtype=object)
_GEOMETRY_ERRORS = (RuntimeError, osmium.InvalidLocationError)
_OSM_TYPE = {"n": "node", "w": "way", "r": "relation"}


@dataclass
class ExtractStats:
    """What one extraction saw, for run metadata."""

    sources: list[str] = field(default_factory=list)
    objects_read: int = 0  # objects that passed the C++ key filter
    objects_matched: int = 0  # of those, objects matching at least one channel
    geometry_failures: int = 0  # ways/areas whose geometry could not be built (missing nodes)
    objects_clipped: int = 0  # areas and ways spanning several pixel cells, cut along them
    seconds_clipping: float = 0.0  # of which measuring the areas and lengths per cell
    rows: int = 0


def source_bbox(path: str | os.PathLike) -> tuple[float, float, float, float]:
    """(min_lat, min_lng, max_lat, max_lng) from the PBF header, validating the file."""
    p = validate_source(path)
    box = osmium.io.Reader(str(p), osmium.osm.osm_entity_bits.NOTHING).header().box()
    if not box.valid():
        return _bbox_from_nodes(p)
    bl, tr = box.bottom_left, box.top_right
    return bl.lat, bl.lon, tr.lat, tr.lon


def _bbox_from_nodes(path: Path) -> tuple[float, float, float, float]:
    """Fallback for files without a header box: one pass over node locations."""
    lats: list[float] = []
    lons: list[float] = []
    for node in osmium.FileProcessor(str(path), osmium.osm.NODE):
        loc = node.location
        if loc.valid():
            lats.append(loc.lat)
            lons.append(loc.lon)
    if not lats:
        raise InvalidSourceError(f"OSM source {path} holds no node with a location")
    lat, lon = np.asarray(lats), np.asarray(lons)
    return float(lat.min()), float(lon.min()), float(lat.max()), float(lon.max())


def validate_source(path: str | os.PathLike) -> Path:
    """Fail early, naming the file, if it is missing or is not an OSM PBF file."""
    p = Path(path)
    if not p.exists():
        raise InvalidSourceError(f"OSM source {p} does not exist: check the --source path")
    if not p.is_file():
        raise InvalidSourceError(f"OSM source {p} is not a file")
    if not p.name.endswith(".pbf"):
        raise InvalidSourceError(
            f"OSM source {p} is not a .osm.pbf file; convert it with `osmium cat {p} -o X.osm.pbf`"
        )
    with p.open("rb") as f:
        head = f.read(16)
    # A PBF starts with a 4-byte big-endian header length followed by the "OSMHeader" blob type.
    if len(head) < 16 or b"OSMHeader" not in head:
        raise InvalidSourceError(
            f"OSM source {p} is not an OSM PBF file (no OSMHeader block at its start): "
            f"it may be empty, truncated or another format"
        )
    try:
        osmium.io.Reader(str(p), osmium.osm.osm_entity_bits.NOTHING).header()
    except RuntimeError as e:
        raise InvalidSourceError(f"OSM source {p} cannot be read: {e}") from e
    return p


class _Collector:
    """Columnar buffers filled by the read loop (plain lists: appends are the cheapest path)."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.osm_id: list[int] = []
        self.lat: list[float] = []  # nodes only; NaN for geometries
        self.lon: list[float] = []
        self.wkb: list[bytes | None] = []
        self.chan_obj: list[int] = []  # one entry per (object, channel)
        self.chan_idx: list[int] = []


def _processor(
    path: Path,
    location_store: str,
    node_keys: tuple[str, ...],
    way_keys: tuple[str, ...],
    area_keys: tuple[str, ...],
) -> osmium.FileProcessor:
    """Nodes, ways and assembled areas of ``path`` carrying a key their kind can use."""
    return (
        # Relations are not needed in the main pass: the area manager reads multipolygon
        # relations in its own first pass (only those with a key an area can match), and they
        # reach us assembled as areas.
        osmium.FileProcessor(str(path), osmium.osm.NODE | osmium.osm.WAY | osmium.osm.AREA)
        .with_locations(location_store)
        .with_areas(osmium.filter.KeyFilter(*area_keys))
        # Per kind, on the C++ side: Python only sees objects with a key that kind can use.
        .with_filter(osmium.filter.KeyFilter(*node_keys).enable_for(osmium.osm.NODE))
        .with_filter(osmium.filter.KeyFilter(*way_keys).enable_for(osmium.osm.WAY))
        .with_filter(osmium.filter.KeyFilter(*area_keys).enable_for(osmium.osm.AREA))
    )


def _read_source(
    path: Path, taxonomy: Taxonomy, col: _Collector, stats: ExtractStats, location_store: str
) -> None:
    """Append the objects of ``path`` that the taxonomy matches to ``col``. The read loop is
    one function on purpose: it runs once per object, on locals bound here (a helper call
    per object would cost more than the loop body)."""
    count_ch = set(taxonomy.indices("count").tolist())
    length_ch = set(taxonomy.indices("length_m").tolist())
    area_ch = set(taxonomy.indices("area_m2").tolist())
    node_ok = frozenset(count_ch)
    open_way_ok = frozenset(count_ch | length_ch)
    closed_way_ok = frozenset(length_ch)
    area_ok = frozenset(count_ch | area_ch)
    match = taxonomy.match
    wkb_factory = osmium.geom.WKBFactory()
    make_line, make_area = wkb_factory.create_linestring, wkb_factory.create_multipolygon
    # Append-method locals: this loop runs once per candidate object.
    kind_a, id_a = col.kind.append, col.osm_id.append
    lat_a, lon_a, wkb_a = col.lat.append, col.lon.append, col.wkb.append
    cobj_ext, cidx_ext = col.chan_obj.extend, col.chan_idx.extend
    n_obj = len(col.kind)
    nan = float("nan")

    node_keys, way_keys, area_keys = _keys_by_kind(taxonomy, node_ok, open_way_ok, area_ok)
    processor = _processor(path, location_store, node_keys, way_keys, area_keys)
    read = matched = failed = 0
    # Exact type checks: pyosmium's is_node()/is_way()/is_area() are Python-level isinstance
    # wrappers, a call each per object on this hot path.
    node_t, way_t, area_t = osmium.osm.Node, osmium.osm.Way, osmium.osm.Area
    try:
        for obj in processor:
            read += 1
            tp = type(obj)
            if tp is node_t:
                chans = [c for c in match(obj.tags) if c in node_ok]
                if not chans:
                    continue
                loc = obj.location
                if not loc.valid():
                    failed += 1
                    continue
                kind_a(_KIND_NODE), id_a(obj.id)
                lat_a(loc.lat), lon_a(loc.lon), wkb_a(None)
            elif tp is way_t:
                ok = closed_way_ok if obj.is_closed() else open_way_ok
                chans = [c for c in match(obj.tags) if c in ok]
                if not chans:
                    continue
                try:
                    geom = bytes.fromhex(make_line(obj))
                except _GEOMETRY_ERRORS:  # too few nodes with locations (clipped extract)
                    failed += 1
                    continue
                kind_a(_KIND_WAY), id_a(obj.id)
                lat_a(nan), lon_a(nan), wkb_a(geom)
            elif tp is area_t:
                chans = [c for c in match(obj.tags) if c in area_ok]
                if not chans:
                    continue
                try:
                    geom = bytes.fromhex(make_area(obj))
                except _GEOMETRY_ERRORS:
                    failed += 1
                    continue
                kind_a(_KIND_AREA_WAY if obj.from_way() else _KIND_AREA_RELATION)
                id_a(obj.orig_id()), lat_a(nan), lon_a(nan), wkb_a(geom)
            else:  # relations themselves: multipolygons arrive as areas
                continue
            matched += 1
            cobj_ext([n_obj] * len(chans))
            cidx_ext(chans)
            n_obj += 1
    except RuntimeError as e:
        raise InvalidSourceError(
            f"OSM source {path} is truncated or corrupt ({e}); re-download or re-export it "
            f"(`osmium fileinfo -e {path}` shows where it breaks)"
        ) from e
    stats.objects_read += read
    stats.objects_matched += matched
    stats.geometry_failures += failed


def _keys_by_kind(taxonomy: Taxonomy, *channel_sets: frozenset[int]) -> tuple[tuple[str, ...], ...]:
    """For each set of usable channels, the taxonomy keys through which some value can feed one
    of them (the compiled matcher's table: key -> ({value: channels}, channels of others))."""
    table = getattr(taxonomy, "_table", None)
    if table is None:  # another Taxonomy layout: every key for every kind
        return tuple(taxonomy.keys for _ in channel_sets)
    reachable = {
        key: set(default).union(*by_value.values()) for key, (by_value, default) in table.items()
    }
    return tuple(
        tuple(k for k in taxonomy.keys if reachable[k] & ok) or ("\x00no-key",)
        for ok in channel_sets
    )


def extract_features(
    sources: Sequence[str | os.PathLike],
    taxonomy: Taxonomy,
    profile: ResolutionProfile,
    partitions: Collection[str] | None = None,
    location_store: str = "flex_mem",
) -> tuple[pl.DataFrame, ExtractStats]:
    """Read each source once; return the ``osm_features`` rows of the given partitions.

    ``partitions`` are level-6 tokens; None keeps every row. Objects present in several sources
    (overlapping extracts) are kept once.
    """
    stats = ExtractStats()
    frames: list[pl.DataFrame] = []
    for src in sources:
        path = validate_source(src)
        stats.sources.append(str(path))
        col = _Collector()
        _read_source(path, taxonomy, col, stats, location_store)
        frames.append(
            _rows_from_collector(col, taxonomy, profile, partitions=partitions, stats=stats)
        )
    df = pl.concat(frames) if frames else _empty_frame()
    if partitions is not None:
        df = df.filter(pl.col("parent_l6").is_in(sorted(set(partitions))))
    if len(stats.sources) > 1:
        df = df.unique(subset=["osm_type", "osm_id", "channel", "cell_id"], keep="first")
    df = df.sort("parent_l6", "cell_id", "channel", "osm_type", "osm_id")
    stats.rows = df.height
    return df, stats


def _empty_frame() -> pl.DataFrame:
    return pl.DataFrame(schema=OSM_FEATURES_SCHEMA)


def _piece_frame(objs: np.ndarray, pieces: clip.CellPieces, value: str) -> pl.DataFrame:
    """The pieces of ``objs`` (collector indices) as (obj, cell, ``value``, lat, lon) rows."""
    return pl.DataFrame(
        {
            "obj": objs[pieces.index],
            "cell": pieces.cell.view(np.int64),
            value: pieces.value,
            "lat": pieces.lat,
            "lon": pieces.lng,
        }
    )


@dataclass
class _Objects:
    """The collected objects as arrays, with their representative points (ways: the middle
    along the line; areas: a point inside) and their (object, channel) pairs."""

    osm_type: pl.Series
    osm_id: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    geoms: np.ndarray  # shapely geometries of ways and areas (None for nodes)
    chan_obj: np.ndarray  # one entry per (object, channel)
    chan_idx: np.ndarray
    chan_measure: np.ndarray
    names: pl.Series  # channel names by index

    @classmethod
    def of(cls, col: _Collector, taxonomy: Taxonomy) -> _Objects:
        kind = np.asarray(col.kind, dtype=np.int8)
        lat = np.asarray(col.lat, dtype=np.float64)
        lon = np.asarray(col.lon, dtype=np.float64)
        geom_rows = np.flatnonzero(kind != _KIND_NODE)
        geoms = np.empty(len(kind), dtype=object)
        if len(geom_rows):
            geoms[geom_rows] = shapely.from_wkb([col.wkb[i] for i in geom_rows])
        way_rows = np.flatnonzero(kind == _KIND_WAY)
        area_rows = np.flatnonzero(kind >= _KIND_AREA_WAY)
        if len(way_rows):
            mid = shapely.line_interpolate_point(geoms[way_rows], 0.5, normalized=True)
            lon[way_rows], lat[way_rows] = shapely.get_x(mid), shapely.get_y(mid)
        if len(area_rows):
            inside = shapely.point_on_surface(geoms[area_rows])
            lon[area_rows], lat[area_rows] = shapely.get_x(inside), shapely.get_y(inside)
        chan_idx = np.asarray(col.chan_idx, dtype=np.int64)
        measure = np.asarray([c.measure for c in taxonomy.channels], dtype=object)
        return cls(
            # strings gathered by index in polars (numpy object -> str conversions cost more)
            osm_type=pl.Series(_OSM_TYPE_OF_KIND.tolist(), dtype=pl.String).gather(kind),
            osm_id=np.asarray(col.osm_id, dtype=np.int64),
            lat=lat,
            lon=lon,
            geoms=geoms,
            chan_obj=np.asarray(col.chan_obj, dtype=np.int64),
            chan_idx=chan_idx,
            chan_measure=measure[chan_idx],
            names=pl.Series(list(taxonomy.channel_names), dtype=pl.String),
        )

    def count_rows(self, pixel_level: int) -> pl.DataFrame:
        """Count rows: one per (object, channel), at the object's point."""
        pt = self.chan_measure == "count"
        pt_obj = self.chan_obj[pt]
        rows = pl.DataFrame(
            {
                "osm_type": self.osm_type.gather(pt_obj),
                "osm_id": self.osm_id[pt_obj],
                "channel": self.names.gather(self.chan_idx[pt]),
                "lat": self.lat[pt_obj],
                "lon": self.lon[pt_obj],
                "length_m": np.full(len(pt_obj), np.nan),
                "area_m2": np.full(len(pt_obj), np.nan),
                "obj": pt_obj,
            }
        ).filter(pl.col("lat").is_finite() & pl.col("lon").is_finite())
        cells = s2.latlng_to_cell_id(rows["lat"].to_numpy(), rows["lon"].to_numpy(), pixel_level)
        return rows.with_columns(pl.Series("cell", cells.view(np.int64)))

    def measure_rows(self, per_cell: pl.DataFrame, value: str, mask: np.ndarray) -> pl.DataFrame:
        """Per-cell values of objects joined to their (object, channel) pairs of one measure."""
        pairs = pl.DataFrame({"obj": self.chan_obj[mask], "chan": self.chan_idx[mask]})
        joined = pairs.join(per_cell, on="obj", how="inner")
        obj = joined["obj"].to_numpy()
        values = joined[value].to_numpy()
        nan = np.full(joined.height, np.nan)
        return pl.DataFrame(
            {
                "osm_type": self.osm_type.gather(obj),
                "osm_id": self.osm_id[obj],
                "channel": self.names.gather(joined["chan"]),
                "lat": joined["lat"].to_numpy(),
                "lon": joined["lon"].to_numpy(),
                "length_m": values if value == "len" else nan,
                "area_m2": values if value == "area" else nan,
                "obj": obj,
                "cell": joined["cell"].to_numpy(),
            }
        )

    def area_rows(
        self, pixel_level: int, partitions: Collection[str] | None
    ) -> tuple[pl.DataFrame | None, int]:
        """Per (area, area channel, pixel cell), the polygon's area inside the cell; and how
        many objects were clipped."""
        is_area = self.chan_measure == "area_m2"
        if not is_area.any():
            return None, 0
        objs = np.unique(self.chan_obj[is_area])
        pieces = clip.polygon_cell_areas(self.geoms[objs], pixel_level, partitions)
        rows = self.measure_rows(_piece_frame(objs, pieces, "area"), "area", is_area)
        return rows, pieces.clipped

    def length_rows(self, pixel_level: int) -> tuple[pl.DataFrame | None, int]:
        """Per (way, length channel, pixel cell), the length of the line inside it; and how
        many objects were clipped."""
        is_length = self.chan_measure == "length_m"
        if not is_length.any():
            return None, 0
        objs = np.unique(self.chan_obj[is_length])
        pieces = clip.line_cell_lengths(self.geoms[objs], pixel_level)
        per_cell = (
            _piece_frame(objs, pieces, "len")
            .group_by("obj", "cell")
            .agg(
                # Pieces come in order along the line: the first one's midpoint, in the cell.
                exact_sum("len"),
                pl.col("lat").first(),
                pl.col("lon").first(),
            )
        )
        return self.measure_rows(per_cell, "len", is_length), pieces.clipped


def _rows_from_collector(
    col: _Collector,
    taxonomy: Taxonomy,
    profile: ResolutionProfile,
    keep_object: bool = False,
    partitions: Collection[str] | None = None,
    stats: ExtractStats | None = None,
) -> pl.DataFrame:
    """The rows of the collected objects; ``keep_object`` adds an ``obj`` column (the object's
    index in the collector) after the schema's columns. ``partitions`` (level-6 tokens) lets
    the clipping of large polygons skip other level-6 cells; rows there may still come back
    (the caller filters)."""
    if not col.kind:
        empty = _empty_frame()
        return empty.with_columns(pl.lit(None, pl.Int64).alias("obj")) if keep_object else empty
    objects = _Objects.of(col, taxonomy)
    frames = [objects.count_rows(profile.pixel_level)]
    t0 = time.perf_counter()
    areas, clipped_areas = objects.area_rows(profile.pixel_level, partitions)
    lengths, clipped_lines = objects.length_rows(profile.pixel_level)
    frames += [f for f in (areas, lengths) if f is not None]
    if stats is not None:
        stats.objects_clipped += clipped_areas + clipped_lines
        stats.seconds_clipping += time.perf_counter() - t0

    rows = pl.concat(frames)
    cells = rows["cell"].to_numpy().view(np.uint64)
    return (
        rows.with_columns(
            pl.col("cell").alias("cell_id"),
            pl.Series("image_id", s2.to_signed(s2.parent(cells, profile.image_level))),
            pl.Series("parent_l6", s2.to_token(s2.parent(cells, PARTITION_LEVEL)), dtype=pl.String),
            pl.lit(taxonomy.version).alias("taxonomy_version"),
            pl.col("length_m").fill_nan(None),
            pl.col("area_m2").fill_nan(None),
        )
        .select([*OSM_FEATURES_SCHEMA, *(["obj"] if keep_object else [])])
        .cast({**OSM_FEATURES_SCHEMA, "obj": pl.Int64} if keep_object else OSM_FEATURES_SCHEMA)
    )
