"""The evaluate command: Dice, the multi-Otsu baseline, the table and the overview."""

import numpy as np
import png
from conftest import DATA, read_png, run_module

from training.evaluate import dice_scores, multi_otsu, pixel_accuracy


def test_multi_otsu_orders_four_intensity_bands():
    truth = np.repeat(np.arange(4, dtype=np.uint8), 25)[None].repeat(20, axis=0)
    raw = (truth * 70 + np.random.default_rng(0).integers(0, 10, truth.shape)).astype(np.uint8)
    assert np.array_equal(multi_otsu(raw), truth)
    assert not multi_otsu(np.zeros((20, 20), np.uint8)).any()


def test_dice_is_pooled_over_slices():
    target = np.array([[0, 1], [2, 3]], np.uint8)
    slices = [{"target": target}, {"target": target}]
    perfect = dice_scores(slices, [target, target])
    assert all(v == 1 for v in perfect.values())
    wrong = np.array([[0, 1], [2, 2]], np.uint8)
    scores = dice_scores(slices, [target, wrong])
    assert scores["white_matter"] == 2 * 1 / (2 + 1)
    assert pixel_accuracy(slices, [target, wrong]) == 7 / 8


def test_command_on_slice_label_pairs(tmp_path):
    (tmp_path / "a.png").write_bytes((DATA / "icbm2009a_axial100.png").read_bytes())
    label = read_png(DATA / "icbm2009a_axial100_label.png")
    png.from_array(label, "L").save(tmp_path / "a_label.png")
    result = run_module(
        "training.evaluate", "--pairs", tmp_path, "--qc", tmp_path / "qc.png",
        "--worst", tmp_path / "worst.png", "--worst-count", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    worst = [line for line in result.stdout.splitlines() if line.startswith("worst a -")]
    assert [line.split(": ")[1].split()[0] for line in worst] == ["outside", "inside"]
    assert 0 <= float(worst[1].split()[-1].rstrip("%")) <= 100
    assert png.Reader(filename=str(tmp_path / "worst.png")).read()[1] > 200
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[1:2] == ["pairs"]]
    assert [r[4] for r in rows] == ["enet", "multi-otsu"]
    assert all(0 <= float(v) <= 1 for r in rows for v in r[5:])
    enet = dict(zip(result.stdout.splitlines()[0].split()[5:], rows[0][5:]))
    assert float(enet["inside"]) > 0.9 and float(enet["outside"]) < 0.05
    width, height, _, _ = png.Reader(filename=str(tmp_path / "qc.png")).read()
    assert width > 300 and height > 150


def test_degradations_keep_the_slice_and_its_reference():
    from training.evaluate import DEGRADATIONS, validation_slices

    volume = toy_volume()
    slices = validation_slices([volume], every=5, degradations=True)
    variants = {s["variant"] for s in slices}
    assert variants == {"skull", "stripped", *DEGRADATIONS}
    for s in slices:
        assert s["raw"].shape == s["target"].shape
        assert s["raw"].dtype == (np.uint8 if s["variant"] == "8-bit" else np.uint16)
    skull = [s for s in slices if s["variant"] == "skull"]
    noisy = [s for s in slices if s["variant"] == "noise"]
    assert len(skull) == len(noisy) and not np.array_equal(skull[0]["raw"], noisy[0]["raw"])


def toy_volume():
    """A 30^3 head of nested spheres with a skull, as a training Volume."""
    from training.data import Volume

    radius = np.sqrt(((np.indices((30, 30, 30)) - 15) ** 2).sum(0))
    classes = np.digitize(radius, [5, 8, 10, 12, 14])  # WM GM CSF gap bone air
    generation = np.array([3, 2, 1, 6, 4, 0])[classes]
    probs = np.stack([generation == k for k in range(7)]).astype(np.float16)
    image = np.array([0.9, 0.5, 0.15, 0.05, 0.6, 0.0], np.float32)[classes]
    return Volume("toy", "toy", image, probs, np.float32([1, 1, 1]))


def test_command_fails_cleanly_without_pairs(tmp_path):
    result = run_module("training.evaluate", "--pairs", tmp_path)
    assert result.returncode != 0 and result.stderr.strip().startswith("error:")
