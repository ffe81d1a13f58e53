"""Soak a server: concurrent clients, mixed sizes, RSS over time; prints the figures.

    python tools/soak.py --clients 8 --requests 1000          # starts its own server
    python tools/soak.py --url http://127.0.0.1:5000 --pid 1234

Each client POSTs slices of mixed sizes (a real T1 slice upscaled to 256..4096 pixels) and
checks every mask against the one the same slice got when sent alone first. Prints errors,
mismatches, latency percentiles per size, and the server's RSS (from /proc): its steady state
(after one slice of each size), sampled over the run, its peak, and after an idle pause. With
--small-during-big it also times a 256-pixel request sent while a 4096-pixel one is served.
"""

import argparse
import io
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import png

ROOT = Path(__file__).resolve().parent.parent
SLICE = ROOT / "tests" / "data" / "icbm2009a_axial100.png"
SIZES = (256, 512, 1024, 2048, 4096)
IDLE_S = 5  # the pause before RSS is read at the steady state and after the run


def main(argv=None):
    """Run the soak and print its figures; exit 1 on any error or mismatch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--url", help="a running server (default: start one here)")
    parser.add_argument("--pid", type=int, help="its process id, for RSS")
    parser.add_argument("--small-during-big", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    process = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        process, url = start_server()
        pid = process.pid
    try:
        return soak(url, pid, sizes, args)
    finally:
        if process:
            process.terminate()
            process.wait(30)


def soak(url, pid, sizes, args):
    """Serial reference masks, then the concurrent run with an RSS sampler; prints figures."""
    slices = {side: upscaled(side) for side in sizes}
    print(f"RSS at start: {rss_mb(pid)} MB")
    reference = {side: post(url, body)[1] for side, body in slices.items()}
    time.sleep(IDLE_S)
    steady = rss_mb(pid)
    print(f"RSS after one of each size {sizes} and {IDLE_S} s (the steady state): {steady} MB")
    if args.small_during_big:
        small_during_big(url, slices)
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(pid, samples, stop), daemon=True)
    sampler.start()
    rng = np.random.default_rng(0)
    plan = rng.choice(sizes, (args.clients, args.requests))
    latencies = {side: [] for side in sizes}
    errors, mismatches = [], 0

    def client(row):
        nonlocal mismatches
        for side in row:
            started = time.perf_counter()
            status, body = post(url, slices[side])
            latencies[side].append(time.perf_counter() - started)
            if status != 200:
                errors.append((side, status))
            elif body != reference[side]:
                mismatches += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(client, plan))
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    total = args.clients * args.requests
    print(f"{total} requests from {args.clients} clients in {elapsed:.1f} s")
    print(f"errors: {len(errors)} {errors[:5]}  masks different from serial: {mismatches}")
    for side in sizes:
        times = sorted(latencies[side])
        if times:
            p90 = times[int(0.9 * (len(times) - 1))]
            print(
                f"  {side:5d}px  n={len(times):5d}  median {statistics.median(times):.3f} s"
                f"  p90 {p90:.3f} s  max {times[-1]:.3f} s"
            )
    if samples:
        print(f"RSS during the run (every 0.5 s): min {min(samples)} max {max(samples)} MB")
    time.sleep(IDLE_S)
    idle = rss_mb(pid)
    print(f"RSS after {IDLE_S} s idle: {idle} MB")
    if steady and idle:
        print(
            f"RSS steady {steady} MB, peak {rss_mb(pid, 'VmHWM')} MB,"
            f" after idle {idle} MB ({idle / steady:.2f} x steady)"
        )
    return 1 if errors or mismatches else 0


def small_during_big(url, slices):
    """Time a 256-pixel request sent while the largest one is being served."""
    big = slices[max(slices)]
    alone = timed(url, slices[min(slices)])
    thread = threading.Thread(target=post, args=(url, big))
    started = time.perf_counter()
    thread.start()
    time.sleep(0.2)
    during = timed(url, slices[min(slices)])
    thread.join()
    print(
        f"{min(slices)}px alone {alone:.3f} s; during a {max(slices)}px request {during:.3f} s;"
        f" the {max(slices)}px request {time.perf_counter() - started:.3f} s"
    )


def timed(url, body):
    started = time.perf_counter()
    post(url, body)
    return time.perf_counter() - started


def upscaled(side):
    """PNG bytes of the real test slice, nearest-neighbour scaled and cropped to side x side."""
    width, height, rows, _ = png.Reader(filename=str(SLICE)).read()
    slice_ = np.vstack([np.asarray(r) for r in rows]).reshape(height, width)
    ys = np.arange(side) * height // side
    xs = np.arange(side) * width // side
    out = io.BytesIO()
    png.Writer(side, side, greyscale=True).write_array(
        out, slice_[ys][:, xs].astype(np.uint8).ravel()
    )
    return out.getvalue()


def post(url, body):
    """(status, body) of one POST."""
    request = urllib.request.Request(url + "/", body, {"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError as error:
        return f"no answer: {error}", b""


def rss_mb(pid, field="VmRSS"):
    """Resident set size of process `pid` in MB, from /proc (None where there is none).

    `field` VmHWM gives its peak since it started, which no sampling can miss.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    except (OSError, TypeError):
        return None
    return None


def sample_rss(pid, samples, stop):
    while not stop.wait(0.5):
        value = rss_mb(pid)
        if value is not None:
            samples.append(value)


def start_server():
    """The standalone server on a free port, as the README starts it; (process, url)."""
    command = [sys.executable, str(ROOT / "greengrassBrainSegmentationApp.py")]
    command += ["--host", "127.0.0.1", "--port", "0"]
    env = dict(os.environ, MAX_UPLOAD_MB=os.environ.get("MAX_UPLOAD_MB", "20"))
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("serving on"):
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split()[-1].rstrip("/")


if __name__ == "__main__":
    sys.exit(main())
