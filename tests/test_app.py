"""The real server over HTTP: masks, health, every bad input, concurrency."""

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import png
import pytest
from conftest import ROOT, agreement, exchange, post_head, read_png, serve, stop
from test_processing import png_with_header

import greengrassBrainSegmentationApp as app_module
import processing


def request(url, data=None, method=None, headers=None):
    """(status, headers, body) of one HTTP request; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def post_png(url, data):
    return request(url, data, "POST", {"Content-Type": "image/png"})


def multipart(field, data, filename="slice.png"):
    """A multipart/form-data body with one file field; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_raw_upload_returns_a_palette_mask_of_the_slice(server_url, t1_png, t1_label):
    status, headers, body = post_png(server_url + "/", t1_png)
    assert status == 200 and headers["Content-Type"] == "image/png"
    reader = png.Reader(bytes=body)
    reader.preamble()
    assert reader.color_type == 3, "the mask must be an indexed (palette) PNG"
    mask = read_png(body)
    assert mask.shape == t1_label.shape and mask.max() <= 3
    brain, predicted_tissue = t1_label > 0, mask > 0
    assert predicted_tissue[brain].mean() > 0.9, "brain pixels must get a tissue class"
    assert not predicted_tissue[~brain].mean() > 0.05, "outside the brain must be background"
    assert float(headers["X-Inference-Ms"]) > 0 and headers["X-Model-Id"]
    assert 0 < float(headers["X-Forward-Ms"]) <= float(headers["X-Inference-Ms"])
    assert headers["X-Runtime"] == "openvino"


def test_multipart_gives_the_same_mask(server_url, t1_png):
    raw = post_png(server_url + "/segment", t1_png)[2]
    body, content_type = multipart("file", t1_png)
    status, _, form = request(server_url + "/segment", body, "POST", {"Content-Type": content_type})
    assert status == 200 and form == raw


def test_curl_raw_and_multipart(server_url, head_png, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("no curl binary on this machine")
    slice_path = tmp_path / "slice.png"
    slice_path.write_bytes(head_png)
    subprocess.run(
        [
            curl,
            "-sf",
            "--data-binary",
            f"@{slice_path}",
            "-H",
            "Content-Type: image/png",
            server_url + "/",
            "-o",
            tmp_path / "raw.png",
        ],
        check=True,
    )
    subprocess.run(
        [curl, "-sf", "-F", f"file=@{slice_path}", server_url + "/", "-o", tmp_path / "form.png"],
        check=True,
    )
    raw = read_png(tmp_path / "raw.png")
    assert raw.shape == (109, 91)
    assert (tmp_path / "raw.png").read_bytes() == (tmp_path / "form.png").read_bytes()


def test_health_and_model(server_url):
    status, _, body = request(server_url + "/health")
    health = json.loads(body)
    assert status == 200 and health["model_loaded"] and health["input_channels"] == 1
    assert health["runtime"] == "openvino" and health["passes"] == 2
    status, _, body = request(server_url + "/model")
    facts = json.loads(body)
    assert facts["classes"] == ["background", "csf", "grey_matter", "white_matter"]
    assert facts["model_id"] == health["model_id"] and len(facts["colours"]) == 4


def jpeg():
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200)


