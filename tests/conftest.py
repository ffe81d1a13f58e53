"""Shared fixtures: the bundled model, real slices, and a real server on a free port."""

import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import png
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(ROOT))

import greengrassBrainSegmentationApp as app_module  # noqa: E402
import load_model  # noqa: E402


@pytest.fixture(scope="session")
def model():
    """The real bundled model, loaded the way the server loads it (OpenVINO here)."""
    return load_model.load(str(load_model.BUNDLED_PATH))


@pytest.fixture(scope="session")
def ort_model():
    """The same bundled model run by ONNX Runtime (what a Raspberry Pi runs)."""
    return load_model.load(str(load_model.BUNDLED_PATH), runtime="onnxruntime")


@pytest.fixture(scope="session")
def mxnet_model():
    """The same bundled model run by MXNet (its rewritten graph)."""
    return load_model.load(str(load_model.BUNDLED_PATH), runtime="mxnet")


@pytest.fixture(scope="session")
def test_slices():
    """{file name: (H, W) slice} of every real slice in tests/data."""
    from processing import decode_png

    paths = sorted(p for p in DATA.glob("*.png") if "_label" not in p.name)
    return {p.name: decode_png(p.read_bytes()) for p in paths}


def agreement(a, b):
    """Share of equal elements of two masks (or argmaxes) of the same shape."""
    assert a.shape == b.shape
    return float((a == b).mean())


@pytest.fixture(scope="session")
def t1_png():
    """A real skull-stripped T1 axial slice (ICBM 2009a, 197x233, 8-bit) as PNG bytes."""
    return (DATA / "icbm2009a_axial100.png").read_bytes()


@pytest.fixture(scope="session")
def t1_label():
    """(233, 197) uint8 tissue classes of `t1_png` from the template's GM/WM maps."""
    return read_png(DATA / "icbm2009a_axial100_label.png")


@pytest.fixture(scope="session")
def head_png():
    """A real skull-on T1 axial slice (Colin27 from SPM, 91x109, 16-bit) as PNG bytes."""
    return (DATA / "colin27_axial50_16bit.png").read_bytes()


# GM + WM + CSF of ICBM 2009a: its brain mask (filled T1 > 0) at 1 mm; tests/data/README.md.
ICBM_BRAIN_ML = 1886.5


@pytest.fixture(scope="session")
def icbm_nifti():
    """ICBM 2009a T1 (brain-extracted) at 2 mm, 98x116x94 uint8, as .nii.gz bytes."""
    return (DATA / "icbm2009a_2mm.nii.gz").read_bytes()


@pytest.fixture(scope="session")
def icbm_slab(icbm_nifti):
    """(data, affine): 12 axial slices through the middle of `icbm_nifti`, a quick volume."""
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image.from_bytes(gzip.decompress(icbm_nifti))
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ [0, 0, 40] + image.affine[:3, 3]
    return np.asarray(image.dataobj)[:, :, 40:52].copy(), affine


def nifti_bytes(data, affine, gz=True, **header):
    """NIfTI-1 bytes of an array (qform and sform code 1), optionally gzipped."""
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    for key, value in header.items():
        image.header[key] = value
    raw = image.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def read_png(path_or_bytes):
    """(H, W) array of the first channel of a PNG file or bytes, as stored (no palette lookup)."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    width, height, rows, info = png.Reader(bytes=data).read()
    return np.vstack([np.asarray(r) for r in rows]).reshape(height, width, -1)[..., 0]


def serve(settings, model=None, publisher=None):
    """Start a real waitress server in a thread; returns (server, base_url)."""
    app = app_module.create_app(settings, model=model, publisher=publisher)
    server = app_module.start_server(settings, app)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}"
    wait_healthy(url, accept=(200, 503))
    return server, url


def wait_healthy(url, accept=(200,), timeout=60):
    """Poll /health until it answers with one of `accept`; returns the seconds it took."""
    started = time.time()
    while time.time() - started < timeout:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status in accept:
                    return time.time() - started
        except urllib.error.HTTPError as error:
            if error.code in accept:
                return time.time() - started
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


@pytest.fixture(scope="session")
def server_url(model):
    """Base URL of a real server with the bundled model on a free port."""
    settings = app_module.Settings(host="127.0.0.1", port=0, threads=4, max_upload_mb=2)
    server, url = serve(settings, model)
    yield url
    stop(server)


def stop(server):
    """Close a running waitress server from its own loop (closing from here races it)."""
    server.trigger.pull_trigger(server.close)


def run_module(module, *args):
    """`python -m module args...` from the repository root; returns the CompletedProcess."""
    import subprocess

    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def exchange(url, head, body=b"", timeout=30):
    """Send raw request bytes (`head`, then `body`) and read the first reply.

    Returns (status, headers dict with lower-case names, body). The reply is read even if the
    server answered before the body was sent and closed the connection.
    """
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            sock.sendall(body)
        except OSError:
            pass  # answered early and closed; read what it said
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        status_line, _, rest = reply.partition(b"\r\n")
        header_block, _, payload = rest.partition(b"\r\n\r\n")
        headers = dict(
            line.decode("latin-1").lower().split(": ", 1) for line in header_block.split(b"\r\n")
        )
        while len(payload) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            payload += chunk
    return int(status_line.split()[1]), headers, payload


def post_head(path, length, *extra):
    """Request bytes of a POST whose headers promise `length` body bytes."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: image/png"]
    lines += [f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
