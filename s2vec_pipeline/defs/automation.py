"""Declarative automation: recompute a partition only when what it is derived from changed.

Plain ``AutomationCondition.eager()`` fires on every upstream materialization; the nightly
refresh rematerializes ``osm_features`` partitions whose content did not change, so the
"deps updated" part is replaced by "a dep's *data version* changed". Data versions are content
hashes logged per partition (``data_assets.partition_materializations``), so an unchanged
partition keeps its version and triggers nothing. A code version bump recomputes everything.
The daemon evaluates these conditions through ``automation_sensor`` (running by default).
"""

import dagster as dg


def on_upstream_change() -> dg.AutomationCondition:
    return (
        dg.AutomationCondition.eager().replace(
            "any_deps_updated",
            dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed()),
        )
        | dg.AutomationCondition.code_version_changed()
    )


automation_sensor = dg.AutomationConditionSensorDefinition(
    "s2vec_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Recomputes cell_features, raster_tiles and embeddings partitions whose "
    "upstream data version (or code version) changed.",
)
