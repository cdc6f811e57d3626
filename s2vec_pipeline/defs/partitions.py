"""Partitions: S2 level-6 cells (tokens). Dynamic, so adding a source or region needs no code.

One run materializes one partition (Dagster's default backfill: one run per partition): each
partition's materialization then carries its own content-hash data version and Dagster's own
input data versions, which is what makes staleness exact per cell (Dagster cannot yet record a
data version per partition in a multi-partition run, dagster-io/dagster#34013).
"""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.settings import parse_partition_tokens

L6_PARTITIONS_NAME = "l6_cells"
l6_partitions = dg.DynamicPartitionsDefinition(name=L6_PARTITIONS_NAME)


def add_partitions(instance: dg.DagsterInstance, tokens: Iterable[str]) -> list[str]:
    """Register tokens not yet known, sorted; returns the new ones."""
    known = set(instance.get_dynamic_partitions(L6_PARTITIONS_NAME))
    new = sorted(set(tokens) - known)
    if new:
        instance.add_dynamic_partitions(L6_PARTITIONS_NAME, new)
    return new


def invalid_partition_keys(keys: Iterable[str], covered: Iterable[str]) -> list[str]:
    """Keys that are not level-6 tokens covered by a source (typed by hand in the UI, say)."""
    covered = set(covered)
    bad = []
    for k in keys:
        try:
            ok = parse_partition_tokens([k]) == [k] and k in covered
        except S2VecError:
            ok = False
        if not ok:
            bad.append(k)
    return sorted(bad)
