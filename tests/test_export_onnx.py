"""training/export_onnx.py: the bundled model's model.onnx, any checkpoint's, and clear refusals."""

import json
import shutil
from collections import Counter

import mxnet as mx
import numpy as np
import onnx
import pytest
from conftest import run_module

import load_model
from training import export_onnx


def ops(path):
    """{ONNX operator: count} of a model file."""
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_the_bundled_model_onnx_is_current_and_has_the_contract():
    proto = onnx.load(str(load_model.BUNDLED_PATH / "model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model_id"] == load_model.file_id(load_model.BUNDLED_PATH / "model-0000.params")
    assert props["output"] == "logits"
    assert proto.ir_version == 8 and proto.opset_import[0].version == 17  # ONNX Runtime 1.19
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in
            (proto.graph.input[0], proto.graph.output[0])]  # fmt: skip
    assert dims == [["N", 1, "H", "W"], ["N", 4, "H", "W"]]
    counted = ops(load_model.BUNDLED_PATH / "model.onnx")
    assert not counted.keys() & {"Softmax", "PRelu", "Dropout"}
    # every batch norm folded into its convolution but the one after the initial concat
    assert counted["BatchNormalization"] == 1 and counted["LeakyRelu"] == 82


def test_the_command_exports_a_sagemaker_checkpoint_and_checks_it(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model-symbol.json", "model-meta.json"):
        shutil.copy(load_model.BUNDLED_PATH / name, folder / name)
    params = mx.nd.load(str(load_model.BUNDLED_PATH / "model-0000.params"))
    mx.nd.save(str(folder / "model-0007.params"), {k.split(":")[1]: v for k, v in params.items()})
    result = run_module("training.export_onnx", folder)
    assert result.returncode == 0, result.stderr[-2000:]
    agreement = float(result.stdout.split("argmax equal on ")[1].split(" %")[0])
    assert agreement >= 99.99 and "largest |Δlogit|" in result.stdout
    assert f"wrote {folder / 'model.onnx'}" in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == [
        "model-0007.params",
        "model-meta.json",
        "model-symbol.json",
        "model.onnx",
    ]
    loaded = load_model.load(str(folder))
    assert loaded.runtime.name == "openvino"


def other_network(folder):
    """A small network with operators and layouts the ENet lacks, random weights, 3 channels."""
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=6, kernel=(3, 3), pad=(1, 1), name="c1")
    x = mx.sym.BatchNorm(x, name="bn1")  # fix_gamma defaults to True: gamma is ignored
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="act1")  # one slope per channel
    skip = x
    x = mx.sym.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="avg", name="pool")
    x = mx.sym.Activation(x, act_type="relu", name="relu")
    x = mx.sym.Deconvolution(x, num_filter=6, kernel=(2, 2), stride=(2, 2), name="up")
    x = mx.sym.BatchNorm(x + skip, fix_gamma=False, eps=1e-5, name="bn2")  # not foldable
    x = mx.sym.Convolution(x, num_filter=4, kernel=(1, 1), num_group=2, name="c2")
    x = mx.sym.softmax(x, axis=1, name="out")
    folder.mkdir()
    x.save(str(folder / "net-symbol.json"))
    shapes = dict(zip(x.list_arguments(), x.infer_shape(data=(1, 3, 16, 16))[0]))
    aux = dict(zip(x.list_auxiliary_states(), x.infer_shape(data=(1, 3, 16, 16))[2]))
    rng = np.random.default_rng(1)
    params = {f"arg:{n}": mx.nd.array(rng.normal(0, 0.5, s)) for n, s in shapes.items()}
    params.update({f"aux:{n}": mx.nd.array(rng.uniform(0.5, 1.5, s)) for n, s in aux.items()})
    del params["arg:data"]
    mx.nd.save(str(folder / "net-0000.params"), params)
    (folder / "net-shapes.json").write_text(json.dumps([{"name": "data", "shape": [1, 3, 32, 32]}]))
    return folder


def test_other_operators_export_to_the_same_masks(tmp_path):
    folder = other_network(tmp_path / "other")
    path, report = export_onnx.export(folder)
    assert report["agreement"] >= 0.9999 and report["max_logit_diff"] < 1e-3
    assert ops(path) >= Counter(["PRelu", "AveragePool", "ConvTranspose", "BatchNormalization"])
    assert "Softmax" not in ops(path)
    model = load_model.load(str(folder))
    assert model.runtime.name == "openvino" and model.meta["input_channels"] == 3
    logits = model.predict(np.ones((3, 3, 24, 40), np.float32))
    assert logits.shape == (3, 4, 24, 40)


def test_an_unsupported_operator_is_named_and_nothing_is_written(tmp_path):
    folder = tmp_path / "dense"
    folder.mkdir()
    flat = mx.sym.Flatten(mx.sym.var("data"), name="flat")
    mx.sym.FullyConnected(flat, num_hidden=4, name="fc").save(str(folder / "m-symbol.json"))
    weights = {"arg:fc_weight": mx.nd.ones((4, 64)), "arg:fc_bias": mx.nd.zeros(4)}
    mx.nd.save(str(folder / "m-0000.params"), weights)
    with pytest.raises(export_onnx.ExportError, match="operator Flatten"):
        export_onnx.export(folder)
    assert not list(folder.glob("*.onnx*"))
    result = run_module("training.export_onnx", folder)
    assert result.returncode == 1 and "error: operator Flatten" in result.stderr
