"""PNG preview of a partition's raster: its images placed at their S2 (i, j) positions.

Red = POI counts, green = areas, blue = line lengths (each scaled to its 99th percentile), so
a city's street grid, buildings and parks are recognisable. The layout follows S2's (i, j)
axes, which are rotated against north-up depending on the cube face.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from s2vec_pipeline import s2


def partition_mosaic(
    image_ids: np.ndarray,
    tensors: np.ndarray,
    measures: list[str],
    partition_level: int = 6,
    max_side: int = 1024,
) -> Image.Image:
    """Compose (n, C, S, S) tensors of images into one RGB picture of their partition."""
    side = tensors.shape[-1]
    ids = s2.from_signed(np.asarray(image_ids, dtype=np.int64))
    r, c = s2.child_position(ids, partition_level)
    r, c = r - r.min(), c - c.min()
    h, w = int(r.max() + 1) * side, int(c.max() + 1) * side
    canvas = np.zeros((3, h, w), dtype=np.float32)
    offs = np.arange(side)
    rr = (r[:, None, None] * side + offs[None, :, None]).repeat(side, axis=2)
    cc = (c[:, None, None] * side + offs[None, None, :]).repeat(side, axis=1)
    m = np.asarray(measures)
    for band, measure in enumerate(("count", "area_m2", "length_m")):
        sel = np.flatnonzero(m == measure)
        if not len(sel):
            continue
        canvas[band, rr, cc] = tensors[:, sel].sum(axis=1)  # (n, S, S) scattered in one go
    for band in range(3):
        nz = canvas[band][canvas[band] > 0]
        scale = np.percentile(nz, 99) if nz.size else 1.0
        canvas[band] = np.clip(canvas[band] / max(scale, 1e-6), 0, 1)
    img = Image.fromarray((canvas.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")
    factor = max(1, min(8, max_side // max(h, w)))
    return img.resize((w * factor, h * factor), Image.Resampling.NEAREST)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """Inline markdown image, rendered by the Dagster UI's metadata panel."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
