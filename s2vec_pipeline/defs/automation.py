"""The one rule for "which assets of which partitions need a run", and the sensor that acts on it.

A partition is stale exactly when Dagster's UI shows it "Unsynced": its latest materialization
was computed from an upstream partition whose data version has changed since, or by another
code version. ``Staleness`` reads that from the provenance every materialization records
(``dg.DataProvenance``: its code version, and the data version and event id of each input),
through the public event-log API (``fetch_materializations`` / ``fetch_observations``) over the
content-hash data versions every asset records. Dagster's own resolver of the UI's badge is
internal API; ``test_dagster_compat`` checks that the two agree, so a Dagster upgrade that
changes either fails there first. Declarative automation conditions cannot state it: they are
evaluated against the previous tick (what changed since), not against what a materialization
was computed from.

``assets_to_run`` adds "never materialized", "embedded by another model" and (through
``has_data``) "recorded but its rows are gone", and returns the requested assets from the first
one needing work to the end: one run computes them all. ``s2vec materialize``
(``Launcher.stale_or_missing``), the region sensors (``regions.region_run_requests``), the
``refresh_stale_partitions`` sensor and ``s2vec refresh`` (``runner.refresh``) all decide
through it, so a partition that is up to date is never recomputed by any of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import dagster as dg

from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME
from s2vec_pipeline.service.k8s import in_run_executor

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
#: Where Dagster records an event's data version (the content hash our assets return).
DATA_VERSION_TAG = "dagster/data_version"
#: ``has_data(asset, partition)``: whether the table still holds the partition's rows.
HasData = Callable[[str, str], bool]
#: The code location's definitions: ``build_definitions(...)`` or a sensor's ``repository_def``.
Defs = dg.Definitions | dg.RepositoryDefinition
# Dagster's versions for "no event": an observable source never observed is assumed to exist
# (INITIAL); a materializable asset never materialized has no data (NULL).
_INITIAL = dg.DataVersion("INITIAL")
_NULL = dg.DataVersion("NULL")

partition_pipeline_job = dg.define_asset_job(
    PARTITION_PIPELINE,
    selection=dg.AssetSelection.assets(*PIPELINE_ASSETS),
    description="Every partitioned asset of one level-6 cell (region and refresh runs pick "
    "the assets they need).",
    tags={"s2vec/stage": "data"},
    executor_def=in_run_executor(),  # steps in the run's process; k8s pods (GPU) on Kubernetes
)


@dataclass(frozen=True)
class AssetNode:
    """What the staleness rule needs to know of one asset of the code location."""

    parents: tuple[dg.AssetKey, ...]
    code_version: str | None
    partitioned: bool
    observed: bool  # an observable source asset: its data versions come from observations


def lineage(defs: Defs) -> dict[dg.AssetKey, AssetNode]:
    """Every asset of ``defs`` with its parents, code version and kind (public definitions
    API). A partitioned parent shares its child's partition key (every partitioned asset of the
    pipeline is partitioned by the same level-6 cells); an unpartitioned parent has one."""
    repo = defs.get_repository_def() if isinstance(defs, dg.Definitions) else defs
    nodes = {
        key: AssetNode((), None, source.partitions_def is not None, source.is_observable)
        for key, source in repo.source_assets_by_key.items()
    }
    for key, assets_def in repo.assets_defs_by_key.items():
        spec = assets_def.specs_by_key[key]
        nodes[key] = AssetNode(
            parents=tuple(sorted((d.asset_key for d in spec.deps), key=lambda k: k.path)),
            code_version=assets_def.code_versions_by_key.get(key),
            partitioned=spec.partitions_def is not None,
            observed=assets_def.is_observable and not assets_def.is_materializable,
        )
    return nodes


class Staleness:
    """Why materialized partitions are stale (the UI's "Unsynced"), for one decision: events
    are read once per call site and cached, as a sensor tick or a command needs them.

    Stale causes of an asset's partition, with Dagster's wording: "has a new code version";
    "has a new dependency data version (parent)" (a parent's partition recorded a different
    data version after the one this materialization read; "... materialization" when the parent
    has no code version); "has a new dependency on parent" / "removed dependency on parent"
    (the lineage changed). Without recorded provenance (materializations older than data
    versions) a parent materialized later makes it stale."""

    def __init__(self, instance: dg.DagsterInstance, defs: Defs) -> None:
        self.instance = instance
        self.nodes = lineage(defs)

    @functools.cache  # noqa: B019 - one Staleness per decision; it dies with it
    def latest(
        self,
        key: dg.AssetKey,
        partition: str | None,
        after: int | None = None,
        before: int | None = None,
    ) -> dg.EventLogRecord | None:
        """The latest event carrying ``key``'s data version for ``partition`` (observations of
        an observable source, else materializations), with storage id in (after, before)."""
        records_filter = dg.AssetRecordsFilter(
            asset_key=key,
            asset_partitions=[partition] if partition else None,
            after_storage_id=after,
            before_storage_id=before,
        )
        fetch = (
            self.instance.fetch_observations
            if self.nodes[key].observed
            else self.instance.fetch_materializations
        )
        return next(iter(fetch(records_filter, limit=1).records), None)

    def causes(self, asset: str, partition: str) -> list[str]:
        """Why ``asset``'s ``partition`` is stale; empty when up to date or never
        materialized (missing is not stale). For the partitioned assets: an unpartitioned one
        fed by every partition (``mae_model``) would need Dagster's partition mappings."""
        key = dg.AssetKey(asset)
        node = self.nodes[key]
        if not node.partitioned:
            raise ValueError(f"the staleness rule covers partitioned assets, not {asset}")
        record = self.latest(key, partition)
        if record is None or node.observed:
            return []
        provenance = dg.DataProvenance.from_tags(_tags(record))
        out: list[str] = []
        if provenance is not None:
            if node.code_version and node.code_version != provenance.code_version:
                out.append("has a new code version")
            for gone in sorted(set(provenance.input_data_versions) - set(node.parents)):
                out.append(f"removed dependency on {gone.to_user_string()}")
        for parent in node.parents:
            name = parent.to_user_string()
            parent_partition = partition if self.nodes[parent].partitioned else None
            if provenance is not None:
                if not provenance.has_input_asset(parent):
                    out.append(f"has a new dependency on {name}")
                elif self._parent_updated(provenance, parent, parent_partition):
                    what = (
                        "data version"
                        if self._versioned(parent, parent_partition)
                        else "materialization"
                    )
                    out.append(f"has a new dependency {what} ({name})")
            elif not self.nodes[parent].observed:
                parent_record = self.latest(parent, parent_partition)
                if parent_record is None:
                    out.append(f"has a new input ({name})")
                elif parent_record.timestamp > record.timestamp:
                    out.append(f"has a new dependency materialization ({name})")
        return out

    def is_stale(self, asset: str, partition: str) -> bool:
        return bool(self.causes(asset, partition))

    def _current_version(self, key: dg.AssetKey, partition: str | None) -> dg.DataVersion:
        record = self.latest(key, partition)
        if record is None:
            return _INITIAL if self.nodes[key].observed else _NULL
        return _version(record) or _INITIAL

    def _parent_updated(
        self, provenance: dg.DataProvenance, parent: dg.AssetKey, partition: str | None
    ) -> bool:
        """Whether ``parent`` (at ``partition``) has a data version other than the one read.
        An unpartitioned parent: its current version against the recorded one. A partitioned
        parent: its first event after the one read against the one read (Dagster records the
        event id of a partitioned input, not necessarily its partition's version)."""
        if partition is None:
            return _differ(
                provenance.input_data_versions[parent], self._current_version(parent, None)
            )
        cursor = provenance.input_storage_ids[parent]
        updated = self.latest(parent, partition, after=cursor)
        if updated is None:
            return False
        previous = self.latest(parent, partition, before=cursor + 1 if cursor else None)
        return _differ(_version(previous) if previous else None, _version(updated))

    def _versioned(self, key: dg.AssetKey, partition: str | None) -> bool:
        """Whether ``key``'s versions mean its data (a code version or user-provided data
        versions) rather than one per materialization: Dagster's wording depends on it."""
        node = self.nodes[key]
        if node.code_version is not None or node.observed:
            return True
        record = self.latest(key, partition)
        provenance = dg.DataProvenance.from_tags(_tags(record)) if record else None
        return provenance is not None and provenance.is_user_provided