@pytest.mark.parametrize(
    "name, send, status, words",
    [
        ("empty body", lambda u, p: post_png(u + "/", b""), 400, "empty"),
        ("not an image", lambda u, p: post_png(u + "/", b"just some text"), 415, "PNG"),
        ("truncated PNG", lambda u, p: post_png(u + "/", p[: len(p) // 2]), 400, "truncated"),
        (
            "100000x100000 header",
            lambda u, p: post_png(u + "/", png_with_header(100000, 100000)),
            413,
            "limit",
        ),
        ("JPEG", lambda u, p: post_png(u + "/", jpeg()), 415, "JPEG"),
        ("1x1 image", lambda u, p: post_png(u + "/", png_with_header(1, 1)), 400, "at least"),
        (
            "multipart without file",
            lambda u, p: request(u + "/", *multipart_request("other", p)),
            400,
            "'file'",
        ),
        ("wrong method", lambda u, p: request(u + "/", method="DELETE"), 405, "not allowed"),
        ("GET on /segment", lambda u, p: request(u + "/segment"), 405, "not allowed"),
        ("unknown path", lambda u, p: request(u + "/nowhere"), 404, "no route"),
        ("body over the limit", lambda u, p: over_limit(u, b""), 413, "2 MB"),
        ("over the limit, Expect", lambda u, p: over_limit(u, b"Expect: 100-continue"), 413, "MB"),
        (
            "malformed request",
            lambda u, p: exchange(u, b"POST / HTTP/1.1\r\nbad\r\n\r\n"),
            400,
            "malformed",
        ),
        ("bad Content-Length", lambda u, p: exchange(u, post_head("/", "-5")), 400, "malformed"),
        (
            "headers too large",
            lambda u, p: request(u + "/", headers={"X-Big": "x" * 300_000}),
            431,
            "headers",
        ),
    ],
)
def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(
    server_url, t1_png, name, send, status, words
):
    got, headers, body = send(server_url, t1_png)
    assert got == status, name
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers["content-type"] == "application/json"
    assert words in json.loads(body)["error"]
    assert post_png(server_url + "/", t1_png)[0] == 200


def over_limit(url, expect):
    """Headers promising 3 MB to a 2 MB server, no body sent: the answer must come anyway."""
    extra = [expect.decode()] if expect else []
    return exchange(url, post_head("/", 3 * 1024 * 1024, *extra))


def multipart_request(field, data):
    body, content_type = multipart(field, data)
    return body, "POST", {"Content-Type": content_type}


def test_concurrent_requests_match_serial_ones(server_url, t1_png, head_png):
    slices = [t1_png, head_png] * 6
    serial = [post_png(server_url + "/", s)[2] for s in slices[:2]]
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda s: post_png(server_url + "/", s), slices))
    assert all(a[0] == 200 for a in answers)
    assert [a[2] for a in answers] == serial * 6


def test_without_a_model_health_is_503_and_posts_explain(tmp_path, t1_png):
    settings = app_module.Settings(
        host="127.0.0.1", port=0, model_dir=str(tmp_path), api_token="s3cret"
    )
    server, url = serve(settings)
    token = {"Authorization": "Bearer s3cret"}
    try:
        status, _, body = request(url + "/health")
        assert status == 503 and "log" in json.loads(body)["error"]
        assert str(tmp_path) not in body.decode(), "paths only for a caller with the token"
        status, _, body = request(url + "/health", headers=token)
        assert status == 503 and str(tmp_path) in json.loads(body)["error"]
        status, _, body = request(url + "/", t1_png, "POST", token)
        assert status == 503 and "no model" in json.loads(body)["error"]
    finally:
        stop(server)


def test_with_a_token_every_route_but_health_needs_it(model, t1_png):
    settings = app_module.Settings(host="127.0.0.1", port=0, api_token="s3cret")
    server, url = serve(settings, model)
    good, bad = {"Authorization": "Bearer s3cret"}, {"Authorization": "Bearer guess"}
    try:
        for route, data in [("/", t1_png), ("/segment", t1_png), ("/model", None), ("/", None)]:
            for headers in ({}, bad):
                status, answer, body = request(url + route, data, headers=headers)
                assert status == 401 and answer["WWW-Authenticate"] == "Bearer", route
                assert "Authorization: Bearer" in json.loads(body)["error"]
        assert request(url + "/", t1_png, "POST", good)[0] == 200
        status, _, body = request(url + "/model", headers=good)
        assert status == 200 and json.loads(body)["model_dir"] == str(model.directory)
        status, _, body = request(url + "/health")
        assert status == 200 and json.loads(body)["model_dir"] == "segmentation-net"
        status, _, body = request(url + "/health", headers=good)
        assert json.loads(body)["model_dir"] == str(model.directory)
    finally:
        stop(server)


def test_without_a_token_no_reply_shows_a_filesystem_path(server_url, model):
    for route in ("/health", "/model"):
        status, _, body = request(server_url + route)
        assert status == 200 and str(model.directory.parent) not in body.decode(), route
        assert json.loads(body)["model_dir"] == "segmentation-net"


def test_two_file_parts_are_a_400(server_url, t1_png, head_png):
    boundary = uuid.uuid4().hex
    body = b""
    for data in (t1_png, head_png):
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    status, _, answer = request(server_url + "/", body, "POST", {"Content-Type": content_type})
    assert status == 400 and "2 fields 'file'" in json.loads(answer)["error"]


def test_internal_failure_is_a_json_500(model, t1_png):
    class Broken:
        meta, model_id, directory, runtime = model.meta, "broken", "nowhere", model.runtime
        passes = 2

        def segment(self, slice_):
            raise RuntimeError("boom")

    server, url = serve(app_module.Settings(host="127.0.0.1", port=0), model=Broken())
    try:
        status, _, body = post_png(url + "/", t1_png)
        assert status == 500 and "internal error" in json.loads(body)["error"]
        assert request(url + "/health")[0] == 200
    finally:
        stop(server)


def test_servers_on_every_runtime_serve_the_same_masks(test_slices):
    runtimes = ["mxnet", "onnxruntime", "auto"]
    servers = [
        serve(app_module.Settings.from_env({"RUNTIME": r}, host="127.0.0.1", port=0))
        for r in runtimes
    ]
    try:
        for slice_ in test_slices.values():
            out = __import__("io").BytesIO()
            png.from_array(slice_, "L;16" if slice_.dtype == np.uint16 else "L").write(out)
            answers = [post_png(url + "/segment", out.getvalue()) for _, url in servers]
            assert [a[1]["X-Runtime"] for a in answers] == ["mxnet", "onnxruntime", "openvino"]
            masks = [read_png(a[2]) for a in answers]
            assert agreement(masks[0], masks[1]) >= 0.9999
            assert agreement(masks[0], masks[2]) >= 0.9999
        assert json.loads(request(servers[0][1] + "/health")[2])["runtime"] == "mxnet"
    finally:
        for server, _ in servers:
            stop(server)


def test_one_pass_serves_the_single_pass_mask(model, t1_png):
    server, url = serve(app_module.Settings.from_env({"PASSES": "1"}, host="127.0.0.1", port=0))
    try:
        slice_ = processing.decode_png(t1_png)
        one = processing.segment_with(model.predict, slice_, 256, passes=1)
        status, _, body = post_png(url + "/segment", t1_png)
        assert status == 200 and np.array_equal(read_png(body), one)
        assert not np.array_equal(one, model.segment(slice_))
        assert json.loads(request(url + "/health")[2])["passes"] == 1
    finally:
        stop(server)


def test_settings_read_the_environment_and_flags_win():
    settings = app_module.Settings.from_env({"PORT": "6001", "MODEL_DIR": "/m"}, port=7000)
    assert settings.port == 7000 and settings.model_dir == "/m" and settings.host == "0.0.0.0"
    assert app_module.Settings.from_env({"RUNTIME": "mxnet"}, runtime=None).runtime == "mxnet"
    with pytest.raises(SystemExit, match="PORT"):
        app_module.Settings.from_env({"PORT": "five thousand"})
    with pytest.raises(SystemExit, match="PASSES=3 must be 1 or 2"):
        app_module.Settings.from_env({"PASSES": "3"})


def test_the_server_keeps_one_malloc_arena_unless_the_operator_chose(monkeypatch):
    code = "import greengrassBrainSegmentationApp as app; print(app.one_malloc_arena())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert run.stdout.decode().split()[-1] == str(app_module.glibc() is not None)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert app_module.one_malloc_arena() is False
    app_module.trim_malloc()  # a no-op without glibc, never an error


def test_16_bit_and_8_bit_uploads_of_one_slice_agree(server_url, head_png):
    wide = read_png(head_png)
    narrow = np.round(wide / 257).astype(np.uint8)
    out = __import__("io").BytesIO()
    png.from_array(narrow, "L").write(out)
    a, b = (
        read_png(post_png(server_url + "/", head_png)[2]),
        read_png(post_png(server_url + "/", out.getvalue())[2]),
    )
    assert (a == b).mean() > 0.98
