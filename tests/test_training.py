"""Training: the ENet itself, a learning run on a trivial task, SageMaker layout, resuming."""

import json
import os
import re
import subprocess
import sys

import mxnet as mx
import numpy as np
import png
import pytest
from conftest import ROOT, run_module

import load_model
from training import train
from training.enet import ENet
from training.synth import SliceSampler


def sphere_volume(path, size=40, family="toy"):
    """A head made of nested spheres: WM core, GM shell, CSF shell, skull-like ring; as .npz."""
    grid = np.indices((size,) * 3) - size / 2
    radius = np.sqrt((grid**2).sum(0))
    classes = np.digitize(radius, [7, 11, 13, 15, 17])  # WM, GM, CSF, other, bone, air
    generation = np.array([3, 2, 1, 6, 4, 0])[classes]
    probs = np.stack([generation == k for k in range(7)]).astype(np.float16)
    image = np.array([0.9, 0.5, 0.15, 0.05, 0.2, 0.0], np.float32)[classes]
    np.savez(path, image=image, probs=probs, spacing=np.float32([1, 1, 1]), family=family)


@pytest.fixture(scope="module")
def toy_volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("volumes")
    sphere_volume(folder / "toy.npz")
    return folder


def test_enet_has_about_360k_parameters_and_keeps_the_size():
    net = ENet()
    net.initialize()
    out = net(mx.nd.zeros((2, 1, 48, 64)))
    count = sum(int(np.prod(p.shape)) for p in net.collect_params().values())
    assert abs(count - 360_000) / 360_000 < 0.10
    assert out.shape == (2, 4, 48, 64)


def test_sampler_gives_normalised_slices_and_valid_targets(toy_volumes):
    from training.data import load_templates

    sampler = SliceSampler(load_templates(toy_volumes), size=32, seed=3, frame_side=48)
    images, targets = sampler.batch(6)
    assert images.shape == (6, 1, 32, 32) and targets.shape == (6, 32, 32)
    assert images.dtype == np.float32 and 0 <= images.min() and images.max() <= 2
    assert set(np.unique(targets)) <= {0, 1, 2, 3} and (targets > 0).any()


def test_sampler_also_draws_head_slices_with_little_brain(toy_volumes):
    from training.data import load_templates

    volumes = load_templates(toy_volumes)
    tissue = {}
    for share in (0.0, 1.0):
        sampler = SliceSampler(volumes, size=32, seed=4, frame_side=48, beyond_brain=share)
        tissue[share] = (sampler.batch(12)[1] > 0).mean()
    # the toy head reaches 4 voxels past its brain: those slices are mostly background
    # (a thick slab there may still average in some brain)
    assert tissue[1.0] < 0.1 and tissue[1.0] < tissue[0.0] / 3, tissue


def test_thick_sets_the_share_of_slices_averaged_over_a_slab(toy_volumes, monkeypatch):
    from training import synth
    from training.data import load_templates

    slabs = []
    real_slab_mean = synth.slab_mean
    monkeypatch.setattr(synth, "slab_mean", lambda *a: slabs.append(a[-1]) or real_slab_mean(*a))
    volumes = load_templates(toy_volumes)
    shares = {}
    for thick in (0.0, 0.3, 1.0):
        slabs.clear()
        SliceSampler(volumes, size=32, seed=5, frame_side=48, thick=thick).batch(40)
        shares[thick] = np.mean(np.array(slabs) > 1)
    # 1 mm voxels: a 2-7 mm slab is always more than one slice
    assert shares[0.0] == 0 and shares[1.0] == 1 and 0.1 < shares[0.3] < 0.5, shares


