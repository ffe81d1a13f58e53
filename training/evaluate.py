"""Dice of the served model against held-out labels, beside a multi-Otsu baseline, and a QC sheet.

    python -m training.evaluate --model-dir model/segmentation-net --family spm \
        --degradations --qc qc.png
    python -m training.evaluate --model-dir model/segmentation-net --pairs my_slices/

--family picks held-out volumes from the prepared ones (repeat it for several brains);
--pairs reads `<name>.png` slices with `<name>_label.png` masks (values 0..3).
The model is loaded through `load_model.py`, exactly as the server loads it. Besides Dice per
class, the table gives `outside`: the share of pixels beyond the reference brain dilated by
2 mm that the model calls tissue, and `inside`: the share of reference brain it calls tissue.
--worst draws the skull-on slices that score worst on those two: where to look first.
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from processing import CLASS_NAMES as CLASSES
from processing import FRAME_SIDE, PALETTE, PASSES, segment_with
from training.data import brain_slices, load_templates, planes

PLANES = ("sagittal", "coronal", "axial")
# Each degradation of a skull-on slice: what a real acquisition or export does to it.
DEGRADATIONS = ("5 mm slices", "2x pixels", "noise", "bias", "8-bit")


def main(argv=None):
    """Print Dice per class for the model and multi-Otsu, per brain, variant and plane."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="model/segmentation-net")
    parser.add_argument("--volumes", default=".cache/volumes", help="prepared template volumes")
    parser.add_argument(
        "--family", action="append",
        help="held-out volume family to evaluate on (repeatable; default spm)",
    )  # fmt: skip
    parser.add_argument("--pairs", help="folder of <name>.png / <name>_label.png pairs instead")
    parser.add_argument("--every", type=int, default=1, help="use every n-th brain slice")
    parser.add_argument(
        "--degradations", action="store_true",
        help="also score skull-on slices under " + ", ".join(DEGRADATIONS),
    )  # fmt: skip
    parser.add_argument("--qc", help="write a QC sheet PNG: input | mask | reference")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--worst", metavar="PNG",
        help="write a sheet (and print a list) of the skull-on slices with the most tissue "
        "called outside the brain and the least of the brain called tissue",
    )  # fmt: skip
    parser.add_argument("--worst-count", type=int, default=6, help="slices of each kind")
    parser.add_argument(
        "--passes", type=int, choices=PASSES, default=2,
        help="2 (as served): each frame also upside down, scores averaged; 1: one pass",
    )  # fmt: skip
    parser.add_argument(
        "--keep-stray", action="store_true",
        help="keep the tissue apart from a skull-on slice's brain (served without "
        "processing.stray_tissue, as before stop 30)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    if args.pairs:
        slices = pair_slices(Path(args.pairs))
    else:
        families = args.family or ["spm"]
        volumes = [v for v in load_templates(args.volumes) if v.family in families]
        if not volumes:
            sys.exit(f"error: no prepared volumes of family {families} in {args.volumes}")
        slices = validation_slices(volumes, args.every, args.degradations)
    import load_model

    try:
        model = load_model.load(args.model_dir, passes=args.passes)
    except load_model.ModelError as error:
        sys.exit(f"error: {error}")
    predictions = [model.segment(s["raw"], drop_stray=not args.keep_stray) for s in slices]
    baseline = [multi_otsu(s["raw"]) for s in slices]
    print_table(slices, predictions, baseline, args.markdown)
    if args.qc:
        write_qc(args.qc, slices, predictions)
    if args.worst:
        write_worst(args.worst, slices, predictions, args.worst_count)


def validation_slices(volumes, every=3, degradations=False):
    """Held-out slices of every plane, skull on (when the image has one) and stripped.

    Each is a dict: raw (H, W) uint16 as a scanner exports it (12-bit range), target (H, W)
    uint8, spacing (mm), and brain / plane / variant names for grouping. With `degradations`,
    skull-on slices also come in each of DEGRADATIONS.
    """
    slices = []
    for volume in volumes:
        labels = volume.labels()
        brain = labels > 0
        scale = 4095 / max(float(volume.image.max()), 1e-6)
        has_skull = (volume.image[~brain] > 0.05 * volume.image.max()).mean() > 0.02
        variants = {"stripped": volume.image * brain}
        if has_skull:
            variants["skull"] = volume.image
        rng = np.random.default_rng(0)
        for variant, image in variants.items():
            for plane, plane_name in enumerate(PLANES):
                spacing = float(np.delete(volume.spacing, plane).mean())
                for index in brain_slices(labels, plane, 0.05)[::every]:
                    base = {
                        "target": planes(labels, plane)[index],
                        "plane": plane_name,
                        "volume": volume.name,
                        "brain": volume.family,
                        "spacing": spacing,
                        "index": int(index),
                    }
                    raw = planes(image, plane)[index] * scale
                    slices.append({**base, "raw": to_uint16(raw), "variant": variant})
                    if degradations and variant == "skull":
                        for name in DEGRADATIONS:
                            degraded = degrade(name, image, plane, index, volume.spacing, rng)
                            slices.append({**base, "raw": degraded(scale), "variant": name})
    return slices


def degrade(name, image, plane, index, spacing, rng):
    """A function of the export scale giving slice `index` of `image` under one degradation."""
    slice_ = planes(image, plane)[index].astype(np.float32)
    if name == "5 mm slices":
        half = max(1, round(5 / spacing[plane])) // 2
        stack = planes(image, plane)[max(0, index - half) : index + half + 1]
        return lambda scale: to_uint16(stack.mean(0) * scale)
    if name == "2x pixels":
        height, width = (np.array(slice_.shape) // 2) * 2
        coarse = slice_[:height, :width].reshape(height // 2, 2, width // 2, 2).mean((1, 3))
        upscaled = np.zeros_like(slice_)
        upscaled[:height, :width] = np.repeat(np.repeat(coarse, 2, 0), 2, 1)
        return lambda scale: to_uint16(upscaled * scale)
    if name == "noise":
        sigma = 0.05 * np.percentile(slice_, 99)
        noisy = np.hypot(
            slice_ + rng.normal(0, sigma, slice_.shape), rng.normal(0, sigma, slice_.shape)
        )
        return lambda scale: to_uint16(noisy * scale)
    if name == "bias":
        y, x = np.indices(slice_.shape) / max(slice_.shape)
        field = np.exp(0.3 * np.sin(2 * y + 1) * np.cos(3 * x))  # about +-30 %
        return lambda scale: to_uint16(slice_ * field * scale)
    if name == "8-bit":
        top = np.percentile(slice_, 99.5)  # a display window: the brightest pixels saturate
        return lambda scale: np.round(np.clip(slice_ / max(top, 1e-6), 0, 1) * 255).astype(np.uint8)
    raise ValueError(name)


def to_uint16(values):
    """Round and clip to a 16-bit export."""
    return np.round(np.clip(values, 0, 65535)).astype(np.uint16)


def predict_slices(net, slices, side=FRAME_SIDE):
    """Masks from a Gluon network for each slice dict (training-time validation: one pass
    and no stray tissue dropped, so every epoch's figures compare with earlier runs')."""
    import mxnet as mx

    def predict(batch):
        return net(mx.nd.array(batch)).asnumpy()

    return [
        segment_with(predict, s["raw"], side, net.in_channels, passes=1, drop_stray=False)
        for s in slices
    ]


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


def brain_outline(slices, predictions, where=lambda s: True):
    """(outside, inside): tissue share beyond the brain dilated by 2 mm, and within the brain."""
    counts = np.zeros(4)
    for s, predicted in zip(slices, predictions):
        if not where(s):
            continue
        brain = s["target"] > 0
        margin = max(1, round(2 / s.get("spacing", 1.0)))
        outside = ~ndimage.binary_dilation(brain, iterations=margin)
        tissue = predicted > 0
        counts += [(tissue & outside).sum(), outside.sum(), (tissue & brain).sum(), brain.sum()]
    return counts[0] / max(counts[1], 1), counts[2] / max(counts[3], 1)


def multi_otsu(raw):
    """Classical baseline: 4-class multi-Otsu thresholds, darkest to brightest = bg, CSF, GM, WM."""
    from skimage.filters import threshold_multiotsu

    try:
        # 16-bit slices as float, so the histogram has 256 bins: on integers it has one per
        # grey level, and the threshold search grows with the cube of that
        wide = int(raw.max()) - int(raw.min()) > 255
        thresholds = threshold_multiotsu(raw.astype(np.float32) if wide else raw, classes=4)
    except ValueError:  # fewer than four grey levels
        return np.zeros(raw.shape, np.uint8)
    return np.digitize(raw, thresholds, right=True).astype(np.uint8)  # t is the last of its class


def print_table(slices, predictions, baseline, markdown=False):
    """Dice per class, pixel accuracy and the brain outline shares, ENet beside multi-Otsu."""
    groups = defaultdict(int)
    for s in slices:
        groups[(s.get("brain", "-"), s["variant"], s["plane"])] += 1
    header = [
        "brain",
        "variant",
        "plane",
        "n",
        "method",
        *CLASSES,
        "pixel_acc",
        "outside",
        "inside",
    ]
    widths = [10, 12, 9, 4, 10] + [12] * len(CLASSES) + [9, 8, 8]
    rows = []
    for (brain, variant, plane), count in sorted(groups.items()):

        def where(s, key=(brain, variant, plane)):
            return (s.get("brain", "-"), s["variant"], s["plane"]) == key

        for method, masks in (("enet", predictions), ("multi-otsu", baseline)):
            scores = dice_scores(slices, masks, where)
            outside, inside = brain_outline(slices, masks, where)
            accuracy = pixel_accuracy(slices, masks, where)
            numbers = [scores[c] for c in CLASSES] + [accuracy, outside, inside]
            rows.append([brain, variant, plane, str(count), method] + [f"{v:.3f}" for v in numbers])
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * 5 + "---:|" * (len(header) - 5))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    for row in [header] + rows:
        print(" ".join(f"{v:<{w}}" if k < 3 or k == 4 else f"{v:>{w}}" for k, (v, w) in
                       enumerate(zip(row, widths))))  # fmt: skip


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


def write_qc(path, slices, predictions):
    """A QC sheet: for the middle slice of each brain, plane and variant, input | mask | reference.

    One row per brain and plane, one column group per variant (skull on, stripped, each
    degradation), titled, with a colour legend: a person sees at a glance where it goes wrong.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = defaultdict(list)
    for s, p in zip(slices, predictions):
        groups[(s["variant"], s["volume"], s["plane"])].append((s, p))
    variants = list(dict.fromkeys(s["variant"] for s in slices))
    rows = list(dict.fromkeys((s["volume"], s["plane"]) for s in slices))
    palette = np.array(PALETTE, np.float32) / 255
    size = (3.6 * len(variants), 1.3 * len(rows) + 0.7)
    figure, axes = plt.subplots(len(rows), 3 * len(variants), figsize=size, squeeze=False)
    for row, (volume, plane) in enumerate(rows):
        for col, variant in enumerate(variants):
            members = groups.get((variant, volume, plane))
            cells = axes[row, 3 * col : 3 * col + 3]
            for ax in cells:
                ax.axis("off")
            if not members:
                continue
            s, predicted = members[len(members) // 2]
            draw_row(cells, s, predicted)
            if row == 0:
                for ax, title in zip(cells, (variant, "mask", "reference")):
                    ax.set_title(title, fontsize=8)
            if col == 0:
                cells[0].text(
                    -0.08, 0.5, f"{volume}\n{plane}", transform=cells[0].transAxes,
                    rotation=90, ha="right", va="center", fontsize=8,
                )  # fmt: skip
    legend = [Patch(color=palette[c], label=name) for c, name in enumerate(CLASSES)]
    figure.legend(handles=legend, loc="lower center", ncol=len(CLASSES), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"qc: {path}")


def write_worst(path, slices, predictions, count):
    """A sheet of the slices that fail the brain outline worst: the `count` skull-on slices
    (every slice when none has a skull) with the largest share of tissue beyond the brain,
    and the `count` with the smallest share of the brain called tissue; one row each, input |
    mask | reference, named and scored. The same list is printed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pool = [i for i, s in enumerate(slices) if s["variant"] == "skull"] or range(len(slices))
    scored = {i: brain_outline([slices[i]], [predictions[i]]) for i in pool}
    outside = sorted(pool, key=lambda i: -scored[i][0])[:count]
    inside = sorted(pool, key=lambda i: scored[i][1])[:count]
    rows = [(i, "outside", scored[i][0]) for i in outside]
    rows += [(i, "inside", scored[i][1]) for i in inside]
    figure, axes = plt.subplots(len(rows), 3, figsize=(5.4, 1.6 * len(rows)), squeeze=False)
    for cells, (i, kind, share) in zip(axes, rows):
        s = slices[i]
        name = f"{s['volume']} {s['plane']} #{s.get('index', '-')}: {kind} {share:.1%}"
        print(f"worst {name}")
        for ax in cells:
            ax.axis("off")
        draw_row(cells, s, predictions[i])
        cells[1].set_title(name, fontsize=7)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"worst: {path}")


def draw_row(cells, s, predicted):
    """Input (windowed at its 99.5th percentile) | mask | reference of one slice, in 3 axes."""
    palette = np.array(PALETTE, np.float32) / 255
    image = s["raw"].astype(np.float32)
    image /= max(float(np.percentile(image, 99.5)), 1e-6)
    pictures = (np.clip(image, 0, 1), palette[predicted], palette[s["target"]])
    for ax, picture in zip(cells, pictures):
        ax.imshow(np.rot90(picture), cmap="gray", interpolation="nearest")


if __name__ == "__main__":
    main()
