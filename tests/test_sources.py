"""Labelling heads by EM with template priors (how every training brain gets its labels)."""

import io
import tarfile

import numpy as np
import pytest

from training import register
from training.sources import (
    TARGET_OF,
    bias_corrected,
    classify,
    debian_file,
    labelled_with,
    relabel,
    resample,
    save,
)


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


def test_relabel_follows_the_image_where_the_map_does_not():
    """A population map that calls the brain's dark rim of fluid grey matter: relabelled from
    the image, the rim is CSF, grey and white matter keep their places, the brain's outline
    and the head around it stay."""
    size = 40
    radius = np.sqrt(((np.indices((size,) * 3).astype(np.float32) - 18) ** 2).sum(0))
    # a ventricle, WM, GM, a rim of fluid, bone, scalp, air
    shells = np.digitize(radius, [3, 6, 10, 12, 14, 16])
    image = np.array([0.1, 0.9, 0.55, 0.1, 0.25, 0.7, 0.0], np.float32)[shells]
    image += np.random.default_rng(1).normal(0, 0.01, image.shape).astype(np.float32)
    # generation classes (air, CSF, GM, WM, bone, soft, other); the map: GM out to the skull
    mapped = np.array([1, 3, 2, 2, 4, 5, 0])[shells]
    classes = 0.02 + (np.arange(7)[:, None, None, None] == mapped).astype(np.float32)
    classes /= classes.sum(0)
    before = TARGET_OF[np.argmax(classes, axis=0)]
    after = TARGET_OF[np.argmax(relabel(image, classes), axis=0)]
    rim = (shells == 3) & (radius > 10.5) & (radius < 11.5)
    assert (before[rim] == 2).all()
    assert (after[rim] == 1).mean() > 0.75  # against a map prior of 0.98 grey matter
    assert (after[(shells == 2) & (radius > 7) & (radius < 9)] == 2).mean() > 0.9
    assert (after[(shells == 1) & (radius > 3.5) & (radius < 5.5)] == 3).mean() > 0.9
    assert (after[shells >= 4] == 0).all()


def test_prepared_volumes_say_how_they_were_labelled(tmp_path):
    """`prepare` redoes volumes labelled otherwise than asked; older files count as 'maps'."""
    image, probs, affine = np.zeros((2, 2, 2)), np.ones((7, 2, 2, 2)) / 7, np.eye(4)
    save(tmp_path / "em.npz", "spm", image, probs, affine, "em")
    save(tmp_path / "maps.npz", "spm", image, probs, affine, "maps")
    np.savez_compressed(tmp_path / "old.npz", image=image, probs=probs, family="spm")
    assert labelled_with(tmp_path / "em.npz") == "em"
    assert labelled_with(tmp_path / "maps.npz") == "maps"
    assert labelled_with(tmp_path / "old.npz") == "maps"
    assert labelled_with(tmp_path / "absent.npz") is None


def ar_member(name, body):
    """One member of an ar archive (what a .deb is): a 60-byte header, the body, padding."""
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
    return header + body + b"\n" * (len(body) % 2)


def test_a_file_comes_out_of_a_debian_package(tmp_path):
    """`debian_file` reads one file from a .deb already fetched (ar, then xz tar), and says
    so clearly when the package has no data archive."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        payload = b"a NIfTI stand-in"
        info = tarfile.TarInfo("./usr/share/pkg/ch2.nii.gz")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    deb = b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
    deb += ar_member("control.tar.xz", b"odd") + ar_member("data.tar.xz", data.getvalue())
    (tmp_path / "pkg_1.0_all.deb").write_bytes(deb)
    assert debian_file("pkg", "./usr/share/pkg/ch2.nii.gz", tmp_path) == payload
    (tmp_path / "empty_1.0_all.deb").write_bytes(
        b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
    )
    with pytest.raises(FileNotFoundError, match="no data archive"):
        debian_file("empty", "./anything", tmp_path)


def phantom_head(size=40, centre=18):
    """(image, classes) of a spherical T1 head: WM core, GM, CSF, bone, scalp, air."""
    radius = np.sqrt(((np.indices((size,) * 3).astype(np.float32) - centre) ** 2).sum(0))
    classes = np.digitize(radius, [6, 10, 12, 14, 16])
    image = np.array([0.9, 0.55, 0.1, 0.25, 0.7, 0.0], np.float32)[classes]
    return image, classes


def test_a_smooth_bias_is_taken_out_of_the_brain():
    """A coil's bias (4x brighter from one side of the head to the other) is removed: grey
    and white matter come back within a few per cent of one level each."""
    image, classes = phantom_head()
    biased = image * 4.0 ** ((np.indices(image.shape)[2] - 18) / 32)  # 4x across the head
    truth = np.array([1, 0, 2, 3, 4, 5])[classes]
    head = 0.05 + 0.7 * (np.arange(6)[:, None, None, None] == truth)
    corrected = bias_corrected(biased, head, sigma=4.0)
    for tissue in (0, 1):
        inner = classes == tissue
        spread = lambda values: values.std() / values.mean()  # noqa: E731
        assert spread(biased[inner]) > 0.1
        assert spread(corrected[inner]) < 0.4 * spread(biased[inner])


def test_registration_finds_how_a_head_was_moved():
    """A head turned by 0.15 rad, shrunk by 8 % and moved by 7 mm: the registered template
    lands within 1.5 mm of where the true affine puts it, over the whole head."""
    size = 48
    grid = np.indices((size,) * 3).astype(np.float32)
    template = np.zeros((size,) * 3, np.float32)
    # an egg-shaped head with a skull, a ventricle off centre and a nose: no symmetry to hide in
    outer = (
        ((grid - np.reshape([24, 24, 22], (3, 1, 1, 1))) / np.reshape([17, 20, 16], (3, 1, 1, 1)))
        ** 2
    ).sum(0)
    template[outer < 1] = 0.7
    template[outer < 0.8] = 0.25
    template[outer < 0.65] = 0.55
    template[(((grid - np.reshape([20, 27, 24], (3, 1, 1, 1))) / 4) ** 2).sum(0) < 1] = 0.1
    template[(((grid - np.reshape([24, 44, 14], (3, 1, 1, 1))) / 3) ** 2).sum(0) < 1] = 0.7
    template_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    template_affine[:3, 3] = -48
    true = register.matrix(np.array([7, -4, 3, 0.15, -0.05, 0.1, -0.08, -0.08, -0.08, 0, 0, 0]))
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = -60
    image = resample(template, template_affine, (80, 80, 80), np.linalg.inv(true) @ affine)[0]
    found = register.register(image, affine, template, template_affine)
    points = np.argwhere(template > 0)[::7] @ template_affine[:3, :3].T + template_affine[:3, 3]
    points = np.c_[points, np.ones(len(points))].T
    error = np.linalg.norm((found @ points - true @ points)[:3], axis=0)
    assert error.mean() < 1.5, error.mean()
