"""requirements.txt per platform: which runtime each target gets, and that pip resolves it."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

TOOL = ROOT / "tools" / "requirements_for.py"
PI_PLATFORMS = ["manylinux2014_aarch64", "manylinux_2_28_aarch64"]  # Pi OS: glibc 2.31+


def pins(python, machine, path=ROOT / "requirements.txt"):
    """{name: version} of the requirements that apply to Linux `machine` with `python`."""
    command = [sys.executable, str(TOOL), "--python", python, "--machine", machine, str(path)]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
    return dict(line.split("==") for line in lines)


@pytest.mark.parametrize(
    "python, machine, openvino, onnxruntime, mxnet",
    [
        ("3.11", "aarch64", None, "1.28.0", None),  # Raspberry Pi OS 64-bit (bookworm)
        ("3.8", "aarch64", None, "1.19.2", None),  # Greengrass V1 on a 64-bit Pi
        ("3.11", "x86_64", "2025.2.0", "1.28.0", "1.9.1"),
        ("3.8", "x86_64", "2024.4.0", "1.19.2", "1.9.1"),
        ("3.11", "armv7l", None, None, None),  # 32-bit Pi OS: the server starts, says what to do
    ],
)
def test_each_platform_gets_a_runtime_that_installs_there(
    python, machine, openvino, onnxruntime, mxnet
):
    chosen = pins(python, machine)
    assert chosen.get("onnxruntime") == onnxruntime and chosen.get("mxnet") == mxnet
    assert chosen.get("openvino") == openvino
    assert chosen["numpy"] == "1.23.5" and "boto3" not in chosen  # boto3 is for training


@pytest.mark.parametrize(
    "python, machine",
    [("3.11", "aarch64"), ("3.8", "aarch64"), ("3.8", "x86_64")],  # 3.11 x86_64: CI installs it
)
def test_pip_resolves_the_serving_requirements(python, machine, tmp_path):
    wanted = pins(python, machine)
    report = tmp_path / "report.json"
    targets = (
        PI_PLATFORMS if machine == "aarch64" else ["manylinux2014_x86_64", "manylinux_2_28_x86_64"]
    )
    platforms = [option for p in targets for option in ("--platform", p)]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "install",
         "--dry-run", "--ignore-installed", "--quiet", "--only-binary=:all:",
         "--python-version", python, "--implementation", "cp", *platforms,
         "--target", str(tmp_path / "target"), "--report", str(report),
         *(f"{name}=={version}" for name, version in wanted.items())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert resolved["onnxruntime"] == wanted["onnxruntime"]
    assert resolved.get("openvino") == wanted.get("openvino")
    assert ("mxnet" in resolved) == (machine == "x86_64")
