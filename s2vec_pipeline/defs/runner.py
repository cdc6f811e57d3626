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
        with dg.DagsterInstance.get() as instance:
            yield instance
    else:
        with dg.DagsterInstance.ephemeral() as instance:
            yield instance


def _user_error(exc: BaseException) -> S2VecError | None:
    """Find the S2VecError a Dagster step failure wraps."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, S2VecError):
            return seen
        user = getattr(seen, "user_exception", None)
        if isinstance(user, S2VecError):
            return user
        seen = seen.__cause__ or seen.__context__
    return None


def materialize(
    settings: PipelineSettings,
    partitions: Sequence[str],
    assets: Sequence[str],
    instance: dg.DagsterInstance,
    log_level: str = "WARNING",
) -> RunReport:
    """Materialize ``assets`` for ``partitions`` (level-6 tokens) in as few runs as possible."""
    from s2vec_pipeline.definitions import build_definitions

    settings.sources_for(partitions)  # every partition must be covered: fail before any run
    add_partitions(instance, list(settings.source_cells))
    job = dg.define_asset_job("s2vec_materialize", selection=dg.AssetSelection.assets(*assets))
    job_def = build_definitions(settings, jobs=[job]).resolve_job_def("s2vec_materialize")
    report = RunReport(partitions=sorted(partitions), assets=list(assets))
    all_keys = instance.get_dynamic_partitions(L6_PARTITIONS_NAME)
    for start, end in contiguous_ranges(all_keys, list(partitions)):
        try:
            result = job_def.execute_in_process(
                instance=instance,
                tags={
                    "dagster/asset_partition_range_start": start,
                    "dagster/asset_partition_range_end": end,
                },
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
            )
        except Exception as e:  # unwrap Dagster's step failure into the user's error
            user = _user_error(e)
            if user is not None:
                raise user from None
            raise
        report.run_ids.append(result.run_id)
        for ev in result.get_asset_check_evaluations():
            name = f"{ev.asset_key.to_user_string()}:{ev.check_name}"
            report.checks[name] = report.checks.get(name, True) and ev.passed
    return report
