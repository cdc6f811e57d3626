"""Data-layer assets: OSM extract -> osm_features -> cell_features -> raster_tiles.

Each asset is partitioned by level-6 cell and runs many partitions in one run
(``BackfillPolicy.single_run``): the OSM source is read once for all of them. Assets write
Delta directly (one atomic commit replacing exactly their partitions) and return metadata and
check results; no IO manager is involved.
"""

import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa

from s2vec_pipeline import delta_store, osm_changes, table_checks
from s2vec_pipeline.cell_features import aggregate_cell_features, cell_features_schema
from s2vec_pipeline.defs.automation import on_upstream_change
from s2vec_pipeline.defs.partitions import l6_partitions
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.errors import MissingInputError, NoFeaturesError
from s2vec_pipeline.osm_extract import OSM_FEATURES_SCHEMA, extract_features
from s2vec_pipeline.preview import markdown_image, partition_mosaic, png_bytes
from s2vec_pipeline.raster import RASTER_SCHEMA, iter_raster_batches, tensor_array
from s2vec_pipeline.versioning import frame_hash

GROUP = "data_layer"
_POLICY = dg.BackfillPolicy.single_run()
MAX_PREVIEWS = 32


def _per_partition_counts(df: pl.DataFrame, keys: list[str]) -> dict[str, int]:
    counts = dict(df.group_by("parent_l6").len().iter_rows()) if df.height else {}
    return {k: int(counts.get(k, 0)) for k in keys}


def _check(name: str, outcome: table_checks.CheckOutcome) -> dg.AssetCheckResult:
    passed, details = outcome
    return dg.AssetCheckResult(
        check_name=name,
        passed=passed,
        metadata={
            k: dg.MetadataValue.json(v) if isinstance(v, dict | list) else v
            for k, v in details.items()
        },
    )


def _commit_metadata(context: dg.AssetExecutionContext) -> dict[str, str]:
    return {
        "dagster.run_id": context.run.run_id,
        "dagster.asset": context.asset_key.to_user_string(),
    }


DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
# Data version of the upstream partition a partition was computed from (our own tag: Dagster's
# ``dagster/input_data_version/*`` tags come with event pointers we do not log).
INPUT_VERSION_TAG = "s2vec/input_data_version."
# osm_features partition metadata: {source path: change batch of the extract it was read from}.
SOURCE_BATCHES = "source_batches"


def source_batches(root: str, sources: list[str]) -> dict[str, int]:
    """How many change batches each source's current extract holds (0: the original file)."""
    out = {}
    for src in sources:
        ledger = osm_changes.read_ledger(root, src)
        out[src] = int(ledger["batches"]) if ledger else 0
    return out


