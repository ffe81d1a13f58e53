"""Fuzz the PNG decoder: mutated PNGs against decode_png, or against a running server.

    python tools/fuzz.py --count 20000                       # in-process, decode_png
    python tools/fuzz.py --count 20000 --url http://127.0.0.1:5000/

Prints the outcomes counted by kind (decoded / HTTP status) and every one that broke the
promise: an exception that is not an ImageError, a 5xx, a non-JSON error, a dropped connection.
The seeds are small valid PNGs of every colour type, bit depth and interlace, with a random
filter type per row; the mutations range from flipped bytes to well-formed chunks (valid CRCs)
that lie about the image: wrong row counts, bad filter bytes, palette indices past the
palette, changed IHDR fields, extra or missing data. tests/test_fuzz.py runs a short run.
"""

import argparse
import io
import json
import struct
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import png

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import processing  # noqa: E402

MODES = [
    # (PyPNG writer options, planes, bit depths)
    ({"greyscale": True}, 1, (1, 2, 4, 8, 16)),
    ({"greyscale": True, "alpha": True}, 2, (8, 16)),
    ({"greyscale": False}, 3, (8, 16)),
    ({"greyscale": False, "alpha": True}, 4, (8, 16)),
    ({"palette": True}, 1, (1, 2, 4, 8)),
]


def main(argv=None):
    """Run the fuzz and print counts; exit 1 if any outcome broke the promise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="mutated PNGs to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="POST each PNG here instead of calling decode_png")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    pool = seeds(rng)
    counts, failures = Counter(), []
    started = time.perf_counter()
    for index in range(args.count):
        data = mutate(pool[index % len(pool)], rng)
        outcome, ok = post(args.url, data) if args.url else decode(data)
        counts[outcome] += 1
        if not ok:
            failures.append((index, outcome))
    elapsed = time.perf_counter() - started
    print(f"{args.count} mutated PNGs in {elapsed:.1f} s ({args.count / elapsed:.0f}/s)")
    for outcome, count in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"  {count:7d}  {outcome}")
    for index, outcome in failures[:20]:
        print(f"FAILED #{index}: {outcome}")
    print(f"{len(failures)} broke the promise")
    return 1 if failures else 0


def decode(data):
    """(outcome, ok) of decode_png: ok if it returned a slice or raised a 4xx ImageError."""
    try:
        slice_ = processing.decode_png(data)
    except processing.ImageError as error:
        return f"{error.status} {type(error).__name__}", 400 <= error.status < 500
    except Exception as error:
        return f"crash {type(error).__name__}: {error}", False
    ok = slice_.ndim == 2 and slice_.dtype in (np.uint8, np.uint16)
    return "decoded", ok


def post(url, data):
    """(outcome, ok) of one POST: ok if 200 with a PNG, or 4xx with a JSON error."""
    request = urllib.request.Request(url, data, {"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
            return "200", body.startswith(processing.PNG_SIGNATURE)
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            json.loads(body)["error"]
            is_json = True
        except (ValueError, KeyError, TypeError):
            is_json = False
        return str(error.code), error.code < 500 and is_json
    except OSError as error:
        return f"no answer: {error}", False


def seeds(rng, sizes=((16, 16), (23, 17), (40, 33)), kind=None):
    """Small valid PNGs of every mode, bit depth and interlace, randomly filtered (or `kind`)."""
    pool = []
    for options, planes, depths in MODES:
        for bitdepth in depths:
            for interlace in (False, True):
                width, height = sizes[len(pool) % len(sizes)]
                pool.append(
                    refilter(
                        encode(rng, width, height, options, planes, bitdepth, interlace), rng, kind
                    )
                )
    return pool


def encode(rng, width, height, options, planes, bitdepth, interlace):
    """A valid PNG of random pixels with PyPNG (which writes filter type 0 on every row)."""
    options = dict(options)
    top = (1 << bitdepth) - 1
    if options.pop("palette", False):
        colours = int(rng.integers(1, top + 2))
        options["palette"] = [
            tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(colours)
        ]
        top = colours - 1
    pixels = rng.integers(0, top + 1, (height, width * planes))
    writer = png.Writer(width, height, bitdepth=bitdepth, interlace=interlace, **options)
    out = io.BytesIO()
    writer.write(out, pixels.tolist())
    return out.getvalue()


def chunks(data):
    """[(type, body)] of a well-formed PNG."""
    found, at = [], len(processing.PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        found.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
    return found


def build(parts):
    """PNG bytes from [(type, body)], every CRC valid."""
    out = [processing.PNG_SIGNATURE]
    for kind, body in parts:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc))
    return b"".join(out)


def with_scanlines(data, raw):
    """The PNG with its image data replaced by `raw` (filtered scanlines), compressed."""
    parts = [(k, b) for k, b in chunks(data) if k != b"IDAT"]
    return build(parts[:-1] + [(b"IDAT", zlib.compress(raw))] + parts[-1:])


def scanlines(data):
    """The PNG's inflated image data."""
    return zlib.decompress(b"".join(b for k, b in chunks(data) if k == b"IDAT"))


