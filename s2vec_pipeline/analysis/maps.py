"""Maps of embeddings and raster channels on the cells' true S2 polygons.

* ``embedding_layer``: the first three principal components of the cells' embeddings as red,
  green and blue (each stretched between its 1st and 99th percentile), so cells with similar
  embeddings get similar colours;
* ``channel_layer``: one ``cell_features`` channel per pixel (every pixel of every image with
  data; empty pixels are 0), on a colour scale with a colour bar.

A layer renders as a PNG (matplotlib: polygons in longitude/latitude, north up, with a legend,
coordinates and a scale bar) or as one self-contained HTML file (inline SVG and JavaScript, no
tiles, no network: it opens offline) that shows each cell's token and top channels on hover.
Polygons are the cells' four S2 vertices (``s2_geometry.cell_corners_latlng``); at pixel levels the
edges' curvature is far below a screen pixel.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from s2vec_pipeline.analysis.cell_matrices import resolve_model_version
from s2vec_pipeline.cells import s2, s2_geometry
from s2vec_pipeline.errors import InvalidCellError, MissingInputError, S2VecError
from s2vec_pipeline.storage import delta_store, fs

#: Above this many cells a map would be unreadable and slow: ask for fewer cells.
MAX_CELLS = 400_000
EARTH_RADIUS_M = 6_371_008.8
UNITS = {"count": "count", "length_m": "m", "area_m2": "m²"}


class MapError(S2VecError):
    """A map cannot be drawn for that selection (no data, too many cells, bad channel)."""


@dataclass
class MapLayer:
    """Cells with one colour each, plus what the legend must say."""

    title: str
    tokens: np.ndarray  # (n,) pixel tokens
    corners: np.ndarray  # (n, 4, 2) [lat, lng] degrees
    colors: np.ndarray  # (n, 3) RGB in [0, 1]
    legend: list[tuple[tuple[float, float, float], str]]  # (colour, meaning)
    hover: list[str]  # (n,) "channel value unit; ..." for the HTML map
    values: np.ndarray | None = None  # channel maps: the value per cell
    value_label: str = ""
    vmax: float = 1.0
    notes: list[str] = field(default_factory=list)


# --- selecting cells ---------------------------------------------------------------------


def _selection(
    root: str | os.PathLike, tokens: Sequence[str], table: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(partitions to read, selection ids, their levels) for tokens of any level."""
    if not tokens:
        raise MapError("give at least one cell token (--cells) or a region (--region)")
    ids = s2.from_token(np.asarray(list(tokens), dtype=str))
    levels = s2.cell_level(ids)
    parts: set[str] = set()
    existing = delta_store.partition_keys(root, table)
    for cid, lvl in zip(ids, levels, strict=True):
        if lvl >= 6:
            parts.add(str(s2.to_token(s2.parent(cid, 6))))
        else:
            kids = s2.from_token(np.asarray(existing, dtype=str)) if existing else np.zeros(0)
            inside = [k for k, p in zip(existing, kids, strict=True) if s2.parent(p, lvl) == cid]
            parts.update(inside)
    return sorted(parts), ids, levels


def _inside(cell_ids: np.ndarray, sel_ids: np.ndarray, sel_levels: np.ndarray) -> np.ndarray:
    """Mask of ``cell_ids`` lying inside any selected cell."""
    keep = np.zeros(len(cell_ids), dtype=bool)
    for lvl in np.unique(sel_levels):
        wanted = sel_ids[sel_levels == lvl]
        keep |= np.isin(s2.parent(cell_ids, int(lvl)), wanted)
    return keep


def _channel_measures(root: str | os.PathLike, channels: list[str]) -> list[str]:
    """Measure of each channel: from the packaged taxonomy when the root was built with it,
    else from the channel name's unit suffix (``_m2``, ``_m``)."""
    from s2vec_pipeline.osm.taxonomy import load_taxonomy

    tax = load_taxonomy(None)
    contract = delta_store.table_contract(root, "cell_features") or {}
    if contract.get("taxonomy_version") == tax.version:
        by_name = {c.name: c.measure for c in tax.channels}
        return [by_name[c] for c in channels]
    return [
        "area_m2" if c.endswith("_m2") else "length_m" if c.endswith("_m") else "count"
        for c in channels
    ]


