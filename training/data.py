"""Volumes for training and validation: the prepared templates, OASIS-1, and slices of them.

A `Volume` holds an image (X, Y, Z) float32 (or None), generation-class probabilities
(K, X, Y, Z) float16 (see `training.sources`), voxel spacing in mm and its family name.
"""

import glob
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.sources import TARGET_OF


@dataclass
class Volume:
    name: str
    family: str
    image: np.ndarray
    probs: np.ndarray
    spacing: np.ndarray

    def labels(self):
        """(X, Y, Z) uint8 target classes 0..3: argmax of the generation classes, mapped."""
        return TARGET_OF[np.argmax(self.probs, axis=0)]


def load_templates(folder):
    """Every prepared template volume with labels, from `<cache>/volumes/*.npz`."""
    volumes = []
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path) as data:
            if "probs" not in data:
                continue
            volumes.append(
                Volume(
                    path.stem, str(data["family"]), data["image"], data["probs"], data["spacing"]
                )
            )
    if not volumes:
        raise FileNotFoundError(f"no prepared volumes in {folder}: run python -m training.sources")
    return volumes


def find_oasis(root):
    """(image, label) path pairs of OASIS-1 discs: T88_111 gfc images with FSL_SEG labels."""
    pairs = []
    pattern = os.path.join(root, "**", "PROCESSED", "MPRAGE", "T88_111", "*_t88_gfc.img")
    for image in sorted(glob.glob(pattern, recursive=True)):
        session = Path(image).parents[3]
        stem = Path(image).name.replace("_t88_gfc.img", "")
        label = session / "FSL_SEG" / f"{stem}_t88_masked_gfc_fseg.img"
        if label.exists():
            pairs.append((image, str(label)))
    return pairs


def patient_of(path):
    """OASIS subject id from a file name: OAS1_0042_MR1_... -> OAS1_0042."""
    parts = Path(path).name.split("_")
    return "_".join(parts[:2])


def split_patients(pairs, validation_fraction=0.2):
    """Deterministic patient-level split: every session of a subject lands on the same side."""
    train, validation = [], []
    for pair in pairs:
        bucket = zlib.crc32(patient_of(pair[0]).encode()) % 1000 / 1000
        (validation if bucket < validation_fraction else train).append(pair)
    if not train and validation:
        train.append(validation.pop())
    return train, validation


def load_oasis(pairs):
    """OASIS-1 Analyze volumes as Volumes; FSL FAST labels 0..3 become one-hot probabilities."""
    import nibabel as nib

    volumes = []
    for image_path, label_path in pairs:
        image = nib.load(image_path)
        data = (
            np.asarray(image.dataobj, dtype=np.float32)[..., 0]
            if image.ndim == 4
            else np.asarray(image.dataobj, dtype=np.float32)
        )
        labels = np.asarray(nib.load(label_path).dataobj)
        labels = (labels[..., 0] if labels.ndim == 4 else labels).astype(np.uint8)
        probs = np.zeros((7,) + labels.shape, dtype=np.float16)
        for k in range(4):
            probs[k] = labels == k
        spacing = np.abs(np.asarray(image.header.get_zooms()[:3], dtype=np.float32))
        volumes.append(Volume(patient_of(image_path), "oasis", data, probs, spacing))
    return volumes


def planes(volume_array, plane):
    """Move `plane` (0 sagittal, 1 coronal, 2 axial) to the first axis of (..., X, Y, Z)."""
    return np.moveaxis(volume_array, volume_array.ndim - 3 + plane, volume_array.ndim - 3)


def brain_slices(labels, plane, min_fraction=0.02):
    """Indices along `plane` whose slice has at least `min_fraction` brain pixels."""
    per_slice = (planes(labels, plane) > 0).reshape(labels.shape[plane], -1).mean(1)
    return np.flatnonzero(per_slice >= min_fraction)
