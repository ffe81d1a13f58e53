"""Measure the runtimes side by side and the service over HTTP, in one run.

    python tools/benchmark.py [--repeats 30] [--requests 30] [--model-dir model/segmentation-net]

Prints a table: ms per 256x256 slice (median and p90) at batch 1, 2 and 8 for MXNet as
exported (PReLU, softmax), MXNet rewritten (LeakyReLU, no softmax), ONNX Runtime and OpenVINO
(the last two run the same model.onnx; a runtime not installed here is left out); then the
standalone server (started as a user would, on a free port, two passes unless --passes 1:
batch 2 is what it runs per slice): start to healthy, end to end over HTTP, the forward pass
inside it and what HTTP adds (a new connection per request, and one kept-alive connection),
peak RSS. Each runtime is timed in its own process, so that one's threads never compete with
another's.
"""

import argparse
import http.client
import io
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

SIDE = processing.FRAME_SIDE
BATCHES = (1, 2, 8)  # 2: one slice served with two passes
ROWS = [
    ("mxnet-exported", "MXNet as exported (PReLU, softmax)"),
    ("mxnet", "MXNet rewritten (LeakyReLU, no softmax)"),
    ("onnxruntime", "ONNX Runtime (BN folded, LeakyReLU, no softmax)"),
    ("openvino", "OpenVINO (same model.onnx, compiled per input shape)"),
]