def _hover_text(
    root: str | os.PathLike, cell_ids: np.ndarray, partitions: list[str], top: int = 4
) -> list[str]:
    """The cell's largest channels (count channels first by value, then lengths, areas)."""
    contract = delta_store.table_contract(root, "cell_features")
    if contract is None:
        return ["" for _ in cell_ids]
    channels = list(contract["channels"])
    units = [UNITS[m] for m in _channel_measures(root, channels)]
    df = delta_store.read_partitions(root, "cell_features", partitions, ["cell_id", *channels])
    lookup = dict(zip(df["cell_id"].to_list(), range(df.height), strict=True))
    values = df.select(channels).to_numpy()
    out = []
    for cid in s2.to_signed(cell_ids).tolist():
        row = lookup.get(cid)
        if row is None:
            out.append("no features")
            continue
        v = values[row]
        # rank by log1p so a few POIs are not hidden behind hundreds of metres of road
        order = [k for k in np.argsort(-np.log1p(v), kind="stable")[:top] if v[k] > 0]
        out.append("; ".join(f"{channels[k]} {v[k]:.4g} {units[k]}" for k in order))
    return out


# --- layers ------------------------------------------------------------------------------


def embedding_layer(
    root: str | os.PathLike, cells: Sequence[str], model_version: str | None = None
) -> MapLayer:
    """The selected cells' embeddings, first three principal components as RGB."""
    from sklearn.decomposition import PCA

    table = "cell_embeddings"
    if not delta_store.table_exists(root, table):
        raise MissingInputError(
            f"no cell_embeddings table under {root}: run s2vec materialize --stages embed first"
        )
    partitions, sel_ids, sel_levels = _selection(root, cells, table)
    version = resolve_model_version(root, partitions, model_version)
    df = (
        delta_store.scan_table(root, table)
        .filter(pl.col("parent_l6").is_in(partitions) & (pl.col("model_version") == version))
        .select("cell_id", "embedding")
        .collect()
    )
    ids = s2.from_signed(df["cell_id"].to_numpy())
    keep = _inside(ids, sel_ids, sel_levels)
    ids, df = ids[keep], df.filter(pl.Series(keep))
    _check_size(ids, cells, "embedded")
    emb = np.asarray(df["embedding"].list.to_array(len(df["embedding"][0])).to_numpy())
    n_comp = min(3, emb.shape[1], len(emb))
    pca = PCA(n_comp, random_state=0).fit(emb)
    comps = pca.transform(emb)
    rgb = np.zeros((len(emb), 3))
    for k in range(n_comp):
        lo, hi = np.percentile(comps[:, k], [1, 99])
        rgb[:, k] = np.clip((comps[:, k] - lo) / max(hi - lo, 1e-12), 0, 1)
    share = [f"{100 * r:.0f}%" for r in pca.explained_variance_ratio_] + ["0%"] * (3 - n_comp)
    legend = [
        ((1.0, 0.0, 0.0), f"red: principal component 1 ({share[0]} of variance)"),
        ((0.0, 1.0, 0.0), f"green: component 2 ({share[1]})"),
        ((0.0, 0.0, 1.0), f"blue: component 3 ({share[2]})"),
        ((0.5, 0.5, 0.5), "similar colour = similar embedding"),
    ]
    return MapLayer(
        title=f"S2Vec embeddings, model {version}: {len(ids):,} cells",
        tokens=s2.to_token(ids),
        corners=s2_geometry.cell_corners_latlng(ids),
        colors=rgb,
        legend=legend,
        hover=_hover_text(root, ids, partitions),
    )


