"""Time decoding (and, with --url, whole requests) for large PNGs as image tools write them.

    python tools/decode_benchmark.py                       # decode_png only, 4096 pixels
    python tools/decode_benchmark.py --url http://127.0.0.1:5000

PyPNG writes filter None on every row, which decodes in one numpy step; libpng, ImageJ,
OsiriX and most converters choose a filter per row, often Paeth or Average, which decode
along anti-diagonals. The slices are a real T1 slice with noise, upscaled to --size by
nearest neighbour as viewers export it: 8-bit grey, 16-bit grey, 16-bit RGBA holding grey
(as viewers save it) and 16-bit RGBA with different planes. For filters None, Paeth,
Average and a random one per row, prints the best of --repeats decode times, checks the
pixels against the None-filtered original, and with --url the best /segment round trip.
"""

import argparse
import io
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import png

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import processing  # noqa: E402
from tools.fuzz import refilter  # noqa: E402

SLICE = ROOT / "tests" / "data" / "icbm2009a_axial100.png"
KINDS = {"none": 0, "paeth": 4, "average": 3, "random": None}
# bit depth, planes, whether the colour planes differ (else a grey slice saved as colour)
FORMATS = {
    "grey8": (8, 1, False),
    "grey16": (16, 1, False),
    "rgba16": (16, 4, False),
    "rgba16-colour": (16, 4, True),
}


def main(argv=None):
    """Print one line per format and filter."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--filters", default=",".join(KINDS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--url", help="a running server: also time POST /segment")
    args = parser.parse_args(argv)
    print(f"{'format':8s} {'filter':8s} {'MB':>6s} {'decode s':>9s} {'request s':>10s}")
    for name in args.formats.split(","):
        bitdepth, planes, colour = FORMATS[name]
        pixels = upscaled_slice(args.size, bitdepth, planes, colour)
        plain = encode_pixels(pixels, bitdepth)
        for kind in args.filters.split(","):
            rng = np.random.default_rng(0)
            data = plain if KINDS[kind] == 0 else refilter(plain, rng, KINDS[kind])
            decode_s, decoded = best_of(args.repeats, processing.decode_png, data)
            if not np.array_equal(decoded, expected_grey(pixels)):
                print(f"{name} {kind}: decoded pixels differ from the original")
                return 1
            request_s = best_of(args.repeats, post, args.url, data)[0] if args.url else None
            shown = f"{request_s:10.2f}" if request_s is not None else f"{'-':>10s}"
            print(f"{name:8s} {kind:8s} {len(data) / 1e6:6.1f} {decode_s:9.2f} {shown}")
    return 0


def upscaled_slice(size, bitdepth, planes, colour=False):
    """(size, size, planes) ints: the test slice with noise, scaled to the bit depth and
    upscaled; with `colour` each plane gets its own noise, else all carry the same grey."""
    slice_ = processing.decode_png(SLICE.read_bytes()).astype(np.float64)
    top = (1 << bitdepth) - 1
    noise = np.random.default_rng(1).normal(0, 255 * 0.01, slice_.shape + (planes,))
    if not colour:
        noise[:] = noise[..., :1]
    small = np.clip((slice_[..., None] + noise) / 255.0 * top * 0.8, 0, top)
    rows = np.arange(size) * slice_.shape[0] // size
    cols = np.arange(size) * slice_.shape[1] // size
    pixels = small[rows][:, cols]
    if planes == 4:
        pixels[..., 3] = top  # opaque
    return pixels.astype(np.uint16 if bitdepth > 8 else np.uint8)


def encode_pixels(pixels, bitdepth):
    """(H, W, planes) -> PNG bytes, as PyPNG writes them (filter None on every row)."""
    height, width, planes = pixels.shape
    writer = png.Writer(
        width, height, bitdepth=bitdepth, greyscale=planes < 3, alpha=planes in (2, 4)
    )
    out = io.BytesIO()
    writer.write(out, np.ascontiguousarray(pixels).reshape(height, width * planes))
    return out.getvalue()


def expected_grey(pixels):
    """What decode_png must give for these pixels: grey as is, colour as its luma."""
    if pixels.shape[2] < 3:
        return pixels[..., 0]
    return processing.luminance(pixels).astype(pixels.dtype)


def best_of(repeats, function, *args):
    """(fastest wall time in seconds, last result) of calling function(*args) repeats times."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def post(url, data):
    """POST the PNG to /segment; the mask bytes."""
    request = urllib.request.Request(
        url.rstrip("/") + "/segment", data=data, headers={"Content-Type": "image/png"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


if __name__ == "__main__":
    sys.exit(main())