def main(argv=None):
    """Print the runtime table and the HTTP figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per batch size")
    parser.add_argument("--requests", type=int, default=30, help="timed HTTP requests")
    parser.add_argument("--model-dir", default=str(load_model.BUNDLED_PATH))
    parser.add_argument(
        "--passes", type=int, choices=processing.PASSES, default=2, help="the server's"
    )
    parser.add_argument("--forward", choices=[key for key, _ in ROWS], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.forward:  # the child process that times one runtime
        print(json.dumps(forward_pass_ms(args.forward, args.model_dir, args.repeats)))
        return
    print(f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    results = {key: time_in_child(key, args) for key, _ in ROWS}
    print_table(results)
    served = http_figures(args.model_dir, args.requests, args.passes)
    print_http(served, results[served["runtime"]])


def time_in_child(key, args):
    """{batch: [ms per slice, ...]} for one runtime, measured in a fresh process; None when
    that runtime cannot run here."""
    command = [sys.executable, __file__, "--forward", key, "--model-dir", args.model_dir]
    command += ["--repeats", str(args.repeats)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    times = json.loads(out.splitlines()[-1])
    return times and {int(batch): ms for batch, ms in times.items()}


def forward_pass_ms(key, model_dir, repeats):
    """{batch: ms per slice of each timed pass} for the real slice, framed to SIDE x SIDE."""
    directory = Path(model_dir)
    files = load_model.find_files(directory)
    meta = load_model.read_meta(directory, files.shapes)
    if key in ("onnxruntime", "openvino"):
        opener = load_model.OnnxRuntime if key == "onnxruntime" else load_model.OpenVinoRuntime
        try:
            runtime = opener(files, meta, load_model.file_id(files.params))
        except load_model.RuntimeUnavailable:
            return None
    else:
        runtime = load_model.MxnetRuntime(files, meta, rewrite=key == "mxnet")
    frame = processing.frame_slice(framed_slice(), SIDE)[0][None, None]
    frame = np.repeat(frame, meta["input_channels"], axis=1)
    times = {}
    for batch in BATCHES:
        inputs = np.ascontiguousarray(np.repeat(frame, batch, axis=0))
        for _ in range(3):
            runtime.predict(inputs)  # bind, plan memory, warm caches
        times[batch] = []
        for _ in range(repeats):
            started = time.perf_counter()
            runtime.predict(inputs)
            times[batch].append((time.perf_counter() - started) * 1000 / batch)
    return times


def print_table(results):
    """The side-by-side table, markdown, as the README shows it."""
    print()
    columns = [f"b{batch} {figure}" for batch in BATCHES for figure in ("median", "p90")]
    print("| runtime | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for key, label in ROWS:
        if results[key] is None:
            continue
        cells = []
        for batch in BATCHES:
            cells += [f"{statistics.median(results[key][batch]):.1f}"]
            cells += [f"{np.percentile(results[key][batch], 90):.1f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("(ms per 256x256 slice)")


def http_figures(model_dir, requests, passes=2):
    """Start the standalone server, time /health and POSTs of the framed slice, peak RSS."""
    body = png_bytes(framed_slice())
    port = free_port()
    began = time.perf_counter()
    command = [sys.executable, str(ROOT / "greengrassBrainSegmentationApp.py"), "--host"]
    command += ["127.0.0.1", "--port", str(port), "--model-dir", model_dir]
    command += ["--passes", str(passes)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        healthy = wait_healthy(url) - began
        with urllib.request.urlopen(url + "/health") as response:
            health = json.loads(response.read())
        end_to_end, inference, forward = [], [], []
        for _ in range(requests + 2):  # a new connection for each request, as curl makes
            started = time.perf_counter()
            request = urllib.request.Request(
                url + "/", data=body, method="POST", headers={"Content-Type": "image/png"}
            )
            with urllib.request.urlopen(request) as response:
                response.read()
                inference.append(float(response.headers["X-Inference-Ms"]))
                forward.append(float(response.headers["X-Forward-Ms"]))
            end_to_end.append((time.perf_counter() - started) * 1000)
        kept_added = []  # one connection kept open, as the page, a browser or a session make
        connection = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(requests + 2):
            started = time.perf_counter()
            connection.request("POST", "/", body=body, headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            response.read()
            seconds = time.perf_counter() - started
            kept_added.append(seconds * 1000 - float(response.headers["X-Forward-Ms"]))
        connection.close()
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait()
    return {
        "runtime": health["runtime"],
        "passes": health["passes"],
        "healthy_s": healthy,
        "end_to_end": end_to_end[2:],
        "inference": inference[2:],
        "forward": forward[2:],
        "kept_added": kept_added[2:],
        "rss_mb": rss,
    }


def print_http(served, runtime_times):
    """The server's figures; what HTTP adds is measured on each request (end to end minus
    that request's forward pass, `X-Forward-Ms`), and also against the bare forward pass of
    the batch the server runs (one frame, or it and its upside-down copy)."""
    passes = served["passes"]
    bare = statistics.median(runtime_times[passes]) * passes
    end_to_end = statistics.median(served["end_to_end"])
    added = [e - f for e, f in zip(served["end_to_end"], served["forward"])]
    print()
    count = len(served["end_to_end"])
    print(f"server ({served['runtime']}, {passes} passes), {count} requests of a 256x256 PNG:")
    print(f"  start to healthy                 {served['healthy_s']:.2f} s")
    print(
        f"  end to end over HTTP, median/p90 {end_to_end:.1f} / "
        f"{np.percentile(served['end_to_end'], 90):.1f} ms"
    )
    print(f"  X-Inference-Ms (segment), median {statistics.median(served['inference']):.1f} ms")
    print(f"  X-Forward-Ms (network), median   {statistics.median(served['forward']):.1f} ms")
    print(f"  HTTP, decode, frame, mask, encode add {statistics.median(added):.1f} ms")
    print(
        f"    (the same over one kept-alive connection: "
        f"{statistics.median(served['kept_added']):.1f} ms)"
    )
    print(
        f"    (end to end minus the bare forward pass, batch {passes}: {end_to_end - bare:.1f} ms)"
    )
    print(f"  server peak RSS                  {served['rss_mb']} MB")


def framed_slice():
    """The repository's real T1 test slice, centre-cropped or padded to SIDE x SIDE."""
    slice_ = processing.decode_png(
        (ROOT / "tests" / "data" / "icbm2009a_axial100.png").read_bytes()
    )
    canvas = np.zeros((SIDE, SIDE), slice_.dtype)
    h, w = min(SIDE, slice_.shape[0]), min(SIDE, slice_.shape[1])
    top, left = (slice_.shape[0] - h) // 2, (slice_.shape[1] - w) // 2
    y, x = (SIDE - h) // 2, (SIDE - w) // 2
    canvas[y : y + h, x : x + w] = slice_[top : top + h, left : left + w]
    return canvas


def png_bytes(slice_):
    """An 8-bit greyscale PNG of an (H, W) uint8 array."""
    import png

    out = io.BytesIO()
    png.from_array(slice_, "L").write(out)
    return out.getvalue()


def wait_healthy(url, timeout=120):
    """perf_counter() at the first 200 from /health."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter()
        except OSError:
            time.sleep(0.02)
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
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