def channel_layer(root: str | os.PathLike, cells: Sequence[str], channel: str) -> MapLayer:
    """One raster channel per pixel of the images with data in the selection."""
    from matplotlib import colormaps

    contract = delta_store.table_contract(root, "cell_features")
    if contract is None:
        raise MissingInputError(
            f"no cell_features table under {root}: run s2vec materialize --root {root} first"
        )
    channels = list(contract["channels"])
    if channel not in channels:
        close = [c for c in channels if channel.lower() in c.lower()][:5]
        raise MapError(
            f"unknown channel {channel!r}: "
            + (
                f"did you mean {', '.join(close)}?"
                if close
                else f"one of {len(channels)} channels such as {', '.join(channels[:3])}"
            )
        )
    measure = _channel_measures(root, channels)[channels.index(channel)]
    partitions, sel_ids, sel_levels = _selection(root, cells, "cell_features")
    df = delta_store.read_partitions(
        root, "cell_features", partitions, ["image_token", "cell_id", channel]
    )
    images = np.unique(df["image_token"].to_numpy().astype(str))
    if len(images) == 0:
        raise MapError(f"no cell_features rows in partitions {partitions} for {list(cells)}")
    pixel_level = int(contract["pixel_level"])
    ids = s2.children_grid(s2.from_token(images), pixel_level).ravel()
    ids = ids[_inside(ids, sel_ids, sel_levels)]
    _check_size(ids, cells, "with data")
    lookup = dict(zip(df["cell_id"].to_list(), df[channel].to_list(), strict=True))
    values = np.array([lookup.get(c, 0.0) for c in s2.to_signed(ids).tolist()])
    nonzero = values[values > 0]
    vmax = float(np.percentile(nonzero, 99)) if nonzero.size else 1.0
    cmap = colormaps["viridis"]
    rgb = np.asarray(cmap(np.clip(values / vmax, 0, 1)))[:, :3]
    unit = UNITS[measure]
    return MapLayer(
        title=f"{channel} per level-{pixel_level} cell: {len(ids):,} cells",
        tokens=s2.to_token(ids),
        corners=s2_geometry.cell_corners_latlng(ids),
        colors=rgb,
        legend=[(tuple(cmap(0.0)[:3]), "0: no such feature in the cell")],
        hover=_hover_text(root, ids, partitions),
        values=values,
        value_label=f"{channel} ({unit} per cell; colours saturate at the 99th percentile)",
        vmax=vmax,
    )


def _check_size(ids: np.ndarray, cells: Sequence[str], what: str) -> None:
    if len(ids) == 0:
        raise MapError(
            f"no cells {what} inside {', '.join(cells)}: run s2vec materialize --cells first"
        )
    if len(ids) > MAX_CELLS:
        raise MapError(
            f"{len(ids):,} cells inside {', '.join(cells)}: a map holds at most {MAX_CELLS:,}; "
            f"give smaller cells (e.g. image tokens)"
        )


# --- PNG ---------------------------------------------------------------------------------


def _metres_per_degree_lon(lat: float) -> float:
    return math.pi / 180 * EARTH_RADIUS_M * math.cos(math.radians(lat))


