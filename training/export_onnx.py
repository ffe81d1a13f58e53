"""Write model.onnx beside an MXNet model and check that both give the same masks.

    python -m training.export_onnx MODEL_DIR     # e.g. model/segmentation-net

MODEL_DIR is any folder `load_model.py` reads (a training export, an unpacked SageMaker
model.tar.gz, the Greengrass ML resource). The graph is written from the MXNet symbol after
`load_model.simplify` (PReLU with one slope as LeakyRelu, no Dropout, no output softmax, so
the output is logits), with batch norm folded into the convolution before it, and with
dynamic batch, height and width. Opset 17 and IR version 8, so that ONNX Runtime 1.19 (the
last release for Python 3.8) loads it. The new file replaces model.onnx only after MXNet and
ONNX Runtime (and OpenVINO, where installed) agreed on the argmax of at least 99.99 % of the
check pixels.
"""

import argparse
import ast
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import load_model
import processing

ROOT = Path(__file__).resolve().parent.parent
OPSET = 17
IR_VERSION = 8
MIN_AGREEMENT = 0.9999
ELEMENTWISE = {
    "elemwise_add": "Add",
    "_plus": "Add",
    "_Plus": "Add",
    "broadcast_add": "Add",
    "broadcast_plus": "Add",
    "elemwise_sub": "Sub",
    "_minus": "Sub",
    "broadcast_sub": "Sub",
    "elemwise_mul": "Mul",
    "_mul": "Mul",
    "broadcast_mul": "Mul",
    "elemwise_div": "Div",
    "broadcast_div": "Div",
}
ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softrelu": "Softplus"}