def test_atrophy_turns_only_grey_and_white_matter_into_csf():
    from training import synth

    radius = np.hypot(*(np.indices((64, 64)) - 32))
    classes = np.array([synth.WHITE, synth.GREY, synth.CSF, synth.BONE, synth.AIR])
    classes = classes[np.digitize(radius, [8, 16, 19, 22])]
    probs = np.eye(synth.CLASSES, dtype=np.float32)[classes].transpose(2, 0, 1)
    for seed in range(5):
        shrunk = synth.atrophy(probs, (1.0, 1.0), np.random.default_rng(seed))
        assert np.allclose(shrunk.sum(0), probs.sum(0))  # mass moves, none is made or lost
        others = [k for k in range(synth.CLASSES) if k not in (synth.CSF, synth.GREY, synth.WHITE)]
        assert np.array_equal(shrunk[others], probs[others])
        gained = shrunk[synth.CSF] - probs[synth.CSF]
        # CSF only grows, by at least the ring of cortex next to it
        assert gained.min() >= -1e-6 and gained.sum() > 50
        assert np.all(shrunk[synth.GREY] <= probs[synth.GREY] + 1e-6)


def test_atrophy_sets_the_share_of_synthetic_slices_with_wider_csf(toy_volumes):
    from training.data import load_templates

    volumes = load_templates(toy_volumes)
    csf = {}
    for share in (0.0, 1.0):
        sampler = SliceSampler(volumes, size=32, seed=6, frame_side=48, real_fraction=0.0,
                               atrophy=share)  # fmt: skip
        targets = sampler.batch(40)[1]
        csf[share] = (targets == 1).sum() / (targets > 0).sum()
    assert csf[1.0] > 1.3 * csf[0.0], csf


def test_repaint_keeps_the_brain_and_its_rim_and_recolours_the_head_beyond():
    from training import synth

    radius = np.hypot(*(np.indices((64, 64)) - 32))
    labels = np.where(radius < 12, 2, 0).astype(np.uint8)
    image = np.where(radius < 12, 0.5, np.where(radius < 28, 0.4, 0.0)).astype(np.float32)
    image[radius >= 28] = 0.05  # the noise floor of the air around a head
    changed = []
    for seed in range(6):
        painted = synth.repaint_head(image, labels, (1.0, 1.0), np.random.default_rng(seed))
        assert np.array_equal(painted[radius < 13], image[radius < 13])  # brain and 1 mm rim
        assert painted[radius >= 28].max() <= 0.12  # air stays dark
        changed.append(abs(float(painted[(radius > 20) & (radius < 28)].mean()) - 0.4))
    assert max(changed) > 0.1, changed  # the head beyond the rim takes other intensities


def test_repaint_sets_the_share_of_real_slices_recoloured(toy_volumes, monkeypatch):
    from training import synth
    from training.data import load_templates

    calls = []
    real_repaint = synth.repaint_head
    monkeypatch.setattr(synth, "repaint_head", lambda *a: calls.append(1) or real_repaint(*a))
    volumes = load_templates(toy_volumes)
    counts = {}
    for share in (0.0, 1.0):
        calls.clear()
        SliceSampler(volumes, size=32, seed=7, frame_side=48, real_fraction=0.5,
                     repaint=share).batch(30)  # fmt: skip
        counts[share] = len(calls)
    # only slices with the volume's real image are repainted: about half of 30
    assert counts[0.0] == 0 and 6 <= counts[1.0] <= 24, counts


def test_patchwork_splits_the_head_outside_the_brain_into_classes_of_their_own():
    from training import synth

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(synth.CLASSES), (64, 64)).transpose(2, 0, 1).astype(np.float32)
    patched = synth.patchwork(probs, np.random.default_rng(1))
    assert patched.shape == (synth.CLASSES + 5 * 3, 64, 64)
    assert np.allclose(patched.sum(0), probs.sum(0))  # only split, nothing lost
    brain = slice(synth.AIR, synth.WHITE + 1)
    assert np.array_equal(patched[brain], probs[brain])
    # extra classes come 3 per split class, in the order bone, soft tissue, ...
    extra = list(range(synth.CLASSES + 3, synth.CLASSES + 6))
    soft = np.stack([patched[synth.SOFT]] + [patched[k] for k in extra])
    assert np.allclose(soft.sum(0), probs[synth.SOFT])
    assert all((part > 0).mean() > 0.05 for part in soft), "every patch shows somewhere"
    # a head of soft tissue only comes out of synthesis as patches of different intensities
    only_soft = np.zeros_like(probs)
    only_soft[synth.SOFT] = 1
    patched = synth.patchwork(only_soft, np.random.default_rng(1))
    image = synth.synthesise(patched, np.random.default_rng(2))
    means = [image[part > 0.5].mean() for part in patched[[synth.SOFT, *extra]]]
    assert np.ptp(means) > 0.05, means


