"""The Dagster layer: one file per stage, each holding that stage's assets, checks, jobs,
sensors and schedules (sources, data_layer, model, regions, automation, maintenance), over the
plain modules of the package. ``definitions.py`` assembles them."""

import warnings

# Features we rely on knowingly, which Dagster marks preview/beta: per-partition asset checks,
# and per-partition data versions of an observable source asset.
for _pattern in (
    r"Specifying a partitions_def on an AssetCheckSpec",
    r"Function `observable_source_asset` is currently in beta",
    r"Class `DataVersionsByPartition` is currently in beta",
):
    warnings.filterwarnings("ignore", message=_pattern)