def main(argv=None):
    """Export, check, print the comparison; exit 1 when the runtimes disagree."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="folder with *-symbol.json and *-NNNN.params")
    args = parser.parse_args(argv)
    try:
        path, report = export(args.model_dir)
    except (load_model.ModelError, ExportError) as error:
        sys.exit(f"error: {error}")
    print(describe(report))
    print(f"wrote {path}")


class ExportError(Exception):
    """The graph has something this exporter cannot write, or the runtimes disagree."""


def export(model_dir):
    """Write MODEL_DIR/model.onnx once it passes `check`; returns (path, check report)."""
    directory = Path(model_dir)
    files = load_model.find_files(directory)
    meta = load_model.read_meta(directory, files.shapes)
    model_id = load_model.file_id(files.params)
    graph = json.loads(files.symbol.read_text())
    graph, params = load_model.simplify(graph, load_model.read_params(files.params))
    proto = to_onnx(graph, params, meta, model_id)
    onnx.checker.check_model(proto)
    target = directory / load_model.ONNX_NAME
    draft = directory / (load_model.ONNX_NAME + ".tmp")
    onnx.save(proto, str(draft))
    try:
        report = check(files._replace(onnx=draft), meta, model_id)
        if report["agreement"] < MIN_AGREEMENT:
            raise ExportError(f"MXNet and the ONNX model disagree: {describe(report)}")
        draft.replace(target)
    finally:
        draft.unlink(missing_ok=True)
    return target, report


def to_onnx(graph, params, meta, model_id):
    """An MXNet symbol graph (parsed JSON) and its parameters -> ONNX ModelProto."""
    writer = GraphWriter(graph, params)
    for index, node in enumerate(graph["nodes"]):
        writer.write(index, node)
    channels, classes = meta["input_channels"], len(meta["classes"])
    name = meta["input_name"]
    if name not in writer.names.values():
        raise ExportError(f"the graph has no input named {name!r} (model-meta.json input_name)")
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, "H", "W"])]
    head = writer.entry(graph["heads"][0])
    writer.nodes.append(helper.make_node("Identity", [head], ["logits"], name="logits"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, "H", "W"])]
    body = helper.make_graph(
        writer.nodes, meta["name"], inputs, outputs, list(writer.initializers.values())
    )
    proto = helper.make_model(
        body,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="brain-segmentation training.export_onnx",
    )
    proto.ir_version = IR_VERSION
    helper.set_model_props(
        proto, {"model_id": model_id, "output": "logits", "classes": ",".join(meta["classes"])}
    )
    return proto


class GraphWriter:
    """Turns MXNet nodes into ONNX nodes one at a time, in the symbol's (topological) order."""

    def __init__(self, graph, params):
        self.graph = graph
        self.params = params
        self.nodes = []
        self.initializers = {}
        self.names = {}  # (MXNet node, output) -> ONNX tensor name
        self.consumers = {}
        for index, node in enumerate(graph["nodes"]):
            for source in node["inputs"]:
                self.consumers.setdefault(source[0], []).append(index)

    def entry(self, source):
        """The ONNX name of an MXNet input entry [node, output, version]."""
        return self.names[(source[0], source[1])]

    def constant(self, name, value):
        """An initializer (added once) holding `value`; returns its name."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def add(self, op, inputs, name, **attributes):
        """Append an ONNX node whose single output is called `name`; returns `name`."""
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def write(self, index, node):
        """Write one MXNet node (or nothing, for a parameter or a folded batch norm)."""
        if (index, 0) in self.names:  # a batch norm already folded into its convolution
            return
        op, name = node["op"], node["name"]
        if op == "null":
            self.names[(index, 0)] = name
            return
        inputs = [self.entry(source) for source in node["inputs"]]
        attrs = node.get("attrs", {})
        if op in ("Convolution", "Deconvolution"):
            output = self.convolution(index, node, inputs, attrs)
        elif op == "BatchNorm":
            output = self.batch_norm(node, inputs, attrs)
        elif op in ELEMENTWISE:
            output = self.add(ELEMENTWISE[op], inputs, name)
        elif op == "LeakyReLU":
            output = self.leaky_relu(node, inputs, attrs)
        elif op == "Activation" and attrs.get("act_type") in ACTIVATIONS:
            output = self.add(ACTIVATIONS[attrs["act_type"]], inputs, name)
        elif op == "Pooling":
            output = self.pooling(name, inputs, attrs)
        elif op == "UpSampling" and attr(attrs, "sample_type", "nearest") == "nearest":
            if len(inputs) != 1:
                raise ExportError(f"{name}: UpSampling of several inputs is not supported")
            scale = float(attr(attrs, "scale", 1))
            scales = self.constant(name + "_scales", np.array([1, 1, scale, scale], np.float32))
            output = self.add(
                "Resize",
                [inputs[0], "", scales],
                name,
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        elif op == "Concat":
            output = self.add("Concat", inputs, name, axis=attr(attrs, "dim", 1))
        elif op == "slice_axis":
            output = self.slice_axis(name, inputs, attrs)
        elif op == "zeros_like":
            shape = self.add("Shape", inputs, name + "_shape")
            zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
            output = self.add("ConstantOfShape", [shape], name, value=zero)
        elif op == "broadcast_equal":
            equal = self.add("Equal", inputs, name + "_bool")
            output = self.add("Cast", [equal], name, to=TensorProto.FLOAT)
        elif op == "softmax" and attr(attrs, "temperature", None) is None:
            output = self.add("Softmax", inputs, name, axis=attr(attrs, "axis", -1))
        else:
            raise ExportError(f"operator {op} ({name}, {attrs}) is not supported by this exporter")
        self.names[(index, 0)] = output

    def parameter(self, source):
        """The array of a parameter input entry; an error if it is computed, not stored."""
        node = self.graph["nodes"][source[0]]
        if node["op"] != "null" or node["name"] not in self.params:
            raise ExportError(f"{node['name']} must be a stored parameter")
        return self.params[node["name"]]

    def convolution(self, index, node, inputs, attrs):
        """Conv or ConvTranspose, with a batch norm that alone reads it folded in."""
        transposed = node["op"] == "Deconvolution"
        if attr(attrs, "layout", "NCHW") not in ("NCHW", None) or attr(attrs, "target_shape", ()):
            raise ExportError(f"{node['name']}: only NCHW without target_shape is supported")
        weight = self.parameter(node["inputs"][1]).astype(np.float64)
        group = attr(attrs, "num_group", 1)
        out_axis = 1 if transposed else 0
        channels = weight.shape[out_axis] * (group if transposed else 1)
        no_bias = attr(attrs, "no_bias", transposed)  # MXNet's defaults differ by operator
        bias = np.zeros(channels) if no_bias else self.parameter(node["inputs"][2])
        name = node["name"]
        norm = self.foldable_batch_norm(index, transposed and group != 1)
        if norm is not None:
            scale, shift = batch_norm_affine(*norm)
            shape = [1] * weight.ndim
            shape[out_axis] = channels
            weight = weight * scale.reshape(shape)
            bias = bias * scale + shift
            name = self.graph["nodes"][norm[0]]["name"]
            self.names[(norm[0], 0)] = name
        kernel = tuple(attr(attrs, "kernel"))
        dims = len(kernel)
        options = {
            "kernel_shape": list(kernel),
            "strides": list(attr(attrs, "stride", (1,) * dims) or (1,) * dims),
            "dilations": list(attr(attrs, "dilate", (1,) * dims) or (1,) * dims),
            "pads": list(attr(attrs, "pad", (0,) * dims) or (0,) * dims) * 2,
            "group": group,
        }
        if transposed:
            options["output_padding"] = list(attr(attrs, "adj", (0,) * dims) or (0,) * dims)
        weights = [
            self.constant(name + "_weight", weight.astype(np.float32)),
            self.constant(name + "_bias", np.asarray(bias, np.float32)),
        ]
        op = "ConvTranspose" if transposed else "Conv"
        return self.add(op, [inputs[0], *weights], name, **options)

    def foldable_batch_norm(self, index, grouped_transpose):
        """(batch norm node, attrs, gamma, beta, mean, var) when one reads only this node."""
        consumers = self.consumers.get(index, [])
        if len(consumers) != 1 or grouped_transpose:
            return None
        norm = self.graph["nodes"][consumers[0]]
        if norm["op"] != "BatchNorm" or attr(norm.get("attrs", {}), "axis", 1) != 1:
            return None
        gamma, beta, mean, var = (self.parameter(s) for s in norm["inputs"][1:5])
        return (consumers[0], norm.get("attrs", {}), gamma, beta, mean, var)

    def batch_norm(self, node, inputs, attrs):
        """A batch norm that could not be folded, as BatchNormalization over axis 1."""
        name = node["name"]
        if attr(attrs, "axis", 1) != 1:
            raise ExportError(f"{name}: batch norm over axis {attrs['axis']} is not supported")
        gamma, beta, mean, var = (self.parameter(s) for s in node["inputs"][1:5])
        if attr(attrs, "fix_gamma", True):
            gamma = np.ones_like(gamma)
        values = [gamma, beta, mean, var]
        names = [
            self.constant(f"{name}_{part}", np.asarray(v, np.float32))
            for part, v in zip(("scale", "bias", "mean", "var"), values)
        ]
        epsilon = float(attr(attrs, "eps", 1e-3))
        return self.add("BatchNormalization", [inputs[0], *names], name, epsilon=epsilon)

    def leaky_relu(self, node, inputs, attrs):
        """LeakyReLU's leaky, prelu and elu kinds."""
        name = node["name"]
        kind = attr(attrs, "act_type", "leaky")
        if kind == "leaky":
            return self.add("LeakyRelu", inputs[:1], name, alpha=float(attr(attrs, "slope", 0.25)))
        if kind == "elu":
            return self.add("Elu", inputs[:1], name, alpha=float(attr(attrs, "slope", 0.25)))
        if kind == "prelu":
            slope = self.parameter(node["inputs"][1]).astype(np.float32).reshape(-1, 1, 1)
            return self.add("PRelu", [inputs[0], self.constant(name + "_slope", slope)], name)
        raise ExportError(f"{name}: LeakyReLU act_type {kind} is not supported")

    def pooling(self, name, inputs, attrs):
        """Max or average pooling, windowed or global."""
        kind = attr(attrs, "pool_type", "max")
        if kind not in ("max", "avg"):
            raise ExportError(f"{name}: {kind} pooling is not supported")
        if attr(attrs, "global_pool", False):
            return self.add("GlobalMaxPool" if kind == "max" else "GlobalAveragePool", inputs, name)
        kernel = tuple(attr(attrs, "kernel"))
        dims = len(kernel)
        options = {
            "kernel_shape": list(kernel),
            "strides": list(attr(attrs, "stride", (1,) * dims) or (1,) * dims),
            "pads": list(attr(attrs, "pad", (0,) * dims) or (0,) * dims) * 2,
            "ceil_mode": int(attr(attrs, "pooling_convention", "valid") == "full"),
        }
        if kind == "max":
            return self.add("MaxPool", inputs, name, **options)
        include = int(bool(attr(attrs, "count_include_pad", True)))
        return self.add("AveragePool", inputs, name, count_include_pad=include, **options)

    def slice_axis(self, name, inputs, attrs):
        """slice_axis as Slice; an end of None means to the end."""
        end = attr(attrs, "end", None)
        end = np.iinfo(np.int64).max if end is None else end
        ints = {"starts": attr(attrs, "begin", 0), "ends": end, "axes": attr(attrs, "axis", 0)}
        names = [self.constant(f"{name}_{k}", np.array([v], np.int64)) for k, v in ints.items()]
        return self.add("Slice", [inputs[0], *names], name)