def epochs_from_log(text):
    """[(loss, mean tissue dice)] per epoch line of a training log."""
    rows = []
    for line in text.splitlines():
        match = re.search(
            r"epoch \d+/\d+ loss ([\d.]+) .* dice_csf ([\d.]+) "
            r"dice_grey_matter ([\d.]+) dice_white_matter ([\d.]+)",
            line,
        )
        if match:
            loss, *dice = map(float, match.groups())
            rows.append((loss, float(np.mean(dice))))
    return rows


def test_a_short_run_learns_and_writes_the_sagemaker_layout(toy_volumes, tmp_path):
    env = dict(
        os.environ,
        SM_CHANNEL_TRAIN=str(toy_volumes),
        SM_MODEL_DIR=str(tmp_path / "model"),
        SM_OUTPUT_DATA_DIR=str(tmp_path / "output"),
        SM_HOSTS='["algo-1"]',
    )
    command = [
        sys.executable,
        "training/train.py",
        "--epochs",
        "6",
        "--iterations",
        "15",
        "--batch-size",
        "8",
        "--size",
        "32",
        "--frame-side",
        "48",
        "--lr",
        "0.01",
        "--seed",
        "1",
        "--hold-out",
        "none",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = epochs_from_log(result.stdout)
    assert len(epochs) == 6
    assert epochs[-1][0] < epochs[0][0], "the loss must fall"
    assert max(d for _, d in epochs[1:]) > epochs[0][1] + 0.1, "tissue Dice must rise"
    # the toy head has a skull: each epoch also scores the brain outline on skull-on slices
    history = json.loads((tmp_path / "output" / "state.json").read_text())["history"]
    assert all(0 <= h["outside"] <= 1 and 0 <= h["inside"] <= 1 for h in history)
    assert history[-1]["inside"] > history[0]["inside"] or history[-1]["inside"] > 0.5
    assert result.stdout.count("skull-on outside") == 6
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert files == [
        "model-0000.params",
        "model-meta.json",
        "model-shapes.json",
        "model-symbol.json",
        "model.onnx",
    ]
    meta = json.loads((tmp_path / "model" / "model-meta.json").read_text())
    assert meta["classes"][0] == "background" and meta["input_channels"] == 1
    assert meta["frame_side"] == 48 and "--frame-side 48" in meta["training"]["command"]
    assert meta["training"]["volumes"] == ["toy"] and meta["training"]["revision"]
    width, height, _, _ = png.Reader(filename=str(tmp_path / "output" / "curve.png")).read()
    assert width > 400 and height > 200
    assert (meta["input_name"], meta["size_multiple"], meta["output"]) == ("data", 8, "logits")
    assert "wrote model.onnx: ONNX Runtime and OpenVINO vs MXNet: argmax equal on" in result.stdout
    loaded = load_model.load(str(tmp_path / "model"))
    assert loaded.runtime.name == "openvino"
    assert loaded.segment(np.zeros((40, 40), np.uint8)).shape == (40, 40)


def test_a_restarted_run_resumes_from_its_checkpoint(toy_volumes, tmp_path):
    common = ["--data-dir", toy_volumes, "--run-dir", tmp_path / "run", "--iterations", 2,
              "--batch-size", 2, "--size", 32, "--hold-out", "none"]  # fmt: skip
    for epochs in (1, 2):
        result = run_module("training.train", *common, "--epochs", epochs)
        assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "epoch 2/2" in result.stdout
    assert "epoch 1/2" not in result.stdout
    assert json.loads((tmp_path / "run" / "state.json").read_text())["epoch"] == 2
    result = run_module("training.train", *common, "--epochs", 2, "--export", "last",
                        "--model-dir", tmp_path / "last")  # fmt: skip
    assert result.returncode == 0 and "epoch 3" not in result.stdout
    meta = json.loads((tmp_path / "last" / "model-meta.json").read_text())
    assert meta["training"]["epoch"] == 2 and meta["training"]["selected"] == "last"


def test_a_run_stopped_resumed_and_validated_less_often_repeats_an_uninterrupted_one(
    toy_volumes, tmp_path
):
    common = ["--data-dir", toy_volumes, "--iterations", 2, "--batch-size", 2, "--size", 32,
              "--hold-out", "none", "--epochs", 3]  # fmt: skip
    straight = run_module("training.train", *common, "--run-dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    parts = tmp_path / "parts"
    less = ["--run-dir", parts, "--validate-every", 2]
    first = run_module("training.train", *common, *less, "--stop-after", 1)
    assert first.returncode == 0 and "stopped after epoch 1" in first.stdout
    assert json.loads((parts / "state.json").read_text())["epoch"] == 1
    second = run_module("training.train", *common, *less)
    assert "resumed from" in second.stdout and "epoch 3/3" in second.stdout
    history = json.loads((parts / "state.json").read_text())["history"]
    # validated after epoch 2 and after the last, not after epoch 1
    assert ["dice_white_matter" in h for h in history] == [False, True, True]
    a = mx.nd.load(str(tmp_path / "straight" / "last.params"))
    b = mx.nd.load(str(parts / "last.params"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k].asnumpy(), b[k].asnumpy()) for k in a)


def test_holding_out_a_family_that_is_not_there_is_a_one_line_error(toy_volumes, tmp_path):
    result = run_module("training.train", "--data-dir", toy_volumes, "--run-dir", tmp_path,
                        "--hold-out", "spn")  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --hold-out must be one of toy or none, not 'spn'"
    assert not (tmp_path / "state.json").exists()


def test_added_volumes_join_the_templates_and_can_be_held_out(toy_volumes, tmp_path):
    """`--add-volumes` folders add their volumes to --data-dir's; their family is a brain
    like any other, to train on or to hold out."""
    sphere_volume(tmp_path / "scan.npz", size=32, family="real")
    args = train.parse_args(["--data-dir", str(toy_volumes), "--add-volumes", str(tmp_path)])
    args.hold_out = "real"
    kept, held = train.load_volumes(args)
    assert [v.family for v in kept] == ["toy"] and [v.name for v in held] == ["scan"]
    args.hold_out = "none"
    assert sorted(v.family for v in train.load_volumes(args)[0]) == ["real", "toy"]


def test_soft_dice_loss_is_zero_for_a_perfect_prediction():
    targets = mx.nd.array(np.random.default_rng(0).integers(0, 4, (2, 8, 8)))
    perfect = mx.nd.one_hot(targets, 4).transpose((0, 3, 1, 2))
    weights = mx.nd.array([0.5, 1, 1, 1])
    assert train.segmentation_loss(perfect, targets, weights, 0).asscalar() < 1e-3
    uniform = mx.nd.ones_like(perfect) / 4
    assert train.segmentation_loss(uniform, targets, weights, 1).asscalar() > 1


def test_margin_penalty_counts_tissue_beyond_the_brain_only():
    targets = np.zeros((1, 16, 16))
    targets[0, 6:10, 6:10] = 2  # a 4x4 brain
    targets = mx.nd.array(targets)
    weights = mx.nd.array([0.5, 1, 1, 1])

    def loss(tissue_at):
        probabilities = mx.nd.one_hot(targets, 4).transpose((0, 3, 1, 2)).asnumpy()
        for row, column in tissue_at:
            probabilities[0, :, row, column] = [0, 0, 1, 0]
        probabilities = mx.nd.array(probabilities)
        dice_only = train.segmentation_loss(probabilities, targets, weights, 0)
        with_margin = train.segmentation_loss(probabilities, targets, weights, 0, 2.0)
        return (with_margin - dice_only).asscalar()

    assert loss([]) == 0
    within = [(6 - train.MARGIN_PIXELS, 8), (9 + train.MARGIN_PIXELS, 8)]
    assert loss(within) == 0  # the margin next to the brain is left to the Dice term
    beyond = [(0, 0), (15, 15), (9 + train.MARGIN_PIXELS + 1, 8)]
    assert abs(loss(beyond) - 2.0 * 3 / (16 + 1)) < 1e-6
