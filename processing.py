"""Pure image functions for the endpoint: decode uploads, normalise, postprocess, encode masks.

Everything here takes and returns bytes or numpy arrays; no Flask, MXNet or file I/O.
Training imports `normalise` (and the class names and colours) from here, so the server and
the model see the same input and speak of the same classes.
"""

import functools
import io
import struct
import time
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
# A slice is taken as skull-stripped when the network calls this share of its above-minimum
# pixels tissue: 0.78-1.00 on stripped held-out slices (5th percentile 0.88), at most 0.73 on
# skull-on ones, degraded or not (model card, "How it is served").
STRIPPED_COVER = 0.85
# Tissue apart from a skull-on slice's brain is dropped (stray_tissue): the frame's tissue is
# eroded by CORE_STEPS pixels and pieces of it under KEEP_PIECE of the largest are not brain.
# On the held-out real heads this takes tongue and neck tissue off mid-sagittal slices.
# Only where the network calls under STRAY_COVER of the slice's above-minimum pixels tissue:
# at most 0.56 on the skull-on held-out slices that had stray pieces, and 0.54-1.00 on the
# stripped ones (whose pieces are all brain) (model card, "How it is served").
CORE_STEPS = 3
KEEP_PIECE = 0.5
STRAY_COVER = 0.6
# How many times each frame goes through the network (predict_frames): 2 is served by default.
PASSES = (1, 2)
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


# Adam7 interlace passes: (first column, first row, column step, row step).
ADAM7 = [
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
]
# Inflated rows handled at a time: bounds decoding memory whatever the image's size.
BLOCK_BYTES = 16 * 1024 * 1024
# Each of the two arrays that unfilter Average/Paeth rows (a 4096² 8-bit block fits in one)
WAVE_BYTES = 40 * 1024 * 1024


