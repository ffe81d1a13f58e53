"""processing.py: decoding every PNG flavour, rejecting bad ones, normalising, encoding."""

import io
import struct
import zlib

import numpy as np
import png
import pytest
from conftest import read_png

import processing


def encode(array, **info):
    """PNG bytes of an (H, W[, planes]) array with pypng."""
    out = io.BytesIO()
    height, width = array.shape[:2]
    planes = 1 if array.ndim == 2 else array.shape[2]
    writer = png.Writer(width, height, **info)
    writer.write(out, array.reshape(height, width * planes).tolist())
    return out.getvalue()


def png_with_header(width, height):
    """A PNG signature and a valid-CRC IHDR claiming width x height, then one tiny IDAT."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = b"IDAT" + zlib.compress(b"\x00\x00")
    chunks = b""
    for body in (ihdr, idat, b"IEND"):
        chunks += struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return processing.PNG_SIGNATURE + chunks


@pytest.fixture
def grey():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 30)).astype(np.uint8)


def test_decodes_8_bit_greyscale(grey):
    decoded = processing.decode_png(encode(grey, greyscale=True))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, grey)


def test_decodes_16_bit_greyscale(grey):
    wide = grey.astype(np.uint16) * 257
    decoded = processing.decode_png(encode(wide, greyscale=True, bitdepth=16))
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, wide)


def test_grey_alpha_keeps_grey(grey):
    pixels = np.stack([grey, np.full_like(grey, 255)], axis=2)
    decoded = processing.decode_png(encode(pixels, greyscale=True, alpha=True))
    assert np.array_equal(decoded, grey)


@pytest.mark.parametrize("alpha", [False, True])
def test_colour_becomes_luminance(grey, alpha):
    planes = [grey, grey, grey] + ([np.full_like(grey, 255)] if alpha else [])
    decoded = processing.decode_png(encode(np.stack(planes, axis=2), greyscale=False, alpha=alpha))
    assert np.abs(decoded.astype(int) - grey).max() <= 1


def test_palette_is_resolved(grey):
    palette = [(v, v, v) for v in range(256)]
    decoded = processing.decode_png(encode(grey, palette=palette))
    assert np.abs(decoded.astype(int) - grey).max() <= 1


def test_normalise_is_independent_of_bit_depth(grey):
    assert np.allclose(
        processing.normalise(grey), processing.normalise(grey.astype(np.uint16) * 257), atol=1e-5
    )
    normalised = processing.normalise(grey)
    assert normalised.dtype == np.float32 and normalised.min() == 0 and normalised.max() <= 2


def test_normalise_of_a_blank_slice_is_zero():
    assert not processing.normalise(np.full((20, 20), 7, np.uint8)).any()


@pytest.mark.parametrize(
    "data, error, words",
    [
        (b"", processing.ImageError, "empty"),
        (b"hello, this is not an image at all", processing.UnsupportedFormat, "not an image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100), processing.UnsupportedFormat, "JPEG"),
        (b"GIF89a" + bytes(100), processing.UnsupportedFormat, "GIF"),
        (bytes(128) + b"DICM" + bytes(100), processing.UnsupportedFormat, "DICOM"),
        (png_with_header(100000, 100000), processing.ImageTooLarge, "100000x100000"),
        (png_with_header(1, 1), processing.ImageError, "at least"),
    ],
)
def test_rejects_with_a_clear_message(data, error, words):
    with pytest.raises(error, match=words) as caught:
        processing.decode_png(data)
    assert 400 <= caught.value.status < 500


def test_rejects_truncated_png(grey):
    data = encode(grey, greyscale=True)
    for cut in (20, 40, len(data) - 20):
        with pytest.raises(processing.ImageError):
            processing.decode_png(data[:cut])


def test_rejects_a_damaged_header_crc(grey):
    data = bytearray(encode(grey, greyscale=True))
    data[20] ^= 0xFF
    with pytest.raises(processing.ImageError, match="header"):
        processing.decode_png(bytes(data))


def test_mask_round_trips_as_a_palette_png():
    mask = np.random.default_rng(1).integers(0, 4, (33, 47)).astype(np.uint8)
    data = processing.encode_mask(mask)
    reader = png.Reader(bytes=data)
    reader.preamble()
    assert reader.color_type == 3 and len(reader.palette()) == 4
    assert np.array_equal(read_png(data), mask)


def test_pad_and_crop_restore_the_size():
    padded = processing.pad_to_multiple(np.ones((91, 109), np.float32), 8)
    assert padded.shape == (96, 112) and padded[91:].sum() == 0
    probabilities = np.zeros((4,) + padded.shape)
    probabilities[2] = 1
    mask = processing.to_mask(probabilities, 91, 109)
    assert mask.shape == (91, 109) and (mask == 2).all()


def test_class_fractions_sum_to_one():
    mask = np.array([[0, 1], [2, 2]], np.uint8)
    fractions = processing.class_fractions(mask)
    assert fractions == {"background": 0.25, "csf": 0.25, "grey_matter": 0.5, "white_matter": 0.0}


def test_to_batch_normalises_pads_and_repeats_channels(grey):
    batch = processing.to_batch(grey, 8, channels=3)
    assert batch.shape == (1, 3, 40, 32) and batch.dtype == np.float32
    assert np.array_equal(batch[0, 2, :40, :30], processing.normalise(grey))
    assert not batch[0, :, :, 30:].any()
