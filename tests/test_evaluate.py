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
    result = run_module("training.evaluate", "--pairs", tmp_path, "--overview",
                        tmp_path / "overview.png")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("pairs")]
    assert [r[3] for r in rows] == ["enet", "multi-otsu"]
    assert all(0 <= float(v) <= 1 for r in rows for v in r[4:])
    width, height, _, _ = png.Reader(filename=str(tmp_path / "overview.png")).read()
    assert (width, height) == (3 * 233, 2 * 233)


def test_command_fails_cleanly_without_pairs(tmp_path):
    result = run_module("training.evaluate", "--pairs", tmp_path)
    assert result.returncode != 0 and result.stderr.strip().startswith("error:")
