"""Whole-volume masks scored against a prepared head's labels, as POST /volume makes them.

    python tools/volume_quality.py [--volumes .cache/heads] [--family colin] [--planes axial ...]
                                   [--stripped] [--thick 5]

Each prepared volume goes through volumes.segment in each plane, with and without the 3-D
clean-up (volumes.keep_brain), and along all three (`all`, as served for a whole brain in
near-cubic voxels), and is scored in 3-D: Dice per class, `outside` (tissue
beyond the reference brain dilated by 2 mm) and `inside` (tissue within it), and brain mL.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import load_model  # noqa: E402
import processing  # noqa: E402
import volumes  # noqa: E402
from training.data import load_templates  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(load_model.BUNDLED_PATH))
    parser.add_argument("--volumes", default=".cache/heads", help="prepared volumes (*.npz)")
    parser.add_argument("--family", action="append", help="only these families")
    parser.add_argument("--planes", nargs="+", default=[*volumes.PLANES, volumes.ALL])
    parser.add_argument("--stripped", action="store_true", help="the heads skull-stripped")
    parser.add_argument(
        "--thick", type=int, default=1, help="average every N axial slices into one (thick slices)"
    )
    args = parser.parse_args(argv)
    model = load_model.load(args.model_dir)
    print(f"model {model.model_id}, {model.runtime.name}, {model.passes} passes")
    print("| volume | plane | clean-up | CSF | GM | WM | outside | inside | brain mL |")
    print("| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |")
    for head in load_templates(args.volumes):
        if args.family and head.family not in args.family:
            continue
        reference, image, spacing = head.labels(), head.image, head.spacing
        if args.thick > 1:
            reference, image, spacing = thick_slices(reference, image, spacing, args.thick)
        if args.stripped:
            image = image * (reference > 0)
        scan = volumes.Volume(image, np.diag([*spacing, 1.0]), "prepared", image.shape)
        margin = [round(2 / float(size)) for size in spacing]  # 2 mm, in voxels per axis
        outside = ~processing.by_cross(reference > 0, margin, np.logical_or)
        for plane in args.planes:
            if plane == volumes.ALL:  # as served: the three planes' majority, each cleaned
                labels, _, _ = volumes.segment(model, scan, plane)
                scores = score(reference, labels, outside, spacing)
                print(f"| {head.name} | {plane} | yes | {scores} |")
                continue
            raw, _, _ = volumes.segment(model, scan, plane, clean=False)
            cleaned = volumes.clean_up(image, raw.copy(), spacing)  # an RAS volume: any order
            for name, labels in (("no", raw), ("yes", cleaned)):
                scores = score(reference, labels, outside, spacing)
                print(f"| {head.name} | {plane} | {name} | {scores} |")


def thick_slices(reference, image, spacing, count):
    """(reference, image, spacing) with every `count` axial slices averaged into one, as a
    scanner's thick slices; the reference keeps each block's middle slice."""
    kept = image.shape[2] // count
    blocks = image[:, :, : kept * count].reshape(*image.shape[:2], kept, count)
    middle = reference[:, :, count // 2 :: count][:, :, :kept]
    return middle, blocks.mean(3), np.asarray(spacing, float) * [1, 1, count]


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
