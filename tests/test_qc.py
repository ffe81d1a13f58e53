"""qc.py and ?overlay=1: pictures to check a segmentation by eye."""

import numpy as np
import png
import pytest
from conftest import read_png
from test_app import post_png

import processing
import qc


def read_rgb(data):
    """(H, W, planes) array of a PNG as stored."""
    width, height, rows, info = png.Reader(bytes=data).read()
    return np.vstack([np.asarray(r) for r in rows]).reshape(height, width, info["planes"])


def test_overlay_route_blends_the_mask_in_class_colours(server_url, t1_png):
    status, _, mask_png = post_png(server_url + "/segment", t1_png)
    status, headers, body = post_png(server_url + "/segment?overlay=1", t1_png)
    assert status == 200 and headers["Content-Type"] == "image/png"
    picture, mask = read_rgb(body), read_png(mask_png)
    assert picture.shape == (*mask.shape, 3)
    red, blue = picture[..., 0].astype(int), picture[..., 2].astype(int)
    assert (red[mask == 2] > blue[mask == 2] + 40).mean() > 0.95  # grey matter: orange
    assert (blue[mask == 1] > red[mask == 1]).mean() > 0.95  # CSF: blue
    assert (picture[mask == 0].std(axis=-1) == 0).all()  # background stays grey


@pytest.mark.parametrize(
    "pixels, palette",
    [
        (np.arange(35 * 17).reshape(35, 17) % 256, None),
        (np.arange(35 * 17 * 3).reshape(35, 17, 3) % 256, None),
        (np.arange(35 * 17).reshape(35, 17) % 4, processing.PALETTE),
    ],
)
def test_encode_png_round_trips(pixels, palette):
    data = qc.encode_png(pixels.astype(np.uint8), palette)
    width, height, rows, info = png.Reader(bytes=data).read()
    stored = np.vstack([np.asarray(r) for r in rows]).reshape(pixels.shape)
    assert np.array_equal(stored, pixels) and (info.get("palette") is not None) == bool(palette)


def test_legend_writes_every_tissue_name_beside_its_swatch():
    strip = qc.legend(processing.CLASS_NAMES, processing.PALETTE, 600)
    columns = np.flatnonzero((strip == 255).all(-1).any(0))
    swatches = [np.flatnonzero((strip == c).all(-1).any(0)) for c in processing.PALETTE[1:]]
    assert all(len(s) == 14 for s in swatches[:2])  # 7 pixels at scale 2
    # letters follow each swatch: "CSF" = 3 glyphs of 12 columns
    assert len(columns[(columns > swatches[0][-1]) & (columns < swatches[1][0])]) > 3 * 6
    assert qc.text("csf").shape == (14, 36)
