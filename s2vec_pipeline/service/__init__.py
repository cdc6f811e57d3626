"""Running Dagster: the instance, launching runs from the CLI, status, integrity, Kubernetes."""
