"""Using the embeddings: evaluation probes, areas, reconstruction quality, maps, SQL."""
