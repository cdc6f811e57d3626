"""The one rule for "which assets of which partitions need a run", and the sensor that acts on it.

A partition is stale exactly when Dagster's UI shows it "Unsynced": its latest materialization
was computed from an upstream partition whose data version has changed since, or by another
code version (Dagster's own stale-status resolver over the content-hash data versions every
asset records). ``assets_to_run`` adds "never materialized", "embedded by another model" and
(through ``has_data``) "recorded but its rows are gone", and returns the requested assets from
the first one needing work to the end: one run computes them all. ``s2vec materialize``
(``Launcher.stale_or_missing``), the region sensors (``regions.region_run_requests``), the
``refresh_stale_partitions`` sensor and ``s2vec refresh`` (``runner.refresh``) all decide
through it, so a partition that is up to date is never recomputed by any of them.
"""

from collections.abc import Callable, Iterable, Sequence

import dagster as dg
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime

from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME
from s2vec_pipeline.service.k8s import executor_from_env

#: Every partitioned asset, in pipeline order.
PIPELINE_ASSETS = [
    "osm_features",
    "cell_features",
    "raster_tiles",
    "cell_embeddings",
    "image_embeddings",
]
EMBEDDING_ASSETS = ("cell_embeddings", "image_embeddings")
PARTITION_PIPELINE = "partition_pipeline"
DATA_VERSION_TAG = "dagster/data_version"
#: ``has_data(asset, partition)``: whether the table still holds the partition's rows.
HasData = Callable[[str, str], bool]

partition_pipeline_job = dg.define_asset_job(
    PARTITION_PIPELINE,
    selection=dg.AssetSelection.assets(*PIPELINE_ASSETS),
    description="Every partitioned asset of one level-6 cell (region and refresh runs pick "
    "the assets they need).",
    tags={"s2vec/stage": "data"},
    # Every step in the run's own process: with the default executor each step is a fresh
    # Python process loading the definitions (~10 s each on a loaded 2-core machine), more than
    # a partition's work. On Kubernetes (S2VEC_EXECUTOR=k8s) steps keep their own pods (GPU).
    executor_def=executor_from_env() or dg.in_process_executor,
)


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


def assets_to_run(
    instance: dg.DagsterInstance,
    asset_graph,  # noqa: ANN001
    partition: str,
    assets: Sequence[str],
    model_version: str | None = None,
    has_data: HasData | None = None,
    resolver: CachingStaleStatusResolver | None = None,
) -> list[str]:
    """The requested ``assets`` (pipeline order) of one partition that need a run: from the
    first one never materialized, stale, embedded by another model than ``model_version``, or
    whose rows ``has_data`` says are gone, to the end (a recomputed upstream can change the
    rest). Empty: the partition is up to date."""
    resolver = resolver or _resolver(instance, asset_graph)
    for i, asset in enumerate(assets):
        key = dg.AssetKey(asset)
        record = instance.get_latest_data_version_record(key, False, partition)
        version = record.asset_materialization.tags.get(DATA_VERSION_TAG, "") if record else ""
        if (
            record is None
            or (
                model_version is not None
                and asset in EMBEDDING_ASSETS
                and not version.startswith(f"{model_version}-")
            )
            or (has_data is not None and not has_data(asset, partition))
            or resolver.get_status(key, partition) == StaleStatus.STALE
        ):
            return list(assets[i:])
    return []


def partitions_to_run(
    instance: dg.DagsterInstance,
    asset_graph,  # noqa: ANN001
    partitions: Iterable[str],
    assets: Sequence[str],
    model_version: str | None = None,
    has_data: HasData | None = None,
) -> dict[str, list[str]]:
    """``assets_to_run`` for each partition; only the partitions with work."""
    resolver = _resolver(instance, asset_graph)
    plan = {
        k: assets_to_run(instance, asset_graph, k, assets, model_version, has_data, resolver)
        for k in sorted(set(partitions))
    }
    return {k: todo for k, todo in plan.items() if todo}


def stale_plan(
    instance: dg.DagsterInstance,
    asset_graph,  # noqa: ANN001
    has_data: HasData | None = None,
) -> dict[str, list[str]]:
    """What a refresh recomputes: for each partition with a stale asset, the assets it has
    materialized, from the first stale one to the end, in one run. Assets a partition never
    had are left alone (materializing them is a user's choice)."""
    resolver = _resolver(instance, asset_graph)
    materialized = {
        a: set(instance.get_materialized_partitions(dg.AssetKey(a))) for a in PIPELINE_ASSETS
    }
    out: dict[str, list[str]] = {}
    for k in sorted(set().union(*materialized.values())):
        mine = [a for a in PIPELINE_ASSETS if k in materialized[a]]
        if any(resolver.get_status(dg.AssetKey(a), k) == StaleStatus.STALE for a in mine):
            todo = assets_to_run(instance, asset_graph, k, mine, None, has_data, resolver)
            out[k] = todo
    return out


def partitions_in_progress(instance: dg.DagsterInstance) -> set[str]:
    """Partitions with a run queued or running: a sensor requests nothing more for them."""
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
    jobs=[partition_pipeline_job],
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Recomputes stale partitions (the UI's 'Unsynced'): after the nightly "
    "refresh_sources observation, a new model or a code change. One run per partition, from "
    "its first stale asset through the embeddings.",
)
def refresh_stale_partitions(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    graph = context.repository_def.asset_graph
    busy = partitions_in_progress(context.instance)
    known = set(context.instance.get_dynamic_partitions(L6_PARTITIONS_NAME))
    requests = []
    for k, assets in stale_plan(context.instance, graph).items():
        if k in busy or k not in known:
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"{assets[0]}:{k}:{_upstream_state(context.instance, graph, assets[0], k)}",
                job_name=PARTITION_PIPELINE,
                partition_key=k,
                asset_selection=[dg.AssetKey(a) for a in assets],
                tags={"s2vec/trigger": "stale"},
            )
        )
    if not requests:
        return dg.SensorResult(skip_reason="no stale partition")
    return dg.SensorResult(run_requests=requests)
