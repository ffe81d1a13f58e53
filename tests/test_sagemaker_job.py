"""The SageMaker launcher against moto's S3 and SageMaker (no AWS account here)."""

import io
import json
import re
import subprocess
import sys
import tarfile

import boto3
import moto
import pytest
from conftest import ROOT

from training import sagemaker_job

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"


@pytest.fixture
def aws(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(key, value)
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="eu-west-1")
        s3.create_bucket(
            Bucket="brains", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        yield s3, boto3.client("sagemaker", region_name="eu-west-1")


def test_launch_uploads_code_and_data_and_starts_a_script_mode_job(aws, tmp_path):
    s3, sagemaker = aws
    (tmp_path / "disc1").mkdir()
    (tmp_path / "disc1" / "scan.img").write_bytes(b"\x00" * 64)
    args = sagemaker_job.parse_args(
        [
            "--bucket",
            "brains",
            "--role",
            ROLE,
            "--data-dir",
            str(tmp_path),
            "--instance-count",
            "2",
            "--epochs",
            "40",
        ]
    )
    job = sagemaker_job.launch(args, s3, sagemaker, "eu-west-1")

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="brains")["Contents"]]
    assert f"brain-segmentation/data/{job['job']}/disc1/scan.img" in keys
    code_key = next(k for k in keys if k.endswith("sourcedir.tar.gz"))
    archive = s3.get_object(Bucket="brains", Key=code_key)["Body"].read()
    names = tarfile.open(fileobj=io.BytesIO(archive)).getnames()
    assert {
        "training/train.py",
        "training/enet.py",
        "training/export_onnx.py",
        "processing.py",
        "load_model.py",
        "requirements.txt",
    } <= set(names)

    described = sagemaker.describe_training_job(TrainingJobName=job["job"])
    params = {k: json.loads(v) for k, v in described["HyperParameters"].items()}
    assert params["sagemaker_program"] == "training/train.py"
    assert params["sagemaker_submit_directory"] == f"s3://brains/{code_key}"
    assert params["epochs"] == "40" and params["sagemaker_parameter_server_enabled"] is True
    assert "mxnet-training:1.9.0" in described["AlgorithmSpecification"]["TrainingImage"]
    assert described["ResourceConfig"]["InstanceCount"] == 2
    assert job["model"].endswith(f"/output/{job['job']}/output/model.tar.gz")


def test_the_training_image_can_install_the_job_requirements(tmp_path):
    python = ".".join(re.search(r"-py(\d)(\d+)", sagemaker_job.IMAGE).groups())
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(sagemaker_job.image_requirements())
    pins = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "requirements_for.py"), "--python", python,
         "--machine", "x86_64", str(requirements)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert {p.split("==")[0] for p in pins} >= {"numpy", "onnxruntime", "scipy", "onnx"}
    # pip resolves the whole dependency tree from PyPI for that Python without installing
    # anything; --isolated keeps this machine's extra package folders out of the answer.
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "install",
         "--dry-run", "--ignore-installed", "--quiet", "--only-binary=:all:",
         "--python-version", python, "--implementation", "cp",
         "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
         "--target", str(tmp_path / "target"), "--report", str(report), *pins],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {p.split("==")[0].lower() for p in pins} <= resolved
