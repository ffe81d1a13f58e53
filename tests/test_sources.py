"""Labelling heads by EM with template priors (how every training brain gets its labels)."""

import io
import tarfile

import numpy as np
import pytest

from training.sources import TARGET_OF, classify, debian_file, labelled_with, relabel, save


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
