"""The Greengrass zip: its contents, same bytes every build, and that it serves once unzipped."""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, read_png, wait_healthy

ZIP_NAME = "greengrassBrainSegmentation.zip"
RECIPE = ROOT / "deploy" / "greengrass-v2-recipe.yaml"
ARN = "arn:aws:lambda:eu-west-1:123456789012:function:brainSeg:1"
APP_MODULES = {
    "greengrassBrainSegmentationApp.py",
    "load_model.py",
    "processing.py",
    "volumes.py",
    "qc.py",
    "page.html",
}
PURE_PACKAGES = {
    "png.py",
    "flask",
    "werkzeug",
    "jinja2",
    "markupsafe",
    "itsdangerous",
    "click",
    "blinker",
    "waitress",
    "greengrasssdk",
    "cbor2",
    "nibabel",
    "pydicom",
    "packaging",
    "importlib_resources",
    "typing_extensions.py",
}
# What the server needs besides the zip: ONNX Runtime and numpy with its bundled libraries.
NATIVE = ["onnxruntime", "numpy", "numpy.libs"]

# Loads the handler module the way the Greengrass Python runtime does, then stays alive as a
# pinned Lambda's process does. argv: the code folder, then the folder with the native packages.
LAMBDA_RUNTIME = """
import importlib, json, sys, threading
sys.path[:0] = sys.argv[1:3]
handler = importlib.import_module("greengrassBrainSegmentationApp")
status = handler.lambda_handler({}, None)
import flask, markupsafe
print(json.dumps({"flask": flask.__file__, "status": status,
                  "escape": markupsafe.escape.__module__}), flush=True)
threading.Event().wait()
"""


def build(out, *options, python=sys.executable):
    """Run build_zip.sh with `options`; returns the CompletedProcess."""
    return subprocess.run(
        ["bash", str(ROOT / "build_zip.sh"), "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": python},
    )


@pytest.fixture(scope="module")
def zips(tmp_path_factory):
    """The zip built twice as is, and once with the model: {"plain", "again", "model"} paths."""
    paths = {}
    for key, options in (("plain", ()), ("again", ()), ("model", ("--with-model",))):
        out = tmp_path_factory.mktemp(key)
        result = build(out, *options)
        assert result.returncode == 0, result.stderr
        last = result.stdout.strip().splitlines()[-1]
        assert last.startswith(f"{out / ZIP_NAME} ") and "bytes" in last
        paths[key] = out / ZIP_NAME
    return paths


@pytest.fixture(scope="module")
def unzipped(zips, tmp_path_factory):
    """The --with-model zip unpacked where Greengrass V2 puts it: <decompressedPath>/<zip name>/."""
    folder = tmp_path_factory.mktemp("artifacts") / ZIP_NAME[: -len(".zip")]
    with zipfile.ZipFile(zips["model"]) as archive:
        archive.extractall(folder)
    return folder


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    """A folder holding links to only onnxruntime and numpy, nothing else."""
    site_packages = Path(importlib.util.find_spec("onnxruntime").origin).parent.parent
    folder = tmp_path_factory.mktemp("native")
    for name in NATIVE:
        (folder / name).symlink_to(site_packages / name)
    return folder


def free_port():
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Both deployed servers here run with this API_TOKEN, so /health may show where the model is.
TOKEN = {"Authorization": "Bearer package-test"}


