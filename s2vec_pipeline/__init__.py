"""S2Vec geospatial embeddings as an orchestrated Dagster pipeline.

Pure computation lives in plain modules (``s2``, ``taxonomy``, ``osm_extract``,
``cell_features``, ``raster``, ``model``); ``defs`` holds the thin Dagster layer.
"""

__version__ = "0.1.0"
