"""load_model.py: finding checkpoints, both parameter layouts, clear faults, the forward pass."""

import json
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from conftest import ROOT, read_png

import load_model


def copy_model(target, prefix="model", epoch=0):
    """Copy the bundled checkpoint into `target` under another prefix and epoch."""
    target.mkdir(parents=True, exist_ok=True)
    bundled = load_model.BUNDLED_PATH
    shutil.copy(bundled / "model-symbol.json", target / f"{prefix}-symbol.json")
    shutil.copy(bundled / "model-0000.params", target / f"{prefix}-{epoch:04d}.params")
    return target


def test_forward_pass_gives_probabilities(model):
    batch = np.random.default_rng(0).random((1, 1, 64, 96), dtype=np.float32)
    probabilities = model.predict(batch)
    assert probabilities.shape == (1, 4, 64, 96)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)


@pytest.mark.parametrize("shape", [(91, 109), (256, 256), (257, 300), (16, 16)])
def test_any_slice_size_gives_a_mask_of_that_size(model, shape):
    mask = model.segment(np.random.default_rng(1).integers(0, 255, shape).astype(np.uint8))
    assert mask.shape == shape and mask.dtype == np.uint8 and mask.max() <= 3


def test_every_slice_size_runs_on_one_frame_shape(model):
    side = model.meta["frame_side"]
    model.segment(np.zeros((120, 136), np.uint8))
    executor, shapes = model.executors[(1, 1, side, side)], set(model.executors)
    for width in range(16, 4096, 300):
        model.segment(np.zeros((16, width), np.uint8))
    assert set(model.executors) == shapes
    assert model.executors[(1, 1, side, side)] is executor


def test_highest_epoch_and_gluon_style_keys_load(tmp_path, model, t1_png):
    folder = copy_model(tmp_path / "sagemaker", prefix="seg", epoch=3)
    params = mx.nd.load(str(folder / "seg-0003.params"))
    mx.nd.save(str(folder / "seg-0012.params"), {k.split(":", 1)[1]: v for k, v in params.items()})
    (folder / "seg-0003.params").write_bytes(b"older epoch, never read")
    loaded = load_model.load(str(folder))
    assert loaded.params_path.name == "seg-0012.params"
    assert loaded.meta["input_channels"] == 1 and loaded.meta["name"] == "unnamed-mxnet-model"
    from processing import decode_png

    slice_ = decode_png(t1_png)
    assert np.array_equal(loaded.segment(slice_), model.segment(slice_))


def test_shapes_file_sets_the_input_channels(tmp_path):
    folder = copy_model(tmp_path / "m")
    (folder / "model-shapes.json").write_text(json.dumps([{"name": "data", "shape": [1, 1, 8, 8]}]))
    assert load_model.load(str(folder)).meta["input_channels"] == 1


def test_corrupt_params_name_the_path(tmp_path):
    folder = copy_model(tmp_path / "corrupt")
    (folder / "model-0000.params").write_bytes(b"\x00" * 100)
    with pytest.raises(load_model.ModelError, match=str(folder)):
        load_model.load(str(folder))


def test_mismatched_symbol_is_reported(tmp_path):
    folder = copy_model(tmp_path / "mismatch")
    data = mx.sym.var("data")
    other = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="other_conv")
    other.save(str(folder / "model-symbol.json"))
    with pytest.raises(load_model.ModelError, match="does not match"):
        load_model.load(str(folder))


def test_missing_params_and_missing_dir_are_reported(tmp_path):
    folder = tmp_path / "only-symbol"
    folder.mkdir()
    shutil.copy(load_model.BUNDLED_PATH / "model-symbol.json", folder)
    with pytest.raises(load_model.ModelError, match="params"):
        load_model.load(str(folder))
    with pytest.raises(load_model.ModelError, match="no \\*-symbol.json"):
        load_model.load(str(tmp_path / "absent"))


def test_search_order_prefers_the_prefixed_greengrass_resource(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_GG_RESOURCE_PREFIX", str(tmp_path))
    resource = copy_model(tmp_path / load_model.GREENGRASS_PATH.strip("/"), prefix="gg")
    directory, origin = load_model.find_model_dir()
    assert directory == resource and "no container" in origin
    monkeypatch.delenv("AWS_GG_RESOURCE_PREFIX")
    directory, origin = load_model.find_model_dir()
    assert directory == load_model.BUNDLED_PATH or directory == load_model.Path(
        load_model.GREENGRASS_PATH
    )


def test_serving_needs_no_training_code_and_no_custom_op():
    graph = json.loads((load_model.BUNDLED_PATH / "model-symbol.json").read_text())
    ops = {node["op"] for node in graph["nodes"]}
    assert "Custom" not in ops and "Convolution" in ops
    code = (
        "import sys, numpy as np, load_model; m = load_model.load(); "
        "print(m.segment(np.zeros((32, 32), np.uint8)).shape); "
        "print(sorted(k for k in sys.modules if k.split('.')[0] == 'training'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[-2:] == ["(32, 32)", "[]"]


def test_mask_png_of_the_bundled_model_is_readable(model, t1_png):
    from processing import decode_png, encode_mask

    mask = model.segment(decode_png(t1_png))
    assert np.array_equal(read_png(encode_mask(mask)), mask)
