"""The Greengrass Lambda path from the repository: import as the runtime does, then HTTP."""

import base64
import json
import os
import socket
import subprocess
import sys

from conftest import ROOT, read_png, wait_healthy

# Imports the module as a pinned Lambda's runtime does (by name, MY_FUNCTION_ARN set), calls
# the handler twice, segments an image event, and stays alive like a pinned Lambda.
RUNTIME = """
import base64, importlib, json, sys, threading
app = importlib.import_module("greengrassBrainSegmentationApp")
first = app.lambda_handler({}, None)
again = importlib.import_module("greengrassBrainSegmentationApp")
thread = app.start_in_background()
with_image = app.lambda_handler({"image_png_base64": sys.argv[1]}, None)
servers = [t.name for t in threading.enumerate() if t.name == "segmentation-server"]
print(json.dumps({"first": first, "same_thread": thread is app._background["thread"],
                  "servers": len(servers), "with_image": with_image,
                  "status": app.lambda_handler({}, None)}), flush=True)
threading.Event().wait()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_import_starts_one_server_and_the_handler_segments(t1_png, t1_label):
    port = free_port()
    env = dict(
        os.environ,
        MY_FUNCTION_ARN="arn:aws:lambda:eu-west-1:1:function:brainSeg:1",
        PORT=str(port),
        HOST="127.0.0.1",
    )
    process = subprocess.Popen(
        [sys.executable, "-c", RUNTIME, base64.b64encode(t1_png).decode()],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        report = json.loads(process.stdout.readline())
        assert report["first"]["state"] in ("starting", "serving")
        assert report["same_thread"] and report["servers"] == 1
        with_image = report["with_image"]
        assert with_image["state"] == "serving" and with_image["port"] == port
        mask = read_png(base64.b64decode(with_image["mask_png_base64"]))
        assert mask.shape == t1_label.shape
        assert abs(sum(with_image["fractions"].values()) - 1) < 1e-3
        assert report["status"]["model_id"] == with_image["model_id"]
        wait_healthy(f"http://127.0.0.1:{port}")
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=t1_png, method="POST")
        with urllib.request.urlopen(req, timeout=60) as response:
            assert response.status == 200
            assert read_png(response.read()).shape == t1_label.shape
    finally:
        process.kill()
        process.wait()


def test_a_bad_image_event_is_reported_not_raised():
    code = (
        "import json, greengrassBrainSegmentationApp as app; "
        "print(json.dumps(app.lambda_handler({'image_png_base64': 'bm90IGEgcG5n'}, None)))"
    )
    env = dict(os.environ, PORT=str(free_port()), HOST="127.0.0.1")
    env.pop("MY_FUNCTION_ARN", None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert status["state"] == "serving" and "not supported" in status["error"]


# Imports the module as the Greengrass runtime does and polls the handler until the server
# has either started or failed; prints the last status.
POLL = """
import importlib, json, time
app = importlib.import_module("greengrassBrainSegmentationApp")
for _ in range(600):
    status = app.lambda_handler({}, None)
    if status["state"] != "starting":
        break
    time.sleep(0.1)
print(json.dumps(app.lambda_handler({"image_png_base64": "bm90IGEgcG5n"}, None)), flush=True)
"""


def run_as_greengrass(**env):
    """The status and the log of a Greengrass-style start with these environment variables."""
    env = dict(
        os.environ,
        MY_FUNCTION_ARN="arn:aws:lambda:eu-west-1:1:function:brainSeg:1",
        HOST="127.0.0.1",
        **env,
    )
    out = subprocess.run(
        [sys.executable, "-c", POLL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_a_bad_setting_is_reported_failed_and_logged_once():
    status, log = run_as_greengrass(PORT="abc")
    assert status["state"] == "failed" and "PORT='abc'" in status["error"]
    assert log.count("PORT='abc'") == 1, log


def test_a_model_that_does_not_load_is_reported_failed_and_logged_once(tmp_path):
    status, log = run_as_greengrass(PORT=str(free_port()), MODEL_DIR=str(tmp_path))
    assert status["state"] == "failed" and str(tmp_path) in status["error"]
    assert log.count(str(tmp_path)) == 1, log
