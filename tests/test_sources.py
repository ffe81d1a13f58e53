"""Labelling a real skull-on head by EM with template priors (how Colin27 gets its labels)."""

import numpy as np

from training.sources import TARGET_OF, classify


def test_fluid_apart_from_the_brain_is_not_labelled_brain():
    """An eyeball of CSF-like fluid, away from the brain, becomes background; the brain stays."""
    size = 40
    grid = np.indices((size,) * 3).astype(np.float32)
    radius = np.sqrt(((grid - 18) ** 2).sum(0))
    eye = np.sqrt(((grid - np.reshape([33, 33, 18], (3, 1, 1, 1))) ** 2).sum(0)) < 3
    # WM core, GM shell, CSF shell, then skull, scalp and air; intensities like a T1
    classes = np.digitize(radius, [6, 10, 12, 14, 16])
    image = np.array([0.9, 0.55, 0.1, 0.25, 0.7, 0.0], np.float32)[classes]
    image[eye] = 0.1
    image += np.random.default_rng(0).normal(0, 0.01, image.shape).astype(np.float32)
    # soft priors as a TPM gives them (GM, WM, CSF, bone, soft tissue, air): the true class
    # likelier; where the eye is, CSF and soft tissue alike
    truth = np.array([1, 0, 2, 3, 4, 5])[classes]
    head = 0.1 + 0.5 * (np.arange(6)[:, None, None, None] == truth)
    head[:, eye] = np.array([0.05, 0.05, 0.4, 0.05, 0.4, 0.05])[:, None]
    labels = TARGET_OF[np.argmax(classify(image, head), axis=0)]
    assert (labels[eye] == 0).all()
    assert (labels[classes == 0] == 3).mean() > 0.95
    assert (labels[classes == 1] == 2).mean() > 0.9
    assert (labels[(classes == 2) & (radius < 11.5)] == 1).mean() > 0.9
