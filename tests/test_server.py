"""start_server under abuse: slow clients, bodies kept off the disk, the shared memory cap."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, exchange, nifti_bytes, post_head, read_png, serve, stop
from test_processing import png_with_header

import greengrassBrainSegmentationApp as app_module
import processing
from tools import fuzz, soak


def big_png(size):
    """A valid 64x64 PNG padded to about `size` bytes with a private ancillary chunk."""
    small = png_with_header(64, 64, idat=__import__("zlib").compress(bytes(64 * 65)))
    parts = fuzz.chunks(small)
    padding = (b"prVt", os.urandom(size - len(small)))
    return fuzz.build(parts[:1] + [padding] + parts[1:])


def test_150_slow_clients_do_not_lock_out_normal_requests(model, t1_png):
    server, url = serve(app_module.Settings(host="127.0.0.1", port=0), model)
    port = server.effective_port
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
    done = threading.Event()

    def dribble():
        for sock in slow:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        while not done.wait(0.5):  # a header line every half second, never the end
            for sock in slow:
                sock.sendall(b"X-Slow: 1\r\n")

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    try:
        time.sleep(1)
        answers = []
        for _ in range(5):
            started = time.perf_counter()
            req = urllib.request.Request(url + "/", t1_png, {"Content-Type": "image/png"})
            with urllib.request.urlopen(req, timeout=30) as response:
                answers.append((response.status, time.perf_counter() - started))
        print("normal requests among 150 slow clients (status, s):", answers)
        assert [status for status, _ in answers] == [200] * 5
    finally:
        done.set()
        thread.join()
        for sock in slow:
            sock.close()
        stop(server)


def test_requests_waiting_for_a_thread_do_not_flood_the_log(model, t1_png, caplog):
    server, url = serve(app_module.Settings(host="127.0.0.1", port=0, threads=1), model)

    def post(_):
        req = urllib.request.Request(url + "/", t1_png, {"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status

    try:
        with caplog.at_level("INFO"), ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(post, range(12)))
    finally:
        stop(server)
    assert statuses == [200] * 12
    assert not [r for r in caplog.records if r.name == "waitress.queue"]


def test_the_shared_upload_memory_cap_answers_503_before_the_body(model, t1_png):
    settings = app_module.Settings(host="127.0.0.1", port=0, max_upload_mb=2, upload_memory_mb=1)
    server, url = serve(settings, model)
    host, port = "127.0.0.1", server.effective_port
    try:
        with socket.create_connection((host, port), timeout=30) as holder:
            holder.sendall(post_head("/", 900_000) + bytes(100_000))  # holds 0.9 MB
            time.sleep(0.5)
            status, headers, body = exchange(url, post_head("/", 500_000))
            assert status == 503 and headers["content-type"] == "application/json"
            assert "retry" in json.loads(body)["error"]
        time.sleep(0.5)  # the holder's share is given back when its connection closes
        req = urllib.request.Request(url + "/", t1_png, {"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=30) as response:
            assert response.status == 200
    finally:
        stop(server)


# Serves like `python greengrassBrainSegmentationApp.py`, and reports every file the process
# opens or creates in $TMPDIR (Python's audit events see unlinked temporary files too).
LAUNCH = """
import os, sys
tmp = os.environ["TMPDIR"]
def audit(event, args):
    if event in ("open", "tempfile.mkstemp", "tempfile.mkdtemp", "os.mkdir"):
        if args and str(args[0]).startswith(tmp):
            sys.stderr.write(f"TEMPFILE {event} {args[0]}\\n")
sys.addaudithook(audit)
import greengrassBrainSegmentationApp as app
app.main(sys.argv[1:])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux temporary-file semantics")
def test_no_upload_reaches_the_temp_directory(tmp_path):
    tmp, home = tmp_path / "tmp", tmp_path / "home"
    tmp.mkdir()
    home.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), HOME=str(home), MAX_UPLOAD_MB="2")
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().split()[-1].rstrip("/")
        body = big_png(1_500_000)  # over waitress's and werkzeug's spooling thresholds
        assert processing.decode_png(body).shape == (64, 64)
        status, _, mask = exchange(url, post_head("/", len(body)), body)
        assert status == 200 and mask.startswith(processing.PNG_SIGNATURE)
        boundary = uuid.uuid4().hex
        form = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + body
            + f"\r\n--{boundary}--\r\n".encode()
        )
        head = post_head("/segment", len(form)).replace(
            b"image/png", f"multipart/form-data; boundary={boundary}".encode()
        )
        assert exchange(url, head, form)[0] == 200
        chunked = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 65536]), body[i : i + 65536])
            for i in range(0, len(body), 65536)
        )
        head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert exchange(url, head, chunked + b"0\r\n\r\n")[0] == 200
        status, _, answer = exchange(url, post_head("/", 3_000_000), bytes(3_000_000))
        assert status == 413 and "2 MB" in json.loads(answer)["error"]
    finally:
        process.terminate()
        _, log = process.communicate(timeout=30)
    assert "TEMPFILE" not in log, log
    assert list(tmp.iterdir()) == []
    assert list(home.iterdir()) == []  # no runtime's telemetry id or cache either


@pytest.fixture(scope="module")
def standalone():
    """(url, pid) of the standalone server in its own process, as the README starts it."""
    process, url = soak.start_server()
    yield url, process.pid
    process.terminate()
    process.wait(30)


def test_a_4096_slice_gets_its_mask(standalone):
    url, _ = standalone
    status, body = soak.post(url, soak.upscaled(4096))
    assert status == 200
    mask = read_png(body)
    _, small = soak.post(url, soak.upscaled(256))
    assert mask.shape == (4096, 4096)
    agreement = (mask[8::16, 8::16] == read_png(small)).mean()
    assert agreement > 0.9, agreement


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RSS is read from /proc")
def test_memory_goes_back_after_large_and_concurrent_uploads(icbm_slab):
    volume = nifti_bytes(*icbm_slab)
    process, url = soak.start_server()  # fresh: its steady state has seen only small slices
    pid = process.pid
    try:
        slices = {side: soak.upscaled(side) for side in (256, 512, 1024, 2048, 4096)}
        for _ in range(3):
            assert soak.post(url, slices[256])[0] == 200
        steady = soak.rss_mb(pid)
        rss = []
        for side in (512, 1024, 2048, 4096):
            assert soak.post(url, slices[side])[0] == 200
            rss.append(soak.rss_mb(pid))
        sides = [2048, 256, 1024, 256, 512, 256, 1024, 256]
        with ThreadPoolExecutor(4) as pool:  # slices side by side grow ORT's arena
            answers = list(pool.map(lambda side: soak.post(url, slices[side]), sides))
        assert [status for status, _ in answers] == [200] * len(sides)
        request = urllib.request.Request(url + "/volume?format=json", volume)
        with urllib.request.urlopen(request, timeout=120) as response:  # batches of 8 frames
            assert response.status == 200
        for _ in range(3):
            assert soak.post(url, slices[256])[0] == 200
        after, peak = soak.rss_mb(pid), soak.rss_mb(pid, "VmHWM")
    finally:
        process.terminate()
        process.wait(30)
    print(f"RSS (MB): steady {steady}, after 512..4096 {rss}, at the end {after}, peak {peak}")
    assert peak <= 600
    assert after <= 1.1 * steady