def render_png(layer: MapLayer, dpi: int = 110) -> bytes:
    """The layer as a PNG: north up, lon/lat axes, legend, colour bar (channels), scale bar."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    verts = layer.corners[:, :, ::-1]  # (lng, lat)
    lat0 = float(np.mean(layer.corners[:, :, 0]))
    fig = Figure(figsize=(9, 8), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    coll = PolyCollection(verts, facecolors=layer.colors, edgecolors=layer.colors, linewidths=0.3)
    ax.add_collection(coll)
    ax.autoscale_view()
    ax.set_aspect(1 / math.cos(math.radians(lat0)))  # equal metres on both axes
    ax.set_xlabel("longitude (° east)")
    ax.set_ylabel("latitude (° north)")
    ax.set_title(layer.title, fontsize=10)
    ax.ticklabel_format(useOffset=False)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    if layer.values is not None:
        mappable = matplotlib.cm.ScalarMappable(Normalize(0, layer.vmax), colormaps["viridis"])
        fig.colorbar(mappable, ax=ax, shrink=0.8, extend="max", label=layer.value_label)
    handles = [Patch(facecolor=c, edgecolor="black", label=t) for c, t in layer.legend]
    ax.legend(handles=handles, loc="upper left", fontsize=8, framealpha=0.85)
    _scale_bar(ax, lat0)
    ax.annotate(
        "N",
        xy=(0.96, 0.95),
        xytext=(0.96, 0.85),
        xycoords="axes fraction",
        ha="center",
        arrowprops={"arrowstyle": "-|>", "color": "black"},
        fontsize=10,
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1},
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _scale_bar(ax, lat0: float) -> None:  # noqa: ANN001 - a matplotlib Axes
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    width_m = (x1 - x0) * _metres_per_degree_lon(lat0)
    target = width_m / 5
    length = 10 ** math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * length <= target:
            length *= m
            break
    deg = length / _metres_per_degree_lon(lat0)
    xs, ys = x0 + 0.04 * (x1 - x0), y0 + 0.04 * (y1 - y0)
    ax.plot([xs, xs + deg], [ys, ys], color="black", linewidth=3)
    label = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    ax.text(
        xs + deg / 2,
        ys + 0.015 * (y1 - y0),
        label,
        ha="center",
        fontsize=8,
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1},
    )


# --- HTML --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """Equirectangular at the map's mean latitude, north up: SVG x = (lng - lng0) * sx,
    y = (lat1 - lat) * sy, with sy = sx / cos(mean lat) so metres are equal on both axes."""

    lng0: float
    lat1: float
    sx: float
    sy: float
    width: int
    height: int

    def __call__(self, lat: np.ndarray, lng: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (lng - self.lng0) * self.sx, (self.lat1 - lat) * self.sy


def projection(corners: np.ndarray, width: int = 900) -> Projection:
    lat, lng = corners[..., 0], corners[..., 1]
    coslat = math.cos(math.radians(float(lat.mean())))
    span_x = max(float(lng.max() - lng.min()), 1e-9)
    span_y = max(float(lat.max() - lat.min()), 1e-9)
    sx = width / span_x
    sy = sx / coslat
    return Projection(float(lng.min()), float(lat.max()), sx, sy, width, math.ceil(span_y * sy))


def _hex(rgb: np.ndarray) -> list[str]:
    b = np.clip(np.round(np.asarray(rgb) * 255), 0, 255).astype(int)
    return [f"#{r:02x}{g:02x}{bl:02x}" for r, g, bl in b]


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ margin: 0; font: 13px sans-serif; background: #fff; }}
#map {{ display: block; }}
#tip {{ position: fixed; display: none; background: #fffff0; border: 1px solid #333;
  padding: 4px 6px; max-width: 420px; pointer-events: none; white-space: pre-line; }}
#legend {{ padding: 6px 8px; }}
.sw {{ display: inline-block; width: 12px; height: 12px; border: 1px solid #000;
  margin: 0 4px -2px 10px; }}
</style></head><body>
<svg id="map" width="{width}" height="{height}" viewBox="0 0 {width} {height}"
  data-bbox="{bbox}" data-projection="equirectangular">
<g id="cells" shape-rendering="crispEdges">{paths}</g>
</svg>
<div id="legend"><b>{title}</b><br>{legend}<br>{axes}</div>
<div id="tip"></div>
<script>
const CELLS = {cells};
const PROJ = {proj};
const tip = document.getElementById("tip");
function show(target, x, y) {{
  const k = target.dataset ? target.dataset.k : undefined;
  if (k === undefined) {{ tip.style.display = "none"; return; }}
  const c = CELLS[+k];
  const lat = PROJ.lat1 - y / PROJ.sy, lng = PROJ.lng0 + x / PROJ.sx;
  tip.textContent = c[0] + "\\n" + (c[1] || "no features") +
    "\\nlat " + lat.toFixed(5) + ", lon " + lng.toFixed(5);
  tip.style.display = "block";
  tip.style.left = (x + 14) + "px"; tip.style.top = (y + 14) + "px";
}}
const svg = document.getElementById("map");
svg.addEventListener("mousemove", e => {{
  const r = svg.getBoundingClientRect();
  show(e.target, e.clientX - r.left, e.clientY - r.top);
}});
svg.addEventListener("mouseleave", () => {{ tip.style.display = "none"; }});
// #probe=TOKEN hovers that cell on load (used by the tests and for sharing a view)
const m = location.hash.match(/probe=([0-9a-f]+)/);
if (m) {{
  const el = document.querySelector('path[data-t="' + m[1] + '"]');
  if (el) {{
    const b = el.getBBox();
    const r = svg.getBoundingClientRect();
    el.dispatchEvent(new MouseEvent("mousemove", {{ bubbles: true,
      clientX: r.left + b.x + b.width / 2, clientY: r.top + b.y + b.height / 2 }}));
  }}
}}
</script></body></html>
"""


