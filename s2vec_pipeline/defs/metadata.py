"""Metadata shared by the table assets: Dagster's standard table keys and check results."""

from __future__ import annotations

from typing import Any

import dagster as dg
import pyarrow as pa

from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.storage import delta_store, tables

OWNERS = ["team:s2vec"]
TABLE_TAGS = {"layer": "table", "storage": "delta"}

_ARROW_TO_NAME = {pa.string(): "string", pa.large_string(): "string", pa.string_view(): "string"}


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return _ARROW_TO_NAME.get(t, str(t))


def column_schema(schema: pa.Schema, descriptions: dict[str, str] | None = None) -> dg.TableSchema:
    """``dagster/column_schema`` from the table's Arrow schema (what was really written)."""
    descriptions = descriptions or {}
    return dg.TableSchema(
        columns=[
            dg.TableColumn(f.name, _type_name(f.type), description=descriptions.get(f.name))
            for f in schema
        ]
    )


def table_metadata(
    settings: PipelineSettings,
    table: str,
    rows: int,
    descriptions: dict[str, str] | None = None,
    version: int | None = None,
) -> dict[str, Any]:
    """Row count, column schema, table name and URI, and ``delta_version``: the version of the
    commit this materialization wrote (``write_partitions``'s answer; later commits of other
    partitions may exist already). Without ``version``, the table's latest version."""
    uri = delta_store.table_uri(settings.root, table)
    return {
        "dagster/row_count": rows,
        "dagster/column_schema": column_schema(
            delta_store.table_schema(settings.root, table), descriptions
        ),
        "dagster/table_name": table,
        "dagster/uri": dg.MetadataValue.path(uri),
        "delta_version": (
            version if version is not None else delta_store.table_version(settings.root, table)
        ),
    }


def check_result(name: str, outcome: tables.CheckOutcome) -> dg.AssetCheckResult:
    passed, details = outcome
    return dg.AssetCheckResult(
        check_name=name,
        passed=passed,
        metadata={
            k: dg.MetadataValue.json(v) if isinstance(v, dict | list) else v
            for k, v in details.items()
        },
    )


def commit_metadata(context: dg.AssetExecutionContext) -> dict[str, str]:
    """Written into the Delta commit, so `DESCRIBE HISTORY` names the Dagster run."""
    return {
        "dagster.run_id": context.run.run_id,
        "dagster.asset": context.asset_key.to_user_string(),
    }
