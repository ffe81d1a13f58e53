"""Leave-one-brain-out summary: each fold's held-out scores against the mask-quality targets.

    python tools/lobo_report.py runs/lobo-spm-eval.md runs/lobo-colin-eval.md ...

Each file is what `python -m training.evaluate ... --degradations --markdown` printed for one
fold (the model trained without that brain, scored on it). Prints, per fold and plane, the
skull-on grey- and white-matter Dice of the network beside 4-class multi-Otsu, the share of
pixels outside the brain called tissue and of the brain called tissue, and the largest Dice
drop under a degradation; then every target with the worst value over the folds and whether
it is met. The Dice floor is 0.97 x the agreement of the two reference label sets, as
`python tools/label_agreement.py` prints it (pass other figures with --agreement).
"""

import argparse
import sys
from collections import defaultdict

TISSUES = ("grey_matter", "white_matter")
PLANES = ("axial", "coronal", "sagittal")
PLAIN = "skull"  # the variant users send: skull on, no degradation
NOT_DEGRADATIONS = ("skull", "stripped")
OUTSIDE_MAX, INSIDE_MIN, DROP_MAX = 0.03, 0.97, 0.05


def main(argv=None):
    """Print the fold table and the targets; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="training.evaluate --markdown outputs")
    parser.add_argument(
        "--agreement",
        default="0.805,0.775",
        help="grey,white matter Dice between the two reference label sets",
    )
    args = parser.parse_args(argv)
    floor = dict(zip(TISSUES, (0.97 * float(v) for v in args.agreement.split(","))))
    rows = [row for path in args.tables for row in read_table(path)]
    if not rows:
        print("no rows found: pass training.evaluate --markdown outputs", file=sys.stderr)
        return 2
    scores = index(rows)
    print(fold_table(scores))
    checks = targets(scores, floor)
    print()
    for name, worst, met in checks:
        print(f"- {'met' if met else 'MISSED'}: {name} (worst: {worst})")
    return 0 if all(met for _, _, met in checks) else 1


def read_table(path):
    """The rows of a Markdown table printed by training.evaluate, as dicts of strings."""
    with open(path, encoding="utf-8") as lines:
        table = [line.strip() for line in lines if line.startswith("|")]
    if len(table) < 2:
        return []
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]
    ]


def index(rows):
    """{(brain, variant, plane, method): {column: float}}."""
    scores = {}
    for row in rows:
        key = (row["brain"], row["variant"], row["plane"], row["method"])
        scores[key] = {k: float(v) for k, v in row.items() if k not in key and is_number(v)}
    return scores


def is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def brains(scores):
    return sorted({key[0] for key in scores})


def worst_drop(scores, brain, plane):
    """The largest GM/WM Dice drop of the network from the plain slices to any degradation."""
    plain = scores[(brain, PLAIN, plane, "enet")]
    drops = [
        plain[t] - values[t]
        for (b, variant, p, method), values in scores.items()
        if b == brain and p == plane and method == "enet" and variant not in NOT_DEGRADATIONS
        for t in TISSUES
    ]
    return max(drops) if drops else None


def fold_table(scores):
    """Markdown: one row per held-out brain and plane, skull on."""
    lines = [
        "| held out | plane | GM ENet / Otsu | WM ENet / Otsu | outside | inside | worst drop |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for brain in brains(scores):
        for plane in PLANES:
            net = scores.get((brain, PLAIN, plane, "enet"))
            otsu = scores.get((brain, PLAIN, plane, "multi-otsu"))
            if not net or not otsu:
                continue
            drop = worst_drop(scores, brain, plane)
            lines.append(
                f"| {brain} | {plane} "
                + "".join(f"| {net[t]:.3f} / {otsu[t]:.3f} " for t in TISSUES)
                + f"| {net['outside']:.1%} | {net['inside']:.1%} "
                + f"| {'-' if drop is None else f'{drop:.3f}'} |"
            )
    return "\n".join(lines)


def targets(scores, floor):
    """[(target, worst value with where, met)] over every fold and plane, skull on."""
    found = defaultdict(list)  # target -> [(value, where)]
    for (brain, variant, plane, method), net in scores.items():
        if variant != PLAIN or method != "enet":
            continue
        where = f"{brain} {plane}"
        otsu = scores.get((brain, PLAIN, plane, "multi-otsu"))
        found["outside <= 3 %"].append((net["outside"], where))
        found["inside >= 97 %"].append((net["inside"], where))
        for tissue in TISSUES:
            short = "GM" if tissue == "grey_matter" else "WM"
            if otsu:
                found[f"{short} Dice beats multi-Otsu"].append((net[tissue] - otsu[tissue], where))
            found[f"{short} Dice >= {floor[tissue]:.3f}"].append((net[tissue], where))
        drop = worst_drop(scores, brain, plane)
        if drop is not None:
            found["degradations drop Dice <= 0.05"].append((drop, where))
    checks = []
    for name, values in found.items():
        higher_is_worse = name.startswith(("outside", "degradations"))
        value, where = max(values) if higher_is_worse else min(values)
        if name.startswith("outside"):
            met = value <= OUTSIDE_MAX
        elif name.startswith("inside"):
            met = value >= INSIDE_MIN
        elif name.startswith("degradations"):
            met = value <= DROP_MAX
        elif "beats" in name:
            met = value > 0
        else:
            met = value >= floor["grey_matter" if name.startswith("GM") else "white_matter"]
        checks.append((name, f"{value:.3f} at {where}", met))
    return checks


if __name__ == "__main__":
    sys.exit(main())
