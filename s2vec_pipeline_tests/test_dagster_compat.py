"""The contracts the package relies on from Dagster, stated so that a Dagster upgrade fails here
first, with the reason:

- the staleness rule (``defs.automation.Staleness``, public provenance and event-log API) agrees
  with Dagster's own resolver of the UI's "Unsynced" badge (internal API, the oracle here) on a
  small graph shaped like the pipeline: a partitioned observable source, partitioned assets
  with code versions, an unpartitioned model feeding a partitioned asset;
- the internal classes ``service/dagster_compat.py`` re-exports exist with the hooks and
  signatures ``service/instance.py`` overrides and calls;
- the no-op compute-log manager named in the CLI's ``dagster.yaml`` loads.
"""

import datetime as dt
import inspect
from pathlib import Path

import dagster as dg
import pytest

from s2vec_pipeline.defs.automation import Staleness, stale_partitions
from s2vec_pipeline.service import dagster_compat as compat
from s2vec_pipeline.service.dagster_compat import (
    AssetGraphView,
    CachingStaleStatusResolver,
    StaleStatus,
    TemporalContext,
)

CELLS = dg.DynamicPartitionsDefinition(name="cells")
SOURCE_VERSIONS: dict[str, str] = {}  # what the next observation records, per partition
MODEL_VERSION = {"v": "m1"}


def ui_status(instance: dg.DagsterInstance, defs: dg.Definitions, asset: str, k: str | None):
    """The UI's badge for one partition: Dagster's own stale-status resolver (internal API)."""
    graph = defs.resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=_now(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    return CachingStaleStatusResolver(instance, graph, view).get_status(dg.AssetKey(asset), k)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dg.observable_source_asset(partitions_def=CELLS)
def source() -> dg.DataVersionsByPartition:
    return dg.DataVersionsByPartition(dict(SOURCE_VERSIONS))


def _graph(features_code: str = "1") -> list:
    @dg.asset(partitions_def=CELLS, deps=[source], code_version=features_code)
    def features(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion(f"f-{context.partition_key}"))

    @dg.asset(partitions_def=CELLS, deps=[features], code_version="1")
    def tiles(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion(f"t-{context.partition_key}"))

    @dg.asset(code_version="1")
    def model() -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion(MODEL_VERSION["v"]))

    @dg.asset(partitions_def=CELLS, deps=[tiles, model], code_version="1")
    def embeddings(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion(f"e-{context.partition_key}"))

    return [source, features, tiles, model, embeddings]


ASSETS = ["features", "tiles", "embeddings"]


def _stale_everywhere(instance: dg.DagsterInstance, defs: dg.Definitions) -> dict[str, set]:
    """{asset: stale partitions} by our rule, after checking it against the UI's resolver."""
    ours = Staleness(instance, defs)
    out: dict[str, set] = {}
    for asset in ASSETS:
        for k in ("x", "y"):
            theirs = ui_status(instance, defs, asset, k)
            assert ours.is_stale(asset, k) == (theirs == StaleStatus.STALE), (
                f"{asset}[{k}]: the staleness rule says {ours.causes(asset, k)}, Dagster's UI "
                f"resolver {theirs}: defs/automation.Staleness no longer matches this Dagster"
            )
            if ours.is_stale(asset, k):
                out.setdefault(asset, set()).add(k)
    return out


def _materialize(defs: dg.Definitions, instance: dg.DagsterInstance, assets, k=None) -> None:  # noqa: ANN001
    job = dg.define_asset_job("j", selection=assets)
    one = dg.Definitions(assets=defs.assets, jobs=[job]).resolve_job_def("j")
    assert one.execute_in_process(instance=instance, partition_key=k).success


def test_staleness_rule_agrees_with_dagsters_ui() -> None:
    defs = dg.Definitions(assets=_graph())
    SOURCE_VERSIONS.clear()
    SOURCE_VERSIONS.update(x="s1", y="s1")
    MODEL_VERSION["v"] = "m1"
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("cells", ["x", "y"])
        _materialize(defs, instance, ["source"])
        _materialize(defs, instance, ["model"])
        for k in ("x", "y"):
            _materialize(defs, instance, ["features", "tiles", "embeddings"], k)
        assert _stale_everywhere(instance, defs) == {}

        # the same source version observed again: nothing changed
        _materialize(defs, instance, ["source"])
        assert _stale_everywhere(instance, defs) == {}
        # x's source changed: x's features only (staleness does not propagate downstream)
        SOURCE_VERSIONS["x"] = "s2"
        _materialize(defs, instance, ["source"])
        assert _stale_everywhere(instance, defs) == {"features": {"x"}}
        assert stale_partitions(instance, defs, "features") == {
            "x": ["has a new dependency data version (source)"]
        }
        # recomputed: features[x] keeps its data version, so nothing downstream changed
        _materialize(defs, instance, ["features"], "x")
        assert _stale_everywhere(instance, defs) == {}

        # a new model: every embedding partition
        MODEL_VERSION["v"] = "m2"
        _materialize(defs, instance, ["model"])
        assert _stale_everywhere(instance, defs) == {"embeddings": {"x", "y"}}
        assert stale_partitions(instance, defs, "embeddings", ["y"]) == {
            "y": ["has a new dependency data version (model)"]
        }
        _materialize(defs, instance, ["embeddings"], "x")
        assert _stale_everywhere(instance, defs) == {"embeddings": {"y"}}

        # a new code version of features: every materialized features partition
        recoded = dg.Definitions(assets=_graph(features_code="2"))
        assert _stale_everywhere(instance, recoded) == {"features": {"x", "y"}, "embeddings": {"y"}}
        assert stale_partitions(instance, recoded, "features", ["y"]) == {
            "y": ["has a new code version"]
        }