def batch_norm_affine(_index, attrs, gamma, beta, mean, var):
    """(scale, shift) per channel that an inference batch norm applies, in float64."""
    gamma = np.ones_like(gamma) if attr(attrs, "fix_gamma", True) else gamma
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + attr(attrs, "eps", 1e-3))
    return scale, beta.astype(np.float64) - mean.astype(np.float64) * scale


def attr(attrs, key, default=None):
    """An MXNet attribute string as a Python value ('(3, 3)' -> (3, 3), 'True' -> True)."""
    if key not in attrs:
        return default
    try:
        return ast.literal_eval(attrs[key])
    except (ValueError, SyntaxError):
        return attrs[key]


def check(files, meta, model_id):
    """Run the check slices through MXNet (rewritten and as exported) and the ONNX runtimes.

    The ONNX runtimes are ONNX Runtime and, where it is installed, OpenVINO. Returns
    {"runtimes": their names, "agreement": the smallest share of pixels whose argmax in one
    of them equals MXNet's (both MXNet graphs), "max_logit_diff": largest |ONNX - MXNet
    rewritten| logit, "pixels", "batches"}.
    """
    runtimes = [load_model.OnnxRuntime(files, meta, model_id)]
    try:
        runtimes.append(load_model.OpenVinoRuntime(files, meta, model_id))
    except load_model.RuntimeUnavailable:
        pass  # not installed here (a SageMaker job): ONNX Runtime alone
    rewritten = load_model.MxnetRuntime(files, meta)
    exported = load_model.MxnetRuntime(files, meta, rewrite=False)
    agree, pixels, largest = [0] * len(runtimes), 0, 0.0
    batches = check_batches(meta)
    for batch in batches:
        reference = rewritten.predict(batch)
        references = [reference.argmax(axis=1), exported.predict(batch).argmax(axis=1)]
        pixels += references[0].size
        for index, runtime in enumerate(runtimes):
            logits = runtime.predict(batch)
            largest = max(largest, float(np.abs(logits - reference).max()))
            classes = logits.argmax(axis=1)
            agree[index] += sum(int((classes == other).sum()) for other in references)
    return {
        "runtimes": [runtime.name for runtime in runtimes],
        "agreement": min(agree) / (2 * pixels),
        "max_logit_diff": largest,
        "pixels": pixels,
        "batches": [list(b.shape) for b in batches],
    }


