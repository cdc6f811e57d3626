"""Data layer: OSM extract -> osm_features -> cell_features -> raster_tiles, and its job.

One run materializes one level-6 partition (``partitions.py`` says why). Each asset writes its
partition to Delta in one atomic commit (``delta_store``) and returns one
``MaterializeResult`` whose data version is the content hash of the partition's rows
(``versioning.partition_data_version``): Dagster adds the input data versions and the code
version, so a partition is "Unsynced" exactly when its upstream partition's content changed.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa

from s2vec_pipeline.cells.features import aggregate_cell_features, cell_features_schema
from s2vec_pipeline.cells.preview import markdown_image, partition_mosaic, png_bytes
from s2vec_pipeline.cells.raster import RASTER_SCHEMA, iter_raster_batches, tensor_array
from s2vec_pipeline.defs.metadata import (
    OWNERS,
    check_result,
    commit_metadata,
    table_metadata,
)
from s2vec_pipeline.defs.partitions import l6_partitions
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.defs.sources import osm_sources
from s2vec_pipeline.errors import MissingInputError
from s2vec_pipeline.osm.coverage import current_sources_for
from s2vec_pipeline.osm.extract import OSM_FEATURES_CODE_VERSION, OSM_FEATURES_SCHEMA
from s2vec_pipeline.osm.extract_cache import extract_partition
from s2vec_pipeline.service.k8s import in_run_executor
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.storage import delta_store, tables
from s2vec_pipeline.storage.tables import CELL_COLUMNS, OSM_FEATURES_COLUMNS, RASTER_COLUMNS
from s2vec_pipeline.storage.versioning import partition_data_version

GROUP = "data_layer"
DATA_TAGS = {"layer": "data", "storage": "delta"}

Result = Iterator[dg.MaterializeResult | dg.AssetCheckResult]


def _check_specs(asset: str, checks: dict[str, str]) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(name, asset=asset, description=desc, partitions_def=l6_partitions)
        for name, desc in checks.items()
    ]


def _read_upstream(
    context: dg.AssetExecutionContext, settings: PipelineSettings, table: str
) -> pl.DataFrame:
    key = context.partition_key
    if delta_store.table_exists(settings.root, table):
        return delta_store.read_partitions(settings.root, table, [key])
    if context.instance.get_latest_data_version_record(dg.AssetKey(table), partition_key=key):
        return pl.DataFrame()  # materialized, and empty: nothing was ever written
    raise MissingInputError(
        f"{table} does not exist under {settings.root}: run s2vec materialize --cells {key} "
        f"with the earlier stages first"
    )


def _write(
    context: dg.AssetExecutionContext,
    settings: PipelineSettings,
    table: str,
    data: pa.Table | pa.RecordBatchReader,
    empty: bool,
    contract: dict[str, Any],
) -> int | None:
    """Replace this partition in one commit and return its version; an empty partition never
    written stays unwritten (a sea cell creates no table and no commit: None)."""
    from s2vec_pipeline.service.instance import record_dagster_home

    key = context.partition_key
    if empty:
        context.log.warning(f"partition {key} of {table} is empty (sea? empty land?)")
        if key not in delta_store.partition_keys(settings.root, table):
            return None
    version = delta_store.write_partitions(
        settings.root, table, data, [key], contract, commit_metadata(context)
    )
    # after the commit: a run that wrote nothing leaves the root as it was
    record_dagster_home(settings.root, context.instance)  # where `s2vec status` finds its runs
    return version


def _table_metadata(
    settings: PipelineSettings,
    table: str,
    rows: int,
    columns: dict[str, str],
    version: int | None,
) -> dict[str, Any]:
    """``table_metadata`` of the commit ``version`` this run wrote; without a commit (an empty
    partition never written), no ``delta_version``."""
    if not delta_store.table_exists(settings.root, table):
        return {"dagster/row_count": 0, "dagster/table_name": table}
    metadata = table_metadata(settings, table, rows, columns, version)
    if version is None:
        del metadata["delta_version"]
    return metadata


@dg.asset(
    partitions_def=l6_partitions,
    group_name=GROUP,
    kinds={"osm", "delta"},
    owners=OWNERS,
    tags=DATA_TAGS,
    code_version=OSM_FEATURES_CODE_VERSION,
    deps=[osm_sources],
    check_specs=_check_specs(
        "osm_features",
        {
            "schema": "Columns and types match the osm_features contract.",
            "valid_cells": "Every cell_id is a valid S2 cell at the profile's pixel level.",
        },
    ),
)
def osm_features(context: dg.AssetExecutionContext, s2vec: S2VecResource) -> Result:
    """One row per (OSM object, matched channel, pixel cell) of this level-6 cell, read from the
    current extracts (the sources with the applied change files) with pyosmium."""
    settings = s2vec.settings()
    key = context.partition_key
    sources = current_sources_for(settings.root, settings.sources, [key])
    # A source covering several partitions is extracted once per version and group, its
    # partitions' rows kept for their own runs (extract_cache): no run reads the whole source.
    extract = extract_partition(
        sources, settings.taxonomy, settings.profile, key, settings.split_cache_dir
    )
    df, stats, seconds = extract.rows, extract.stats, extract.seconds
    version = _write(
        context,
        settings,
        "osm_features",
        df.to_arrow(),
        df.height == 0,
        settings.contract("osm_features"),
    )
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(partition_data_version("osm_features", df)),
        metadata={
            **_table_metadata(settings, "osm_features", df.height, OSM_FEATURES_COLUMNS, version),
            "sources": dg.MetadataValue.json(extract.how),
            # "read" / "extracted" (this run extracted its group) / "cached" (an earlier run did)
            "extraction": ", ".join(sorted(set(extract.how.values()))),
            "objects_read": stats.objects_read,
            "objects_matched": stats.objects_matched,
            "geometry_failures": stats.geometry_failures,
            "objects_clipped": stats.objects_clipped,
            "objects_per_second": round(stats.objects_read / max(seconds, 1e-9)),
            "extract_seconds": round(seconds, 2),
        },
    )
    yield check_result("schema", tables.schema_matches(df, OSM_FEATURES_SCHEMA))
    yield check_result(
        "valid_cells",
        tables.cells_at_level(df["cell_id"].to_numpy(), settings.profile.pixel_level),
    )


@dg.asset(
    partitions_def=l6_partitions,
    group_name=GROUP,
    kinds={"polars", "delta"},
    owners=OWNERS,
    tags=DATA_TAGS,
    code_version="2",
    deps=[osm_features],
    check_specs=_check_specs(
        "cell_features",
        {
            "schema": "Key columns, then one float64 column per taxonomy channel in tensor order.",
            "no_nan": "No channel value is NaN or infinite.",
        },
    ),
)
def cell_features(context: dg.AssetExecutionContext, s2vec: S2VecResource) -> Result:
    """One row per non-empty pixel cell: its (row, col) in its image, one column per channel."""
    settings = s2vec.settings()
    features = _read_upstream(context, settings, "osm_features")
    if features.height == 0:
        features = pl.DataFrame(schema=OSM_FEATURES_SCHEMA)
    df = aggregate_cell_features(features, settings.taxonomy, settings.profile)
    channels = list(settings.taxonomy.channel_names)
    version = _write(
        context,
        settings,
        "cell_features",
        df.to_arrow(),
        df.height == 0,
        settings.contract("cell_features", channels=channels),
    )
    nonzero = df.select((pl.col(channels) > 0).sum()).row(0) if df.height else [0]
    measures = {c.name: c.measure for c in settings.taxonomy.channels}
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(partition_data_version("cell_features", df)),
        metadata={
            **_table_metadata(
                settings,
                "cell_features",
                df.height,
                {**CELL_COLUMNS, **{c: f"channel ({measures[c]})" for c in channels}},
                version,
            ),
            "images": df["image_token"].n_unique(),
            "channels": len(channels),
            "channels_present": int(sum(v > 0 for v in nonzero)),
        },
    )
    yield check_result("schema", tables.schema_matches(df, cell_features_schema(settings.taxonomy)))
    yield check_result("no_nan", tables.no_nan(df, channels))


@dg.asset(
    partitions_def=l6_partitions,
    group_name=GROUP,
    kinds={"numpy", "delta"},
    owners=OWNERS,
    tags=DATA_TAGS,
    code_version="2",
    deps=[cell_features],
    check_specs=_check_specs(
        "raster_tiles",
        {
            "no_nan": "Every tensor value is finite.",
            "agrees_with_cell_features": "Each tensor equals log1p(cell_features) at the "
            "pixels' S2 (row, col), zero elsewhere, one row per image with data.",
        },
    ),
)
def raster_tiles(context: dg.AssetExecutionContext, s2vec: S2VecResource) -> Result:
    """One C×S×S log1p tensor per image cell with data, pixels at their S2 (i, j) offsets."""
    settings = s2vec.settings()
    key = context.partition_key
    channels = list(settings.taxonomy.channel_names)
    cells = _read_upstream(context, settings, "cell_features")
    if cells.height == 0:
        cells = pl.DataFrame(schema=cell_features_schema(settings.taxonomy))
    side = settings.profile.side
    batches = iter_raster_batches(cells, channels, side) if cells.height else iter([])
    reader = pa.RecordBatchReader.from_batches(RASTER_SCHEMA, batches)
    version = _write(
        context,
        settings,
        "raster_tiles",
        reader,
        cells.height == 0,
        settings.contract("raster_tiles", channels=channels),
    )
    # Checks and the preview read back what was committed, not what we meant to write.
    written = (
        delta_store.read_partitions(settings.root, "raster_tiles", [key])
        if delta_store.table_exists(settings.root, "raster_tiles")
        else pl.DataFrame(schema=pl.from_arrow(RASTER_SCHEMA.empty_table()).schema)
    )
    tensors = tensor_array(written, len(channels), side)
    metadata: dict[str, Any] = {
        **_table_metadata(settings, "raster_tiles", written.height, RASTER_COLUMNS, version),
        "tensor_shape": f"{len(channels)}x{side}x{side}",
    }
    if written.height:
        pixels = written["nonempty_pixels"].to_numpy()
        metadata["nonempty_pixels_per_image"] = dg.MetadataValue.json(
            {
                "min": int(pixels.min()),
                "median": float(np.median(pixels)),
                "max": int(pixels.max()),
                "of": side * side,
            }
        )
        measures = [c.measure for c in settings.taxonomy.channels]
        png = png_bytes(partition_mosaic(written["image_id"].to_numpy(), tensors, measures))
        metadata["preview"] = dg.MetadataValue.md(markdown_image(png, f"raster of {key}"))
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(partition_data_version("raster_tiles", written)),
        metadata=metadata,
    )
    finite = np.isfinite(tensors)
    yield check_result("no_nan", (bool(finite.all()), {"non_finite": int((~finite).sum())}))
    yield check_result(
        "agrees_with_cell_features",
        tables.raster_agrees_with_cells(written, cells, channels, side)
        if cells.height or written.height
        else (True, {"images": 0}),
    )


data_layer_assets = [osm_features, cell_features, raster_tiles]

data_layer_job = dg.define_asset_job(
    "data_layer",
    selection=dg.AssetSelection.assets(*data_layer_assets),
    description="osm_features -> cell_features -> raster_tiles for one level-6 cell per run "
    "(pick several partitions to launch one run each).",
    tags={"s2vec/stage": "data"},
    executor_def=in_run_executor(),
)
