"""Real heads from the package registries: fetching, reading their formats, FreeSurfer's labels."""

import gzip
import hashlib
import io
import json
import tarfile
import zipfile

import nibabel as nib
import numpy as np
import pytest

from training import real
from training.sources import TARGET_OF


def test_a_brainbrowser_export_reads_in_world_order():
    """MINC axes stored (x, z, y) with x decreasing come back as (x, y, z), each increasing,
    and the affine puts every voxel where MINC's starts, steps and cosines do."""
    rng = np.random.default_rng(0)
    shape = {"xspace": 4, "yspace": 6, "zspace": 5}
    steps = {"xspace": -1.0, "yspace": 2.0, "zspace": -1.5}
    starts = {"xspace": 10.0, "yspace": -20.0, "zspace": 30.0}
    order = ["xspace", "zspace", "yspace"]
    header = {"order": order}
    for axis in shape:
        cosines = np.eye(3)[["xspace", "yspace", "zspace"].index(axis)]
        header[axis] = {
            "start": starts[axis], "space_length": shape[axis], "step": steps[axis],
            "direction_cosines": list(cosines),
        }  # fmt: skip
    stored = rng.integers(0, 255, [shape[a] for a in order], dtype=np.uint8)
    volume, affine = real.read_minc_export(json.dumps(header).encode(), stored.tobytes())
    assert volume.shape == (4, 6, 5)
    assert (np.diag(affine)[:3] > 0).all()
    for i, k, j in np.ndindex(*stored.shape):  # stored index (x, z, y)
        world = [
            starts[a] + index * steps[a]
            for a, index in zip(("xspace", "yspace", "zspace"), (i, j, k))
        ]
        voxel = np.linalg.solve(affine, [*world, 1])[:3].round().astype(int)
        assert volume[tuple(voxel)] == stored[i, k, j]


def test_an_archive_is_fetched_once_and_checked(tmp_path):
    """The archive comes from its registry (here a folder behind a file:// URL), is kept, and a
    wrong checksum or a missing file is a one-line error, not a traceback."""
    registry = tmp_path / "registry"
    registry.mkdir()
    body = b"a tarball's bytes"
    (registry / "pkg-1.0.0.tgz").write_bytes(body)
    url = (registry / "pkg-1.0.0.tgz").as_uri()
    sha256 = hashlib.sha256(body).hexdigest()
    path = real.fetched(url, sha256, tmp_path / "cache")
    assert path.read_bytes() == body
    (registry / "pkg-1.0.0.tgz").unlink()
    assert real.fetched(url, sha256, tmp_path / "cache") == path  # kept
    with pytest.raises(SystemExit, match=r"^error: could not fetch .*pkg-1\.0\.0\.tgz"):
        real.fetched(url, sha256, tmp_path / "other")
    (registry / "pkg-1.0.0.tgz").write_bytes(b"something else")
    with pytest.raises(SystemExit, match=f"^error: .* has sha256 [0-9a-f]{{64}}, not {sha256}$"):
        real.fetched(url, sha256, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_volume_reads_the_same_from_a_wheel_or_a_tarball(tmp_path):
    """NIfTI (4-D with one volume too), FreeSurfer's MGZ and a MINC export, each from a zip
    (a wheel) and from a gzipped tarball (an npm package or an sdist): same voxels, same affine."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, (5, 6, 7)).astype(np.float32)
    affine = np.diag([0.9, 1.0, 1.2, 1.0])
    affine[:3, 3] = [-10, 20, -30]
    members = {
        "pkg/a.nii.gz": gzip.compress(nib.Nifti1Image(volume[..., None], affine).to_bytes()),
        "pkg/b.mgz": gzip.compress(nib.MGHImage(volume.astype(np.uint8), affine).to_bytes()),
        "pkg/c.mnc.header.gz": gzip.compress(json.dumps(minc_header(volume.shape)).encode()),
        "pkg/c.mnc.raw.gz": gzip.compress(volume.astype(np.uint8).tobytes()),
    }
    wheel, tarball = tmp_path / "pkg.whl", tmp_path / "pkg.tgz"
    with zipfile.ZipFile(wheel, "w") as zipped, tarfile.open(tarball, "w:gz") as tar:
        for name, data in members.items():
            zipped.writestr(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for archive in (wheel, tarball):
        for member in ("pkg/a.nii.gz", "pkg/b.mgz"):
            image, found = real.read_volume(archive, member)
            assert image.shape == volume.shape and np.array_equal(image, volume), member
            assert np.allclose(found, affine), member
        image, found = real.read_volume(archive, "pkg/c.mnc")
        assert np.array_equal(image, volume) and np.allclose(np.diag(found), [1, 1, 1, 1])


def minc_header(shape):
    """A BrainBrowser MINC export's header for 1 mm voxels stored in (x, y, z) order."""
    header = {"order": ["xspace", "yspace", "zspace"]}
    for k, axis in enumerate(header["order"]):
        cosines = list(np.eye(3)[k])
        header[axis] = {"start": 0.0, "space_length": shape[k], "step": 1.0,
                        "direction_cosines": cosines}  # fmt: skip
    return header


def test_freesurfer_labels_become_our_four_classes():
    """Cortical parcels and deep grey structures are grey matter, cerebral and cerebellar white
    matter white, ventricles CSF, and so is unlabelled fluid inside FreeSurfer's brain mask;
    beyond the mask is background."""
    aseg = np.array([[1021, 2035, 10, 8, 2, 46, 251, 4, 24, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]], bool)
    labels = TARGET_OF[np.argmax(real.freesurfer_classes(aseg, mask), axis=0)]
    assert labels.tolist() == [[2, 2, 2, 2, 3, 3, 3, 1, 1, 1, 0]]


def test_a_volume_stored_left_inferior_anterior_comes_back_towards_r_a_s(tmp_path):
    """FreeSurfer's conformed L, I, A voxel order: the axes are reordered and flipped to run
    towards R, A, S, and every voxel keeps its place in the world."""
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 255, (4, 5, 6)).astype(np.float32)
    lia = np.array([[-1.0, 0, 0, 10], [0, 0, 1, -20], [0, -1, 0, 30], [0, 0, 0, 1]])
    tarball = tmp_path / "pkg.tgz"
    data = nib.Nifti1Image(stored, lia).to_bytes()
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("pkg/orig.nii")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    volume, affine = real.read_volume(tarball, "pkg/orig.nii")
    assert nib.aff2axcodes(affine) == ("R", "A", "S") and volume.shape == (4, 6, 5)
    for index in np.ndindex(*stored.shape):
        world = lia @ [*index, 1]
        found = np.linalg.solve(affine, world)[:3].round().astype(int)
        assert volume[tuple(found)] == stored[index]
