"""Measure the service: start-to-healthy, latency for a 256x256 slice, forward pass, peak RSS.

    python tools/benchmark.py [--requests 30] [--model-dir model/segmentation-net]

Starts the standalone server as a subprocess on a free port, as a user would, and talks HTTP.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import load_model  # noqa: E402
import processing  # noqa: E402


def main(argv=None):
    """Print the figures the README quotes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--model-dir", default=str(load_model.BUNDLED_PATH))
    args = parser.parse_args(argv)
    slice_png = test_slice(256)
    port = free_port()
    began = time.perf_counter()
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "greengrassBrainSegmentationApp.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model-dir",
            args.model_dir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        healthy = wait_healthy(url) - began
        end_to_end, inference = [], []
        for _ in range(args.requests + 2):
            started = time.perf_counter()
            request = urllib.request.Request(
                url + "/", data=slice_png, method="POST", headers={"Content-Type": "image/png"}
            )
            with urllib.request.urlopen(request) as response:
                response.read()
                inference.append(float(response.headers["X-Inference-Ms"]))
            end_to_end.append((time.perf_counter() - started) * 1000)
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait()
    forward = forward_pass_ms(args.model_dir, args.requests)
    report = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "requests": args.requests,
        "start_to_healthy_s": round(healthy, 2),
        "http_end_to_end_ms_median": round(statistics.median(end_to_end[2:]), 1),
        "http_end_to_end_ms_p90": round(float(np.percentile(end_to_end[2:], 90)), 1),
        "server_inference_ms_median": round(statistics.median(inference[2:]), 1),
        "forward_pass_ms_median": round(statistics.median(forward), 1),
        "server_peak_rss_mb": rss,
    }
    print(json.dumps(report, indent=2))


def test_slice(side):
    """The repository's real T1 test slice, centre-cropped/padded to side x side, as PNG."""
    slice_ = processing.decode_png(
        (ROOT / "tests" / "data" / "icbm2009a_axial100.png").read_bytes()
    )
    canvas = np.zeros((side, side), slice_.dtype)
    h, w = min(side, slice_.shape[0]), min(side, slice_.shape[1])
    top, left = (slice_.shape[0] - h) // 2, (slice_.shape[1] - w) // 2
    canvas[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = slice_[
        top : top + h, left : left + w
    ]
    import io

    import png

    out = io.BytesIO()
    png.from_array(canvas, "L").write(out)
    return out.getvalue()


def forward_pass_ms(model_dir, repeats):
    """Median milliseconds of the forward pass alone for a (1, 1, 256, 256) batch."""
    model = load_model.load(model_dir)
    batch = np.random.default_rng(0).random((1, 1, 256, 256), dtype=np.float32)
    model.predict(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(batch)
        times.append((time.perf_counter() - started) * 1000)
    return times


def wait_healthy(url, timeout=120):
    """perf_counter() at the first 200 from /health."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter()
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"error: {url} did not become healthy in {timeout} s")


def peak_rss_mb(pid):
    """VmHWM (peak resident memory) of a Linux process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def cpu_name():
    """The CPU model, for the record."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
