"""Per-pixel feature table: one row per non-empty pixel cell, one column per channel.

Values: ``count`` channels count objects, ``length_m`` channels sum metres of line inside the
cell, ``area_m2`` channels sum square metres of the areas inside the cell (each polygon cut
along the cell's boundary, ``clip.py``; overlapping objects of one channel add up, so a sum
may exceed the cell's area where OSM maps nested objects of the same kind).
(row, col) place the pixel in its image: row = i − i₀, col = j − j₀ at the pixel level.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.profiles import ResolutionProfile
from s2vec_pipeline.osm.taxonomy import Taxonomy
from s2vec_pipeline.storage.versioning import exact_sum

KEY_COLUMNS = ["parent_l6", "image_token", "cell_token", "cell_id", "row", "col"]


def cell_features_schema(taxonomy: Taxonomy) -> dict[str, pl.DataType]:
    schema: dict[str, pl.DataType] = {
        "parent_l6": pl.String(),
        "image_token": pl.String(),
        "cell_token": pl.String(),
        "cell_id": pl.Int64(),
        "row": pl.Int16(),
        "col": pl.Int16(),
    }
    schema.update({name: pl.Float64() for name in taxonomy.channel_names})
    schema["taxonomy_version"] = pl.String()
    return schema


def aggregate_cell_features(
    osm_features: pl.DataFrame | pl.LazyFrame, taxonomy: Taxonomy, profile: ResolutionProfile
) -> pl.DataFrame:
    """Aggregate ``osm_features`` rows into the wide ``cell_features`` table."""
    measures = pl.DataFrame(
        {
            "channel": list(taxonomy.channel_names),
            "measure": [c.measure for c in taxonomy.channels],
        }
    ).lazy()
    long = (
        osm_features.lazy()
        .join(measures, on="channel", how="inner")
        .with_columns(
            pl.when(pl.col("measure") == "count")
            .then(pl.lit(1.0))
            .when(pl.col("measure") == "length_m")
            .then(pl.col("length_m"))
            .otherwise(pl.col("area_m2"))
            .fill_null(0.0)
            .alias("value")
        )
        .group_by("parent_l6", "cell_id", "channel")
        .agg(exact_sum("value"))
        .collect()
    )
    schema = cell_features_schema(taxonomy)
    if long.height == 0:
        return pl.DataFrame(schema=schema)
    wide = long.pivot(on="channel", index=["parent_l6", "cell_id"], values="value")
    missing = [n for n in taxonomy.channel_names if n not in wide.columns]
    wide = wide.with_columns([pl.lit(0.0).alias(n) for n in missing])
    wide = wide.with_columns(pl.col(list(taxonomy.channel_names)).fill_null(0.0))

    cells = s2.from_signed(wide["cell_id"].to_numpy())
    row, col = s2.child_position(cells, profile.image_level)
    keys = pl.DataFrame(
        {
            "image_token": s2.to_token(s2.parent(cells, profile.image_level)),
            "cell_token": s2.to_token(cells),
            "row": row.astype(np.int16),
            "col": col.astype(np.int16),
        },
        schema={
            "image_token": pl.String,
            "cell_token": pl.String,
            "row": pl.Int16,
            "col": pl.Int16,
        },
    )
    return (
        pl.concat([wide, keys], how="horizontal")
        .with_columns(pl.lit(taxonomy.version).alias("taxonomy_version"))
        .select(list(schema))
        .cast(schema)
        .sort("parent_l6", "cell_id")
    )
