"""Pure image functions for the endpoint: decode uploads, normalise, postprocess, encode masks.

Everything here takes and returns bytes or numpy arrays; no Flask, MXNet or file I/O.
Training imports `normalise` (and the class names and colours) from here, so the server and
the model see the same input and speak of the same classes.
"""

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import png

CLASS_NAMES = ["background", "csf", "grey_matter", "white_matter"]
# Colour-blind-safe colours that a person can tell apart when opening the mask.
PALETTE = [(0, 0, 0), (0, 114, 178), (230, 159, 0), (240, 240, 240)]
NORMALISATION = "minimum to 0, 99th percentile of above-minimum pixels to 1, clip to [0, 2]"
MIN_SIDE = 16
# The network sees every slice as a square frame of this side (the model's meta can say
# otherwise): the head's bounding box, widened by the margin on each side.
FRAME_SIDE = 256
HEAD_MARGIN = 0.05
HEAD_THRESHOLD = 0.1
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
    16-bit and float inputs of the same anatomy give the same numbers, and black margins
    (pixels at the minimum) do not count.
    """
    values = np.asarray(slice_)
    low = values.min() if values.size else 0
    high = upper_percentile(values, low, 99)
    shifted = values.astype(np.float32) - np.float32(low)
    return np.clip(shifted / np.float32(max(high, 1e-6)), 0.0, 2.0).astype(np.float32)


def upper_percentile(values, low, q):
    """The q-th percentile of (values - low) over the pixels above `low`, as np.percentile.

    Integer slices are counted with a histogram: exact, and fast for 4096x4096 uploads.
    """
    if values.dtype.kind not in "ui":
        shifted = values.astype(np.float32) - np.float32(low)
        foreground = shifted[shifted > 0]
        return float(np.percentile(foreground, q)) if foreground.size else 1.0
    counts = np.bincount((values.astype(np.int64) - int(low)).ravel())
    counts[0] = 0
    total = int(counts.sum())
    if not total:
        return 1.0
    position = q / 100 * (total - 1)
    cumulative = np.cumsum(counts)
    below, above = np.searchsorted(cumulative, [np.floor(position) + 1, np.ceil(position) + 1])
    return float(below + (position - np.floor(position)) * (above - below))


@dataclass(frozen=True)
class Geometry:
    """Where the network's square frame lies in an upload.

    The frame's `side` pixels span `extent` pixels centred on (`centre_y`, `centre_x`) of the
    (height, width) slice; parts of the frame outside it are background. An upload that is
    that slice upscaled by `factor` with nearest neighbours is (height, width) x factor.
    """

    height: int
    width: int
    centre_y: float
    centre_x: float
    extent: float
    side: int
    factor: int = 1

    def source_coordinates(self, axis):
        """(side,) upload coordinates of the frame's pixel centres along axis 0 (y) or 1 (x)."""
        centre = self.centre_y if axis == 0 else self.centre_x
        step = self.extent / self.side
        return centre - self.extent / 2 + (np.arange(self.side) + 0.5) * step - 0.5


def head_box(image):
    """(top, bottom, left, right), bottom/right exclusive, of the head in a normalised slice.

    A row or column belongs to the head when enough of its pixels are brighter than
    `HEAD_THRESHOLD`, so isolated noise pixels do not widen the box. A blank slice gives the
    whole image.
    """
    height, width = image.shape
    bright = image > HEAD_THRESHOLD
    rows = np.flatnonzero(bright.sum(1) >= max(2, round(0.005 * width)))
    columns = np.flatnonzero(bright.sum(0) >= max(2, round(0.005 * height)))
    if not len(rows) or not len(columns):
        return 0, height, 0, width
    return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1


def frame_slice(slice_, side):
    """(H, W) slice of any dtype -> ((side, side) float32 network frame, Geometry).

    The frame is the head's bounding box plus a margin, made square, normalised and resampled
    to `side` pixels: a black canvas around the head, nearest-neighbour upscaling or a huge
    matrix change neither what the network sees nor how much work it does.
    """
    slice_, factor = undo_upscaling(slice_)
    image = normalise(slice_)
    top, bottom, left, right = head_box(image)
    extent = max(bottom - top, right - left) * (1 + 2 * HEAD_MARGIN)
    height, width = image.shape
    geometry = Geometry(height, width, (top + bottom) / 2, (left + right) / 2, extent, side, factor)
    rows = resampling_weights(geometry.source_coordinates(0), extent / side, image.shape[0])
    columns = resampling_weights(geometry.source_coordinates(1), extent / side, image.shape[1])
    frame = rows @ image @ columns.T
    return frame.astype(np.float32), geometry