def latest_tags(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str
) -> dict[str, str] | None:
    """Tags of the latest materialization of one partition (None if never materialized)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    return dict(records[0].asset_materialization.tags or {})


def latest_data_version(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str
) -> str | None:
    """The data version recorded by the latest materialization of one partition."""
    tags = latest_tags(instance, key, partition)
    return None if tags is None else tags.get(DATA_VERSION_TAG)


def partition_materializations(
    context: dg.AssetExecutionContext,
    df: pl.DataFrame,
    keys: list[str],
    sort_by: list[str],
    metadata: dict[str, Any],
    per_partition: dict[str, dict[str, Any]] | None = None,
    upstream: str | None = None,
) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """The run's result, then one materialization per partition carrying the content hash of
    that partition's rows as its data version.

    Dagster gives every partition of a multi-partition run the same data version; the
    per-partition events that follow supersede it, so a partition whose rows did not change
    keeps its version and only really changed partitions make their downstream stale. With
    ``upstream``, each event also records the upstream partition's data version it was computed
    from (``INPUT_VERSION_TAG``): the refresh compares it with the upstream's latest version.
    """
    yield dg.MaterializeResult(metadata={"partitions_in_run": len(keys), **metadata})
    counts = _per_partition_counts(df, keys)
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key) or ""
    for k in keys:
        version = frame_hash(df.filter(pl.col("parent_l6") == k), sort_by)
        tags = {DATA_VERSION_TAG: version, CODE_VERSION_TAG: code_version}
        if upstream is not None:
            up = latest_data_version(context.instance, dg.AssetKey(upstream), k)
            tags[INPUT_VERSION_TAG + upstream] = up or ""
        yield dg.AssetMaterialization(
            asset_key=context.asset_key,
            partition=k,
            metadata={"rows": counts[k], **(per_partition or {}).get(k, {})},
            tags=tags,
        )


@dg.asset(
    partitions_def=l6_partitions,
    backfill_policy=_POLICY,
    group_name=GROUP,
    kinds={"osm", "delta"},
    code_version="1",
    deps=["osm_sources"],
    check_specs=[
        dg.AssetCheckSpec("schema", asset="osm_features"),
        dg.AssetCheckSpec("valid_cells", asset="osm_features"),
    ],
)
def osm_features(
    context: dg.AssetExecutionContext, s2vec: S2VecResource
) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization | dg.AssetCheckResult]:
    """One row per (OSM object, matched channel, pixel cell), read with pyosmium."""
    settings = s2vec.settings()
    keys = sorted(context.partition_keys)
    sources = settings.current_sources_for(keys)  # with applied change files, if any
    t0 = time.perf_counter()
    df, stats = extract_features(sources, settings.taxonomy, settings.profile, partitions=keys)
    seconds = time.perf_counter() - t0
    if df.height == 0:
        raise NoFeaturesError(
            f"no OSM object in {sources} matches the taxonomy inside cells {keys}: check that "
            f"the sources cover these cells and carry mapped tags"
        )
    batches = source_batches(settings.root, settings.sources_for(keys))
    version = delta_store.write_partitions(
        settings.root,
        "osm_features",
        df.to_arrow(),
        keys,
        settings.contract("osm_features"),
        _commit_metadata(context),
    )
    counts = _per_partition_counts(df, keys)
    empty = [k for k, n in counts.items() if n == 0]
    if empty:
        context.log.warning(f"partitions without any feature (sea, empty land?): {empty}")
    yield from partition_materializations(
        context,
        df,
        keys,
        ["cell_id", "channel", "osm_type", "osm_id"],
        {
            "sources": dg.MetadataValue.json(stats.sources),
            "objects_read": stats.objects_read,
            "objects_matched": stats.objects_matched,
            "geometry_failures": stats.geometry_failures,
            "objects_per_second": round(stats.objects_read / max(seconds, 1e-9)),
            "table": dg.MetadataValue.path(delta_store.table_uri(settings.root, "osm_features")),
            "delta_version": version,
        },
        {k: {SOURCE_BATCHES: dg.MetadataValue.json(batches)} for k in keys},
    )
    yield _check("schema", table_checks.schema_matches(df, OSM_FEATURES_SCHEMA))
    yield _check(
        "valid_cells",
        table_checks.cells_at_level(df["cell_id"].to_numpy(), settings.profile.pixel_level),
    )


def _read_upstream(root: str, table: str, keys: list[str]) -> pl.DataFrame:
    df = delta_store.read_partitions(root, table, keys)
    if df.height == 0:
        raise MissingInputError(
            f"{table} has no rows for partitions {keys} under {root}: materialize {table} for "
            f"them first"
        )
    return df


@dg.asset(
    partitions_def=l6_partitions,
    backfill_policy=_POLICY,
    group_name=GROUP,
    kinds={"polars", "delta"},
    code_version="1",
    deps=[osm_features],
    automation_condition=on_upstream_change(),
    check_specs=[
        dg.AssetCheckSpec("schema", asset="cell_features"),
        dg.AssetCheckSpec("no_nan", asset="cell_features"),
    ],
)
def cell_features(
    context: dg.AssetExecutionContext, s2vec: S2VecResource
) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization | dg.AssetCheckResult]:
    """One row per non-empty pixel cell: its (row, col) in its image, one column per channel."""
    settings = s2vec.settings()
    keys = sorted(context.partition_keys)
    features = _read_upstream(settings.root, "osm_features", keys)
    df = aggregate_cell_features(features, settings.taxonomy, settings.profile)
    channels = list(settings.taxonomy.channel_names)
    version = delta_store.write_partitions(
        settings.root,
        "cell_features",
        df.to_arrow(),
        keys,
        settings.contract("cell_features", channels=channels),
        _commit_metadata(context),
    )
    nonzero = df.select((pl.col(channels) > 0).sum()).row(0)
    yield from partition_materializations(
        context,
        df,
        keys,
        ["cell_id"],
        {
            "images_in_run": df["image_token"].n_unique(),
            "channels": len(channels),
            "channels_present": int(sum(v > 0 for v in nonzero)),
            "table": dg.MetadataValue.path(delta_store.table_uri(settings.root, "cell_features")),
            "delta_version": version,
        },
        upstream="osm_features",
    )
    yield _check("schema", table_checks.schema_matches(df, cell_features_schema(settings.taxonomy)))
    yield _check("no_nan", table_checks.no_nan(df, channels))


@dg.asset(
    partitions_def=l6_partitions,
    backfill_policy=_POLICY,
    group_name=GROUP,
    kinds={"numpy", "delta"},
    code_version="1",
    deps=[cell_features],
    automation_condition=on_upstream_change(),
    check_specs=[
        dg.AssetCheckSpec("no_nan", asset="raster_tiles"),
        dg.AssetCheckSpec("agrees_with_cell_features", asset="raster_tiles"),
    ],
)
def raster_tiles(
    context: dg.AssetExecutionContext, s2vec: S2VecResource
) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization | dg.AssetCheckResult]:
    """One C×S×S log1p tensor per image cell with data, pixels at their S2 (i, j) offsets."""
    settings = s2vec.settings()
    keys = sorted(context.partition_keys)
    cells = _read_upstream(settings.root, "cell_features", keys)
    channels = list(settings.taxonomy.channel_names)
    side = settings.profile.side
    reader = pa.RecordBatchReader.from_batches(
        RASTER_SCHEMA, iter_raster_batches(cells, channels, side)
    )
    contract = settings.contract("raster_tiles", channels=channels)
    version = delta_store.write_partitions(
        settings.root, "raster_tiles", reader, keys, contract, _commit_metadata(context)
    )
    # Checks and previews read back what was committed, not what we meant to write.
    written = delta_store.read_partitions(settings.root, "raster_tiles", keys)
    tensors = tensor_array(written, len(channels), side)
    pixels = written["nonempty_pixels"].to_numpy()
    measures = [c.measure for c in settings.taxonomy.channels]
    ids = written["image_id"].to_numpy()
    previews: dict[str, dict[str, Any]] = {}
    for k in keys[:MAX_PREVIEWS]:  # a PNG per partition, bounded for continent-sized runs
        sel = (written["parent_l6"] == k).to_numpy()
        if sel.any():
            png = png_bytes(partition_mosaic(ids[sel], tensors[sel], measures))
            previews[k] = {"preview": dg.MetadataValue.md(markdown_image(png, f"raster of {k}"))}
    yield from partition_materializations(
        context,
        written,
        keys,
        ["image_id"],
        {
            "nonempty_pixels_per_image": dg.MetadataValue.json(
                {
                    "min": int(pixels.min()),
                    "median": float(np.median(pixels)),
                    "max": int(pixels.max()),
                    "side": side,
                }
            ),
            "tensor_shape": f"{len(channels)}x{side}x{side}",
            "table": dg.MetadataValue.path(delta_store.table_uri(settings.root, "raster_tiles")),
            "delta_version": version,
        },
        previews,
        upstream="cell_features",
    )
    finite = np.isfinite(tensors)
    yield _check("no_nan", (bool(finite.all()), {"non_finite": int((~finite).sum())}))
    yield _check(
        "agrees_with_cell_features",
        table_checks.raster_agrees_with_cells(written, cells, channels, side),
    )


data_layer_assets = [osm_features, cell_features, raster_tiles]
