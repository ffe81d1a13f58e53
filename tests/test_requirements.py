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
    "python, machine, onnxruntime, mxnet",
    [
        ("3.11", "aarch64", "1.28.0", None),  # Raspberry Pi OS 64-bit (bookworm)
        ("3.8", "aarch64", "1.19.2", None),  # Greengrass V1 on a 64-bit Pi
        ("3.11", "x86_64", "1.28.0", "1.9.1"),
        ("3.8", "x86_64", "1.19.2", "1.9.1"),
        ("3.11", "armv7l", None, None),  # 32-bit Pi OS: the server starts and says what to do
    ],
)
def test_each_platform_gets_a_runtime_that_installs_there(python, machine, onnxruntime, mxnet):
    chosen = pins(python, machine)
    assert chosen.get("onnxruntime") == onnxruntime and chosen.get("mxnet") == mxnet
    assert chosen["numpy"] == "1.23.5" and "boto3" not in chosen  # boto3 is for training


@pytest.mark.parametrize("python", ["3.11", "3.8"])
def test_pip_resolves_the_serving_requirements_for_a_64_bit_pi(python, tmp_path):
    wanted = pins(python, "aarch64")
    report = tmp_path / "report.json"
    platforms = [option for p in PI_PLATFORMS for option in ("--platform", p)]
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
    assert resolved["onnxruntime"] == wanted["onnxruntime"] and "mxnet" not in resolved