def check_batches(meta):
    """Network inputs for the check: each slice's frame, all frames as one batch, one crop.

    The slices are the repository's test slices (tests/data) when they are there, else a
    synthetic head, so the check also runs inside a SageMaker job. The crop, smaller than the
    frame, checks that height and width are dynamic.
    """
    side, channels = meta["frame_side"], meta["input_channels"]
    frames = np.stack([processing.frame_slice(s, side)[0] for s in sample_slices()])
    frames = np.repeat(frames[:, None], channels, axis=1)
    multiple = meta["size_multiple"]
    crop = frames[:1, :, : side // 2 - side // 2 % multiple, : side - multiple]
    singles = [frames[i : i + 1] for i in range(len(frames))]
    return singles + [frames, np.ascontiguousarray(crop)]


def sample_slices():
    """(H, W) slices to check with: tests/data/*.png without labels, else a synthetic one."""
    paths = sorted(p for p in (ROOT / "tests" / "data").glob("*.png") if "_label" not in p.name)
    if paths:
        return [processing.decode_png(p.read_bytes()) for p in paths]
    rows, cols = np.mgrid[-1:1:181j, -1:1:217j]
    radius = np.hypot(rows / 0.9, cols / 0.75)
    head = 60.0 * (radius < 1) + 60.0 * (radius < 0.92) + 80.0 * (radius < 0.6)
    noise = np.random.default_rng(0).normal(0, 4, head.shape)
    return [np.clip(head + noise, 0, 255).astype(np.uint8)]


def describe(report):
    """One line for the check report."""
    names = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
    return (
        f"{' and '.join(names[r] for r in report['runtimes'])} vs MXNet: argmax equal on "
        f"{100 * report['agreement']:.4f} % of "
        f"{report['pixels']} pixels, largest |Δlogit| {report['max_logit_diff']:.2e} "
        f"(inputs {report['batches']})"
    )


if __name__ == "__main__":
    main()
