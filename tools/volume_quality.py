"""Whole-volume masks scored against a prepared head's labels, as POST /volume makes them.

    python tools/volume_quality.py [--volumes .cache/heads] [--family colin] [--planes axial ...]
                                   [--stripped]

Each prepared volume goes through volumes.segment in each plane, with and without the 3-D
clean-up (volumes.keep_brain), and along all three (`all`, as served for a whole brain in
near-cubic voxels), and is scored in 3-D: Dice per class, `outside` (tissue
beyond the reference brain dilated by 2 mm) and `inside` (tissue within it), and brain mL.
"""

import argparse
import sys
from pathlib import Path
from unittest import mock

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import load_model  # noqa: E402
import volumes  # noqa: E402
from training.data import load_templates  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(load_model.BUNDLED_PATH))
    parser.add_argument("--volumes", default=".cache/heads", help="prepared volumes (*.npz)")
    parser.add_argument("--family", action="append", help="only these families")
    parser.add_argument("--planes", nargs="+", default=[*volumes.PLANES, volumes.ALL])
    parser.add_argument("--stripped", action="store_true", help="the heads skull-stripped")
    args = parser.parse_args(argv)
    model = load_model.load(args.model_dir)
    print(f"model {model.model_id}, {model.runtime.name}, {model.passes} passes")
    print("| volume | plane | clean-up | CSF | GM | WM | outside | inside | brain mL |")
    print("| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |")
    for head in load_templates(args.volumes):
        if args.family and head.family not in args.family:
            continue
        reference = head.labels()
        affine = np.diag([*head.spacing, 1.0])
        image = head.image * (reference > 0) if args.stripped else head.image
        scan = volumes.Volume(image, affine, "prepared", image.shape)
        margin = max(1, round(2 / float(np.mean(head.spacing))))
        outside = ~ndimage.binary_dilation(reference > 0, iterations=margin)
        for plane in args.planes:
            if plane == volumes.ALL:  # as served: the three planes' majority, each cleaned
                labels, _, _ = volumes.segment(model, scan, plane)
                scores = score(reference, labels, outside, head.spacing)
                print(f"| {head.name} | {plane} | yes | {scores} |")
                continue
            raw, _, _ = segment_without_cleanup(model, scan, plane)
            radius = 0.0 if volumes.looks_stripped(image, raw) else volumes.CORE_RADIUS_MM
            cleaned = volumes.keep_brain(raw.copy(), head.spacing, radius)  # RAS: any order
            for name, labels in (("no", raw), ("yes", cleaned)):
                scores = score(reference, labels, outside, head.spacing)
                print(f"| {head.name} | {plane} | {name} | {scores} |")


def segment_without_cleanup(model, scan, plane):
    """volumes.segment with keep_brain switched off (it is applied here afterwards)."""
    with mock.patch.object(volumes, "keep_brain", lambda labels, spacing, radius: labels):
        return volumes.segment(model, scan, plane)


def score(reference, labels, outside, spacing):
    """The table's figures for one mask, as a Markdown row's cells."""
    dice = []
    for k in (1, 2, 3):
        truth, guess = reference == k, labels == k
        dice.append(2 * np.count_nonzero(truth & guess) / max(truth.sum() + guess.sum(), 1))
    tissue, brain = labels > 0, reference > 0
    beyond = np.count_nonzero(tissue & outside) / outside.sum()
    within = np.count_nonzero(tissue & brain) / brain.sum()
    millilitres = np.count_nonzero(tissue) * float(np.prod(spacing)) / 1000
    cells = [f"{d:.3f}" for d in dice] + [f"{beyond:.2%}", f"{within:.2%}", f"{millilitres:.0f}"]
    return " | ".join(cells)


if __name__ == "__main__":
    main()
