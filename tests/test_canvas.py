"""Masks over HTTP do not depend on the canvas around the head or on nearest upscaling; tissue
apart from a skull-on slice's brain is dropped."""

import io

import numpy as np
import png
import pytest
from conftest import DATA, read_png
from test_app import post_png

# Colin27's lowest brain slice: the network calls face tissue apart from the cerebellum
SKULL_BASE = "colin27_axial6_16bit.png"
SLICES = ["icbm2009a_axial100.png", "colin27_axial50_16bit.png", SKULL_BASE]


def encode(array):
    """Greyscale PNG bytes of an (H, W) uint8 or uint16 array."""
    out = io.BytesIO()
    bitdepth = 16 if array.dtype == np.uint16 else 8
    writer = png.Writer(array.shape[1], array.shape[0], greyscale=True, bitdepth=bitdepth)
    writer.write(out, array.tolist())
    return out.getvalue()


def slice_of(name):
    """The test slice as stored: (H, W) uint8 or uint16."""
    reader = png.Reader(bytes=(DATA / name).read_bytes())
    width, height, rows, info = reader.read()
    dtype = np.uint16 if info["bitdepth"] > 8 else np.uint8
    return np.vstack([np.asarray(r, dtype) for r in rows]).reshape(height, width)


def segment(server_url, array):
    status, _, body = post_png(server_url + "/", encode(array))
    assert status == 200, body[:200]
    return read_png(body)


@pytest.fixture(scope="module")
def plain_masks(server_url):
    return {name: segment(server_url, slice_of(name)) for name in SLICES}


@pytest.mark.parametrize("name", SLICES)
@pytest.mark.parametrize("side", [512, 1024])
def test_a_black_canvas_changes_nothing(server_url, plain_masks, name, side):
    image = slice_of(name)
    canvas = np.zeros((side, side), image.dtype)
    top, left = side // 3, side // 5
    canvas[top : top + image.shape[0], left : left + image.shape[1]] = image
    mask = segment(server_url, canvas)
    inside = mask[top : top + image.shape[0], left : left + image.shape[1]]
    assert (inside == plain_masks[name]).mean() >= 0.99
    margin = np.ones(mask.shape, bool)
    margin[top : top + image.shape[0], left : left + image.shape[1]] = False
    assert (mask[margin] > 0).mean() <= 0.01


@pytest.mark.parametrize("name", SLICES)
@pytest.mark.parametrize("factor", [2, 3])
def test_nearest_upscaling_changes_nothing(server_url, plain_masks, name, factor):
    image = slice_of(name)
    mask = segment(server_url, np.repeat(np.repeat(image, factor, 0), factor, 1))
    expected = np.repeat(np.repeat(plain_masks[name], factor, 0), factor, 1)
    assert (mask == expected).mean() >= 0.99


def test_tissue_apart_from_the_brain_is_dropped(server_url, model):
    image = slice_of(SKULL_BASE)
    reference = read_png(DATA / "colin27_axial6_label.png")
    served = segment(server_url, image)
    kept = model.segment(image, drop_stray=False)
    dropped = (kept > 0) & (served == 0)
    assert np.count_nonzero(dropped) >= 100
    assert not (dropped & (reference > 0)).any()  # all of it beyond the brain
    assert not ((served > 0) & (kept == 0)).any()  # and nothing gained
