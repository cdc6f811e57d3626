"""The pooled SQLite storages (issue 15, cheap runs): the same files and schemas as Dagster's
default SQLite storages, so records written by either are read by the other (Dagster's own
storage classes are the oracle), run shards made from the empty template hold their run."""

from pathlib import Path

import dagster as dg
import pytest

from s2vec_pipeline.service.instance import (
    PooledSqliteEventLogStorage,
    PooledSqliteRunStorage,
    pooled_sqlite_config,
)


@dg.asset(partitions_def=dg.StaticPartitionsDefinition(["a", "b"]))
def numbers(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"v-{context.partition_key}"), metadata={"n": 3}
    )


def _versions(instance: dg.DagsterInstance) -> dict[str, str]:
    records = instance.fetch_materializations(dg.AssetKey("numbers"), limit=100).records
    return {
        r.asset_materialization.partition: r.asset_materialization.tags["dagster/data_version"]
        for r in records
    }


def _open(home: Path, pooled: bool) -> dg.DagsterInstance:
    config = "telemetry:\n  enabled: false\n"
    if pooled:
        config += pooled_sqlite_config(str(home))
    (home / "dagster.yaml").write_text(config)
    return dg.DagsterInstance.local_temp(str(home))


@pytest.mark.slow
def test_records_cross_between_default_and_pooled_storages(tmp_path: Path) -> None:
    with _open(tmp_path, pooled=False) as instance:  # Dagster's own SQLite storages
        assert dg.materialize([numbers], instance=instance, partition_key="a").success
    with _open(tmp_path, pooled=True) as instance:
        assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)
        assert isinstance(instance.run_storage, PooledSqliteRunStorage)
        assert _versions(instance) == {"a": "v-a"}  # written by the default storage
        result = dg.materialize([numbers], instance=instance, partition_key="b")
        assert result.success
        run_id = result.run_id
        assert len(instance.get_runs()) == 2
    shards = tmp_path / "history" / "runs"
    assert (shards / ".empty-run-shard.db").exists()  # the template, hidden from run ids
    with _open(tmp_path, pooled=False) as instance:  # and back: the default reads it all
        assert _versions(instance) == {"a": "v-a", "b": "v-b"}
        assert sorted(instance.event_log_storage.get_all_run_ids()) == sorted(
            r.run_id for r in instance.get_runs()
        )
        events = instance.all_logs(run_id)  # the run's own shard, made from the template
        kinds = {e.dagster_event.event_type_value for e in events if e.dagster_event}
        assert {"PIPELINE_START", "ASSET_MATERIALIZATION", "PIPELINE_SUCCESS"} <= kinds
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
