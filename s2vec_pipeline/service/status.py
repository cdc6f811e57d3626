"""``s2vec status``: what a root holds, per table and partition, and what is stale and why.

Everything comes from the Delta tables themselves (partitions, versions, contracts), the
root's files (models, regions, change ledgers) and the Dagster records (data versions and the
one staleness rule, ``defs.automation.stale_partitions``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from s2vec_pipeline.osm import changes as osm_changes
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.storage import delta_store, fs

TABLES = ["osm_features", "cell_features", "raster_tiles", "cell_embeddings", "image_embeddings"]


@dataclass
class PartitionStatus:
    table: str
    partition: str
    data_version: str | None  # as Dagster recorded it (None: no record in this instance)
    stale: list[str] = field(default_factory=list)  # reasons; empty when up to date


@dataclass
class RootStatus:
    root: str
    contract: dict[str, Any] | None
    tables: dict[str, int | None]  # table -> Delta version (None: absent)
    partitions: list[PartitionStatus]
    models: list[str]
    embedding_models: dict[str, list[str]]  # partition -> model versions in cell_embeddings
    regions: dict[str, list[str]]
    sources: dict[str, dict[str, Any]]  # source -> last applied change file, batches
    failed_runs: list[str] = field(default_factory=list)  # recent failed/interrupted runs
    dagster_home: str | None = None  # the instance the CLI reads (runner.instance_home)
    recorded_home: str | None = None  # the instance the root's runs recorded into, if noted

    @property
    def mixed_models(self) -> dict[str, list[str]]:
        """Embedding partitions of another model than the others (an interrupted re-embedding)."""
        models = {m for ms in self.embedding_models.values() for m in ms}
        if len(models) <= 1:
            return {}
        return {k: ms for k, ms in self.embedding_models.items()}

    def text(self) -> str:
        lines = [f"root {self.root}"]
        if self.contract:
            c = self.contract
            lines.append(
                f"profile {c.get('profile')} (images level {c.get('image_level')}, pixels "
                f"level {c.get('pixel_level')}), taxonomy {c.get('taxonomy_version')}"
            )
        lines.append("\nsources:")
        for src, info in self.sources.items():
            last = info["last_change"] or "no change file applied"
            lines.append(f"  {src}: {last} (batches {info['batches']})")
        lines.append(
            "regions: "
            + ("; ".join(f"{n} ({', '.join(c)})" for n, c in self.regions.items()) or "none")
        )
        lines.append(f"models: {', '.join(self.models) or 'none'}")
        lines.append(f"\n{'table':<17} {'delta':>5}  {'partition':<9} {'data version':<34} state")
        for p in self.partitions:
            state = "stale: " + "; ".join(p.stale) if p.stale else "up to date"
            if p.data_version is None:
                state = (
                    "not recorded by Dagster here (an interrupted run, or another "
                    "DAGSTER_HOME): s2vec materialize recomputes it"
                )
            lines.append(
                f"{p.table:<17} {self.tables[p.table]!s:>5}  {p.partition:<9} "
                f"{(p.data_version or '-'):<34} {state}"
            )
        hint = self.other_home_hint()
        if hint:
            lines.append(f"\n{hint}")
        if self.failed_runs:
            lines.append("\nfailed or interrupted runs (newest first):")
            lines += [f"  {r}" for r in self.failed_runs]
        if self.mixed_models:
            lines.append(
                "\nwarning: embeddings of several models: "
                + "; ".join(f"{k}: {', '.join(m)}" for k, m in self.mixed_models.items())
                + " (s2vec materialize --stages embed re-embeds with one)"
            )
        return "\n".join(lines)

    def other_home_hint(self) -> str | None:
        """Where the records are when this instance lacks some and the root names another."""
        unrecorded = any(p.data_version is None for p in self.partitions)
        if not unrecorded or not self.recorded_home or self.recorded_home == self.dagster_home:
            return None
        where = f"the Dagster instance {self.recorded_home} recorded this root's runs"
        if Path(self.recorded_home) == Path(self.root) / "_dagster":
            return f"{where}: run s2vec status without DAGSTER_HOME to read them"
        return f"{where}: run DAGSTER_HOME={self.recorded_home} s2vec status to read them"


def root_status(settings: PipelineSettings, instance: dg.DagsterInstance) -> RootStatus:
    from s2vec_pipeline.cells.regions import RegionRegistry
    from s2vec_pipeline.definitions import build_definitions
    from s2vec_pipeline.defs.automation import stale_partitions
    from s2vec_pipeline.model.registry import list_models
    from s2vec_pipeline.service.instance import recorded_dagster_home
    from s2vec_pipeline.service.integrity import lost_data
    from s2vec_pipeline.service.runner import instance_home

    defs = build_definitions(settings)
    versions = {t: delta_store.table_version(settings.root, t) for t in TABLES}
    rows: list[PartitionStatus] = []
    for table in TABLES:
        if versions[table] is None:
            continue
        keys = delta_store.partition_keys(settings.root, table)
        stale = stale_partitions(instance, defs, table, keys)
        # partitions Dagster recorded but the table lost (or lost files of): stale, with why
        recorded = instance.get_materialized_partitions(dg.AssetKey(table))
        for k in sorted(set(keys) | recorded):
            lost = lost_data(instance, settings.root, table, k)
            if lost:
                stale[k] = [f"lost: {lost}", *stale.get(k, [])]
        keys = sorted(set(keys) | set(stale))
        for k in keys:
            record = instance.get_latest_data_version_record(dg.AssetKey(table), False, k)
            version = (
                record.asset_materialization.tags.get("dagster/data_version")
                if record and record.asset_materialization
                else None
            )
            rows.append(PartitionStatus(table, k, version, stale.get(k, [])))
    embedding_models: dict[str, list[str]] = {}
    if versions["cell_embeddings"] is not None:
        df = delta_store.read_partitions(
            settings.root, "cell_embeddings", columns=["parent_l6", "model_version"]
        ).unique()
        for k, m in df.sort("parent_l6", "model_version").iter_rows():
            embedding_models.setdefault(k, []).append(m)
    sources = {}
    for src in settings.sources:
        applied = osm_changes.applied_changes(settings.root, src)
        sources[src] = {
            "last_change": applied[-1].name if applied else None,
            "batches": applied[-1].batch if applied else 0,
        }
    contract = next(
        (delta_store.table_contract(settings.root, t) for t in TABLES if versions[t] is not None),
        None,
    )
    return RootStatus(
        root=settings.root if fs.is_object_store(settings.root) else str(Path(settings.root)),
        contract=contract,
        tables=versions,
        partitions=rows,
        models=list_models(settings.root),
        embedding_models=embedding_models,
        regions={r.name: list(r.cells) for r in RegionRegistry(settings.root).list()},
        sources=sources,
        failed_runs=failed_runs(instance),
        dagster_home=os.path.abspath(instance_home(settings.root)),
        recorded_home=recorded_dagster_home(settings.root),
    )


def failed_runs(instance: dg.DagsterInstance, limit: int = 10) -> list[str]:
    """One line per recent run that failed or was interrupted (reaped: its process is gone)
    and was not followed by a successful run of the same job and partition."""
    lines, succeeded = [], set()
    for run in instance.get_runs(limit=200):  # newest first
        key = (run.job_name, run.tags.get("dagster/partition"))
        if run.status == dg.DagsterRunStatus.SUCCESS:
            succeeded.add(key)
        elif run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            if key in succeeded:
                continue
            record = instance.get_run_record_by_id(run.run_id)
            when = record.end_time or record.create_timestamp.timestamp() if record else None
            stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(when)) if when else "?"
            lines.append(
                f"{run.run_id[:8]} {run.job_name} {key[1] or ''} {run.status.value.lower()} "
                f"{stamp} UTC{' ' + _failure(instance, run.run_id)}"
            )
            succeeded.add(key)  # one line per job and partition
        if len(lines) >= limit:
            break
    return lines


def _failure(instance: dg.DagsterInstance, run_id: str) -> str:
    """The run's failure message (the reaper's "interrupted: …" line), when it has one."""
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    message = events[-1].message if events else ""
    return f"({message.splitlines()[0][:160]})" if message else ""