def refilter(data, rng, kind=None):
    """The same image with each row re-filtered with a random filter type (0-4), or `kind`."""
    reader = png.Reader(bytes=data)
    reader.preamble()
    unit = max(1, reader.planes * reader.bitdepth // 8)
    raw, out, at = scanlines(data), bytearray(), 0
    for *_, height, row_bytes in processing.scan_passes(reader):
        above = np.zeros(row_bytes, np.int16)
        for _ in range(height):
            row = np.frombuffer(raw, np.uint8, row_bytes, at + 1).astype(np.int16)
            at += 1 + row_bytes
            chosen = int(rng.integers(0, 5)) if kind is None else kind
            out += bytes([chosen]) + filter_row(chosen, row, above, unit).tobytes()
            above = row
    return with_scanlines(data, bytes(out))


def filter_row(kind, row, above, unit):
    """PNG filter `kind` applied to one row (int16 bytes) given the row above -> uint8."""
    left = np.concatenate([np.zeros(unit, np.int16), row[:-unit]])
    upper_left = np.concatenate([np.zeros(unit, np.int16), above[:-unit]])
    pa, pb = np.abs(above - upper_left), np.abs(left - upper_left)
    pc = np.abs(left + above - 2 * upper_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upper_left))
    predictor = [0 * row, left, above, (left + above) >> 1, paeth][kind]
    return ((row - predictor) & 0xFF).astype(np.uint8)


def mutate(data, rng):
    """One random mutation of a PNG, from byte noise to well-formed lies."""
    kind = int(rng.integers(0, 10))
    raw = bytearray(data)
    if kind == 0:  # flip a few bytes anywhere
        for at in rng.integers(0, len(raw), int(rng.integers(1, 9))):
            raw[at] ^= int(rng.integers(1, 256))
        return bytes(raw)
    if kind == 1:  # truncate
        return bytes(raw[: int(rng.integers(0, len(raw)))])
    if kind == 2:  # corrupt a chunk's length field
        offsets, at = [], 8
        for _, body in chunks(data):
            offsets.append(at)
            at += 12 + len(body)
        at = offsets[int(rng.integers(0, len(offsets)))]
        raw[at : at + 4] = struct.pack(">I", int(rng.integers(0, 2**32)))
        return bytes(raw)
    if kind == 3:  # change IHDR fields, CRC kept valid
        parts = chunks(data)
        fields = list(struct.unpack(">IIBBBBB", parts[0][1]))
        which = int(rng.integers(0, 7))
        fields[which] = (
            int(rng.integers(0, 70)) if which < 2 else int(rng.choice([0, 1, 2, 3, 4, 6, 8, 16]))
        )
        return build([(b"IHDR", struct.pack(">IIBBBBB", *fields))] + parts[1:])
    image = scanlines(data)
    if kind == 4:  # rows missing or extra
        cut = int(rng.integers(1, 64))
        image = image[:-cut] if rng.random() < 0.5 else image + bytes(rng.integers(0, 256, cut))
    elif kind == 5:  # a far larger stream than the header promises (a small bomb)
        image = image + bytes(int(rng.integers(1, 1 << 20)))
    elif kind == 6:  # bad filter bytes or palette indices: random bytes in the stream
        image = bytearray(image)
        for at in rng.integers(0, len(image), int(rng.integers(1, 9))):
            image[at] = int(rng.integers(0, 256))
        image = bytes(image)
    elif kind == 7:  # trailing bytes after the zlib stream
        parts = chunks(data)
        idat = zlib.compress(image) + bytes(rng.integers(0, 256, int(rng.integers(1, 16))))
        return build([p for p in parts if p[0] != b"IDAT"][:-1] + [(b"IDAT", idat), parts[-1]])
    elif kind == 8:  # drop or duplicate a chunk
        parts = chunks(data)
        at = int(rng.integers(0, len(parts)))
        parts = parts[:at] + parts[at + 1 :] if rng.random() < 0.5 else parts + [parts[at]]
        return build(parts)
    return with_scanlines(data, image)


if __name__ == "__main__":
    sys.exit(main())