def _tags(record: dg.EventLogRecord) -> Mapping[str, str]:
    event = record.asset_materialization or record.asset_observation
    return (event.tags if event else None) or {}


def _version(record: dg.EventLogRecord) -> dg.DataVersion | None:
    value = _tags(record).get(DATA_VERSION_TAG)
    return None if value is None else dg.DataVersion(value)


def _differ(before: dg.DataVersion | None, now: dg.DataVersion | None) -> bool:
    # As Dagster: a parent read as INITIAL (assumed present) and now NULL has not changed.
    return not (before == _INITIAL and now == _NULL) and before != now


def stale_partitions(
    instance: dg.DagsterInstance,
    defs: Defs,
    asset: str,
    partitions: Iterable[str] | None = None,
) -> dict[str, list[str]]:
    """Materialized partitions of ``asset`` that are stale, with the reasons the UI shows.

    ``partitions``: the candidates (default: every partition materialized so far). Partitions
    never materialized are not stale (they are missing; materializing them is a user's choice).
    """
    if partitions is None:
        partitions = instance.get_materialized_partitions(dg.AssetKey(asset))
    staleness = Staleness(instance, defs)
    out = {k: staleness.causes(asset, k) for k in sorted(partitions)}
    return {k: why for k, why in out.items() if why}


