"""OSM input: reading extracts, cutting large ones, per-pixel geometry, taxonomy, change files."""
