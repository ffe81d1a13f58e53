"""Find and load the segmentation model; run it with OpenVINO, ONNX Runtime or MXNet on the CPU.

A model directory holds `<prefix>-symbol.json` and `<prefix>-NNNN.params` (the highest NNNN
wins), optionally `<prefix>-shapes.json`, `model-meta.json` and `model.onnx`: what a SageMaker
MXNet job's model.tar.gz and the Greengrass ML resource hold. Module checkpoints (`arg:`/`aux:`
keys) and Gluon parameter files (bare names) both load. `model.onnx` is the same network
exported by `python -m training.export_onnx DIR`.

The rest of the code sees `Model.predict(batch) -> logits` and `Model.segment(slice) -> mask`,
whichever runtime runs the network. `auto` takes the first that can run here: OpenVINO, then
ONNX Runtime (both need `model.onnx`; on a Raspberry Pi, where MXNet does not import,
requirements.txt installs ONNX Runtime only), then MXNet.
"""

import hashlib
import json
import logging
import os
import platform
import re
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

import processing

log = logging.getLogger("segmentation.model")
# MXNet prints a line per executor bound; the serving log has no use for it.
os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")

GREENGRASS_PATH = "/greengrass-machine-learning/mxnet/segmentation-net/"
BUNDLED_PATH = Path(__file__).resolve().parent / "model" / "segmentation-net"
ONNX_NAME = "model.onnx"
RUNTIMES = ("auto", "openvino", "onnxruntime", "mxnet")
# What a checkpoint without model-meta.json or shapes file is taken to be: a Gluon export
# (whose input is always "data") of a one-channel network; these are the only copies.
DEFAULT_META = {
    "name": "unnamed-mxnet-model",
    "input_name": "data",
    "input_channels": 1,
    "size_multiple": 8,
    "frame_side": processing.FRAME_SIDE,
    "classes": processing.CLASS_NAMES,
    "colours": [list(c) for c in processing.PALETTE],
    "normalisation": processing.NORMALISATION,
    "output": "logits",
}
CACHED_SHAPES = 8
CHUNK = 2  # frames per OpenVINO call (OpenVinoRuntime)
# Output operators that only rescale the scores: dropping one leaves the argmax unchanged.
SOFTMAX_OPS = {"softmax", "SoftmaxActivation", "SoftmaxOutput", "log_softmax"}


class ModelError(Exception):
    """The model cannot be found or loaded; the message names the path and the fault."""


class ModelFiles(NamedTuple):
    """The files of one model directory; shapes and onnx are None when absent."""

    symbol: Path
    params: Path
    shapes: Optional[Path]
    onnx: Optional[Path]


def candidate_dirs(model_dir=None):
    """Where to look, in order: explicit dir, Greengrass resource (prefixed, plain), bundled."""
    candidates = []
    if model_dir:
        candidates.append((Path(model_dir), "--model-dir / MODEL_DIR"))
    prefix = os.environ.get("AWS_GG_RESOURCE_PREFIX")
    if prefix:
        candidates.append((Path(prefix + GREENGRASS_PATH), "Greengrass ML resource (no container)"))
    candidates.append((Path(GREENGRASS_PATH), "Greengrass ML resource"))
    candidates.append((BUNDLED_PATH, "model bundled with the app"))
    return candidates


def find_model_dir(model_dir=None):
    """The first candidate directory holding a symbol file; an explicit dir must hold one."""
    for path, origin in candidate_dirs(model_dir):
        if any(path.glob("*-symbol.json")):
            return path, origin
        if model_dir and origin.startswith("--model-dir"):
            raise ModelError(f"no *-symbol.json model in {path} (given by --model-dir/MODEL_DIR)")
    searched = ", ".join(str(p) for p, _ in candidate_dirs(model_dir))
    raise ModelError(f"no model found; looked in {searched}")