def assets_to_run(
    instance: dg.DagsterInstance,
    defs: Defs,
    partition: str,
    assets: Sequence[str],
    model_version: str | None = None,
    has_data: HasData | None = None,
    staleness: Staleness | None = None,
) -> list[str]:
    """The requested ``assets`` (pipeline order) of one partition that need a run: from the
    first one never materialized, stale, embedded by another model than ``model_version``, or
    whose rows ``has_data`` says are gone, to the end (a recomputed upstream can change the
    rest). Empty: the partition is up to date."""
    staleness = staleness or Staleness(instance, defs)
    for i, asset in enumerate(assets):
        record = staleness.latest(dg.AssetKey(asset), partition)
        recorded = _version(record) if record else None
        version = recorded.value if recorded else ""
        if (
            record is None
            or (
                model_version is not None
                and asset in EMBEDDING_ASSETS
                and not version.startswith(f"{model_version}-")
            )
            or (has_data is not None and not has_data(asset, partition))
            or staleness.is_stale(asset, partition)
        ):
            return list(assets[i:])
    return []


def partitions_to_run(
    instance: dg.DagsterInstance,
    defs: Defs,
    partitions: Iterable[str],
    assets: Sequence[str],
    model_version: str | None = None,
    has_data: HasData | None = None,
) -> dict[str, list[str]]:
    """``assets_to_run`` for each partition; only the partitions with work."""
    staleness = Staleness(instance, defs)
    plan = {
        k: assets_to_run(instance, defs, k, assets, model_version, has_data, staleness)
        for k in sorted(set(partitions))
    }
    return {k: todo for k, todo in plan.items() if todo}


def stale_plan(
    instance: dg.DagsterInstance,
    defs: Defs,
    has_data: HasData | None = None,
    staleness: Staleness | None = None,
) -> dict[str, list[str]]:
    """What a refresh recomputes: for each partition with a stale asset, the assets it has
    materialized, from the first stale one to the end, in one run. Assets a partition never
    had are left alone (materializing them is a user's choice)."""
    staleness = staleness or Staleness(instance, defs)
    materialized = {
        a: set(instance.get_materialized_partitions(dg.AssetKey(a))) for a in PIPELINE_ASSETS
    }
    out: dict[str, list[str]] = {}
    for k in sorted(set().union(*materialized.values())):
        mine = [a for a in PIPELINE_ASSETS if k in materialized[a]]
        if any(staleness.is_stale(a, k) for a in mine):
            out[k] = assets_to_run(instance, defs, k, mine, None, has_data, staleness)
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


def _upstream_state(staleness: Staleness, asset: str, partition: str) -> int:
    """The newest upstream event of one partition: the same staleness is requested once."""
    newest = 0
    for parent in staleness.nodes[dg.AssetKey(asset)].parents:
        partitioned = staleness.nodes[parent].partitioned
        record = staleness.latest(parent, partition if partitioned else None)
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
    staleness = Staleness(context.instance, context.repository_def)
    busy = partitions_in_progress(context.instance)
    known = set(context.instance.get_dynamic_partitions(L6_PARTITIONS_NAME))
    requests = []
    for k, assets in stale_plan(context.instance, context.repository_def, None, staleness).items():
        if k in busy or k not in known:
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"{assets[0]}:{k}:{_upstream_state(staleness, assets[0], k)}",
                job_name=PARTITION_PIPELINE,
                partition_key=k,
                asset_selection=[dg.AssetKey(a) for a in assets],
                tags={"s2vec/trigger": "stale"},
            )
        )
    if not requests:
        return dg.SensorResult(skip_reason="no stale partition")
    return dg.SensorResult(run_requests=requests)