def render_html(layer: MapLayer, width: int = 900) -> str:
    """One self-contained HTML page: inline SVG polygons, hover with token and top channels.

    It references no URL (no tiles, scripts, fonts or images), so it opens offline."""
    from matplotlib import colormaps

    proj = projection(layer.corners, width)
    x, y = proj(layer.corners[..., 0], layer.corners[..., 1])
    colours = _hex(layer.colors)
    paths = []
    for k in range(len(layer.tokens)):
        pts = " ".join(f"{x[k, v]:.2f},{y[k, v]:.2f}" for v in range(4))
        paths.append(
            f'<path d="M{pts}Z" fill="{colours[k]}" stroke="{colours[k]}" stroke-width="0.3"'
            f' data-k="{k}" data-t="{layer.tokens[k]}"/>'
        )
    legend = "".join(
        f'<span class="sw" style="background:{_hex([c])[0]}"></span>{html.escape(t)}'
        for c, t in layer.legend
    )
    if layer.values is not None:
        stops = ", ".join(_hex([colormaps["viridis"](f)[:3]])[0] for f in np.linspace(0, 1, 9))
        legend += (
            f'<br>0 <span style="display:inline-block;width:240px;height:12px;'
            f'background:linear-gradient(to right, {stops})"></span> '
            f"≥ {layer.vmax:.4g} — {html.escape(layer.value_label)}"
        )
    lat = layer.corners[..., 0]
    lng = layer.corners[..., 1]
    axes = (
        f"North is up. Latitude {lat.min():.5f}…{lat.max():.5f} °N, longitude "
        f"{lng.min():.5f}…{lng.max():.5f} °E; map width "
        f"{(lng.max() - lng.min()) * _metres_per_degree_lon(float(lat.mean())) / 1000:.2f} km."
    )
    cells = json.dumps([[str(t), h] for t, h in zip(layer.tokens, layer.hover, strict=True)])
    return _HTML.format(
        title=html.escape(layer.title),
        width=proj.width,
        height=proj.height,
        bbox=f"{proj.lng0!r},{proj.lat1!r},{proj.sx!r},{proj.sy!r}",
        paths="".join(paths),
        legend=legend,
        axes=axes,
        cells=cells.replace("</", "<\\/"),
        proj=json.dumps({"lng0": proj.lng0, "lat1": proj.lat1, "sx": proj.sx, "sy": proj.sy}),
    )


def write_map(layer: MapLayer, out: str | os.PathLike) -> Path:
    """Write ``.png`` or ``.html`` (chosen by the suffix), whole or not at all."""
    p = Path(out)
    suffix = p.suffix.lower()
    if suffix == ".png":
        data = render_png(layer)
    elif suffix in (".html", ".htm"):
        data = render_html(layer).encode()
    else:
        raise MapError(f"--out must end in .png or .html, got {p.name}")
    if not p.parent.is_dir():
        raise MapError(f"folder {p.parent} does not exist")
    fs.write_bytes(p, data)
    return p


def partition_embedding_png(
    root: str | os.PathLike, partition: str, model_version: str | None = None
) -> bytes:
    """PNG bytes of one level-6 partition's embedding map (for Dagster metadata)."""
    try:
        s2.from_token(np.array([partition]))
    except InvalidCellError as e:
        raise MapError(str(e)) from e
    return render_png(embedding_layer(root, [partition], model_version))


