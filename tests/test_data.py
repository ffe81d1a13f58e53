"""OASIS-1 loading from an Analyze-format fixture laid out like the OASIS discs."""

import nibabel as nib
import numpy as np
import pytest
from conftest import run_module

from training import data

SHAPE = (24, 28, 20)


def write_session(root, session, seed):
    """One OASIS-shaped session: T88_111 gfc image and FSL_SEG labels, Analyze 7.5."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, SHAPE).astype(np.uint8)
    image = (labels * 300 + rng.integers(0, 50, SHAPE)).astype(np.int16)
    stem = f"{session}_mpr_n4_anon_111"
    t88 = root / session / "PROCESSED" / "MPRAGE" / "T88_111"
    seg = root / session / "FSL_SEG"
    t88.mkdir(parents=True)
    seg.mkdir(parents=True)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.AnalyzeImage(image[..., None], affine), t88 / f"{stem}_t88_gfc.img")
    nib.save(nib.AnalyzeImage(labels, affine), seg / f"{stem}_t88_masked_gfc_fseg.img")
    return labels


@pytest.fixture
def oasis(tmp_path):
    sessions = [
        "OAS1_0001_MR1",
        "OAS1_0002_MR1",
        "OAS1_0002_MR2",
        "OAS1_0003_MR1",
        "OAS1_0004_MR1",
        "OAS1_0005_MR1",
    ]
    labels = {s: write_session(tmp_path / "disc1", s, i) for i, s in enumerate(sessions)}
    (tmp_path / "disc1" / "OAS1_0006_MR1" / "PROCESSED").mkdir(parents=True)  # no images
    return tmp_path, labels


def test_finds_image_and_label_pairs(oasis):
    root, labels = oasis
    pairs = data.find_oasis(root)
    assert len(pairs) == len(labels)
    assert all(img.endswith("_t88_gfc.img") and lab.endswith("_fseg.img") for img, lab in pairs)


def test_split_keeps_every_session_of_a_patient_together(oasis):
    root, _ = oasis
    train, validation = data.split_patients(data.find_oasis(root), validation_fraction=0.5)
    assert train and validation
    train_patients = {data.patient_of(p[0]) for p in train}
    val_patients = {data.patient_of(p[0]) for p in validation}
    assert not train_patients & val_patients
    assert data.split_patients(data.find_oasis(root), 0.5) == (train, validation)


def test_loads_volumes_with_their_labels(oasis):
    root, labels = oasis
    pairs = [p for p in data.find_oasis(root) if "OAS1_0002_MR2" in p[0]]
    (volume,) = data.load_oasis(pairs)
    assert volume.name == "OAS1_0002" and volume.family == "oasis"
    assert volume.image.shape == SHAPE and volume.image.dtype == np.float32
    assert np.array_equal(volume.labels(), labels["OAS1_0002_MR2"])
    assert np.allclose(volume.spacing, 1.0)


def test_brain_slices_skip_empty_ones():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[3:6, 2:8, 2:8] = 2
    assert list(data.brain_slices(labels, 0)) == [3, 4, 5]


def test_the_train_command_trains_on_oasis(oasis, tmp_path):
    root, _ = oasis
    result = run_module(
        "training.train", "--data-dir", root, "--epochs", 1, "--iterations", 2,
        "--batch-size", 2, "--size", 32, "--run-dir", tmp_path / "run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training on ['OAS1_" in result.stdout and "epoch 1/1" in result.stdout
    assert (tmp_path / "run" / "model" / "model-symbol.json").exists()