def test_staleness_of_never_materialized_partitions_is_missing() -> None:
    defs = dg.Definitions(assets=_graph())
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("cells", ["x"])
        assert ui_status(instance, defs, "features", "x") == StaleStatus.MISSING
        assert Staleness(instance, defs).causes("features", "x") == []


def _params(fn) -> list[str]:  # noqa: ANN001
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize(
    ("cls", "hooks", "init"),
    [
        (
            compat.SqliteEventLogStorage,
            ["_connect", "_initdb", "path_for_shard", "conn_string_for_shard", "dispose"],
            ["base_dir", "inst_data"],
        ),
        (
            compat.SqliteRunStorage,
            ["connect", "from_local", "dispose"],
            ["conn_string", "inst_data"],
        ),
    ],
)
def test_sqlite_storage_hooks_the_pooled_storages_override(
    cls: type, hooks: list[str], init: list[str]
) -> None:
    missing = [h for h in hooks if not callable(getattr(cls, h, None))]
    assert not missing, f"{cls.__name__} lost {missing}: service/instance.py overrides them"
    assert _params(cls.__init__)[1:3] == init, f"{cls.__name__}.__init__ changed"
    assert _params(compat.SqliteEventLogStorage._connect)[1:] == ["shard"]
    assert _params(compat.SqliteRunStorage.from_local)[:2] == ["base_dir", "inst_data"]


def test_sqlite_storage_state_the_pooled_storages_share(tmp_path: Path) -> None:
    storage = compat.SqliteEventLogStorage(str(tmp_path))
    try:
        # the pooled storage guards its engines with the same lock and shard bookkeeping
        assert hasattr(storage, "_db_lock") and isinstance(storage._initialized_dbs, set)
        assert storage.path_for_shard(compat.INDEX_SHARD_NAME).startswith(str(tmp_path))
    finally:
        storage.dispose()
    runs = compat.SqliteRunStorage.from_local(str(tmp_path))
    try:
        assert runs._conn_string.startswith("sqlite:///")
    finally:
        runs.dispose()
    assert isinstance(compat.SQLITE_BUSY_TIMEOUT_SECONDS, int | float)


def test_run_health_result_signature() -> None:
    result = compat.CheckRunHealthResult(compat.WorkerStatus.FAILED, msg="gone", run_worker_id="12")
    assert (result.status, result.msg, result.run_worker_id) == (
        compat.WorkerStatus.FAILED,
        "gone",
        "12",
    )
    assert {"RUNNING", "FAILED"} <= {s.name for s in compat.WorkerStatus}
    assert "check_run_worker_health" in dir(dg.DefaultRunLauncher)


def test_no_compute_logs_config_loads(tmp_path: Path) -> None:
    (tmp_path / "dagster.yaml").write_text(compat.NO_COMPUTE_LOGS_YAML)
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        assert type(instance.compute_log_manager).__name__ == "NoOpComputeLogManager"


def test_post_processing_error_refuses_a_config_value() -> None:
    class Positive(dg.Shape):  # what defs/model.py's launchpad config does
        def __new__(cls, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204 - Shape memoizes
            return object.__new__(cls)

        def __init__(self, fields: dict) -> None:
            self._initialized = False
            super().__init__(fields)

        def post_process(self, value):  # noqa: ANN001, ANN202
            if value["n"] <= 0:
                raise compat.PostProcessingError("n must be positive")
            return value

    @dg.op(config_schema=Positive({"n": dg.Field(int)}))
    def op() -> None: ...

    @dg.job
    def job() -> None:
        op()

    with pytest.raises(dg.DagsterInvalidConfigError, match="n must be positive"):
        job.execute_in_process(run_config={"ops": {"op": {"config": {"n": 0}}}})


def test_run_execution_hooks_the_warm_run_workers_call() -> None:
    """``execute_existing_run`` follows ``dagster api execute_run``: the same three names."""
    assert _params(compat.core_execute_run)[:4] == [
        "recon_job",
        "dagster_run",
        "instance",
        "inject_env_vars",
    ]
    assert _params(compat.recon_job_from_origin) == ["origin"]
    pid = compat.EngineEventData.in_process(1234).metadata["pid"]
    assert int(pid.value) == 1234  # what run monitoring's run_worker_pid reads