def find_files(directory):
    """The ModelFiles of the checkpoint in `directory`."""
    symbols = sorted(directory.glob("*-symbol.json"))
    if len(symbols) > 1:
        log.warning("several symbol files in %s; using %s", directory, symbols[0].name)
    prefix = symbols[0].name[: -len("-symbol.json")]
    epochs = {}
    for path in directory.glob(f"{prefix}-*.params"):
        match = re.fullmatch(re.escape(prefix) + r"-(\d+)\.params", path.name)
        if match:
            epochs[int(match.group(1))] = path
    if not epochs:
        raise ModelError(f"{symbols[0]} has no matching {prefix}-NNNN.params in {directory}")
    shapes = directory / f"{prefix}-shapes.json"
    onnx = directory / ONNX_NAME
    return ModelFiles(
        symbols[0],
        epochs[max(epochs)],
        shapes if shapes.exists() else None,
        onnx if onnx.exists() else None,
    )


def read_meta(directory, shapes_path=None):
    """The model's contract: model-meta.json, else the shapes file, else DEFAULT_META.

    The shapes file (`[{"name": ..., "shape": [N, C, H, W]}]`) gives the input name and the
    channels.
    """
    meta = dict(DEFAULT_META)
    try:
        if shapes_path:
            first = json.loads(shapes_path.read_text())[0]
            meta.update(input_name=first["name"], input_channels=int(first["shape"][1]))
        meta_path = directory / "model-meta.json"
        if meta_path.exists():
            meta.update(json.loads(meta_path.read_text()))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise ModelError(f"cannot read the model's description in {directory}: {error}") from error
    return meta


def load(model_dir=None, runtime="auto", passes=2):
    """Find and load the model with `runtime` (auto, onnxruntime or mxnet); raises ModelError.

    `passes`: 2 averages each frame's scores with its upside-down copy's, 1 runs it once
    (`processing.predict_frames`).
    """
    directory, origin = find_model_dir(model_dir)
    model = Model(directory, runtime, passes)
    log.info(
        "loaded model %s (%s) from %s [%s] with %s",
        model.meta["name"],
        model.model_id,
        directory,
        origin,
        model.runtime.name,
    )
    return model


class Model:
    """A model directory's facts (meta, model_id) and the runtime that runs its network."""

    def __init__(self, directory, runtime="auto", passes=2):
        if passes not in processing.PASSES:
            raise ModelError(f"passes must be 1 or 2, not {passes!r}")
        self.passes = passes
        self.directory = Path(directory)
        self.files = find_files(self.directory)
        self.params_path = self.files.params
        self.meta = read_meta(self.directory, self.files.shapes)
        self.model_id = file_id(self.params_path)
        self.runtime = open_runtime(runtime, self.files, self.meta, self.model_id)
        side = self.meta["frame_side"]  # the one frame shape that serving uses, as batched
        self.predict(np.zeros((passes, self.meta["input_channels"], side, side), np.float32))

    def predict(self, batch):
        """(N, C, H, W) float32, H and W multiples of size_multiple -> (N, K, H, W) logits."""
        return self.runtime.predict(batch)

    def segment(self, slice_, timings=None, drop_stray=True):
        """(H, W) slice of any dtype -> (H, W) uint8 class indices.

        A `timings` dict gets "forward_ms", the network's own share of the time; `drop_stray`
        is as in processing.mask_of().
        """
        return processing.segment_with(
            self.predict,
            slice_,
            self.meta["frame_side"],
            self.meta["input_channels"],
            timings,
            self.passes,
            drop_stray,
        )

    def describe(self):
        """Facts for /health and /model."""
        return {
            "model_id": self.model_id,
            "model_dir": str(self.directory),
            "params_file": self.params_path.name,
            "runtime": self.runtime.name,
            "passes": self.passes,
            **self.meta,
        }


def open_runtime(choice, files, meta, model_id):
    """The runtime for `choice`: auto takes the first of OpenVINO, ONNX Runtime, MXNet that can."""
    if choice not in RUNTIMES:
        raise ModelError(f"RUNTIME/--runtime must be one of {', '.join(RUNTIMES)}, not {choice!r}")
    reasons = []
    for runtime in (OpenVinoRuntime, OnnxRuntime, MxnetRuntime):
        if choice not in ("auto", runtime.name):
            continue
        try:
            opened = runtime(files, meta, model_id)
        except RuntimeUnavailable as error:
            reasons.append(str(error))
            continue
        if reasons:
            log.info("running the model with %s: %s", runtime.name, "; ".join(reasons))
        return opened
    raise ModelError("; ".join(reasons))


