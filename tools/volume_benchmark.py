"""Time a whole 256x256x176 T1 volume through POST /volume, and the batched forward pass alone.

    python tools/volume_benchmark.py [--repeats 3] [--batch 8] [--plane axial|...|all]
                                     [--shape 256 256 176] [--model-dir model/segmentation-net]

The volume is the test ICBM 2009a template (tests/data) resampled to 256x256x176 (or --shape)
at 1 mm with nearest neighbours, so every one of its axial slices holds head (none is skipped
as blank). The server's peak RSS is printed too.
Starts the standalone server as a subprocess on a free port and talks HTTP, as a user would.
"""

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import load_model  # noqa: E402
import processing  # noqa: E402
import volumes  # noqa: E402
from tools.benchmark import free_port, peak_rss_mb, wait_healthy  # noqa: E402

SHAPE = (256, 256, 176)


def main(argv=None):
    """Print the figures the README quotes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=volumes.BATCH, help="frames per forward")
    parser.add_argument("--model-dir", default=str(load_model.BUNDLED_PATH))
    parser.add_argument("--plane", help="?plane= for /volume (default: the server's)")
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE, help="voxels")
    args = parser.parse_args(argv)
    body = t1_volume(args.shape)
    print(f"volume {'x'.join(map(str, args.shape))} int16, .nii.gz {len(body) / 1e6:.1f} MB")
    forward_pass(args)
    port = free_port()
    command = [sys.executable, str(ROOT / "greengrassBrainSegmentationApp.py")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--model-dir", args.model_dir]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        times, summary = [], {}
        for _ in range(args.repeats + 1):  # the first binds the batch executors
            started = time.perf_counter()
            query = "?format=json" + (f"&plane={args.plane}" if args.plane else "")
            request = urllib.request.Request(url + "/volume" + query, data=body, method="POST")
            with urllib.request.urlopen(request, timeout=600) as response:
                summary = json.loads(response.read())
            times.append(time.perf_counter() - started)
        print(
            f"POST /volume end to end, median of {args.repeats}: "
            f"{statistics.median(times[1:]):.1f} s (first {times[0]:.1f} s); "
            f"server: decode {summary['decode_ms'] / 1000:.2f} s, "
            f"segment {summary['inference_ms'] / 1000:.1f} s, {summary['slices']} slices, "
            f"plane {summary['plane']}; server peak RSS {peak_rss_mb(server.pid):.0f} MB"
        )
    finally:
        server.terminate()
        server.wait()


def t1_volume(shape=SHAPE):
    """.nii.gz bytes of the test template resampled to `shape` (1 mm, RAS), int16."""
    source = nib.Nifti1Image.from_bytes(
        gzip.decompress((ROOT / "tests" / "data" / "icbm2009a_2mm.nii.gz").read_bytes())
    )
    data = np.asarray(source.dataobj)
    picks = [
        np.clip(np.round(np.linspace(0, n - 1, m)).astype(int), 0, n - 1)
        for n, m in zip(data.shape, shape)
    ]
    volume = data[np.ix_(*picks)].astype(np.int16) * 4
    return gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes(), compresslevel=1)


def forward_pass(args):
    """The network alone on batches of frames, as volumes.segment calls it (two passes)."""
    model = load_model.load(args.model_dir)
    side = model.meta["frame_side"]
    frames = np.random.default_rng(0).random((args.batch, side, side), np.float32)
    channels = model.meta["input_channels"]
    processing.predict_frames(model.predict, frames, channels, model.passes)
    started = time.perf_counter()
    rounds = max(1, 32 // args.batch)
    for _ in range(rounds):
        processing.predict_frames(model.predict, frames, channels, model.passes)
    per_slice = (time.perf_counter() - started) / (rounds * args.batch)
    print(
        f"forward pass alone, {model.passes} passes, batches of {args.batch} slices of "
        f"{side}x{side}: {per_slice * 1000:.0f} ms a slice, "
        f"{per_slice * SHAPE[2]:.1f} s for {SHAPE[2]} slices"
    )


if __name__ == "__main__":
    main()
