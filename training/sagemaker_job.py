"""Launch training as a SageMaker MXNet script-mode job with boto3.

    python -m training.sagemaker_job --bucket my-bucket --role arn:aws:iam::1:role/SageMaker \
        --data-dir /data/oasis1 [--instance-count 2] [--epochs 40]

Uploads this repository's training code and the data folder to S3 and starts the job. Its
output, s3://<bucket>/<prefix>/output/<job>/output/model.tar.gz, is the Greengrass ML resource.
"""

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The last MXNet training image; its Python 3.8 is why requirements-train.txt pins releases
# that still support 3.8 (tests/test_sagemaker_job.py resolves them for the Python named here).
IMAGE = "763104351884.dkr.ecr.{region}.amazonaws.com/mxnet-training:1.9.0-cpu-py38"
# From requirements.txt: numpy as the server pins it (the image's MXNet needs numpy < 1.24),
# and ONNX Runtime, with which the export checks model.onnx.
SERVING_PINS = ("numpy", "onnxruntime")
ENTRY_POINT = "training/train.py"
PASSED_FLAGS = ("epochs", "iterations", "batch_size", "size", "lr", "hold_out", "source")


def main(argv=None):
    """Upload code and data, start the job, print its name and where the model will be."""
    args = parse_args(argv)
    import boto3

    session = boto3.session.Session(region_name=args.region)
    job = launch(args, session.client("s3"), session.client("sagemaker"), session.region_name)
    print(json.dumps(job, indent=2))


def parse_args(argv=None):
    """Flags for the job; training flags left unset keep train.py's defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--role", required=True, help="SageMaker execution role ARN")
    parser.add_argument("--data-dir", required=True, help="OASIS-1 discs or .cache/volumes")
    parser.add_argument("--prefix", default="brain-segmentation")
    parser.add_argument("--region")
    parser.add_argument("--instance-type", default="ml.c5.2xlarge")
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument("--max-hours", type=float, default=6)
    for flag in PASSED_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"))
    return parser.parse_args(argv)


def launch(args, s3, sagemaker, region):
    """Upload and call CreateTrainingJob; returns the job name and the S3 addresses."""
    name = f"{args.prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    base = f"s3://{args.bucket}/{args.prefix}"
    code_key = f"{args.prefix}/code/{name}/sourcedir.tar.gz"
    s3.put_object(Bucket=args.bucket, Key=code_key, Body=source_archive())
    data_prefix = f"{args.prefix}/data/{name}"
    for path in sorted(Path(args.data_dir).rglob("*")):
        if path.is_file():
            key = f"{data_prefix}/{path.relative_to(args.data_dir).as_posix()}"
            s3.upload_file(str(path), args.bucket, key)
    hyperparameters = {
        "sagemaker_program": ENTRY_POINT,
        "sagemaker_submit_directory": f"s3://{args.bucket}/{code_key}",
        "sagemaker_region": region,
        **{
            flag.replace("_", "-"): getattr(args, flag)
            for flag in PASSED_FLAGS
            if getattr(args, flag) is not None
        },
    }
    if args.instance_count > 1:  # dist_sync kvstore needs SageMaker's parameter servers
        hyperparameters["sagemaker_parameter_server_enabled"] = True
    sagemaker.create_training_job(
        TrainingJobName=name,
        AlgorithmSpecification={
            "TrainingImage": IMAGE.format(region=region),
            "TrainingInputMode": "File",
        },
        RoleArn=args.role,
        # SageMaker's framework images read every hyperparameter as a JSON value.
        HyperParameters={k: json.dumps(v) for k, v in hyperparameters.items()},
        InputDataConfig=[
            {
                "ChannelName": "train",
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": f"s3://{args.bucket}/{data_prefix}",
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
        ],
        OutputDataConfig={"S3OutputPath": f"{base}/output"},
        ResourceConfig={
            "InstanceType": args.instance_type,
            "InstanceCount": args.instance_count,
            "VolumeSizeInGB": 30,
        },
        StoppingCondition={"MaxRuntimeInSeconds": int(args.max_hours * 3600)},
    )
    return {
        "job": name,
        "data": f"s3://{args.bucket}/{data_prefix}",
        "model": f"{base}/output/{name}/output/model.tar.gz",
    }


def source_archive():
    """sourcedir.tar.gz: the training package, the modules it imports, the requirements."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        modules = [ROOT / "processing.py", ROOT / "load_model.py"]
        for path in sorted((ROOT / "training").glob("*.py")) + modules:
            tar.add(path, arcname=path.relative_to(ROOT).as_posix())
        # The MXNet image has mxnet; it pip-installs a requirements.txt it finds here.
        data = image_requirements().encode()
        info = tarfile.TarInfo("requirements.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def image_requirements():
    """What the image installs: requirements-train.txt and the SERVING_PINS lines."""
    serving = [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.split("==")[0] in SERVING_PINS
    ]
    return "\n".join(serving) + "\n" + (ROOT / "requirements-train.txt").read_text()


if __name__ == "__main__":
    main()
