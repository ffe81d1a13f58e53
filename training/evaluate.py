"""Dice of the served model against held-out labels, beside a multi-Otsu baseline.

    python -m training.evaluate --model-dir model/segmentation-net --volumes .cache/volumes \
        --family spm --overview docs/overview.png
    python -m training.evaluate --model-dir model/segmentation-net --pairs my_slices/

--pairs reads `<name>.png` slices with `<name>_label.png` masks (values 0..3).
The model is loaded through `load_model.py`, exactly as the server loads it.
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from processing import CLASS_NAMES as CLASSES
from processing import FRAME_SIDE, frame_slice, mask_from_scores
from training.data import brain_slices, load_templates, planes


def main(argv=None):
    """Print Dice per class for the model and multi-Otsu, per plane and skull variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="model/segmentation-net")
    parser.add_argument("--volumes", default=".cache/volumes", help="prepared template volumes")
    parser.add_argument("--family", default="spm", help="which template family to evaluate on")
    parser.add_argument("--pairs", help="folder of <name>.png / <name>_label.png pairs instead")
    parser.add_argument("--every", type=int, default=1, help="use every n-th brain slice")
    parser.add_argument("--overview", help="write an image / truth / prediction PNG here")
    args = parser.parse_args(argv)

    if args.pairs:
        slices = pair_slices(Path(args.pairs))
    else:
        volumes = [v for v in load_templates(args.volumes) if v.family == args.family]
        if not volumes:
            sys.exit(f"error: no prepared volumes of family '{args.family}' in {args.volumes}")
        slices = validation_slices(volumes, args.every)
    import load_model

    try:
        model = load_model.load(args.model_dir)
    except load_model.ModelError as error:
        sys.exit(f"error: {error}")
    predictions = [model.segment(s["raw"]) for s in slices]
    baseline = [multi_otsu(s["raw"]) for s in slices]
    print_table(slices, predictions, baseline)
    if args.overview:
        write_overview(args.overview, slices, predictions)


def validation_slices(volumes, every=3):
    """Held-out slices of every plane, skull on (when the image has one) and stripped.

    Each is a dict: raw (H, W) uint8 as a user would upload it, target (H, W) uint8, and
    plane / variant / volume names for grouping.
    """
    slices = []
    for volume in volumes:
        labels = volume.labels()
        brain = labels > 0
        has_skull = (volume.image[~brain] > 0.05 * volume.image.max()).mean() > 0.02
        variants = {"stripped": volume.image * brain}
        if has_skull:
            variants["skull"] = volume.image
        for variant, image in variants.items():
            for plane, plane_name in enumerate(("sagittal", "coronal", "axial")):
                for index in brain_slices(labels, plane, 0.05)[::every]:
                    raw = planes(image, plane)[index]
                    raw = np.round(255 * raw / max(float(image.max()), 1e-6)).astype(np.uint8)
                    slices.append(
                        {
                            "raw": raw,
                            "target": planes(labels, plane)[index],
                            "plane": plane_name,
                            "variant": variant,
                            "volume": volume.name,
                        }
                    )
    return slices


def predict_slices(net, slices, side=FRAME_SIDE):
    """Masks from a Gluon network for each slice dict (training-time validation)."""
    import mxnet as mx

    masks = []
    for s in slices:
        frame, geometry = frame_slice(s["raw"], side)
        scores = net(mx.nd.array(frame[None, None])).asnumpy()[0]
        masks.append(mask_from_scores(scores, geometry))
    return masks


def dice_scores(slices, predictions, where=lambda s: True):
    """Dice per class over all pixels of the selected slices, pooled."""
    overlap, sizes = np.zeros(len(CLASSES)), np.zeros(len(CLASSES))
    for s, predicted in zip(slices, predictions):
        if not where(s):
            continue
        for c in range(len(CLASSES)):
            truth, guess = s["target"] == c, predicted == c
            overlap[c] += np.logical_and(truth, guess).sum()
            sizes[c] += truth.sum() + guess.sum()
    return {name: 2 * overlap[c] / max(sizes[c], 1) for c, name in enumerate(CLASSES)}


def pixel_accuracy(slices, predictions, where=lambda s: True):
    """Share of pixels whose class is right, over the selected slices."""
    right = sum(int((p == s["target"]).sum()) for s, p in zip(slices, predictions) if where(s))
    total = sum(s["target"].size for s in slices if where(s))
    return right / max(total, 1)


def multi_otsu(raw):
    """Classical baseline: 4-class multi-Otsu thresholds, darkest to brightest = bg, CSF, GM, WM."""
    from skimage.filters import threshold_multiotsu

    try:
        thresholds = threshold_multiotsu(raw, classes=4)
    except ValueError:  # fewer than four grey levels
        return np.zeros(raw.shape, np.uint8)
    return np.digitize(raw, thresholds, right=True).astype(np.uint8)  # t is the last of its class


def print_table(slices, predictions, baseline):
    """Dice per class and pixel accuracy, ENet beside multi-Otsu, per variant and plane."""
    groups = defaultdict(int)
    for s in slices:
        groups[(s["variant"], s["plane"])] += 1
    header = (
        f"{'variant':9} {'plane':9} {'n':>4} {'method':10} "
        + " ".join(f"{c[:12]:>12}" for c in CLASSES)
        + f" {'pixel_acc':>9}"
    )
    print(header)
    for (variant, plane), count in sorted(groups.items()) + [(("all", "all"), len(slices))]:

        def where(s, variant=variant, plane=plane):
            return variant == "all" or (s["variant"] == variant and s["plane"] == plane)

        for method, masks in (("enet", predictions), ("multi-otsu", baseline)):
            scores = dice_scores(slices, masks, where)
            print(
                f"{variant:9} {plane:9} {count:4d} {method:10} "
                + " ".join(f"{scores[c]:12.3f}" for c in CLASSES)
                + f" {pixel_accuracy(slices, masks, where):9.3f}"
            )


def pair_slices(folder):
    """Slice dicts from a folder of <name>.png and <name>_label.png files."""
    from processing import decode_png

    slices = []
    for label_path in sorted(folder.glob("*_label.png")):
        image_path = label_path.with_name(label_path.name.replace("_label.png", ".png"))
        raw = decode_png(image_path.read_bytes())
        target = decode_png(label_path.read_bytes()).astype(np.uint8)
        slices.append(
            {
                "raw": raw,
                "target": target,
                "plane": "-",
                "variant": "pairs",
                "volume": image_path.stem,
            }
        )
    if not slices:
        sys.exit(f"error: no <name>_label.png files in {folder}")
    return slices


def write_overview(path, slices, predictions, per_group=2):
    """A PNG grid: for a few slices per plane and variant, image | truth | prediction."""
    import png

    from processing import PALETTE

    groups = defaultdict(list)
    for s, p in zip(slices, predictions):
        groups[(s["variant"], s["plane"])].append((s, p))
    picked = []
    for members in groups.values():  # evenly spaced slices, away from the ends
        step = len(members) / (per_group + 1)
        picked += [members[int(step * (k + 1))] for k in range(per_group)]
    side = max(max(s["raw"].shape) for s, _ in picked)
    palette = np.array(PALETTE, dtype=np.uint8)
    rows = []
    for s, p in picked:
        tiles = [np.repeat(s["raw"][..., None], 3, axis=2), palette[s["target"]], palette[p]]
        tiles = [np.pad(t, ((0, side - t.shape[0]), (0, side - t.shape[1]), (0, 0))) for t in tiles]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    png.from_array(grid.reshape(grid.shape[0], -1), "RGB").save(path)
    print(f"overview: {path}")


if __name__ == "__main__":
    main()
