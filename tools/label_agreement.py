"""How far two reference segmentations of the same MNI space agree: a ceiling for held-out Dice.

    python tools/label_agreement.py [CACHE]   # after python -m training.sources [--cache CACHE]

Resamples the ICBM 2009a tissue labels onto the grid of SPM's avg152 labels and prints Dice
per class between the two, then, per plane, the brain-outline shares that `training.evaluate`
reports (`outside`, `inside`) with each label set standing in for a model scored against the
other: how well one careful label set can score on the other's brain outline.

Both label sets come from the prepared cache. With the templates' maps (`training.sources
--labels maps`) grey and white matter agree at 0.805 and 0.775, the floor `lobo_report.py`
uses; labelled by EM from their own images (the default) at 0.697 and 0.780: avg152's image
is a blurred average, which its EM labels follow.
"""

import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from processing import CLASS_NAMES  # noqa: E402
from training.data import brain_slices, load_templates, planes  # noqa: E402
from training.evaluate import PLANES, brain_outline  # noqa: E402
from training.sources import NILEARN_T1, TARGET_OF, read_nifti, resample  # noqa: E402

# avg152T1.nii's voxel-to-MNI affine (2 mm, x flipped), as stored in the SPM file
SPM_AFFINE = np.array([[-2, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1.0]])


def main(cache=ROOT / ".cache"):
    """Print Dice per class between the two label sets."""
    volumes = {v.name: v for v in load_templates(cache / "volumes")}
    icbm, spm = volumes["icbm2009a"], volumes["avg152"]
    wheel = sorted((cache / "wheels").glob("nilearn-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        _, icbm_affine = read_nifti(archive.read(NILEARN_T1.format("t1")))
    probs = np.moveaxis(icbm.probs.astype(np.float32), 0, -1)
    icbm_on_spm = TARGET_OF[np.argmax(resample(probs, icbm_affine, spm.image.shape, SPM_AFFINE), 0)]
    spm_labels = spm.labels()
    for c, name in enumerate(CLASS_NAMES):
        a, b = icbm_on_spm == c, spm_labels == c
        print(f"{name:13} Dice {2 * (a & b).sum() / (a.sum() + b.sum()):.3f}")
    for reference, other, title in (
        (spm_labels, icbm_on_spm, "ICBM labels on SPM's outline"),
        (icbm_on_spm, spm_labels, "SPM labels on ICBM's outline"),
    ):
        print(title)
        for plane, plane_name in enumerate(PLANES):
            indices = brain_slices(reference, plane, 0.05)
            slices = [{"target": planes(reference, plane)[i], "spacing": 2.0} for i in indices]
            outside, inside = brain_outline(slices, [planes(other, plane)[i] for i in indices])
            print(f"  {plane_name:11} outside {100 * outside:.1f} %  inside {100 * inside:.1f} %")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".cache")
