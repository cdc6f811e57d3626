"""PNG preview of a partition's raster: its images placed at their S2 (i, j) positions.

Red = POI counts, green = areas, blue = line lengths (each the sum of that measure's log1p
channels, scaled to its 99th percentile), so a city's street grid, buildings and parks are
recognisable. The layout follows S2's (i, j) axes: rows are i (downwards), columns are j
(rightwards). Those axes point in different compass directions on each cube face, so the
picture is rotated against north-up by a face-dependent angle (S2's faces are all
right-handed, so in practice a rotation, never a mirror; the panel would say so otherwise).
A panel under the mosaic says all this: the colour legend, north and east arrows measured at
the partition's centre, the S2 axes, and the pixel size with a scale bar.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from s2vec_pipeline.cells import s2, s2_geometry

EARTH_RADIUS_M = 6_371_008.8
BANDS = (
    ("count", (230, 40, 40), "red: POI counts (sum of log1p of the count channels)"),
    ("area_m2", (40, 200, 40), "green: areas, square metres (sum of log1p of the area channels)"),
    ("length_m", (60, 90, 255), "blue: line lengths, metres (sum of log1p of the length channels)"),
)
PANEL_HEIGHT = 150
PANEL_MIN_WIDTH = 640


@dataclass(frozen=True)
class Orientation:
    """Compass directions in picture coordinates (x right = +col, y down = +row)."""

    north: tuple[float, float]
    east: tuple[float, float]
    mirrored: bool  # east is not 90° clockwise from north: north-up needs a mirror
    pixel_m: float  # mean edge length of a pixel cell, metres
    pixel_level: int
    face: int


def _haversine_m(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Great-circle distance between [lat, lng] degree pairs."""
    lat1, lng1, lat2, lng2 = (np.radians(v) for v in (a[..., 0], a[..., 1], b[..., 0], b[..., 1]))
    h = (
        np.sin((lat2 - lat1) / 2) ** 2
        + np.cos(lat1) * np.cos(lat2) * np.sin((lng2 - lng1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(h))


def orientation(image_id: int, side: int) -> Orientation:
    """North/east as unit vectors in the raster's (col, row) frame at an image's centre, and
    the pixel size, from the S2 geometry of the image's central pixels."""
    image = s2.from_signed(np.array([image_id], dtype=np.int64))
    image_level = int(s2.cell_level(image)[0])
    pixel_level = image_level + int(round(math.log2(side)))
    grid = s2.children_grid(image, pixel_level)[0]  # (S, S): grid[row, col]
    mid = side // 2 - 1 if side > 1 else 0
    nxt = min(mid + 1, side - 1)
    lat0, lng0 = (float(v) for v in s2_geometry.cell_center_latlng(grid[mid, mid]))
    lat_r, lng_r = (float(v) for v in s2_geometry.cell_center_latlng(grid[nxt, mid]))  # +1 row
    lat_c, lng_c = (float(v) for v in s2_geometry.cell_center_latlng(grid[mid, nxt]))  # +1 col
    coslat = math.cos(math.radians(lat0))
    # columns of m: the (north, east) displacement of one step along +col and along +row
    m = np.array([[lat_c - lat0, lat_r - lat0], [(lng_c - lng0) * coslat, (lng_r - lng0) * coslat]])
    inv = np.linalg.inv(m)
    north, east = inv[:, 0], inv[:, 1]
    north, east = north / np.linalg.norm(north), east / np.linalg.norm(east)
    # On a north-up map (y down) east is 90° clockwise from north: cross(north, east) > 0.
    mirrored = bool(north[0] * east[1] - north[1] * east[0] < 0)
    corners = s2_geometry.cell_corners_latlng(grid[mid, mid : mid + 1])[0]
    edges = _haversine_m(corners, np.roll(corners, -1, axis=0))
    face = int(s2.face_ij(image)[0][0])
    return Orientation(
        (float(north[0]), float(north[1])),
        (float(east[0]), float(east[1])),
        mirrored,
        float(edges.mean()),
        pixel_level,
        face,
    )


def band_sums(tensors: np.ndarray, measures: list[str]) -> np.ndarray:
    """(n, 3, S, S): per image, the sum of the count, area and length channels (red, green,
    blue), in the tensors' log1p units."""
    m = np.asarray(measures)
    out = np.zeros((tensors.shape[0], 3, *tensors.shape[2:]), dtype=np.float32)
    for band, (measure, _, _) in enumerate(BANDS):
        sel = np.flatnonzero(m == measure)
        if len(sel):
            out[:, band] = tensors[:, sel].sum(axis=1)
    return out


def mosaic_rgb(
    image_ids: np.ndarray, tensors: np.ndarray, measures: list[str], partition_level: int = 6
) -> np.ndarray:
    """(H, W, 3) uint8 mosaic, one picture pixel per raster pixel, without any annotation."""
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
    for band, (measure, _, _) in enumerate(BANDS):
        sel = np.flatnonzero(m == measure)
        if not len(sel):
            continue
        canvas[band, rr, cc] = tensors[:, sel].sum(axis=1)  # (n, S, S) scattered in one go
    for band in range(3):
        nz = canvas[band][canvas[band] > 0]
        scale = np.percentile(nz, 99) if nz.size else 1.0
        canvas[band] = np.clip(canvas[band] / max(scale, 1e-6), 0, 1)
    return (canvas.transpose(1, 2, 0) * 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _arrow(
    draw: ImageDraw.ImageDraw,
    c: tuple[float, float],
    v: tuple[float, float],
    label: str,
    length: float,
    font: ImageFont.ImageFont,
    colour: str = "black",
) -> None:
    x0, y0 = c
    x1, y1 = x0 + v[0] * length, y0 + v[1] * length
    draw.line([x0, y0, x1, y1], fill=colour, width=3)
    ang = math.atan2(y1 - y0, x1 - x0)
    for da in (2.6, -2.6):
        draw.line(
            [x1, y1, x1 + 9 * math.cos(ang + da), y1 + 9 * math.sin(ang + da)], fill=colour, width=3
        )
    draw.text((x1 + v[0] * 12 - 5, y1 + v[1] * 12 - 7), label, fill=colour, font=font)


def _nice_length(target_m: float) -> float:
    base = 10 ** math.floor(math.log10(max(target_m, 1e-3)))
    for m in (5, 2, 1):
        if m * base <= target_m:
            return m * base
    return base


def legend_panel(width: int, orient: Orientation, factor: int) -> Image.Image:
    """The strip under the mosaic: colours, compass, S2 axes, pixel size and scale bar."""
    panel = Image.new("RGB", (width, PANEL_HEIGHT), "white")
    d = ImageDraw.Draw(panel)
    font, small = _font(13), _font(11)
    y = 8
    for _, colour, text in BANDS:
        d.rectangle([8, y + 2, 20, y + 14], fill=colour, outline="black")
        d.text((26, y), text, fill="black", font=font)
        y += 18
    d.text(
        (8, y), "each scaled to its 99th percentile; black = empty pixel", fill="black", font=small
    )
    y += 18
    d.text(
        (8, y),
        f"rows: S2 i axis (down), columns: S2 j axis (right); cube face {orient.face}",
        fill="black",
        font=small,
    )
    y += 16
    mirror = "; north-up needs a mirror, not only a rotation" if orient.mirrored else ""
    d.text((8, y), f"N / E arrows: true directions at the centre{mirror}", fill="black", font=small)
    # compass
    cx, cy = width - 70, PANEL_HEIGHT // 2
    d.ellipse([cx - 48, cy - 48, cx + 48, cy + 48], outline=(180, 180, 180))
    _arrow(d, (cx, cy), orient.north, "N", 36, font, "black")
    _arrow(d, (cx, cy), orient.east, "E", 26, font, (110, 110, 110))
    # scale bar
    px_m = orient.pixel_m / factor  # metres per picture pixel
    length = _nice_length(min(width - 230, 260) * px_m)
    bar = length / px_m
    x0, yb = 8, PANEL_HEIGHT - 14
    d.rectangle([x0, yb - 4, x0 + bar, yb], fill="black")
    label = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    d.text(
        (x0 + bar + 8, yb - 10),
        f"{label}   (1 pixel = level-{orient.pixel_level} cell ~ {orient.pixel_m:.0f} m)",
        fill="black",
        font=small,
    )
    return panel


def partition_mosaic(
    image_ids: np.ndarray,
    tensors: np.ndarray,
    measures: list[str],
    partition_level: int = 6,
    max_side: int = 1024,
    annotate: bool = True,
) -> Image.Image:
    """Compose (n, C, S, S) tensors of images into one RGB picture of their partition, with
    a legend / compass / scale panel underneath (``annotate=False``: the mosaic alone)."""
    rgb = mosaic_rgb(image_ids, tensors, measures, partition_level)
    h, w = rgb.shape[:2]
    factor = max(1, min(8, max_side // max(h, w)))
    img = Image.fromarray(rgb, "RGB").resize((w * factor, h * factor), Image.Resampling.NEAREST)
    if not annotate:
        return img
    ids = np.asarray(image_ids, dtype=np.int64)
    centres = np.array(s2_geometry.cell_center_latlng(s2.from_signed(ids))).T
    central = int(np.argmin(((centres - centres.mean(axis=0)) ** 2).sum(axis=1)))
    orient = orientation(int(ids[central]), tensors.shape[-1])
    width = max(img.width, PANEL_MIN_WIDTH)
    out = Image.new("RGB", (width, img.height + PANEL_HEIGHT), "white")
    out.paste(img, (0, 0))
    out.paste(legend_panel(width, orient, factor), (0, img.height))
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """Inline markdown image, rendered by the Dagster UI's metadata panel."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