def segment(url, png_bytes):
    """POST a slice; returns (status, content type, body)."""
    request = urllib.request.Request(
        url + "/segment",
        data=png_bytes,
        method="POST",
        headers={"Content-Type": "image/png", **TOKEN},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.headers["Content-Type"], response.read()


def health(url):
    """The JSON of GET /health, asked with the token (so it names the model's folder)."""
    request = urllib.request.Request(url + "/health", headers=TOKEN)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def started(command, log_path, **kwargs):
    """Popen with stdout and stderr to a log file (a pipe nobody reads could fill and block)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def wait_or_fail(url, log_path, what):
    """Wait for /health; on a timeout fail the test with the process's log."""
    try:
        wait_healthy(url, timeout=60)
    except TimeoutError:
        pytest.fail(f"{what} did not serve:\n{log_path.read_text()}")


def stop(process):
    """Terminate, and kill if that is not enough."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def inside(path, folder):
    """Whether `path` lies under `folder`."""
    return Path(folder).resolve() in Path(path).resolve().parents


def test_zip_holds_the_app_and_pure_python_dependencies_only(zips):
    with zipfile.ZipFile(zips["plain"]) as archive:
        infos = archive.infolist()
        app_source = archive.read("greengrassBrainSegmentationApp.py")
    names = [info.filename for info in infos]
    top = {name.split("/")[0] for name in names}
    assert APP_MODULES | PURE_PACKAGES <= top
    assert not top & {"mxnet", "onnxruntime", "numpy", "numpy.libs", "model", "bin"}
    assert not [n for n in names if re.search(r"\.(so|pyd|pyc|dylib)$|\.so\.", n)]
    assert not [n for n in names if "__pycache__" in n.split("/")]
    assert "markupsafe/_native.py" in names  # the pure fallback for the dropped speedups
    assert app_source == (ROOT / "greengrassBrainSegmentationApp.py").read_bytes()
    assert names == sorted(names)
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.external_attr >> 16 for info in infos} == {0o100644}


def test_same_inputs_give_the_same_bytes(zips):
    assert zips["plain"].read_bytes() == zips["again"].read_bytes()


def test_with_model_adds_only_the_bundled_model(zips):
    with zipfile.ZipFile(zips["plain"]) as plain, zipfile.ZipFile(zips["model"]) as with_model:
        added = set(with_model.namelist()) - set(plain.namelist())
    model_dir = ROOT / "model" / "segmentation-net"
    assert added == {f"model/segmentation-net/{p.name}" for p in model_dir.iterdir() if p.is_file()}


def test_unzipped_package_serves_as_a_greengrass_lambda(unzipped, native_dir, t1_png, tmp_path):
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "MY_FUNCTION_ARN": ARN,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "API_TOKEN": "package-test",
    }
    # -I -S: no user or venv site-packages, no PYTHON* variables; the paths come in argv.
    command = [sys.executable, "-I", "-S", "-c", LAMBDA_RUNTIME, str(unzipped), str(native_dir)]
    log_path = tmp_path / "lambda.log"
    began = time.perf_counter()
    process = started(command, log_path, cwd=unzipped, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_or_fail(url, log_path, "the unzipped package")
        status, content_type, body = segment(url, t1_png)
        first_mask = time.perf_counter() - began
        assert (status, content_type) == (200, "image/png")
        assert read_png(body).shape == read_png(t1_png).shape
        facts = health(url)
        assert inside(facts["model_dir"], unzipped) and facts["runtime"] == "onnxruntime"

        report = json.loads(log_path.read_text().splitlines()[0])
        assert inside(report["flask"], unzipped)
        assert report["escape"] == "markupsafe._native"
        assert process.poll() is None
    finally:
        stop(process)
    print(f"\nunzipped package: first mask served {first_mask:.1f} s after process start")


def test_recipe_names_the_zip_and_the_native_pins():
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert recipe["ComponentConfiguration"]["DefaultConfiguration"] == {
        "Port": 5000,
        "ModelDir": "",
        "Passes": 2,
    }
    manifest = recipe["Manifests"][0]
    artifact = manifest["Artifacts"][0]
    assert artifact["URI"].endswith("/" + ZIP_NAME)
    assert artifact["Unarchive"] == "ZIP"
    requirements = (ROOT / "requirements.txt").read_text()
    install = manifest["Lifecycle"]["Install"]["Script"]
    pins = re.findall(r"^(?:onnxruntime|numpy)==.*$", requirements, re.M)
    assert len(pins) == 3 and all(pin in install for pin in pins)
    assert "mxnet" not in install
    run = manifest["Lifecycle"]["Run"]
    assert "{artifacts:decompressedPath}/greengrassBrainSegmentation/" in run
    assert "{configuration:/Port}" in run and "{configuration:/ModelDir}" in run
    assert "--passes {configuration:/Passes}" in run


@pytest.mark.parametrize("runtime_there", [True, False])
def test_recipe_install_step_fails_the_deployment_without_the_runtime(
    runtime_there, unzipped, native_dir, tmp_path
):
    install = yaml.safe_load(RECIPE.read_text())["Manifests"][0]["Lifecycle"]["Install"]
    # The venv the step makes, with pip's part done: native packages only (or none).
    venv = tmp_path / "work" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = next(venv.glob("lib/python3*/site-packages"))
    native = native_dir
    if not runtime_there:  # numpy installed, onnxruntime not (no wheel for this device)
        native = tmp_path / "numpy-only"
        native.mkdir()
        for name in ("numpy", "numpy.libs"):
            (native / name).symlink_to((native_dir / name).resolve())
    (site_packages / "native.pth").write_text(str(native))
    script = install["Script"].split(" && ", 2)[2]  # after the venv and pip install steps
    script = (
        script.replace("{work:path}", str(tmp_path / "work"))
        .replace("{artifacts:decompressedPath}", str(unzipped.parent))
        .replace("{configuration:/ModelDir}", "")
    )
    result = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    if runtime_there:
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.startswith("ok: ") and "runs with onnxruntime" in result.stdout
        assert str(unzipped / "model" / "segmentation-net") in result.stdout
    else:
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "error: onnxruntime is not installed" in result.stderr


def test_with_native_packs_onnxruntime_for_the_pi_not_mxnet(tmp_path):
    result = build(tmp_path, "--with-native", "manylinux_2_28_aarch64")
    assert result.returncode == 0, result.stderr
    size = (tmp_path / ZIP_NAME).stat().st_size
    assert size < 35 * 2**20  # the console's direct-upload limit is 50 MB
    with zipfile.ZipFile(tmp_path / ZIP_NAME) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names}
    assert {"onnxruntime", "numpy", "numpy.libs"} <= top and "mxnet" not in top
    assert "onnxruntime/capi/onnxruntime_pybind11_state.cpython-311-aarch64-linux-gnu.so" in names
    assert not [n for n in names if "x86_64" in n]
    print(f"\nnative zip for the Pi: {size / 2**20:.2f} MB")


def test_recipe_run_step_serves(unzipped, tmp_path):
    recipe = yaml.safe_load(RECIPE.read_text())
    lifecycle = recipe["Manifests"][0]["Lifecycle"]
    # Stand in for the venv that the Install step makes: put this interpreter's python3 first.
    python_bin = Path(sys.executable).parent
    if not (python_bin / "python3").exists():
        pytest.skip(f"no python3 beside {sys.executable}")
    activate = tmp_path / "work" / "venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text(f'PATH="{python_bin}:$PATH"; export PATH\n')
    port = free_port()
    model_dir = ROOT / "model" / "segmentation-net"
    run = (
        lifecycle["Run"]
        .replace("{work:path}", str(tmp_path / "work"))
        .replace("{artifacts:decompressedPath}", str(unzipped.parent))
        .replace("{configuration:/Port}", str(port))
        .replace("{configuration:/ModelDir}", str(model_dir))
        .replace("{configuration:/Passes}", "1")
    )
    assert "{" not in run
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HOST": "127.0.0.1",
        "API_TOKEN": "package-test",
        **lifecycle.get("Setenv", {}),
    }
    log_path = tmp_path / "component.log"
    process = started(["sh", "-c", run], log_path, cwd=tmp_path, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_or_fail(url, log_path, "the recipe's Run step")
        facts = health(url)
        assert facts["status"] == "ok" and facts["passes"] == 1
        assert Path(facts["model_dir"]).resolve() == model_dir.resolve()
    finally:
        stop(process)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--with-native"], "--with-native needs a platform"),
    ],
)
def test_build_rejects_bad_options(arguments, message, tmp_path):
    result = build(tmp_path, *arguments)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_zip.sh: error: ") and message in lines[0]
    assert not (tmp_path / ZIP_NAME).exists()


def test_build_without_python_says_so(tmp_path):
    result = build(tmp_path, python="no-such-python3")
    assert result.returncode != 0
    assert "'no-such-python3' not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
