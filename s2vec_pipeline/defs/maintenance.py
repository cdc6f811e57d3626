"""Weekly maintenance of the Delta tables: the ``maintain_tables`` job and its schedule.

The job runs :func:`s2vec_pipeline.storage.maintenance.maintain_root` on the storage root of the
``s2vec`` resource (compaction, vacuum, staging leftovers of killed writes; retention rules in
that module) and reports files and bytes before and after per table as output metadata and in
the run log. ``s2vec maintain --root DIR`` runs the same function in the foreground.
"""

import dagster as dg
from pydantic import Field

from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.settings import ENV_MAINTAIN_CRON, schedule_cron
from s2vec_pipeline.storage.maintenance import (
    DEFAULT_RETENTION_HOURS,
    format_report,
    maintain_root,
)

DEFAULT_MAINTAIN_CRON = "0 4 * * 6"  # weekly, Saturday 04:00 UTC


class MaintainConfig(dg.Config):
    retention_hours: float = Field(
        default=DEFAULT_RETENTION_HOURS,
        description="Keep unreferenced files younger than this many hours. The default (7 "
        "days) is safe beside running writers and readers of older table versions; shorter "
        "is safe only when nothing else uses the root meanwhile.",
    )


@dg.op(
    description="Compact small files, vacuum unreferenced files and delete staging leftovers "
    "of killed writes in every Delta table under the storage root; report files and bytes "
    "before and after.",
    tags={"kind": "deltalake"},
)
def maintain_delta_tables(
    context: dg.OpExecutionContext, config: MaintainConfig, s2vec: S2VecResource
) -> dg.Output[list]:
    root = s2vec.settings().root
    reports = maintain_root(root, config.retention_hours)
    text = format_report(reports)
    context.log.info(f"maintenance of {root}:\n{text}")
    rows = [r.as_dict() for r in reports]
    header = "| table | files before | files after | bytes before | bytes after | active files |"
    lines = [header, "|---|---:|---:|---:|---:|---|"]
    for r in reports:
        lines.append(
            f"| {r.table} | {r.files_before} | {r.files_after} | {r.bytes_before} | "
            f"{r.bytes_after} | {r.active_files_before} → {r.active_files_after} |"
        )
    return dg.Output(
        rows,
        metadata={
            "root": dg.MetadataValue.path(root),
            "retention_hours": config.retention_hours,
            "tables": len([r for r in reports if r.version_before >= 0]),
            "files_before": sum(r.files_before for r in reports),
            "files_after": sum(r.files_after for r in reports),
            "bytes_before": sum(r.bytes_before for r in reports),
            "bytes_after": sum(r.bytes_after for r in reports),
            "report": dg.MetadataValue.md("\n".join(lines)),
        },
    )


@dg.job(
    name="maintain_tables",
    description="Weekly Delta maintenance of every table under the storage root "
    "(s2vec maintain runs the same in the foreground).",
    tags={"s2vec/stage": "maintenance"},
)
def maintain_tables() -> None:
    maintain_delta_tables()


def weekly_maintenance_schedule(cron: str | None = None) -> dg.ScheduleDefinition:
    """``maintain_tables`` every week (``S2VEC_MAINTAIN_CRON``, default Saturday 04:00 UTC)."""
    return dg.ScheduleDefinition(
        name="weekly_maintenance",
        cron_schedule=cron or schedule_cron(ENV_MAINTAIN_CRON, DEFAULT_MAINTAIN_CRON),
        execution_timezone="UTC",
        job=maintain_tables,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Compact and vacuum every Delta table (retention: 7 days by default)",
    )
