"""The Dagster layer: thin assets over the pure modules, plus resources, partitions, jobs."""
