"""Find, load and run the MXNet segmentation model on the CPU.

A model directory holds `<prefix>-symbol.json` and `<prefix>-NNNN.params` (the highest NNNN
wins), optionally `<prefix>-shapes.json` and `model-meta.json`: what a SageMaker MXNet job's
model.tar.gz and the Greengrass ML resource hold. Module checkpoints (`arg:`/`aux:` keys) and
Gluon parameter files (bare names) both load. The rest of the code sees
`Model.predict(batch) -> probabilities` and `Model.segment(slice) -> mask`.
"""

import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

import processing

log = logging.getLogger("segmentation.model")
# MXNet prints a line per executor bound; the serving log has no use for it.
os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")

GREENGRASS_PATH = "/greengrass-machine-learning/mxnet/segmentation-net/"
BUNDLED_PATH = Path(__file__).resolve().parent / "model" / "segmentation-net"
DEFAULT_META = {
    "name": "unnamed-mxnet-model",
    "input_name": "data",
    "input_channels": 1,
    "size_multiple": 8,
    "frame_side": processing.FRAME_SIDE,
    "classes": processing.CLASS_NAMES,
    "colours": [list(c) for c in processing.PALETTE],
    "normalisation": processing.NORMALISATION,
}
CACHED_SHAPES = 8


class ModelError(Exception):
    """The model cannot be found or loaded; the message names the path and the fault."""


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
    """(symbol, params, shapes or None) paths of the checkpoint in `directory`."""
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
    return symbols[0], epochs[max(epochs)], shapes if shapes.exists() else None


def load(model_dir=None):
    """Find and load the model; raises ModelError with the path and the fault."""
    directory, origin = find_model_dir(model_dir)
    model = Model(directory)
    log.info(
        "loaded model %s (%s) from %s [%s]", model.meta["name"], model.model_id, directory, origin
    )
    return model


class Model:
    """A loaded checkpoint with a cache of CPU executors, one per input shape."""

    def __init__(self, directory):
        import mxnet as mx

        self.mx = mx
        self.directory = Path(directory)
        symbol_path, params_path, shapes_path = find_files(self.directory)
        self.meta = dict(DEFAULT_META)
        meta_path = self.directory / "model-meta.json"
        try:
            if meta_path.exists():
                self.meta.update(json.loads(meta_path.read_text()))
            if shapes_path:
                shape = json.loads(shapes_path.read_text())[0]["shape"]
                self.meta.setdefault("input_channels", shape[1])
            self.symbol = mx.sym.load(str(symbol_path))
            raw = mx.nd.load(str(params_path))
        except (OSError, ValueError, KeyError, IndexError, mx.base.MXNetError) as error:
            raise ModelError(
                f"cannot read the model in {self.directory}: {first_line(error)}"
            ) from error
        self.args, self.aux = split_params(raw, self.symbol)
        self.input_name = self.meta["input_name"]
        missing = [
            n for n in self.symbol.list_arguments() if n != self.input_name and n not in self.args
        ]
        if missing:
            raise ModelError(
                f"{params_path} does not match {symbol_path.name}: "
                f"{len(missing)} missing parameters, e.g. {missing[:3]}"
            )
        self.model_id = hashlib.sha256(params_path.read_bytes()).hexdigest()[:12]
        self.params_path = params_path
        self.executors = OrderedDict()
        self.lock = threading.Lock()
        side = self.meta["frame_side"]
        self.predict(np.zeros((1, self.meta["input_channels"], side, side), np.float32))

    def predict(self, batch):
        """(N, C, H, W) float32, H and W multiples of size_multiple -> (N, K, H, W) float32."""
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

    def segment(self, slice_):
        """(H, W) slice of any dtype -> (H, W) uint8 class indices."""
        frame, geometry = processing.frame_slice(slice_, self.meta["frame_side"])
        batch = np.repeat(frame[None, None], self.meta["input_channels"], axis=1)
        return processing.mask_from_scores(self.predict(batch)[0], geometry)

    def describe(self):
        """Facts for /health and /model."""
        return {
            "model_id": self.model_id,
            "model_dir": str(self.directory),
            "params_file": self.params_path.name,
            **self.meta,
        }


def split_params(raw, symbol):
    """Module (`arg:`/`aux:`) or Gluon (bare names) params -> (args, aux) dicts for the symbol."""
    args, aux = {}, {}
    aux_names = set(symbol.list_auxiliary_states())
    for key, value in raw.items():
        kind, _, name = key.partition(":")
        if not name:
            kind, name = ("aux" if key in aux_names else "arg"), key
        (aux if kind == "aux" else args)[name] = value
    return args, aux


def first_line(error):
    """The first meaningful line of an MXNet error (they carry long C++ stack traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__
