"""S2 cells: cell math, regions, profiles, per-pixel features, rasterization, previews."""
