"""Pictures to check a segmentation by eye: overlays, a volume's mosaic with a legend, and the
slice sheets the web page scrolls through.

Pure numpy in, PNG bytes out; no Flask, MXNet or file I/O. The legend's names are drawn with a
small bitmap font of our own (the box is offline and has no fonts to rely on).
"""

import base64
import struct
import zlib

import numpy as np

import processing
import volumes

OPACITY = 0.45
MOSAIC_SLICES = 12
MOSAIC_COLUMNS = 4
MIN_TILE = 160  # small slices (2 mm scans) are enlarged to at least this many pixels
# 5x7 capitals, one string of five 0/1 columns per row, top row first.
GLYPHS = {
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01111 10000 10000 10000 10000 10000 01111",
    "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01111 10000 10000 10011 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "11111 00100 00100 00100 00100 00100 11111",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 11001 10101 10011 10001 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    " ": "00000 00000 00000 00000 00000 00000 00000",
}


def grey(slice_):
    """(H, W) slice of any dtype -> (H, W) uint8 for display, scaled as the network sees it."""
    return (np.clip(processing.normalise(slice_), 0, 1) * 255).astype(np.uint8)


def overlay(image, mask, colours, opacity=OPACITY):
    """(H, W) uint8 grey and (H, W) class indices -> (H, W, 3) uint8, tissue blended in colour."""
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    palette = np.asarray(colours, np.float32)
    tissue = mask > 0
    rgb[tissue] = (1 - opacity) * rgb[tissue] + opacity * palette[mask[tissue]]
    return np.round(rgb).astype(np.uint8)


def slice_overlay(slice_, mask, colours):
    """A PNG slice and its mask -> RGB PNG bytes of the overlay (the PNG route's ?overlay=1)."""
    return encode_png(overlay(grey(slice_), mask, colours))


def text(label, scale=2):
    """(7 * scale, 6 * scale * len) bool pixels of `label` in capitals (unknown letters: a box)."""
    box = "11111 10001 10001 10001 10001 10001 11111"
    glyphs = []
    for letter in label.upper():
        rows = GLYPHS.get(letter, box).split()
        bits = np.array([[c == "1" for c in row] + [False] for row in rows])
        glyphs.append(bits)
    pixels = np.hstack(glyphs) if glyphs else np.zeros((7, 0), bool)
    return np.repeat(np.repeat(pixels, scale, 0), scale, 1)


def legend(classes, colours, width, scale=2):
    """(h, width, 3) uint8 strip: a colour swatch and the name of each class but background."""
    height = 11 * scale
    strip = np.zeros((height, width, 3), np.uint8)
    x = 2 * scale
    for name, colour in list(zip(classes, colours))[1:]:
        if x + 7 * scale > width:
            break
        strip[2 * scale : 9 * scale, x : x + 7 * scale] = colour
        x += 10 * scale
        pixels = text(name.replace("_", " "), scale)[:, : max(0, width - x)]
        strip[2 * scale : 9 * scale, x : x + pixels.shape[1]][pixels] = 255
        x += pixels.shape[1] + 6 * scale
    return strip


class VolumePictures:
    """A segmented volume's slices along one plane, upright, for the mosaic and the page."""

    def __init__(self, volume, labels, plane, colours, classes):
        self.plane = plane
        self.images = volumes.along(volume.data, volume.affine, plane)
        self.labels = volumes.along(labels.reshape(volume.data.shape), volume.affine, plane)
        self.colours, self.classes = colours, classes
        self.pixel_mm = volumes.in_plane_mm(volume, plane)
        sample = np.asarray(volume.data[::2, ::2, ::2], np.float32)
        self.low = float(sample.min())
        above = sample[sample > self.low]
        self.high = float(np.percentile(above, 99.5)) if above.size else self.low + 1

    def tile(self, index):
        """(h, w) uint8 grey and labels of slice `index`, turned so that up is superior or
        anterior (RAS slices have their second axis pointing there)."""
        scaled = (np.asarray(self.images[index], np.float32) - self.low) / (self.high - self.low)
        image = (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
        return np.rot90(image), np.rot90(self.labels[index])

    def mosaic(self):
        """RGB PNG bytes: up to MOSAIC_SLICES evenly spaced slices through the tissue, the
        overlay in class colours, and a legend underneath."""
        with_tissue = np.flatnonzero(self.labels.reshape(len(self.labels), -1).max(1) > 0)
        first, last = (with_tissue[0], with_tissue[-1]) if len(with_tissue) else (0, 0)
        count = min(MOSAIC_SLICES, last - first + 1) if len(with_tissue) else 1
        picks = np.unique(np.round(np.linspace(first, last, count + 2)[1:-1]).astype(int))
        if not len(picks):
            picks = np.array([first])
        tiles = [overlay(*self.tile(i), self.colours) for i in picks]
        tiles = [self.enlarged(t) for t in tiles]
        columns = min(MOSAIC_COLUMNS, len(tiles))
        height, width = tiles[0].shape[:2]
        rows = -(-len(tiles) // columns)
        sheet = np.zeros((rows * height, columns * width, 3), np.uint8)
        for n, t in enumerate(tiles):
            r, c = divmod(n, columns)
            sheet[r * height : (r + 1) * height, c * width : (c + 1) * width] = t
        return encode_png(np.vstack([sheet, legend(self.classes, self.colours, sheet.shape[1])]))

    def enlarged(self, tile):
        """A tile repeated to square pixels and at least MIN_TILE pixels on its long side."""
        across, down = self.pixel_mm  # upright: columns step along A, rows along B
        finest = min(across, down)
        rows, columns = round(down / finest), round(across / finest)
        grow = max(1, -(-MIN_TILE // max(tile.shape[0] * rows, tile.shape[1] * columns)))
        return np.repeat(np.repeat(tile, rows * grow, 0), columns * grow, 1)

    def viewer(self):
        """The page's slices: one grey sheet and one label sheet, tiles in reading order."""
        count = len(self.images)
        first_image, _ = self.tile(0)
        height, width = first_image.shape
        columns = max(1, int(np.ceil(np.sqrt(count * height / width))))
        rows = -(-count // columns)
        images = np.zeros((rows * height, columns * width), np.uint8)
        labels = np.zeros_like(images)
        for index in range(count):
            image, mask = self.tile(index)
            r, c = divmod(index, columns)
            images[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
            labels[r * height : (r + 1) * height, c * width : (c + 1) * width] = mask
        return {
            "plane": self.plane,
            "count": count,
            "columns": columns,
            "tile_width": width,
            "tile_height": height,
            "pixel_mm": [round(float(v), 4) for v in self.pixel_mm],
            "colours": [list(map(int, c)) for c in self.colours],
            "image_png_base64": base64.b64encode(encode_png(images)).decode(),
            "labels_png_base64": base64.b64encode(encode_png(labels, self.colours)).decode(),
        }


def encode_png(pixels, palette=None, level=6):
    """(H, W) uint8 grey, (H, W, 3) uint8 RGB, or (H, W) indices with a palette -> PNG bytes.

    Rows go unfiltered into one zlib stream: fast for sheets of millions of pixels.
    """
    pixels = np.ascontiguousarray(pixels, np.uint8)
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else (3 if palette is not None else 0)
    rows = pixels.reshape(height, -1)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes()

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    parts = [processing.PNG_SIGNATURE]
    parts.append(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)))
    if colour_type == 3:
        parts.append(chunk(b"PLTE", bytes(int(v) for c in palette for v in c[:3])))
    parts.append(chunk(b"IDAT", zlib.compress(raw, level)))
    parts.append(chunk(b"IEND", b""))
    return b"".join(parts)
