"""Partitions: S2 level-6 cells (tokens). Dynamic, so adding a source or region needs no code."""

import dagster as dg

L6_PARTITIONS_NAME = "l6_cells"
l6_partitions = dg.DynamicPartitionsDefinition(name=L6_PARTITIONS_NAME)


def add_partitions(instance: dg.DagsterInstance, tokens: list[str]) -> list[str]:
    """Register tokens not yet known, sorted (a UI backfill launches one run per key range)."""
    known = set(instance.get_dynamic_partitions(L6_PARTITIONS_NAME))
    new = sorted(set(tokens) - known)
    if new:
        instance.add_dynamic_partitions(L6_PARTITIONS_NAME, new)
    return new


def contiguous_ranges(all_keys: list[str], selected: list[str]) -> list[tuple[str, str]]:
    """Split ``selected`` into runs of consecutive keys in ``all_keys`` order (one run each)."""
    pos = {k: i for i, k in enumerate(all_keys)}
    idx = sorted(pos[k] for k in set(selected))
    ranges: list[tuple[str, str]] = []
    for i in idx:
        if ranges and pos[ranges[-1][1]] == i - 1:
            ranges[-1] = (ranges[-1][0], all_keys[i])
        else:
            ranges.append((all_keys[i], all_keys[i]))
    return ranges