def decode_png(data):
    """PNG bytes -> (H, W) uint8 or uint16 greyscale slice.

    Colour is reduced to luminance, alpha is dropped and palette indices are resolved. The
    header's size is checked before any pixel is decompressed, and no more is inflated than
    the header promises (rows x row bytes, every interlace pass counted), so a decompression
    bomb is refused after a few bytes. Memory is the (H, W) result plus one block of inflated
    rows, about BLOCK_BYTES of them (for colour, BLOCK_BYTES per sample plane: 64 MB for
    16-bit RGBA), and two arrays of at most WAVE_BYTES to unfilter Average and Paeth rows.
    Any fault in the file is an ImageError (a 4xx).
    """
    reader = open_png(data)
    to_grey = grey_converter(reader)
    dtype = np.uint16 if reader.bitdepth > 8 else np.uint8
    slice_ = np.empty((reader.height, reader.width), dtype)
    passes = scan_passes(reader)
    try:
        stream = Inflater(idat_chunks(reader))
        layout = Layout.of(reader)
        for x0, y0, dx, dy, width, height, row_bytes in passes:
            # rows per block, as even as they go; colour is sized for one plane, the work
            # that remains when it turns out to be grey (true colour goes in parts)
            sized = width * layout.sample if layout.planes >= 3 else row_bytes
            blocks = -(-height * sized // BLOCK_BYTES)  # ceiling division
            block_rows = max(1, -(-height // max(blocks, 1)))
            previous = np.zeros(width * layout.kept if layout.whole else row_bytes, np.uint8)
            for top in range(0, height, block_rows):
                count = min(block_rows, height - top)
                block = np.frombuffer(stream.read(count * (1 + row_bytes)), np.uint8)
                block = block.reshape(count, 1 + row_bytes)
                grey, previous = grey_rows(block, previous, width, layout, to_grey)
                slice_[y0 + top * dy : y0 + (top + count) * dy : dy, x0::dx] = grey
        stream.finish()
    except (png.Error, EOFError, zlib.error, struct.error, ValueError) as error:
        raise ImageError(
            f"the PNG is damaged or truncated ({error}); re-export it and retry"
        ) from error
    return slice_


@dataclass(frozen=True)
class Layout:
    """How a PNG's pixels lie in its scanlines, for decoding."""

    bitdepth: int
    unit: int  # bytes a filter steps back: one pixel, or 1 below 8 bits
    sample: int  # bytes per sample (1 below 8 bits)
    kept: int  # bytes per pixel decoded: alpha's are left out
    planes: int  # samples per pixel decoded

    @classmethod
    def of(cls, reader):
        unit = max(1, reader.planes * reader.bitdepth // 8)
        sample = max(1, reader.bitdepth // 8)
        # PNG filters never mix a pixel's bytes, so alpha's, dropped anyway, are left out
        kept = unit - sample if reader.alpha else unit
        return cls(reader.bitdepth, unit, sample, kept, reader.planes - reader.alpha)

    @property
    def whole(self):
        """Whether pixels are whole bytes (8 or 16 bits per sample)."""
        return self.bitdepth >= 8


def grey_rows(block, previous, width, layout, to_grey):
    """(n, 1 + row_bytes) filtered scanlines -> ((n, width) grey, the last unfiltered row).

    `previous` is the unfiltered row above, as this function returns it.
    """
    count, sample = len(block), layout.sample
    kinds, data = block[:, 0], block[:, 1:]
    if layout.whole:
        data = data.reshape(count, width, layout.unit)[:, :, : layout.kept]
    else:
        data = data[:, :, None]  # below 8 bits filters step back one byte
    if layout.planes >= 3 and grey_as_colour(data, previous, sample):
        # the red plane is the grey: a third of the unfiltering
        above = previous.reshape(width, layout.kept)[:, :sample].ravel()
        red = unfilter(kinds, data[..., :sample], above)
        previous = np.repeat(red[-1].reshape(width, 1, sample), 3, 1).ravel()
        return unpack(red, layout.bitdepth, width), previous
    part = max(1, BLOCK_BYTES // (width * layout.kept)) if layout.planes >= 3 else count
    parts = []
    for start in range(0, count, part):
        rows = unfilter(kinds[start : start + part], data[start : start + part], previous)
        previous = rows[-1]
        values = unpack(rows, layout.bitdepth, width * layout.planes)
        parts.append(to_grey(values.reshape(len(rows), width, layout.planes)))
    return np.concatenate(parts) if len(parts) > 1 else parts[0], previous


def grey_as_colour(data, previous, sample):
    """True when a block of RGB pixels, (rows, width, 3 x sample) filtered bytes, and the
    row above it carry the same bytes in all three planes: a grey slice saved as colour.
    Filtering maps equal planes to equal planes, so the unfiltered ones are equal too, and
    their Rec. 601 luma is the red plane exactly."""
    kind = np.uint16 if sample == 2 else np.uint8  # one element per sample: 10x faster
    above = previous.reshape(-1, 3 * sample).view(kind)
    samples = data.view(kind)
    return all(
        np.array_equal(group[..., 0], group[..., k]) for group in (above, samples) for k in (1, 2)
    )


def png_size(data):
    """(width, height) of a PNG upload, after the checks decode_png makes before any pixel."""
    reader = open_png(data)
    return reader.width, reader.height


def open_png(data):
    """A png.Reader positioned at the first IDAT, once the body is a PNG of a size we take."""
    if not data:
        raise ImageError(
            "the request body is empty: send the PNG as the raw body or as multipart field 'file'"
        )
    if not data.startswith(PNG_SIGNATURE):
        raise UnsupportedFormat(f"{sniff(data)} is not supported; send a {ACCEPTED}")
    reader = read_header(data)
    check_size(reader.width, reader.height)
    return reader


def sniff(data):
    """A name for what the bytes look like, for error messages."""
    if len(data) > 132 and data[128:132] == b"DICM":
        return "DICOM"
    for magic, name in OTHER_FORMATS:
        if data.startswith(magic):
            return name
    return "this body (not an image we recognise)"


def read_header(data):
    """A png.Reader that has read and checked IHDR and every chunk up to the first IDAT."""
    if data[12:16] != b"IHDR":
        raise ImageError("the PNG is truncated or has no IHDR header; re-export it and retry")
    reader = png.Reader(bytes=data)
    try:
        reader.preamble()
        if reader.colormap and not reader.plte:
            raise png.FormatError("a palette image without a PLTE chunk before its pixels")
    except (png.Error, EOFError, struct.error, ValueError) as error:
        raise ImageError(
            f"the PNG header is damaged or truncated ({error}); re-export it and retry"
        ) from error
    return reader


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


def scan_passes(reader):
    """[(x0, y0, dx, dy, width, height, row_bytes)]: each non-empty pass, one if not interlaced."""
    grid = ADAM7 if reader.interlace else [(0, 0, 1, 1)]
    passes = []
    for x0, y0, dx, dy in grid:
        width = -(-(reader.width - x0) // dx)
        height = -(-(reader.height - y0) // dy)
        if width > 0 and height > 0:
            row_bytes = -(-(width * reader.planes * reader.bitdepth) // 8)
            passes.append((x0, y0, dx, dy, width, height, row_bytes))
    return passes


def idat_chunks(reader):
    """The data of each IDAT chunk (CRC checked by PyPNG), up to the first other chunk."""
    while True:
        kind, body = reader.chunk()
        if kind != b"IDAT":
            return
        yield body


class Inflater:
    """Inflates IDAT data on demand: only the bytes asked for, then at most one more."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.zlib = zlib.decompressobj()
        self.pending = b""

    def read(self, size):
        """Exactly `size` inflated bytes; ImageError if the image data ends before."""
        parts, need = [], size
        while need:
            if not self.pending:
                self.pending = b"" if self.zlib.eof else next(self.chunks, b"")
                if not self.pending:
                    raise ImageError(
                        "the PNG has fewer pixel rows than its header promises "
                        "(truncated or damaged); re-export it and retry"
                    )
            out = self.zlib.decompress(self.pending, need)
            self.pending = self.zlib.unconsumed_tail
            parts.append(out)
            need -= len(out)
        return b"".join(parts)

    def finish(self):
        """Refuse data beyond the promised rows: more pixels, or bytes after the zlib stream."""
        while not self.zlib.eof:
            if not self.pending:
                self.pending = next(self.chunks, b"")
                if not self.pending:
                    return  # no end-of-stream marker, but every row arrived: accept, as libpng does
            if self.zlib.decompress(self.pending, 1):
                raise ImageError(
                    "the PNG holds more pixel data than its header promises; re-export it and retry"
                )
            self.pending = self.zlib.unconsumed_tail
        if self.zlib.unused_data or any(self.chunks):
            raise ImageError("the PNG has data after its image stream; re-export it and retry")


def unfilter(kinds, pixels, previous):
    """(n,) filter types and (n, units, unit) filtered bytes -> (n, units x unit) uint8 bytes.

    `unit` is the filter's pixel size in bytes; `pixels` may be any view (alpha or colour
    planes left out). `previous` is the row above the first one (zeros at the top of a pass).
    Filters without a left neighbour (None, Sub, Up) go a row at a time; a block with Average
    or Paeth rows goes along anti-diagonals, where every pixel's left, upper and upper-left
    neighbours are already known, so it costs rows + columns numpy steps rather than one
    Python step per pixel.
    """
    if kinds.size and kinds.max() > 4:
        raise ImageError(f"the PNG uses filter type {kinds.max()}, which does not exist")
    count, units, unit = pixels.shape
    # one filter type on every row (PyPNG writes None throughout): one numpy step
    if (kinds == 0).all():
        return np.array(pixels).reshape(count, -1)
    if (kinds == 1).all():  # Sub: each row is its own running sum
        return np.cumsum(pixels, axis=1, dtype=np.uint8).reshape(count, -1)
    if (kinds == 2).all():  # Up: a running sum down the rows
        rows = np.vstack([previous, pixels.reshape(count, -1)])
        return np.cumsum(rows, axis=0, dtype=np.uint8)[1:]
    if not np.isin(kinds, (3, 4)).any():
        data = np.array(pixels).reshape(count, -1)
        rows = np.empty_like(data)
        above = previous
        for i, kind in enumerate(kinds):
            if kind == 1:
                rows[i] = np.cumsum(data[i].reshape(units, unit), axis=0, dtype=np.uint8).ravel()
            elif kind == 2:
                rows[i] = data[i] + above
            else:
                rows[i] = data[i]
            above = rows[i]
        return rows
    return wavefront(pixels, kinds, previous)


def wavefront(pixels, kinds, previous):
    """unfilter() for blocks with Average or Paeth rows, in as few row chunks as keep each of
    wave()'s two arrays, (rows + units) x rows x unit bytes, within WAVE_BYTES: a tall, narrow
    block would otherwise cost memory in the square of its height."""
    count, units, unit = pixels.shape
    rows = count
    while rows > 1 and (rows + units + 2) * (rows + 1) * unit > WAVE_BYTES:
        rows = (rows + 1) // 2
    parts = []
    for start in range(0, count, rows):
        part = wave(pixels[start : start + rows], kinds[start : start + rows], previous)
        parts.append(part)
        previous = part[-1]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def wave(pixels, kinds, previous):
    """unfilter() along anti-diagonals: one numpy step per diagonal.

    Pixel (i, x) is stored at skew[i + x + 2, i + 1], so the diagonal i + x = d is one
    contiguous run, its left and upper neighbours the run before it and its upper-left ones
    the run before that; row 0 of the skew holds the previous row and untouched places are
    the zeros PNG puts beyond the edges. Each pixel's predictor comes from one lookup in
    predictor_table(), whatever the row's filter.
    """
    count, units, unit = pixels.shape
    shape = (count + units + 2, count + 1, unit)
    known, raw = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    skew(raw, count, units)[...] = pixels
    known[1 : units + 1, 0] = previous.reshape(units, unit)
    # index = table row of the filter + (b - c + 255) * 511 + (a - c + 255)
    offsets = (np.maximum(kinds, 1).astype(np.int32) - 1) * 511 * 511 + 255 * 512
    offsets = int(offsets[0]) if (kinds == kinds[0]).all() else offsets[:, None]
    plain = (kinds == 0)[:, None] if (kinds == 0).any() else None
    table = predictor_table()
    for diagonal in range(count + units - 1):
        first, last = max(0, diagonal - units + 1), min(count - 1, diagonal)
        here = slice(first + 1, last + 2)
        a, b = known[diagonal + 1, here], known[diagonal + 1, first : last + 1]
        c, out = known[diagonal, first : last + 1], known[diagonal + 2, here]
        index = np.subtract(b, c, dtype=np.int32)
        index *= 511
        index += a
        index -= c
        index += offsets if isinstance(offsets, int) else offsets[first : last + 1]
        predictor = table[index]
        predictor += c
        np.add(raw[diagonal + 2, here], predictor, out=out)
        if plain is not None:  # filter None amid Average/Paeth rows: the byte as sent
            np.copyto(out, raw[diagonal + 2, here], where=plain[first : last + 1])
    return skew(known, count, units).reshape(count, units * unit)


def skew(array, count, units):
    """The (count, units, unit) view of a wavefront array in which pixel (i, x) is
    array[i + x + 2, i + 1]."""
    step, row, byte = array.strides
    return np.lib.stride_tricks.as_strided(
        array[2:, 1:], (count, units, array.shape[2]), (step + row, step, byte), writeable=True
    )


@functools.lru_cache(maxsize=None)  # functools.cache needs Python 3.9
def predictor_table():
    """PNG predictors minus c, modulo 256, for Sub, Up, Average, Paeth in turn, each indexed
    by (b - c + 255) * 511 + (a - c + 255), where a is the left, b the upper and c the
    upper-left byte: uint8, 1 MB."""
    up, left = np.meshgrid(np.arange(-255, 256), np.arange(-255, 256), indexing="ij")
    pa, pb, pc = np.abs(up), np.abs(left), np.abs(up + left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, 0))
    return (np.stack([left, up, (left + up) >> 1, paeth]) & 0xFF).astype(np.uint8).ravel()


def unpack(rows, bitdepth, count):
    """(n, row_bytes) uint8 scanlines -> (n, count) sample values, uint8 or uint16."""
    if bitdepth == 16:
        return rows.view(">u2").astype(np.uint16)[:, :count]
    if bitdepth == 8:
        return rows[:, :count]
    shifts = np.arange(8 - bitdepth, -1, -bitdepth, dtype=np.uint8)
    samples = (rows[:, :, None] >> shifts) & ((1 << bitdepth) - 1)
    return samples.reshape(len(rows), -1)[:, :count]


def grey_converter(reader):
    """A function (n, W, planes) samples -> (n, W) grey, for this PNG's colour type."""
    if reader.colormap:
        palette = np.array([entry[:3] for entry in reader.palette()], np.uint8)
        lookup = luminance(palette).astype(np.uint8)

        def from_palette(samples):
            indices = samples[..., 0]
            if indices.max() >= len(lookup):
                raise ImageError(
                    f"the PNG uses palette index {indices.max()} but its palette has "
                    f"{len(lookup)} colours; re-export it and retry"
                )
            return lookup[indices]

        return from_palette
    dtype = np.uint16 if reader.bitdepth > 8 else np.uint8
    if reader.planes >= 3:
        return lambda samples: luminance(samples).astype(dtype)
    return lambda samples: samples[..., 0].astype(dtype)


def luminance(rgb):
    """(..., 3 or more) integer samples -> Rec. 601 luma 0.299 R + 0.587 G + 0.114 B, rounded
    half up, in exact integer arithmetic (uint32)."""
    total = np.multiply(rgb[..., 0], 299, dtype=np.uint32)
    total += np.multiply(rgb[..., 1], 587, dtype=np.uint32)
    total += np.multiply(rgb[..., 2], 114, dtype=np.uint32)
    total += 500
    total //= 1000
    return total


def normalise(slice_):
    """Scale an (H, W) slice of any dtype to float32, about 0..1 in tissue, scanner-independent.

    The minimum maps to 0 and the 99th percentile of the pixels above it to 1, so 8-bit,
    16-bit and float inputs of the same anatomy give the same numbers, and black margins
    (pixels at the minimum) do not count.
    """
    values = np.asarray(slice_)
    low, scale = intensity_range(values)
    shifted = values.astype(np.float32) - np.float32(low)
    return np.clip(shifted / np.float32(scale), 0.0, 2.0).astype(np.float32)


def intensity_range(values):
    """(low, scale) of normalise(): the minimum, and the 99th percentile of the pixels above
    it, less the minimum (at least 1e-6)."""
    low = values.min() if values.size else 0
    return low, max(upper_percentile(values, low, 99), 1e-6)


def upper_percentile(values, low, q):
    """The q-th percentile of (values - low) over the pixels above `low`, as np.percentile.

    Integer slices are counted with a histogram: exact, and fast for 4096x4096 uploads.
    """
    if values.dtype.kind not in "ui":
        shifted = values.astype(np.float32) - np.float32(low)
        foreground = shifted[shifted > 0]
        return float(np.percentile(foreground, q)) if foreground.size else 1.0
    if values.dtype.kind == "u":
        counts = np.bincount(values.ravel())[int(low) :]
    else:  # signed: shifted to start at zero first
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


def head_box(image, threshold=HEAD_THRESHOLD):
    """(top, bottom, left, right), bottom/right exclusive, of the head in a normalised slice.

    A row or column belongs to the head when enough of its pixels are brighter than
    `threshold`, so isolated noise pixels do not widen the box. A blank slice gives the
    whole image.
    """
    height, width = image.shape
    bright = image > threshold
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
    low, scale = intensity_range(slice_)
    if slice_.dtype.kind == "u" and slice_.max() <= low + 2 * scale:
        # nothing to clip: resample the integers less their minimum, then scale the frame
        # alone, rather than make a float copy of a large upload
        image = slice_ - slice_.dtype.type(low) if low else slice_
    else:
        image, scale = normalise(slice_), 1.0
    top, bottom, left, right = head_box(image, HEAD_THRESHOLD * scale)
    extent = max(bottom - top, right - left) * (1 + 2 * HEAD_MARGIN)
    height, width = image.shape
    geometry = Geometry(height, width, (top + bottom) / 2, (left + right) / 2, extent, side, factor)
    columns = geometry.source_coordinates(1)
    first, stop = kernel_span(columns, extent / side, width)
    # the first pass keeps only the columns the second reads: not a black canvas's
    frame = resample_rows(image[:, first:stop], geometry.source_coordinates(0), extent / side)
    # rows are gathered fast, columns slowly: the second pass runs on the transpose
    frame = resample_rows(np.ascontiguousarray(frame.T), columns - first, extent / side)
    return np.divide(frame.T, np.float32(scale), out=np.empty((side, side), np.float32)), geometry


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


def kernel_taps(coordinates, step):
    """(radius, source): the triangle kernel's radius for sampling `step`, and the (outputs,
    taps) rows it may weigh for each coordinate. The kernel is non-zero on the open interval
    (c - radius, c + radius): at most ceil(2 radius) whole rows, from floor(c - radius) + 1."""
    radius = max(step, 1.0)
    first = np.floor(coordinates - radius).astype(np.int64) + 1
    return radius, first[:, None] + np.arange(int(np.ceil(2 * radius)))[None]


def kernel_span(coordinates, step, length):
    """(first, stop): the rows of a `length`-row image that resample_rows() reads for
    `coordinates` with a nonzero weight."""
    source = kernel_taps(coordinates, step)[1]
    return min(max(int(source.min()), 0), length), min(max(int(source.max()) + 1, 0), length)


def resample_rows(image, coordinates, step):
    """(len(coordinates), W) rows of an (H, W) image sampled at row `coordinates`.

    A triangle kernel as wide as the sampling step (at least one pixel): bilinear when
    upsampling, area-like averaging when downsampling. Weights are normalised over every
    tap, then taps beyond the image are dropped: they are background, zero in a normalised
    slice. Only the kernel's few taps per output row are read, so a 4096-row upload costs
    about as much as the pixels it has, not pixels x outputs.
    """
    length = len(image)
    if not length:  # every tap beyond the image: all background
        return np.zeros((len(coordinates), image.shape[1]), np.float32)
    radius, source = kernel_taps(coordinates, step)
    kernel = np.clip(1 - np.abs(source - coordinates[:, None]) / radius, 0, None)
    kernel = (kernel / kernel.sum(1, keepdims=True)).astype(np.float32)
    kernel[(source < 0) | (source >= length)] = 0
    source = np.clip(source, 0, length - 1)
    out = np.zeros((len(coordinates), image.shape[1]), np.float32)
    for tap in range(source.shape[1]):
        out += kernel[:, tap, None] * image[source[:, tap]]
    return out


def segment_with(predict, slice_, side, channels=1, timings=None, passes=2, drop_stray=True):
    """(H, W) slice -> (H, W) uint8 classes: frame it, `predict` the frame, map the scores back.

    `predict` takes an (N, channels, side, side) float32 batch and returns (N, K, side, side)
    scores; `passes` is as in predict_frames() and `drop_stray` as in mask_of(). A `timings`
    dict gets "forward_ms", the network's own share of the time.
    """
    frame, geometry = frame_slice(slice_, side)
    started = time.perf_counter()
    scores = predict_frames(predict, frame[None], channels, passes)[0]
    if timings is not None:
        timings["forward_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return mask_of(slice_, scores, geometry, drop_stray)


def mask_of(slice_, scores, geometry, drop_stray=True):
    """(H, W) uint8 classes of an (H, W) slice from its frame's (K, side, side) scores: the
    scores mapped back (mask_from_scores), then a stripped slice filled (fill_stripped) and,
    with `drop_stray`, a skull-on slice rid of the tissue apart from its brain (stray_tissue).
    The PNG and volume routes both end here; volumes drop stray tissue in 3-D instead.
    """
    mask = mask_from_scores(scores, geometry)
    cover, gap = tissue_cover(slice_, mask)
    if cover >= STRIPPED_COVER:
        mask[gap] = CLASS_NAMES.index("csf")
        return mask
    if not drop_stray or cover >= STRAY_COVER:
        return mask
    stray = stray_tissue(first_argmax(scores) > 0)
    if stray is None:
        return mask
    scores = scores.copy()
    scores[0][stray] = scores.max() + 1  # background wins there, and blends at its edge
    return mask_from_scores(scores, geometry)


def predict_frames(predict, frames, channels=1, passes=2):
    """(N, side, side) frames -> (N, K, side, side) scores, in one call to `predict`.

    With 2 `passes` each frame also goes through the network upside down, and its scores are
    the mean of both: better masks on every held-out brain and plane, for twice the work
    (model card, "How it is served"). 1 is a single pass.
    """
    if passes not in PASSES:
        raise ValueError(f"passes must be 1 or 2, not {passes!r}")
    count, side = len(frames), frames.shape[-1]
    batch = np.empty((passes * count, channels, side, side), np.float32)
    batch[:count] = frames[:, None]  # every channel the same frame
    if passes == 2:
        batch[count:] = frames[:, None, ::-1]
    scores = predict(batch)
    if passes == 2:
        # in place: new score-sized arrays cost page faults (0.3 ms a slice here)
        mean = scores[:count]
        np.add(mean, scores[count:, :, ::-1], out=mean)
        mean *= np.float32(0.5)
        return mean
    return scores


def fill_stripped(slice_, mask):
    """(H, W) mask of an (H, W) slice, with the brain's dark pixels made CSF if it is stripped.

    Outside a skull-stripped brain the slice is black: every pixel above its minimum is brain,
    which is how a scan's labels (FSL FAST, SPM) count it. The network, which also sees heads
    with a skull, leaves the darkest of them, fluid at the brain's rim, as background. When it
    calls at least STRIPPED_COVER of those pixels tissue, the slice is stripped and the rest
    are CSF. Changes `mask` in place and returns it.
    """
    cover, gap = tissue_cover(slice_, mask)
    if cover >= STRIPPED_COVER:
        mask[gap] = CLASS_NAMES.index("csf")
    return mask


def tissue_cover(slice_, mask):
    """(cover, gap): the share of the slice's pixels above its minimum that `mask` calls
    tissue (0 for a blank slice), and the (H, W) bool pixels of them it calls background."""
    gap = slice_ > slice_.min()
    count = np.count_nonzero(gap)
    np.logical_and(gap, mask == 0, out=gap)  # in place: a 4096x4096 upload is 16 MB a copy
    return (1 - np.count_nonzero(gap) / count if count else 0.0), gap


def mask_from_scores(scores, geometry, rows_per_strip=512):
    """(K, side, side) class scores of a frame -> (H, W) uint8 class indices of the upload.

    Each upload pixel takes the class of the bilinearly interpolated scores; pixels outside
    the frame are background. Where the four frame pixels around an upload pixel share one
    class, so does any blend of them, so only pixels near a class boundary are interpolated:
    a frame row at a time when each spans several upload rows (large uploads), else a strip
    of rows at a time, which keeps either fast and small in memory.
    """
    mask = np.zeros((geometry.height, geometry.width), np.uint8)
    # only the rows and columns the frame covers: a black canvas around the head costs nothing
    y, x = frame_coordinates(geometry, 0), frame_coordinates(geometry, 1)
    top, bottom = frame_span(y, geometry.side)
    left, right = frame_span(x, geometry.side)
    if top < bottom and left < right:
        labels = first_argmax(scores)
        corner = labels[:-1, :-1]
        settled = corner == labels[1:, :-1]
        settled &= corner == labels[:-1, 1:]
        settled &= corner == labels[1:, 1:]
        y = y[top:bottom]
        x_taps = taps(x[left:right], geometry.side)
        if bottom - top >= 4 * geometry.side:
            inside = blend_by_frame_row(scores, corner, settled, taps(y, geometry.side), x_taps)
        else:
            inside = blend_by_strip(scores, corner, settled, y, x_taps, rows_per_strip)
        mask[top:bottom, left:right] = inside
    if geometry.factor > 1:
        mask = np.repeat(np.repeat(mask, geometry.factor, 0), geometry.factor, 1)
    return mask


def blend_by_strip(scores, corner, settled, y, x_taps, rows_per_strip):
    """mask_from_scores() for uploads about the frame's size: (H, W) uint8."""
    x0, x1, fx = x_taps
    side = len(corner) + 1
    mask = np.empty((len(y), len(x0)), np.uint8)
    unsettled = ~settled
    for start in range(0, len(y), rows_per_strip):
        y0, y1, fy = taps(y[start : start + rows_per_strip], side)
        strip = corner[y0][:, x0]
        # flatnonzero and divmod: half the time of a 2-D np.nonzero
        rows, columns = np.divmod(np.flatnonzero(unsettled[y0][:, x0]), len(x0))
        a, b, c, d = y0[rows], y1[rows], x0[columns], x1[columns]
        wy, wx = fy[rows], fx[columns]
        blended = (scores[:, a, c] * (1 - wx) + scores[:, a, d] * wx) * (1 - wy) + (
            scores[:, b, c] * (1 - wx) + scores[:, b, d] * wx
        ) * wy
        strip[rows, columns] = first_argmax(blended)
        mask[start : start + rows_per_strip] = strip
    return mask


def blend_by_frame_row(scores, corner, settled, y_taps, x_taps):
    """mask_from_scores() for uploads several times the frame's size: (H, W) uint8.

    The upload rows between two frame rows share their settled columns and their blend
    along x, so each frame row costs one gather and one small blend, not one per upload row.
    """
    (y0, _, fy), (x0, x1, fx) = y_taps, x_taps
    mask = np.empty((len(y0), len(x0)), np.uint8)
    edges = np.flatnonzero(np.diff(y0)) + 1
    for start, stop in zip(np.r_[0, edges], np.r_[edges, len(y0)]):
        j = y0[start]
        mask[start:stop] = corner[j, x0]
        columns = np.flatnonzero(~settled[j, x0])
        if not len(columns):
            continue
        c, d, wx = x0[columns], x1[columns], fx[columns]
        upper = scores[:, j, c] * (1 - wx) + scores[:, j, d] * wx
        lower = scores[:, j + 1, c] * (1 - wx) + scores[:, j + 1, d] * wx
        wy = fy[start:stop, None]
        mask[start:stop, columns] = first_argmax(upper[:, None] * (1 - wy) + lower[:, None] * wy)
    return mask


def first_argmax(scores):
    """np.argmax(scores, axis=0) as uint8, ties to the first class; a few times faster.

    NumPy reduces the leading axis of a (K, ...) array with strided loops; comparing the K
    planes in turn reads each once, contiguously.
    """
    best = scores[0].copy()
    labels = np.zeros(best.shape, np.uint8)
    for k in range(1, len(scores)):
        better = scores[k] > best
        labels[better] = k
        np.maximum(best, scores[k], out=best)
    return labels


def frame_coordinates(geometry, axis):
    """Frame coordinates of every upload pixel centre along axis 0 (y) or 1 (x)."""
    length = geometry.height if axis == 0 else geometry.width
    centre = geometry.centre_y if axis == 0 else geometry.centre_x
    scale = geometry.side / geometry.extent
    return (np.arange(length) + 0.5 - (centre - geometry.extent / 2)) * scale - 0.5


def frame_span(coordinates, side):
    """(first, stop) of the upload rows or columns, at frame `coordinates`
    (frame_coordinates()), whose centres lie inside the frame."""
    inside = np.flatnonzero(np.abs(coordinates - (side - 1) / 2) < side / 2)
    return (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)


def taps(coordinates, side):
    """Neighbouring frame indices and the weight of the second, for linear interpolation."""
    clipped = np.clip(coordinates, 0, side - 1)
    first = np.minimum(np.floor(clipped).astype(np.int64), side - 2)
    return first, first + 1, (clipped - first).astype(np.float32)


def encode_mask(mask, palette=PALETTE):
    """(H, W) uint8 class indices -> 8-bit palette PNG bytes; pixel value = class index."""
    height, width = mask.shape
    writer = png.Writer(
        width, height, palette=[tuple(c) for c in palette], bitdepth=8, compression=1
    )
    out = io.BytesIO()
    writer.write_array(out, np.ascontiguousarray(mask, dtype=np.uint8).ravel())
    return out.getvalue()


def class_fractions(mask, names=CLASS_NAMES):
    """Share of pixels in each class, rounded to 4 places, by class name."""
    counts = [np.count_nonzero(mask == k) for k in range(len(names))]  # 3x np.bincount
    return {name: round(float(n) / max(mask.size, 1), 4) for name, n in zip(names, counts)}


# --- Tissue apart from the brain -------------------------------------------------------------


def stray_tissue(tissue, steps=CORE_STEPS, keep=KEEP_PIECE):
    """(side, side) bool: what a frame's `tissue` holds apart from the brain, or None.

    Slice by slice the network calls some of the head tissue: the tongue and the soft tissue
    under the cerebellum in mid-sagittal slices, eyes, scalp. They meet the brain, if at all,
    by thin bridges. So the tissue is eroded by `steps` pixels and the pieces left are
    counted; the brain is the largest and any at least `keep` of its size, grown back within
    the tissue by one pixel more. Stray tissue is the tissue apart from that brain that is
    joined to a smaller piece: a thin fold of the brain joined to nothing else stays. In the
    frame, so the same upload framed on any canvas loses the same pixels.
    """
    tissue = tissue[None]
    core = erode(tissue, [0, steps, steps])
    rows, starts, stops, piece = tissue_pieces(core)
    if len(piece) == 0:
        return None
    sizes = np.bincount(piece, weights=stops - starts)
    small = sizes[piece] < keep * sizes.max()
    if not small.any():
        return None
    stray = np.zeros_like(core)
    stray.reshape(-1)[run_pixels(rows[small], starts[small], stops[small], core)] = True
    brain = grow_within(core & ~stray, tissue, [0, steps + 1, steps + 1])
    apart = tissue & ~brain
    rows, starts, stops, piece = tissue_pieces(apart)
    # the pieces apart from the brain that hold a stray core pixel go
    width = apart.shape[-1]
    held = np.zeros((apart.size // width, width + 1), np.int32)
    np.cumsum(stray.reshape(-1, width), axis=1, out=held[:, 1:])
    joined = held[rows, stops] > held[rows, starts]
    going = np.isin(piece, piece[joined])
    stray = np.zeros_like(apart)
    stray.reshape(-1)[run_pixels(rows[going], starts[going], stops[going], apart)] = True
    return stray[0]


def run_pixels(rows, starts, stops, array):
    """Flat indices into `array` of every pixel of runs as tissue_pieces() gives them (few,
    unlike the array's pixels)."""
    lengths = stops - starts
    begins = rows * array.shape[-1] + starts
    offsets = np.repeat(begins - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(lengths.sum())


def erode(mask, steps):
    """`mask` eroded by a cross, steps[axis] voxels along each axis; beyond the array is
    background. (Where a field of view cuts the brain, grow_within puts the cut back.)"""
    return by_cross(mask, steps, np.logical_and)


def grow_within(mask, within, steps):
    """`mask` dilated by a cross, steps[axis] voxels along each axis, never beyond `within`."""
    return by_cross(mask, steps, np.logical_or, within)


def by_cross(mask, steps, combine, within=None):
    """erode() (`combine` np.logical_and) or dilate (np.logical_or) `mask` one voxel a step
    along each axis that has steps left, keeping it within `within` after each step."""
    mask = mask.copy()
    for step in range(max(steps)):
        before = mask.copy()
        for axis, count in enumerate(steps):
            if step < count:
                ahead, behind = shifted(axis)
                combine(mask[ahead], before[behind], out=mask[ahead])
                combine(mask[behind], before[ahead], out=mask[behind])
                if combine is np.logical_and:
                    np.moveaxis(mask, axis, 0)[[0, -1]] = False
        if within is not None:
            mask &= within
    return mask


def shifted(axis):
    """Index tuples of a 3-D array's voxels 1..end and 0..end-1 along `axis`."""
    ahead = [slice(None)] * 3
    behind = [slice(None)] * 3
    ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
    return tuple(ahead), tuple(behind)


def tissue_pieces(mask):
    """The 26-connected pieces of an (N, A, B) bool mask, as runs along its last axis.

    Returns (row, start, stop, piece) per run: the run covers mask.reshape(-1, B)[row,
    start:stop], and runs in one piece share its number. NumPy only (scipy is not a serving
    dependency) and about as fast as scipy.ndimage.label: each row's runs are joined to the
    runs they touch in the 4 rows after it, then union-find with pointer jumping.
    """
    count, height, width = mask.shape
    padded = np.zeros((count * height, width + 2), np.int8)
    padded[:, 1:-1] = mask.reshape(count * height, width)
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    stops = np.nonzero(steps == -1)[1]
    # one sorted key per run end, so the runs a run touches in another row are one range
    key = width + 2
    start_keys, stop_keys = rows * key + starts, rows * key + stops
    slab, row = np.divmod(rows, height)
    first, second = [], []
    for d_slab, d_row in ((0, 1), (1, -1), (1, 0), (1, 1)):
        to_slab, to_row = slab + d_slab, row + d_row
        run = np.flatnonzero((to_slab < count) & (to_row >= 0) & (to_row < height))
        other = (to_slab * height + to_row)[run] * key
        # diagonal neighbours count: runs touch when they overlap or meet at a corner
        low = np.searchsorted(stop_keys, other + starts[run] - 1, side="right")
        high = np.searchsorted(start_keys, other + stops[run], side="right")
        touching = np.maximum(high - low, 0)
        first.append(np.repeat(run, touching))
        within = np.arange(touching.sum()) - np.repeat(np.cumsum(touching) - touching, touching)
        second.append(np.repeat(low, touching) + within)
    first, second = np.concatenate(first), np.concatenate(second)
    piece = np.arange(len(starts))
    while True:
        a, b = piece[first], piece[second]
        apart = a != b
        if not apart.any():
            return rows, starts, stops, piece
        a, b = a[apart], b[apart]
        piece[np.maximum(a, b)] = np.minimum(a, b)  # hook the larger root under the smaller
        while True:
            jumped = piece[piece]
            if np.array_equal(jumped, piece):
                break
            piece = jumped
