"""tools/lobo_report.py: fold tables from training.evaluate output, checked against the targets."""

from tools import lobo_report

HEADER = (
    "| brain | variant | plane | n | method | background | csf | grey_matter | white_matter "
    "| pixel_acc | outside | inside |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
)


def row(brain, variant, method, gm, wm, outside, inside, plane="axial"):
    return (
        f"| {brain} | {variant} | {plane} | 10 | {method} | 0.9 | 0.4 | {gm} | {wm} | 0.9 "
        f"| {outside} | {inside} |\n"
    )


def write(path, rows):
    path.write_text("some log line\n" + HEADER + "".join(rows))
    return str(path)


def test_a_fold_that_meets_every_target_passes(tmp_path, capsys):
    table = write(
        tmp_path / "a.md",
        [
            row("a", "skull", "enet", 0.80, 0.80, 0.01, 0.98),
            row("a", "skull", "multi-otsu", 0.50, 0.60, 0.40, 1.00),
            row("a", "noise", "enet", 0.78, 0.79, 0.01, 0.98),
        ],
    )
    assert lobo_report.main([table]) == 0
    printed = capsys.readouterr().out
    assert "| a | axial | 0.800 / 0.500 | 0.800 / 0.600 | 1.0% | 98.0% | 0.020 |" in printed
    assert "MISSED" not in printed


def test_the_worst_fold_decides_and_is_named(tmp_path, capsys):
    good = write(
        tmp_path / "a.md",
        [
            row("a", "skull", "enet", 0.80, 0.80, 0.01, 0.98),
            row("a", "skull", "multi-otsu", 0.50, 0.60, 0.40, 1.00),
        ],
    )
    bad = write(
        tmp_path / "b.md",
        [
            row("b", "skull", "enet", 0.60, 0.80, 0.06, 0.98, plane="coronal"),
            row("b", "skull", "multi-otsu", 0.65, 0.60, 0.40, 1.00, plane="coronal"),
            row("b", "5 mm slices", "enet", 0.50, 0.80, 0.06, 0.98, plane="coronal"),
        ],
    )
    assert lobo_report.main([good, bad]) == 1
    printed = capsys.readouterr().out
    assert "MISSED: outside <= 3 % (worst: 0.060 at b coronal)" in printed
    assert "MISSED: GM Dice beats multi-Otsu (worst: -0.050 at b coronal)" in printed
    assert "MISSED: degradations drop Dice <= 0.05 (worst: 0.100 at b coronal)" in printed
    assert "met: WM Dice beats multi-Otsu" in printed
