"""``s2vec map``: PNG and self-contained HTML maps of embeddings and channels.

Oracles: s2geometry for cell vertices and centres, numpy's SVD for the principal components,
``cell_features`` joined by token for channel values, and headless Chromium (Debian package
``chromium``) rendering the HTML map: the screenshot's pixels at each cell's centre must have
that cell's colour, and a hover shows the token and its top channel.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import s2geometry as s2g
from PIL import Image

from s2vec_pipeline.analysis import maps
from s2vec_pipeline.cli import main
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import MONACO_L6

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHANNEL = "building_residential_m2"


@pytest.fixture(scope="module")
def embedding(embedded_root: Path) -> maps.MapLayer:
    return maps.embedding_layer(embedded_root, [MONACO_L6])


def _s2g_centre(token: str) -> tuple[float, float]:
    ll = s2g.S2LatLng(s2g.S2Cell(s2g.S2CellId.FromToken(token)).GetCenter())
    return ll.lat().degrees(), ll.lng().degrees()


def test_embedding_layer_is_pca_on_true_polygons(embedded_root: Path, embedding) -> None:
    cells = delta_store.read_partitions(
        embedded_root, "cell_embeddings", [MONACO_L6], ["cell_token", "embedding"]
    )
    assert sorted(embedding.tokens.tolist()) == sorted(cells["cell_token"].to_list())
    order = {t: k for k, t in enumerate(cells["cell_token"].to_list())}
    emb = np.array(cells["embedding"].to_list())[[order[t] for t in embedding.tokens]]
    centred = emb - emb.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    for k in range(3):
        r = np.corrcoef(centred @ vt[k], embedding.colors[:, k])[0, 1]
        assert abs(r) > 0.95, (k, r)  # colour k follows component k (percentile clipping)
    for t, corners in list(zip(embedding.tokens, embedding.corners, strict=True))[:50]:
        cell = s2g.S2Cell(s2g.S2CellId.FromToken(str(t)))
        for v in range(4):
            ll = s2g.S2LatLng(cell.GetVertex(v))
            assert corners[v] == pytest.approx([ll.lat().degrees(), ll.lng().degrees()], abs=1e-9)


def test_channel_layer_values(embedded_root: Path) -> None:
    layer = maps.channel_layer(embedded_root, [MONACO_L6], CHANNEL)
    features = delta_store.read_partitions(embedded_root, "cell_features", [MONACO_L6])
    n_images = features["image_token"].n_unique()
    assert len(layer.tokens) == 256 * n_images
    truth = dict(zip(features["cell_token"], features[CHANNEL], strict=True))
    expected = np.array([truth.get(str(t), 0.0) for t in layer.tokens])
    np.testing.assert_array_equal(layer.values, expected)
    assert (expected > 0).sum() > 20


@pytest.mark.slow
def test_cli_png_maps(embedded_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.png"
    args = ["map", "--root", str(embedded_root), "--cells", MONACO_L6]
    assert main([*args, "--embedding", "--out", str(out)]) == 0
    img = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in img.tolist()}
    layer = maps.embedding_layer(embedded_root, [MONACO_L6])
    cell_colours = {tuple(c) for c in np.round(layer.colors * 255).astype(int).tolist()}
    # most cells' exact colours are on the picture (each cell is several pixels wide)
    assert len(cell_colours & colours) > 0.8 * len(cell_colours)
    out2 = tmp_path / "channel.png"
    assert main([*args, "--channel", CHANNEL, "--out", str(out2)]) == 0
    assert Image.open(out2).size[0] > 500
    png = maps.partition_embedding_png(embedded_root, MONACO_L6)
    assert Image.open(io.BytesIO(png)).format == "PNG"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--channel", "no_such_channel"], "unknown channel"),
        (["--channel", "building"], "did you mean"),
        (["--embedding", "--model-version", "0123456789abcdef"], "unknown model version"),
        (["--embedding", "--out", "m.txt"], "must end in .png or .html"),
        (["--embedding", "--cells", "1234"], None),
    ],
)
def test_cli_map_bad_input(
    embedded_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra, expected
) -> None:
    out = tmp_path / "m.png"
    args = ["map", "--root", str(embedded_root), "--out", str(out), *extra]
    if "--cells" not in extra:
        args += ["--cells", MONACO_L6]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert expected is None or expected in err[0]  # None: a cell with no data ("1234")
    assert not out.exists() and not (Path.cwd() / "m.txt").exists()


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_html_map_renders_cells_and_hover_in_chromium(
    embedded_root: Path, embedding, tmp_path: Path
) -> None:
    page = maps.render_html(embedding, width=900)
    assert not re.search(r"https?://|\bsrc=|\bhref=|@import|url\(", page)  # nothing to fetch
    path = tmp_path / "map.html"
    path.write_text(page)
    bbox = re.search(r'data-bbox="([^"]+)"', page).group(1)
    lng0, lat1, sx, sy = (float(v) for v in bbox.split(","))
    height = int(re.search(r'<svg id="map" width="900" height="(\d+)"', page).group(1))
    shot = tmp_path / "shot.png"
    run = _chromium(
        [
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size=900,{height + 100}",
            f"--screenshot={shot}",
            path.as_uri(),
        ],
        tmp_path / "profile1",
    )
    assert shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(embedding.tokens), 300, replace=False)
    hits = 0
    for k in sample:
        lat, lng = _s2g_centre(str(embedding.tokens[k]))
        x, y = int((lng - lng0) * sx), int((lat1 - lat) * sy)
        expected = np.round(embedding.colors[k] * 255)
        hits += bool(np.abs(pixels[y, x] - expected).max() <= 2)
    assert hits >= 0.97 * len(sample)
    # A blank or single-colour page cannot pass: the sampled colours differ.
    assert len({tuple(np.round(embedding.colors[k] * 255)) for k in sample}) > 50

    # Hover: the page's own mousemove handler fills the tooltip for a cell with features.
    features = delta_store.read_partitions(embedded_root, "cell_features", [MONACO_L6])
    channels = delta_store.table_contract(embedded_root, "cell_features")["channels"]
    row = features.sort(CHANNEL, descending=True).row(0, named=True)
    top = max(channels, key=lambda c: np.log1p(row[c]))
    dom = _chromium(
        ["--dump-dom", f"{path.as_uri()}#probe={row['cell_token']}"], tmp_path / "profile2"
    )
    tip = re.search(r'<div id="tip" style="display: block;[^"]*">([^<]*)</div>', dom.stdout)
    assert tip is not None, dom.stdout[-500:]
    assert row["cell_token"] in tip.group(1) and top in tip.group(1)


def test_map_of_a_region_and_of_image_cells(embedded_root: Path, tmp_path: Path) -> None:
    image = delta_store.read_partitions(embedded_root, "raster_tiles", [MONACO_L6])["image_token"][
        0
    ]
    layer = maps.channel_layer(embedded_root, [image], CHANNEL)
    assert len(layer.tokens) == 256
    assert {s2g.S2CellId.FromToken(str(t)).parent(13).ToToken() for t in layer.tokens} == {image}
    root = tmp_path / "root"
    shutil.copytree(embedded_root, root)
    from s2vec_pipeline.cells.regions import RegionRegistry, region_from_bbox

    RegionRegistry(root).add(region_from_bbox("monaco", 43.72, 7.40, 43.75, 7.44))
    out = tmp_path / "region.html"
    assert (
        main(["map", "--root", str(root), "--region", "monaco", "--embedding", "--out", str(out)])
        == 0
    )
    assert (
        out.read_text().count("<path ")
        == 256
        * pl.read_delta(str(root / "raster_tiles")).filter(pl.col("parent_l6") == MONACO_L6).height
    )


def test_reconstruction_png(embedded_root: Path, tmp_path: Path) -> None:
    """Middle panel: exactly the masked pixels are grey; right panel: the visible pixels are
    the input's, the masked ones the model's (not all grey, not the input)."""
    tiles = delta_store.read_partitions(embedded_root, "raster_tiles", [MONACO_L6])
    token = tiles.sort("nonempty_pixels", descending=True)["image_token"][0]
    out = tmp_path / "recon.png"
    args = ["map", "--root", str(embedded_root), "--cells", token, "--reconstruction"]
    assert main([*args, "--out", str(out)]) == 0
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    side = 16 * 16  # 16 pixels drawn 16 times larger
    panels = [
        img[30 : 30 + side, 10 + k * (side + 10) : 10 + k * (side + 10) + side] for k in range(3)
    ]
    cells = [p[8::16, 8::16] for p in panels]  # one sample per raster pixel
    grey = (cells[1] == 128).all(axis=2)
    assert grey.sum() == 256 - int(256 * (1 - 0.75))  # the model's mask ratio
    np.testing.assert_array_equal(cells[2][~grey], cells[0][~grey])
    assert not (cells[2][grey] == 128).all(axis=1).all()
