"""Run assets through Dagster from Python (the CLI and the tests use this, the UI does the same).

Selected partitions are grouped into contiguous key ranges and each range runs as one Dagster
run, so a source is read once per range rather than once per partition.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import dagster as dg

from s2vec_pipeline.defs.partitions import L6_PARTITIONS_NAME, add_partitions, contiguous_ranges
from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.settings import PipelineSettings

# CLI stage name -> asset keys, in pipeline order.
STAGES: dict[str, list[str]] = {
    "extract": ["osm_features"],
    "features": ["cell_features"],
    "raster": ["raster_tiles"],
    "train": ["mae_model"],
    "embed": ["cell_embeddings", "image_embeddings"],
}
UNPARTITIONED = {"mae_model", "osm_sources"}
# The op that computes each asset (the two embedding tables come from one multi-asset).
OP_OF = {
    "mae_model": "mae_model",
    "cell_embeddings": "embeddings",
    "image_embeddings": "embeddings",
}


@dataclass
class RunReport:
    run_ids: list[str] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)
    assets: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)  # "asset:check" -> passed

    @property
    def checks_failed(self) -> list[str]:
        return [name for name, passed in self.checks.items() if not passed]


def parse_stages(stages: Sequence[str]) -> list[str]:
    names = [s.strip() for s in stages if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise S2VecError(f"unknown stage(s) {unknown or stages}: choose from {list(STAGES)}")
    return [a for stage in STAGES if stage in names for a in STAGES[stage]]


@contextlib.contextmanager
def dagster_instance() -> Iterator[dg.DagsterInstance]:
    """The instance under $DAGSTER_HOME when set (the UI then shows these runs), else an
    in-memory one: runs are real Dagster runs, but nothing outlives the command (and nothing
    pays SQLite's per-event commits, ~3 s of a ~4 s small run here)."""
    if os.environ.get("DAGSTER_HOME"):
        from s2vec_pipeline.instance import open_dagster_instance

        # An unreachable PostgreSQL or wrong credentials: InstanceUnavailableError (exit 2).
        with open_dagster_instance() as instance:
            yield instance
    else:
        with dg.DagsterInstance.ephemeral() as instance:
            yield instance


@contextlib.contextmanager
def persistent_instance(root: str) -> Iterator[dg.DagsterInstance]:
    """The instance under $DAGSTER_HOME when set, else one kept under ``<root>/_dagster``: the
    refresh compares data versions with the ones recorded by earlier runs, so they must last."""
    if os.environ.get("DAGSTER_HOME"):
        with dg.DagsterInstance.get() as instance:
            yield instance
    else:
        home = os.path.join(root, "_dagster")
        os.makedirs(home, exist_ok=True)
        with dg.DagsterInstance.local_temp(home) as instance:
            yield instance


def _user_error(exc: BaseException) -> S2VecError | None:
    """Find the S2VecError a Dagster step failure wraps (chains can loop: track visits)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, S2VecError):
            return e
        todo += [getattr(e, "user_exception", None), e.__cause__, e.__context__]
    return None


def _phases(assets: Sequence[str]) -> list[list[str]]:
    """Consecutive runs of partitioned / unpartitioned assets (a job cannot mix them)."""
    phases: list[list[str]] = []
    for a in assets:
        if phases and (a in UNPARTITIONED) == (phases[-1][0] in UNPARTITIONED):
            phases[-1].append(a)
        else:
            phases.append([a])
    return phases


def materialize(
    settings: PipelineSettings,
    partitions: Sequence[str],
    assets: Sequence[str],
    instance: dg.DagsterInstance,
    log_level: str = "WARNING",
    op_config: dict[str, dict] | None = None,
) -> RunReport:
    """Materialize ``assets`` for ``partitions`` (level-6 tokens) in as few runs as possible.

    ``op_config`` maps op names (``mae_model``, ``embeddings``) to their run config.
    """
    from s2vec_pipeline.definitions import build_definitions

    settings.sources_for(partitions)  # every partition must be covered: fail before any run
    add_partitions(instance, list(settings.source_cells))
    report = RunReport(partitions=sorted(partitions), assets=list(assets))
    all_keys = instance.get_dynamic_partitions(L6_PARTITIONS_NAME)
    for n, phase in enumerate(_phases(assets)):
        name = f"s2vec_materialize_{n}"
        job = dg.define_asset_job(name, selection=dg.AssetSelection.assets(*phase))
        job_def = build_definitions(settings, jobs=[job]).resolve_job_def(name)
        ops = {OP_OF[a] for a in phase if a in OP_OF}
        run_config: dict = {"loggers": {"console": {"config": {"log_level": log_level}}}}
        if ops and op_config:
            run_config["ops"] = {op: {"config": op_config[op]} for op in ops if op in op_config}
        if phase[0] in UNPARTITIONED:
            ranges: list[dict[str, str]] = [{}]
        else:
            ranges = [
                {
                    "dagster/asset_partition_range_start": start,
                    "dagster/asset_partition_range_end": end,
                }
                for start, end in contiguous_ranges(all_keys, list(partitions))
            ]
        for tags in ranges:
            try:
                result = job_def.execute_in_process(
                    instance=instance, tags=tags, run_config=run_config
                )
            except Exception as e:  # unwrap Dagster's step failure into the user's error
                user = _user_error(e)
                if user is not None:
                    raise user from None
                raise
            report.run_ids.append(result.run_id)
            for ev in result.get_asset_check_evaluations():
                name_ = f"{ev.asset_key.to_user_string()}:{ev.check_name}"
                report.checks[name_] = report.checks.get(name_, True) and ev.passed
    return report
