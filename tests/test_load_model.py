"""load_model.py: finding checkpoints, both parameter layouts, both runtimes, clear faults."""

import json
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from conftest import ROOT, agreement, read_png

import load_model
import processing


def copy_model(target, prefix="model", epoch=0, onnx=False):
    """Copy the bundled checkpoint (and its model.onnx) into `target` under another prefix."""
    target.mkdir(parents=True, exist_ok=True)
    bundled = load_model.BUNDLED_PATH
    shutil.copy(bundled / "model-symbol.json", target / f"{prefix}-symbol.json")
    shutil.copy(bundled / "model-0000.params", target / f"{prefix}-{epoch:04d}.params")
    if onnx:
        shutil.copy(bundled / "model.onnx", target / "model.onnx")
    return target


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def python_lines(code):
    """The lines a fresh `python -c code` prints from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()


def test_auto_takes_openvino_and_never_imports_the_others():
    code = (
        "import sys, numpy as np, load_model; m = load_model.load(); "
        "print(m.runtime.name, m.segment(np.zeros((32, 32), np.uint8)).shape, "
        "'mxnet' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    assert python_lines(code)[-1] == "openvino (32, 32) False False"


def test_auto_falls_back_to_onnx_runtime_without_openvino(tmp_path):
    (tmp_path / "openvino").mkdir()  # a package that fails to import, as a broken install does
    (tmp_path / "openvino" / "__init__.py").write_text("raise ImportError('broken install')")
    setup = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import load_model; "
    code = setup + "m = load_model.load(); print(m.runtime.name, 'mxnet' in sys.modules)"
    assert python_lines(code)[-1] == "onnxruntime False"
    code = setup + "load_model.load(runtime='openvino')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "ModelError: openvino is not installed (broken install)" in result.stderr


def test_every_runtime_gives_the_logits_whose_softmax_mxnet_exported(model, ort_model, mxnet_model):
    batch = np.random.default_rng(0).random((2, 1, 64, 96), dtype=np.float32)
    files = mxnet_model.files
    as_exported = load_model.MxnetRuntime(files, mxnet_model.meta, rewrite=False).predict(batch)
    assert np.allclose(as_exported.sum(axis=1), 1, atol=1e-4)  # the symbol ends in softmax
    for runtime in (model, ort_model, mxnet_model):
        logits = runtime.predict(batch)
        assert logits.shape == (2, 4, 64, 96) and logits.dtype == np.float32
        assert np.abs(softmax(logits) - as_exported).max() < 1e-3
    names = [m.runtime.name for m in (model, ort_model, mxnet_model)]
    assert names == ["openvino", "onnxruntime", "mxnet"]


def test_runtimes_give_identical_masks_on_the_test_slices(
    model, ort_model, mxnet_model, test_slices
):
    for name, slice_ in test_slices.items():
        reference = mxnet_model.segment(slice_)
        for other in (model, ort_model):
            assert agreement(other.segment(slice_), reference) >= 0.9999, name
    side = model.meta["frame_side"]  # all frames in one batch: a dynamic batch size
    frames = np.stack([processing.frame_slice(s, side)[0] for s in test_slices.values()])
    reference = mxnet_model.predict(frames[:, None])
    for other in (model, ort_model):
        logits = other.predict(frames[:, None])
        difference = np.abs(logits - reference).max()
        print(f"{other.runtime.name}: largest |logit difference| {difference:.2e}")
        assert agreement(logits.argmax(axis=1), reference.argmax(axis=1)) >= 0.9999


def test_openvino_compiles_once_per_input_shape(model):
    requests = model.runtime.requests
    side = model.meta["frame_side"]
    model.segment(np.zeros((120, 136), np.uint8))
    serving = (model.passes, 1, side, side)  # a slice and, with two passes, its flipped copy
    request = requests[serving]
    for width in range(16, 4096, 600):
        model.segment(np.random.default_rng(width).integers(0, 255, (16, width), np.uint8))
    model.predict(np.zeros((5, 1, side, side), np.float32))  # chunks of 2, then 1
    assert requests[serving] is request
    assert {shape[0] for shape in requests} == {1, load_model.CHUNK}
    assert len(requests) <= load_model.CACHED_SHAPES


def test_every_slice_size_runs_on_one_frame_shape(mxnet_model):
    executors = mxnet_model.runtime.executors
    side = mxnet_model.meta["frame_side"]
    served = (mxnet_model.passes, 1, side, side)  # a frame and its upside-down copy
    mxnet_model.segment(np.zeros((120, 136), np.uint8))
    executor, shapes = executors[served], set(executors)
    for width in range(16, 4096, 300):
        mxnet_model.segment(np.zeros((16, width), np.uint8))
    assert set(executors) == shapes
    assert executors[served] is executor


def test_mxnet_runs_the_rewritten_graph(mxnet_model):
    graph = json.loads(mxnet_model.runtime.symbol.tojson())
    ops = {node["op"] for node in graph["nodes"]}
    kinds = {n["attrs"]["act_type"] for n in graph["nodes"] if n["op"] == "LeakyReLU"}
    assert kinds == {"leaky"} and not ops & {"softmax", "Dropout"}


def test_highest_epoch_and_gluon_style_keys_load(tmp_path, model, t1_png):
    folder = copy_model(tmp_path / "sagemaker", prefix="seg", epoch=3)
    params = mx.nd.load(str(folder / "seg-0003.params"))
    mx.nd.save(str(folder / "seg-0012.params"), {k.split(":", 1)[1]: v for k, v in params.items()})
    (folder / "seg-0003.params").write_bytes(b"older epoch, never read")
    loaded = load_model.load(str(folder))
    assert loaded.params_path.name == "seg-0012.params"
    assert loaded.meta["input_channels"] == 1 and loaded.meta["name"] == "unnamed-mxnet-model"
    assert loaded.runtime.name == "mxnet"  # no model.onnx in the folder
    slice_ = processing.decode_png(t1_png)
    assert agreement(loaded.segment(slice_), model.segment(slice_)) >= 0.9999


def tiny_model(folder, channels, input_name="data"):
    """A 3x3 convolution from `channels` inputs to 4 classes, saved as an MXNet checkpoint."""
    folder.mkdir()
    conv = mx.sym.Convolution(
        mx.sym.var(input_name), num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv"
    )
    conv.save(str(folder / "tiny-symbol.json"))
    rng = np.random.default_rng(0)
    weights = {
        "arg:conv_weight": mx.nd.array(rng.normal(size=(4, channels, 3, 3))),
        "arg:conv_bias": mx.nd.zeros(4),
    }
    mx.nd.save(str(folder / "tiny-0000.params"), weights)
    return folder


def test_shapes_file_sets_the_input_channels(tmp_path):
    folder = tiny_model(tmp_path / "rgb", channels=3)
    with pytest.raises(load_model.ModelError, match=r"cannot take input \(2, 1, 256, 256\)"):
        load_model.load(str(folder))  # taken as one channel without the file
    (folder / "tiny-shapes.json").write_text(
        json.dumps([{"name": "data", "shape": [1, 3, 32, 48]}])
    )
    loaded = load_model.load(str(folder))
    assert loaded.meta["input_channels"] == 3
    assert loaded.predict(np.ones((2, 3, 16, 24), np.float32)).shape == (2, 4, 16, 24)
    side = loaded.meta["frame_side"]
    assert list(loaded.runtime.executors) == [(2, 3, side, side), (2, 3, 16, 24)]


def test_model_meta_wins_over_the_shapes_file(tmp_path):
    folder = tiny_model(tmp_path / "rgb", channels=3, input_name="image")
    (folder / "tiny-shapes.json").write_text(json.dumps([{"name": "x", "shape": [1, 1, 8, 8]}]))
    (folder / "model-meta.json").write_text(
        json.dumps({"input_name": "image", "input_channels": 3})
    )
    loaded = load_model.load(str(folder))
    assert (loaded.meta["input_name"], loaded.meta["input_channels"]) == ("image", 3)


def test_a_stale_model_onnx_is_not_served(tmp_path, caplog):
    folder = copy_model(tmp_path / "retrained", onnx=True)
    assert load_model.load(str(folder)).runtime.name == "openvino"
    params = mx.nd.load(str(folder / "model-0000.params"))
    params["arg:conv89_weight"] *= 0.5  # stands in for new training
    mx.nd.save(str(folder / "model-0000.params"), params)
    with caplog.at_level("INFO", logger="segmentation.model"):
        assert load_model.load(str(folder)).runtime.name == "mxnet"
    assert "exported from other parameters" in caplog.text
    for runtime in ("openvino", "onnxruntime"):
        with pytest.raises(load_model.ModelError, match="training.export_onnx"):
            load_model.load(str(folder), runtime=runtime)


def test_an_unknown_runtime_is_refused():
    with pytest.raises(load_model.ModelError, match="auto, openvino, onnxruntime, mxnet"):
        load_model.load(runtime="tensorflow")


def test_32_bit_arm_gets_a_message_not_a_traceback(tmp_path):
    code = (
        "import platform, sys; "
        "sys.modules['openvino'] = sys.modules['onnxruntime'] = sys.modules['mxnet'] = None; "
        "platform.machine = lambda: 'armv7l'; import greengrassBrainSegmentationApp as app; "
        "app.main(['--port', '0'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: openvino is not installed")
    assert "onnxruntime is not installed" in message
    assert "32-bit ARM (armv7l)" in message and "64-bit Raspberry Pi OS" in message


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
        "import sys, numpy as np, load_model; m = load_model.load(runtime='mxnet'); "
        "print(m.segment(np.zeros((32, 32), np.uint8)).shape); "
        "print(sorted(k for k in sys.modules if k.split('.')[0] == 'training'))"
    )
    assert python_lines(code)[-2:] == ["(32, 32)", "[]"]


def test_mask_png_of_the_bundled_model_is_readable(model, t1_png):
    mask = model.segment(processing.decode_png(t1_png))
    assert np.array_equal(read_png(processing.encode_mask(mask)), mask)


def test_the_bundled_model_fills_a_stripped_brain_and_not_a_head(model, t1_png, head_png):
    stripped = processing.decode_png(t1_png)
    mask = model.segment(stripped)
    assert (mask[stripped > stripped.min()] > 0).all()
    head = processing.decode_png(head_png)
    frame, geometry = processing.frame_slice(head, model.meta["frame_side"])
    scores = processing.predict_frames(model.predict, frame[None], 1, model.passes)[0]
    plain = processing.mask_from_scores(scores, geometry)
    assert np.array_equal(model.segment(head), plain)
    assert not plain[head > np.percentile(head, 60)].all()  # the head is not all brain


def test_two_passes_average_the_frame_and_its_upside_down_copy(model, t1_png):
    frame = processing.frame_slice(processing.decode_png(t1_png), 256)[0]
    once = model.predict(frame[None, None])[0]
    flipped = model.predict(np.ascontiguousarray(frame[None, None, ::-1]))[0][:, ::-1]
    both = processing.predict_frames(model.predict, frame[None], 1, 2)[0]
    assert np.allclose(both, (once + flipped) / 2, atol=1e-4)
    assert np.array_equal(processing.predict_frames(model.predict, frame[None], 1, 1)[0], once)
    assert (np.argmax(both, 0) != np.argmax(once, 0)).any()  # the second pass changes pixels
