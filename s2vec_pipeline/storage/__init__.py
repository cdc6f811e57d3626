"""Storage roots: files (local or object store), Delta tables, manifest, locks, versions."""