class RuntimeUnavailable(ModelError):
    """This runtime cannot run here (not installed, cannot import, or no file for it)."""


class OnnxRuntime:
    """`model.onnx` in an ONNX Runtime CPU session (one pass at a time, any input size)."""

    name = "onnxruntime"

    def __init__(self, files, meta, model_id):
        need_onnx(files)
        try:
            import onnxruntime
        except ImportError as error:
            raise RuntimeUnavailable(f"onnxruntime is not installed ({error})") from error
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are not news
        # Worker threads that spin between operators lose their core when anything else runs
        # (here a 2-thread pass then took twice as long); sleeping costs little when idle.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(
                str(files.onnx), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # ORT raises its own exception types for a bad file
            raise ModelError(f"cannot load {files.onnx}: {first_line(error)}") from error
        self.input_name = self.session.get_inputs()[0].name
        exported_from = self.session.get_modelmeta().custom_metadata_map.get("model_id")
        matches_folder(files, meta, model_id, exported_from, self.input_name)
        # ORT's memory arena grows to what the passes in flight need at once and keeps it for
        # good: four slices side by side, or a volume's batches of 8 frames, left 50-100 MB.
        # So passes take turns (one already spreads over every core: side by side they were
        # no faster here), and a batched pass shrinks the arena back when it ends.
        self.lock = threading.Lock()
        self.shrink = onnxruntime.RunOptions()
        self.shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def predict(self, batch):
        """(N, C, H, W) float32 -> (N, K, H, W) float32 logits."""
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        with self.lock:
            return self.session.run(None, feed, self.shrink if len(batch) > 1 else None)[0]


def need_onnx(files):
    """RuntimeUnavailable unless the folder has model.onnx."""
    if files.onnx is None:
        raise RuntimeUnavailable(
            f"no {ONNX_NAME} in {files.params.parent} "
            f"(make it with: python -m training.export_onnx {files.params.parent})"
        )


def matches_folder(files, meta, model_id, exported_from, input_name):
    """RuntimeUnavailable unless model.onnx was exported from the folder's parameters;
    ModelError unless it takes the input that model-meta.json names."""
    if exported_from != model_id:
        raise RuntimeUnavailable(
            f"{files.onnx} was exported from other parameters ({exported_from}) than "
            f"{files.params.name} ({model_id}); re-export it with: "
            f"python -m training.export_onnx {files.params.parent}"
        )
    if input_name != meta["input_name"]:
        raise ModelError(
            f"{files.onnx} takes input {input_name!r}, the model's description says "
            f"{meta['input_name']!r}"
        )


