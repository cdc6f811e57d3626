"""The Dagster layer: thin assets over the pure modules, plus resources, partitions, jobs."""

import warnings

# single_run backfill policies are what make one run read a source once for many partitions;
# Dagster still marks the parameter beta. Silence that one warning, not the category.
warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy` of function `asset`")
