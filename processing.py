"""Pure image functions for the endpoint: decode uploads, normalise, postprocess, encode masks.

Everything here takes and returns bytes or numpy arrays; no Flask, MXNet or file I/O.
Training imports `normalise` from here so the server and the model see the same input.
"""
import numpy as np

NORMALISATION = "divide by the 99th percentile of above-minimum pixels, clip to [0, 2]"


def normalise(slice_):
    """Scale an (H, W) slice of any dtype to float32, about 0..1 in tissue, scanner-independent.

    The minimum maps to 0 and the 99th percentile of the pixels above it to 1, so 8-bit,
    16-bit and float inputs of the same anatomy give the same numbers.
    """
    values = np.asarray(slice_, dtype=np.float32)
    low = float(values.min()) if values.size else 0.0
    shifted = values - low
    foreground = shifted[shifted > 0]
    high = float(np.percentile(foreground, 99)) if foreground.size else 1.0
    return np.clip(shifted / max(high, 1e-6), 0.0, 2.0).astype(np.float32)


def pad_to_multiple(slice_, multiple):
    """Zero-pad an (H, W) array at the bottom and right so both sides divide by `multiple`."""
    height, width = slice_.shape
    pad_h, pad_w = -height % multiple, -width % multiple
    return np.pad(slice_, ((0, pad_h), (0, pad_w)))


def to_mask(probabilities, height, width):
    """(C, H', W') class probabilities -> (height, width) uint8 class indices, cropped."""
    return np.argmax(probabilities[:, :height, :width], axis=0).astype(np.uint8)
