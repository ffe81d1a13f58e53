"""Pure image functions for the endpoint: decode uploads, normalise, postprocess, encode masks.

Everything here takes and returns bytes or numpy arrays; no Flask, MXNet or file I/O.
Training imports `normalise` (and the class names and colours) from here, so the server and
the model see the same input and speak of the same classes.
"""

import io
import struct
import zlib

import numpy as np
import png

CLASS_NAMES = ["background", "csf", "grey_matter", "white_matter"]
# Colour-blind-safe colours that a person can tell apart when opening the mask.
PALETTE = [(0, 0, 0), (0, 114, 178), (230, 159, 0), (240, 240, 240)]
NORMALISATION = "minimum to 0, 99th percentile of above-minimum pixels to 1, clip to [0, 2]"
MIN_SIDE = 16
MAX_SIDE = 4096
ACCEPTED = "PNG: 1- to 16-bit greyscale, greyscale+alpha, RGB, RGBA or palette"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OTHER_FORMATS = [
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x1f\x8b", "gzip (NIfTI?)"),
    (b"RIFF", "WebP"),
    (b"%PDF", "PDF"),
]


class ImageError(Exception):
    """An upload we cannot use; `status` is the HTTP status the server answers with."""

    status = 400


class UnsupportedFormat(ImageError):
    status = 415


class ImageTooLarge(ImageError):
    status = 413


def decode_png(data):
    """PNG bytes -> (H, W) uint8 or uint16 greyscale slice.

    Colour is reduced to luminance, alpha and palette are resolved. The header's size is
    checked before any pixel is decompressed, so a decompression bomb costs nothing.
    """
    if not data:
        raise ImageError(
            "the request body is empty: send the PNG as the raw body or as multipart field 'file'"
        )
    if not data.startswith(PNG_SIGNATURE):
        raise UnsupportedFormat(f"{sniff(data)} is not supported; send a {ACCEPTED}")
    width, height = read_header(data)
    check_size(width, height)
    try:
        width, height, rows, info = png.Reader(bytes=data).asDirect()
        pixels = np.vstack([np.asarray(row) for row in rows])
    except (png.Error, zlib.error, EOFError, ValueError, struct.error) as error:
        raise ImageError(
            f"the PNG is damaged or truncated ({error}); re-export it and retry"
        ) from error
    planes = info["planes"]
    pixels = pixels.reshape(height, width, planes)
    dtype = np.uint16 if info["bitdepth"] > 8 else np.uint8
    if planes >= 3:
        luminance = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114])
        return np.round(luminance).astype(dtype)
    return pixels[..., 0].astype(dtype)


def sniff(data):
    """A name for what the bytes look like, for error messages."""
    if len(data) > 132 and data[128:132] == b"DICM":
        return "DICOM"
    for magic, name in OTHER_FORMATS:
        if data.startswith(magic):
            return name
    return "this body (not an image we recognise)"


def read_header(data):
    """(width, height) from the IHDR chunk, which must come first and have a valid CRC."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageError("the PNG is truncated or has no IHDR header; re-export it and retry")
    (length,) = struct.unpack(">I", data[8:12])
    chunk = data[12 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    if length != 13 or zlib.crc32(chunk) & 0xFFFFFFFF != crc:
        raise ImageError("the PNG header is damaged (bad IHDR); re-export it and retry")
    return struct.unpack(">II", data[16:24])


def check_size(width, height):
    """Reject slices too small to segment or too large to decode safely."""
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(
            f"the image is {width}x{height} pixels; slices must be at least {MIN_SIDE}x{MIN_SIDE}"
        )
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ImageTooLarge(
            f"the image is {width}x{height} pixels; the limit is {MAX_SIDE}x{MAX_SIDE}"
        )


def normalise(slice_):
    """Scale an (H, W) slice of any dtype to float32, about 0..1 in tissue, scanner-independent.

    The minimum maps to 0 and the 99th percentile of the pixels above it to 1, so 8-bit,
    16-bit and float inputs of the same anatomy give the same numbers.
    """
    values = np.asarray(slice_, dtype=np.float32)
    low = float(values.min()) if values.size else 0.0
    shifted = values - low
    foreground = shifted[shifted > 0]
    high = float(np.percentile(foreground, 99)) if foreground.size else 1.0
    return np.clip(shifted / max(high, 1e-6), 0.0, 2.0).astype(np.float32)


def pad_to_multiple(slice_, multiple):
    """Zero-pad an (H, W) array at the bottom and right so both sides divide by `multiple`."""
    height, width = slice_.shape
    return np.pad(slice_, ((0, -height % multiple), (0, -width % multiple)))


def to_batch(slice_, multiple, channels=1):
    """(H, W) slice of any dtype -> (1, channels, H', W') float32 network input.

    Normalised, then zero-padded so H' and W' divide by `multiple`; `to_mask` crops back.
    """
    image = pad_to_multiple(normalise(slice_), multiple)
    return np.repeat(image[None, None], channels, axis=1)


def to_mask(probabilities, height, width):
    """(C, H', W') class probabilities -> (height, width) uint8 class indices, cropped."""
    return np.argmax(probabilities[:, :height, :width], axis=0).astype(np.uint8)


def encode_mask(mask, palette=PALETTE):
    """(H, W) uint8 class indices -> 8-bit palette PNG bytes; pixel value = class index."""
    height, width = mask.shape
    writer = png.Writer(
        width, height, palette=[tuple(c) for c in palette], bitdepth=8, compression=6
    )
    out = io.BytesIO()
    writer.write_array(out, np.ascontiguousarray(mask, dtype=np.uint8).ravel())
    return out.getvalue()


def class_fractions(mask, names=CLASS_NAMES):
    """Share of pixels in each class, rounded to 4 places, by class name."""
    counts = np.bincount(mask.ravel(), minlength=len(names))[: len(names)]
    return {name: round(float(n) / max(mask.size, 1), 4) for name, n in zip(names, counts)}