def undo_upscaling(slice_):
    """(slice, factor): an (H, W) slice exported with nearest-neighbour upscaling, undone.

    Viewers and PACS exports often enlarge slices by repeating pixels; the information is
    on the coarse grid, so the mask is computed there and repeated the same way.
    """
    factor = 1
    for k in (2, 3, 5, 7):
        while slice_.shape[0] % k == 0 and slice_.shape[1] % k == 0 and min(slice_.shape) > k:
            rows, columns = slice_[::k], slice_[:, ::k]
            same = all(np.array_equal(slice_[j::k], rows) for j in range(1, k)) and all(
                np.array_equal(slice_[:, j::k], columns) for j in range(1, k)
            )
            if not same:
                break
            slice_, factor = slice_[::k, ::k], factor * k
    return slice_, factor


def resampling_weights(coordinates, step, length):
    """(len(coordinates), length) float32 weights sampling a signal of `length` at coordinates.

    A triangle kernel as wide as the sampling step (at least one pixel): bilinear when
    upsampling, area-like averaging when downsampling. Samples beyond the signal are zero,
    the background value of a normalised slice.
    """
    radius = max(step, 1.0)
    low = int(np.floor(coordinates.min() - radius))
    high = int(np.ceil(coordinates.max() + radius)) + 1
    source = np.arange(low, high, dtype=np.float32)
    kernel = np.clip(1 - np.abs(source[None] - coordinates[:, None]) / radius, 0, None)
    # normalised over every tap, then the taps beyond the signal dropped: they are background
    kernel /= kernel.sum(1, keepdims=True)
    weights = np.zeros((len(coordinates), length), np.float32)
    inside = (source >= 0) & (source < length)
    weights[:, source[inside].astype(np.int64)] = kernel[:, inside]
    return weights


def mask_from_scores(scores, geometry, rows_per_strip=512):
    """(K, side, side) class scores of a frame -> (H, W) uint8 class indices of the upload.

    Each upload pixel takes the class of the bilinearly interpolated scores; pixels outside
    the frame are background. Where the four frame pixels around an upload pixel share one
    class, so does any blend of them, so only pixels near a class boundary are interpolated,
    a strip of rows at a time, which keeps large uploads fast and small in memory.
    """
    labels = np.argmax(scores, axis=0).astype(np.uint8)
    corner = labels[:-1, :-1]
    settled = (corner == labels[1:, :-1]) & (corner == labels[:-1, 1:]) & (corner == labels[1:, 1:])
    y, x = frame_coordinates(geometry, 0), frame_coordinates(geometry, 1)
    x0, x1, fx = taps(x, geometry.side)
    mask = np.zeros((geometry.height, geometry.width), np.uint8)
    for start in range(0, geometry.height, rows_per_strip):
        y0, y1, fy = taps(y[start : start + rows_per_strip], geometry.side)
        strip = corner[y0][:, x0]
        rows, columns = np.nonzero(~settled[y0][:, x0])
        a, b, c, d = y0[rows], y1[rows], x0[columns], x1[columns]
        wy, wx = fy[rows], fx[columns]
        blended = (scores[:, a, c] * (1 - wx) + scores[:, a, d] * wx) * (1 - wy) + (
            scores[:, b, c] * (1 - wx) + scores[:, b, d] * wx
        ) * wy
        strip[rows, columns] = np.argmax(blended, axis=0)
        mask[start : start + rows_per_strip] = strip
    inside_y = (y > -0.5) & (y < geometry.side - 0.5)
    inside_x = (x > -0.5) & (x < geometry.side - 0.5)
    mask[~inside_y] = 0
    mask[:, ~inside_x] = 0
    if geometry.factor > 1:
        mask = np.repeat(np.repeat(mask, geometry.factor, 0), geometry.factor, 1)
    return mask


def frame_coordinates(geometry, axis):
    """Frame coordinates of every upload pixel centre along axis 0 (y) or 1 (x)."""
    length = geometry.height if axis == 0 else geometry.width
    centre = geometry.centre_y if axis == 0 else geometry.centre_x
    scale = geometry.side / geometry.extent
    return (np.arange(length) + 0.5 - (centre - geometry.extent / 2)) * scale - 0.5


def taps(coordinates, side):
    """Neighbouring frame indices and the weight of the second, for linear interpolation."""
    clipped = np.clip(coordinates, 0, side - 1)
    first = np.minimum(np.floor(clipped).astype(np.int64), side - 2)
    return first, first + 1, (clipped - first).astype(np.float32)


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