def reconstruction_png(
    root: str | os.PathLike,
    image_token: str,
    model_version: str | None = None,
    mask_ratio: float | None = None,
    seed: int = 0,
    scale: int = 16,
) -> bytes:
    """Input, masked input and the model's reconstruction of one image, side by side.

    Colours as in the raster preview (red: POI counts, green: areas, blue: line lengths, sums
    of log1p channels), one scale for all three panels (the input's 99th percentile per band);
    masked pixels are grey in the middle panel. The masks are drawn as in training (seeded).
    """
    from s2vec_pipeline.cells import preview
    from s2vec_pipeline.cells.raster import tensor_array
    from s2vec_pipeline.model.registry import list_models, load_model

    row = _raster_tile(root, image_token)
    if model_version is None:
        versions = list_models(root)
        if not versions:
            raise MissingInputError(f"no trained model under {root}: train one first")
        model_version = versions[-1]
    model, card = load_model(root, model_version)
    x = np.array(tensor_array(row, len(card.channels), card.side))
    ratio = float(card.config.get("mask_ratio", 0.75) if mask_ratio is None else mask_ratio)
    recon, masked = _reconstruct(model, x, ratio, seed)
    measures = _channel_measures(root, list(card.channels))
    bands_in = preview.band_sums(x, measures)[0]
    # MAE convention: the decoder's output where pixels were masked, the input where visible.
    bands_out = np.where(masked, preview.band_sums(recon, measures)[0], bands_in)
    caption = (
        f"image {image_token}, model {model_version}; red POI counts, green areas, blue "
        f"lengths; rows = S2 i, columns = S2 j"
    )
    return _panels_png(bands_in, masked, bands_out, ratio, caption, scale)


def _raster_tile(root: str | os.PathLike, image_token: str) -> pl.DataFrame:
    """The ``raster_tiles`` row (``tensor`` only) of one image."""
    image_id = s2.from_token(np.array([image_token]))
    if int(s2.cell_level(image_id)[0]) < 7:
        raise MapError(f"{image_token} is not an image cell: give an image token (raster_tiles)")
    partition = str(s2.to_token(s2.parent(image_id, 6))[0])
    row = (
        delta_store.scan_table(root, "raster_tiles")
        .filter((pl.col("parent_l6") == partition) & (pl.col("image_token") == image_token))
        .select("tensor")
        .collect()
    )
    if row.height == 0:
        raise MapError(f"no raster tile {image_token} under {root}: it holds no data")
    return row


def _reconstruct(
    model: Any, x: np.ndarray, ratio: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(the model's reconstruction of ``x`` in log1p units, the (S, S) mask of masked pixels)
    with masks drawn as in training from ``seed``."""
    import torch

    noise = torch.rand(1, model.num_patches, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        _, pred, mask = model(torch.from_numpy(x), mask_ratio=ratio, noise=noise)
        recon = model.unpatchify(pred).float().numpy()
    mean = model.channel_mean.numpy()[None, :, None, None]
    std = model.channel_std.numpy()[None, :, None, None]
    recon = np.maximum(recon * std + mean, 0.0)  # back to log1p units
    p, grid = model.patch_size, model.grid
    masked = mask.numpy().reshape(grid, grid).repeat(p, axis=0).repeat(p, axis=1) > 0
    return recon, masked


def _panels_png(
    bands_in: np.ndarray,
    masked: np.ndarray,
    bands_out: np.ndarray,
    ratio: float,
    caption: str,
    scale: int,
) -> bytes:
    """The three panels (input, masked input, reconstruction) on one scale, captioned."""
    from PIL import Image, ImageDraw

    scales = np.array([np.percentile(b[b > 0], 99) if (b > 0).any() else 1.0 for b in bands_in])[
        :, None, None
    ]

    def to_image(bands: np.ndarray, grey: np.ndarray | None = None) -> Image.Image:
        rgb = (np.clip(bands / np.maximum(scales, 1e-6), 0, 1) * 255).astype(np.uint8)
        rgb = rgb.transpose(1, 2, 0).copy()
        if grey is not None:
            rgb[grey] = 128
        side = rgb.shape[0] * scale
        return Image.fromarray(rgb, "RGB").resize((side, side), Image.Resampling.NEAREST)

    panels = [
        ("input", to_image(bands_in)),
        (f"masked input ({ratio:.0%} grey)", to_image(bands_in, masked)),
        ("reconstruction of the grey pixels", to_image(bands_out)),
    ]
    w, h = panels[0][1].size
    out = Image.new("RGB", (3 * w + 40, h + 60), "white")
    draw = ImageDraw.Draw(out)
    for k, (label, img) in enumerate(panels):
        out.paste(img, (10 + k * (w + 10), 30))
        draw.text((10 + k * (w + 10), 10), label, fill="black")
    draw.text((10, h + 38), caption, fill="black")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