class OpenVinoRuntime:
    """`model.onnx` compiled by OpenVINO for the CPU, once per input shape, one pass at a time.

    A network compiled for one fixed shape ran twice as fast here as ONNX Runtime, and as
    OpenVINO itself with a dynamic shape; so a batch runs in chunks of CHUNK frames through
    the model compiled for (CHUNK, C, H, W), an odd last frame through (1, C, H, W). A chunk
    of 2 (a slice and its upside-down copy when serving) took 7 % less time than its two
    frames one by one, and larger chunks gained no more. Serving uses one frame shape; others
    (tests, tools) compile on first use and the least recently used is dropped.
    """

    name = "openvino"

    def __init__(self, files, meta, model_id):
        need_onnx(files)
        # `import openvino` also imports its model converter, whose telemetry client writes a
        # client id into ~/intel; serving converts nothing, so the converter stays out.
        if "openvino" not in sys.modules:
            sys.modules.setdefault("openvino.tools.ovc", None)
        try:
            import openvino
            from openvino.frontend import FrontEndManager
        except ImportError as error:
            raise RuntimeUnavailable(f"openvino is not installed ({error})") from error
        self.core = openvino.Core()
        self.onnx = files.onnx
        try:  # the ONNX reader only: the generic one tries every format and logs each failure
            frontend = FrontEndManager().load_by_framework("onnx")
            self.network = frontend.convert(frontend.load(str(files.onnx)))
        except Exception as error:  # OpenVINO raises plain RuntimeError/Exception for a bad file
            raise ModelError(f"cannot load {files.onnx}: {first_line(error)}") from error
        exported_from = None
        if self.network.has_rt_info(["framework", "model_id"]):
            exported_from = self.network.get_rt_info(["framework", "model_id"]).astype(str)
        self.input_name = self.network.inputs[0].get_any_name()
        matches_folder(files, meta, model_id, exported_from, self.input_name)
        self.requests = OrderedDict()
        self.lock = threading.Lock()

    def predict(self, batch):
        """(N, C, H, W) float32 -> (N, K, H, W) float32 logits."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self.lock:  # an infer request runs one pass at a time
            chunks = []
            for start in range(0, len(batch), CHUNK):
                chunk = batch[start : start + CHUNK]
                chunks.append(self.request(chunk.shape).infer([chunk])[0])
        # one chunk (a slice served with two passes) is returned as it is: a copy of its
        # 2 MB of scores cost 1 ms here, most of it faulting in fresh pages
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def request(self, shape):
        """An infer request of the network compiled for `shape`, compiled once and kept."""
        if shape in self.requests:
            self.requests.move_to_end(shape)
            return self.requests[shape]
        network = self.network.clone()
        try:
            network.reshape({self.input_name: list(shape)})
            compiled = self.core.compile_model(
                network, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
            )
        except Exception as error:
            raise ModelError(
                f"{self.onnx} cannot take input {shape}: {first_line(error)}"
            ) from error
        self.requests[shape] = compiled.create_infer_request()
        if len(self.requests) > CACHED_SHAPES:
            self.requests.popitem(last=False)
        return self.requests[shape]


class MxnetRuntime:
    """The MXNet checkpoint, bound once per input shape (least recently used dropped).

    With `rewrite` (the default) the graph is first made cheaper with the same argmax, see
    `simplify`; without it, it runs exactly as exported (for comparisons).
    """

    name = "mxnet"

    def __init__(self, files, meta, model_id=None, rewrite=True):
        mx = import_mxnet()
        self.mx = mx
        self.directory = files.params.parent
        try:
            graph = json.loads(files.symbol.read_text())
            params = read_params(files.params)
            if rewrite:
                graph, params = simplify(graph, params)
            self.symbol = mx.sym.load_json(json.dumps(graph))
        except (OSError, ValueError, KeyError, IndexError, mx.base.MXNetError) as error:
            raise ModelError(
                f"cannot read the model in {self.directory}: {first_line(error)}"
            ) from error
        self.input_name = meta["input_name"]
        arguments = [n for n in self.symbol.list_arguments() if n != self.input_name]
        missing = [n for n in arguments if n not in params]
        if missing:
            raise ModelError(
                f"{files.params} does not match {files.symbol.name}: "
                f"{len(missing)} missing parameters, e.g. {missing[:3]}"
            )
        self.args = {n: mx.nd.array(params[n], dtype=params[n].dtype) for n in arguments}
        self.aux = {
            n: mx.nd.array(params[n], dtype=params[n].dtype)
            for n in self.symbol.list_auxiliary_states()
        }
        self.executors = OrderedDict()
        self.lock = threading.Lock()

    def predict(self, batch):
        """(N, C, H, W) float32 -> (N, K, H, W) float32 (logits when rewritten)."""
        with self.lock:  # executors are not thread-safe
            executor = self.executor(batch.shape)
            executor.arg_dict[self.input_name][:] = batch
            executor.forward(is_train=False)
            return executor.outputs[0].asnumpy()

    def executor(self, shape):
        """A bound executor for this shape, bound once and kept (least recently used dropped)."""
        shape = tuple(shape)
        if shape in self.executors:
            self.executors.move_to_end(shape)
            return self.executors[shape]
        mx = self.mx
        args = dict(self.args)
        args[self.input_name] = mx.nd.zeros(shape)
        try:
            executor = self.symbol.bind(mx.cpu(), args, aux_states=dict(self.aux), grad_req="null")
        except mx.base.MXNetError as error:
            raise ModelError(
                f"the model in {self.directory} cannot take input {shape}: {first_line(error)}"
            ) from error
        self.executors[shape] = executor
        if len(self.executors) > CACHED_SHAPES:
            self.executors.popitem(last=False)
        return executor


def import_mxnet():
    """The mxnet module, or RuntimeUnavailable saying why it does not import here and what to do."""
    try:
        import mxnet
    except (ImportError, OSError) as error:
        machine = platform.machine()
        if machine.startswith(("armv6", "armv7", "armv8l")):
            advice = (
                f"this is 32-bit ARM ({machine}), for which neither ONNX Runtime nor MXNet has "
                "a wheel: install 64-bit Raspberry Pi OS (aarch64), then "
                "pip install -r requirements.txt"
            )
        elif "libarmpl" in str(error):
            advice = (
                "MXNet's aarch64 wheel needs Arm Performance Libraries; serve with ONNX "
                "Runtime instead (pip install -r requirements.txt, model.onnx in the model "
                "folder) or install ArmPL (docs/DEPLOY.md)"
            )
        else:
            advice = "pip install -r requirements.txt"
        raise RuntimeUnavailable(
            f"MXNet cannot be imported ({first_line(error)}): {advice}"
        ) from error
    return mxnet


def read_params(path):
    """A .params file (Module `arg:`/`aux:` keys or Gluon bare names) -> {name: ndarray}."""
    mx = import_mxnet()
    try:
        raw = mx.nd.load(str(path))
    except mx.base.MXNetError as error:
        raise ModelError(f"cannot read {path}: {first_line(error)}") from error
    return {key.partition(":")[2] or key: value.asnumpy() for key, value in raw.items()}


def simplify(graph, params):
    """An MXNet symbol graph (the parsed JSON) made cheaper to run, with the same argmax.

    - PReLU with a single slope becomes LeakyReLU with that slope: the same function, and
      MXNet's PReLU kernel takes over half of the forward pass.
    - Dropout goes (it does nothing at inference).
    - A softmax at the output goes: the output becomes logits, whose argmax is the same.
    Returns (graph, params) without the parameters that are no longer used.
    """
    nodes = graph["nodes"]
    head = graph["heads"][0][0]
    kept, entries = [], {}  # entries: (old node, output) -> [new node, output, 0]

    def entry(node_input):
        node, output = node_input[0], node_input[1]
        return entries.get((node, output)) or [entries[(node, 0)][0], output, 0]

    for index, node in enumerate(nodes):
        inputs = [entry(i) for i in node["inputs"]]
        op, attrs = node["op"], dict(node.get("attrs", {}))
        if op == "Dropout" or (index == head and op in SOFTMAX_OPS):
            entries[(index, 0)] = inputs[0]
            continue
        if op == "LeakyReLU" and attrs.get("act_type") == "prelu":
            slope = params.get(nodes[node["inputs"][1][0]]["name"])
            if slope is not None and slope.size == 1:
                attrs = {"act_type": "leaky", "slope": repr(float(slope.reshape(-1)[0]))}
                inputs = inputs[:1]
        entries[(index, 0)] = [len(kept), 0, 0]
        kept.append({"op": op, "name": node["name"], "attrs": attrs, "inputs": inputs})
    heads = [entry(h) for h in graph["heads"]]
    graph, used = prune(kept, heads, graph.get("attrs", {}))
    return graph, {name: value for name, value in params.items() if name in used}


def prune(nodes, heads, attrs):
    """(graph JSON with only the nodes the heads depend on, names of its variables)."""
    needed, stack = set(), [h[0] for h in heads]
    while stack:
        index = stack.pop()
        if index not in needed:
            needed.add(index)
            stack.extend(i[0] for i in nodes[index]["inputs"])
    order = sorted(needed)
    new_index = {old: new for new, old in enumerate(order)}

    def moved(entry):
        return [new_index[entry[0]], entry[1], entry[2]]

    pruned = [{**nodes[i], "inputs": [moved(e) for e in nodes[i]["inputs"]]} for i in order]
    variables = [i for i, node in enumerate(pruned) if node["op"] == "null"]
    graph = {
        "nodes": pruned,
        "arg_nodes": variables,
        "heads": [moved(h) for h in heads],
        "attrs": attrs,
    }
    return graph, {pruned[i]["name"] for i in variables}


def file_id(path):
    """The first 12 hex digits of the file's SHA-256: the model id that the responses carry."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def first_line(error):
    """The first meaningful line of an MXNet error (they carry long C++ stack traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__
