"""The one staleness rule, and the sensor that acts on it.

A partition is stale exactly when Dagster's UI shows it "Unsynced": its latest materialization
was computed from an upstream partition whose data version has changed since, or by another
code version (Dagster's own stale-status resolver over the content-hash data versions every
asset records). The nightly ``refresh_stale_partitions`` sensor and ``s2vec refresh``
(``runner.refresh``) both recompute what ``stale_partitions`` returns, layer by layer, so a
partition whose content did not change stops the cascade.
"""

from collections.abc import Iterable

import dagster as dg
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime

from s2vec_pipeline.defs.data_layer import data_layer_job
from s2vec_pipeline.defs.model import embed_job
from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME

# The partitioned steps in pipeline order: (job, assets computed by one op).
PARTITIONED_STEPS: list[tuple[str, list[str]]] = [
    ("data_layer", ["osm_features"]),
    ("data_layer", ["cell_features"]),
    ("data_layer", ["raster_tiles"]),
    ("embed", ["cell_embeddings", "image_embeddings"]),
]


def _resolver(instance: dg.DagsterInstance, asset_graph) -> CachingStaleStatusResolver:  # noqa: ANN001
    # Internal Dagster API (pinned to dagster 1.13): the resolver behind the UI's badges.
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=asset_graph,
    )
    return CachingStaleStatusResolver(instance, asset_graph, view)


def stale_partitions(
    instance: dg.DagsterInstance,
    asset_graph,  # noqa: ANN001 - a Definitions' or a repository's asset graph
    asset: str,
    partitions: Iterable[str] | None = None,
) -> dict[str, list[str]]:
    """Materialized partitions of ``asset`` that are stale, with Dagster's reasons.

    ``partitions``: the candidates (default: every partition materialized so far). Partitions
    never materialized are not stale (they are missing; materializing them is a user's choice).
    """
    key = dg.AssetKey(asset)
    if partitions is None:
        partitions = instance.get_materialized_partitions(key)
    resolver = _resolver(instance, asset_graph)
    out: dict[str, list[str]] = {}
    for k in sorted(partitions):
        if resolver.get_status(key, k) == StaleStatus.STALE:
            out[k] = [
                f"{c.reason} ({c.dependency.asset_key.to_user_string()})"
                if c.dependency
                else c.reason
                for c in resolver.get_stale_causes(key, k)
            ]
    return out


def next_stale_step(
    instance: dg.DagsterInstance,
    asset_graph,  # noqa: ANN001
) -> dict[str, tuple[str, list[str]]]:
    """For each partition with anything stale, the most upstream stale step: (job, assets).

    Downstream steps wait: once the upstream is recomputed, they are stale only if its content
    really changed.
    """
    out: dict[str, tuple[str, list[str]]] = {}
    for job, assets in PARTITIONED_STEPS:
        stale: set[str] = set()
        for a in assets:
            stale |= set(stale_partitions(instance, asset_graph, a))
        for k in sorted(stale - set(out)):
            out[k] = (job, assets)
    return out


def _in_progress(instance: dg.DagsterInstance) -> set[str]:
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            statuses=[
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ]
        )
    )
    return {r.tags["dagster/partition"] for r in runs if "dagster/partition" in r.tags}


def _upstream_state(
    instance: dg.DagsterInstance,
    asset_graph,
    asset: str,
    partition: str,  # noqa: ANN001
) -> int:
    """The newest upstream event of one partition: the same staleness is requested once."""
    newest = 0
    for parent in asset_graph.get(dg.AssetKey(asset)).parent_keys:
        node = asset_graph.get(parent)
        record = instance.get_latest_data_version_record(
            parent, node.is_external, partition if node.is_partitioned else None
        )
        newest = max(newest, record.storage_id if record else 0)
    return newest


@dg.sensor(
    name="refresh_stale_partitions",
    jobs=[data_layer_job, embed_job],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Recomputes stale partitions (the UI's 'Unsynced'): after the nightly "
    "refresh_sources observation, a new model or a code change. One run per partition and "
    "step, most upstream first; an unchanged result stops the cascade.",
)
def refresh_stale_partitions(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    graph = context.repository_def.asset_graph
    busy = _in_progress(context.instance)
    known = set(context.instance.get_dynamic_partitions(L6_PARTITIONS_NAME))
    requests = []
    for k, (job, assets) in next_stale_step(context.instance, graph).items():
        if k in busy or k not in known:
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"{assets[0]}:{k}:{_upstream_state(context.instance, graph, assets[0], k)}",
                job_name=job,
                partition_key=k,
                asset_selection=[dg.AssetKey(a) for a in assets],
                tags={"s2vec/trigger": "stale"},
            )
        )
    if not requests:
        return dg.SensorResult(skip_reason="no stale partition")
    return dg.SensorResult(run_requests=requests)
