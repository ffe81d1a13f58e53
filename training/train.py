"""Train the ENet here on CPU or as a SageMaker MXNet script-mode job.

    python -m training.train --run-dir runs/enet            # templates, background-friendly
    python -m training.train --source oasis --data-dir /data/oasis1

Each epoch logs a progress line and validation Dice, checkpoints into --run-dir (a rerun
resumes), and exports the best model so far into --model-dir as model-symbol.json,
model-0000.params, model-shapes.json and model-meta.json: the layout SageMaker tars into
model.tar.gz and the Greengrass ML resource and `load_model.py` read.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (SageMaker script mode): make imports work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import load_model
from processing import CLASS_NAMES, FRAME_SIDE, NORMALISATION, PALETTE
from training import data, export_onnx
from training.enet import ENet
from training.evaluate import brain_outline, dice_scores, predict_slices, validation_slices
from training.synth import SliceSampler

# --margin-weight leaves this many frame pixels around the brain alone: about the 2 mm of
# evaluate's `outside` score, a head filling the 256-pixel frame at 0.7-0.8 mm per pixel
MARGIN_PIXELS = 3


def main(argv=None):
    """Parse flags (SageMaker passes hyperparameters as flags), then train."""
    args = parse_args(argv)
    train(args)


def parse_args(argv=None):
    """Flags; defaults read SageMaker's environment when it is there and work without it."""
    env = os.environ
    parser = argparse.ArgumentParser(description="Train the ENet brain tissue segmenter.")
    parser.add_argument(
        "--source",
        choices=["auto", "templates", "oasis"],
        default="auto",
        help="auto: OASIS-1 if --data-dir holds it, else prepared templates",
    )
    parser.add_argument("--data-dir", default=env.get("SM_CHANNEL_TRAIN", ".cache/volumes"))
    parser.add_argument(
        "--add-volumes", action="append", default=[], metavar="DIR",
        help="more prepared volumes beside --data-dir's templates (repeatable), e.g. .cache/real "
        "(python -m training.sources --real: two real 1 mm skull-on scans of one head)",
    )  # fmt: skip
    parser.add_argument("--model-dir", default=env.get("SM_MODEL_DIR"))
    parser.add_argument(
        "--run-dir",
        default=env.get("SM_OUTPUT_DATA_DIR", "runs/enet"),
        help="checkpoints and log; rerunning with the same folder resumes",
    )
    parser.add_argument(
        "--hold-out",
        default="spm",
        help="template family kept out of training and used for validation; none: train on "
        "every brain and validate on their own slices",
    )
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--iterations", type=int, default=100, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--frame-side", type=int, default=FRAME_SIDE,
        help="side of the square frame the server resamples every slice to, pixels",
    )  # fmt: skip
    parser.add_argument(
        "--size", type=int, default=160,
        help="side of the training crops, pixels, taken from the server's 256-pixel frame",
    )  # fmt: skip
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--class-weights",
        default="0.5,1,1,1",
        help="soft-Dice weight per class: background, CSF, GM, WM",
    )
    parser.add_argument(
        "--ce-weight",
        type=float,
        default=0.0,
        help="weight of cross-entropy added to the soft-Dice loss (0: none; 0.5 in the "
        "bundled recipe cost held-out Colin27 0.04-0.07 of grey-matter Dice, "
        "docs/lobo/colin.md)",
    )
    parser.add_argument(
        "--margin-weight",
        type=float,
        default=0.0,
        help="weight of a penalty on tissue probability beyond the brain dilated by "
        f"{MARGIN_PIXELS} frame pixels, over the batch's brain pixels (0: none; 1 in the "
        "bundled recipe cost held-out Colin27 0.06-0.09 of grey-matter Dice and did not "
        "lower axial outside, docs/lobo/colin.md)",
    )
    parser.add_argument(
        "--real-fraction",
        type=float,
        default=0.3,
        help="share of slices that use the volume's real image, not a synthetic one (0.7 in "
        "the bundled recipe's third run: less neck and scalp called tissue on every fold, "
        "docs/lobo/brainbrowser.md; 0.85 was level on the brainbrowser fold and within the "
        "draw's noise on the real-head fold, docs/lobo/real.md)",
    )
    parser.add_argument(
        "--beyond-brain",
        type=float,
        default=0.15,
        help="share of slices drawn where the head has little or no brain (skull base, eyes, "
        "neck, vertex)",
    )
    parser.add_argument(
        "--patches", type=float, default=0.0,
        help="share of synthetic slices whose head outside the brain is a mosaic of random "
        "patches, each its own intensity (synth.patchwork; 0: none; 0.5 on the real-head fold "
        "lowered sagittal outside and raised axial and coronal, docs/lobo/real.md)",
    )  # fmt: skip
    parser.add_argument(
        "--thick", type=float, default=0.3,
        help="share of slices averaged over a 2-7 mm slab through their plane (thick slices; 0.5 "
        "on the brainbrowser fold: lower Dice, the 5 mm slices' drop unchanged)",
    )  # fmt: skip
    parser.add_argument(
        "--atrophy", type=float, default=0.0,
        help="share of synthetic slices whose brain is shrunk as in older heads: thinner cortex, "
        "wider sulci, larger ventricles, sometimes CSF-filled holes (synth.atrophy)",
    )  # fmt: skip
    parser.add_argument(
        "--repaint", type=float, default=0.0,
        help="share of real-image slices whose head beyond the brain's rim takes a random "
        "intensity curve: real tongues, necks and scalps in any brightness (synth.repaint_head; "
        "0: none; 0.5 on both real-head folds called more neck tissue, docs/lobo/real.md)",
    )  # fmt: skip
    parser.add_argument(
        "--pixel-mm", default="0.5,3",
        help="range of in-plane pixel sizes (mm) that training slices are resampled to",
    )  # fmt: skip
    parser.add_argument(
        "--validate-every", type=int, default=1,
        help="validate every N epochs and after the last (validation does not change the "
        "weights; on every training brain it takes as long as an epoch)",
    )  # fmt: skip
    parser.add_argument("--init", help="start from these parameters (fine-tuning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop-after", type=int,
        help="stop, checkpointed, after this many epochs (to train in parts); rerun the same "
        "command without it to go on",
    )  # fmt: skip
    parser.add_argument(
        "--export", choices=["best", "last"], default="best",
        help="export the epoch with the best validation Dice (each time it improves), or the "
        "last epoch when training ends; rerun a finished run with 'last' to export it",
    )  # fmt: skip
    parser.add_argument(
        "--hosts",
        default=env.get("SM_HOSTS", "[]"),
        help="JSON list of hosts; more than one trains with kvstore dist_sync",
    )
    args = parser.parse_args(argv)
    args.model_dir = args.model_dir or str(Path(args.run_dir) / "model")
    return args


def train(args):
    """The training loop: sample, step, validate, checkpoint, export the best."""
    run_dir, model_dir = Path(args.run_dir), Path(args.model_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mx.random.seed(args.seed)
    train_volumes, val_volumes = load_volumes(args)
    args.volumes = sorted(v.name for v in train_volumes)  # recorded by export
    distributed = len(json.loads(args.hosts)) > 1
    kvstore = mx.kv.create("dist_sync") if distributed else "device"
    rank = kvstore.rank if distributed else 0
    pixel_mm = tuple(float(v) for v in args.pixel_mm.split(","))
    sampler = SliceSampler(
        train_volumes,
        size=args.size,
        real_fraction=args.real_fraction,
        seed=args.seed + rank,
        pixel_mm=pixel_mm,
        frame_side=args.frame_side,
        beyond_brain=args.beyond_brain,
        patches=args.patches,
        thick=args.thick,
        atrophy=args.atrophy,
        repaint=args.repaint,
    )
    validation = validation_slices(val_volumes)
    log(
        f"training on {[v.name for v in train_volumes]}, validating on "
        f"{[v.name for v in val_volumes]} ({len(validation)} slices)"
    )

    net = ENet(len(CLASS_NAMES))
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net(mx.nd.zeros((1, net.in_channels, args.size, args.size)))
    if args.init:
        load_init(net, args.init)
    total = args.epochs * args.iterations
    schedule = mx.lr_scheduler.CosineScheduler(total, args.lr, final_lr=args.lr * 0.02)
    trainer = gluon.Trainer(
        net.collect_params(),
        "adam",
        {"learning_rate": args.lr, "lr_scheduler": schedule},
        kvstore=kvstore,
    )
    state = resume(run_dir, net, trainer)
    first = state["epoch"]
    # The saved optimiser carries its old schedule; a resumed run follows this run's --epochs.
    trainer._optimizer.lr_scheduler = schedule
    weights = mx.nd.array([float(w) for w in args.class_weights.split(",")])
    scores = None  # the last epoch's validation Dice, reused by --export last

    for epoch in range(state["epoch"], args.epochs):
        if args.stop_after is not None and epoch - first >= args.stop_after:
            log(f"stopped after epoch {epoch} (--stop-after); rerun without it to go on")
            return state
        # Slices and dropout are drawn from seeds of their own epoch, so a run resumed from its
        # checkpoint repeats an uninterrupted one bit for bit.
        sampler.rng = np.random.default_rng([args.seed, rank, epoch])
        mx.random.seed(
            int(np.random.SeedSequence([args.seed, rank, epoch, 1]).generate_state(1)[0])
        )
        started, losses = time.time(), []
        for _ in range(args.iterations):
            images, targets = sampler.batch(args.batch_size)
            images, targets = mx.nd.array(images), mx.nd.array(targets)
            with autograd.record():
                loss = segmentation_loss(
                    net(images), targets, weights, args.ce_weight, args.margin_weight
                )
            loss.backward()
            trainer.step(1)
            losses.append(float(loss.asscalar()))
        seconds = time.time() - started
        state["epoch"] = epoch + 1
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": seconds}
        line = (
            f"epoch {epoch + 1}/{args.epochs} loss {np.mean(losses):.4f} "
            f"{seconds / args.iterations:.2f} s/batch lr {trainer.learning_rate:.2e}"
        )
        validate = (epoch + 1) % args.validate_every == 0 or epoch + 1 == args.epochs
        if validate:
            masks = predict_slices(net, validation, args.frame_side)
            scores = dice_scores(validation, masks)
            outline = {}
            if any(map(skull_on, validation)):
                outline = dict(
                    zip(("outside", "inside"), brain_outline(validation, masks, skull_on))
                )
            entry.update({f"dice_{c}": round(float(scores[c]), 4) for c in CLASS_NAMES})
            entry.update({k: round(float(v), 4) for k, v in outline.items()})
            line += "".join(f" dice_{c} {scores[c]:.3f}" for c in CLASS_NAMES)
            line += "".join(f" skull-on {k} {v:.3f}" for k, v in outline.items())
        log(line)
        state.setdefault("history", []).append(entry)
        if rank == 0:
            mean_tissue = np.mean([scores[c] for c in CLASS_NAMES[1:]]) if validate else -1
            if mean_tissue > state["best"]:
                state["best"], state["best_epoch"] = float(mean_tissue), epoch + 1
                if args.export == "best":
                    export(net, model_dir, args, scores, state)
            checkpoint(run_dir, net, trainer, state)
            plot_curve(state["history"], run_dir / "curve.png", validation_title(args))
    if rank == 0 and args.export == "last":
        # the last epoch, chosen without looking at validation scores; a finished run that is
        # rerun only to export it has none yet
        if scores is None:
            scores = dice_scores(validation, predict_slices(net, validation, args.frame_side))
        export(net, model_dir, args, scores, state)
    return state


def load_volumes(args):
    """(train, validation) Volumes from OASIS-1 discs or the prepared templates."""
    source = args.source
    if source == "auto":
        source = "oasis" if data.find_oasis(args.data_dir) else "templates"
    if source == "oasis":
        pairs = data.find_oasis(args.data_dir)
        if not pairs:
            raise SystemExit(
                f"error: no OASIS-1 T88_111 images with FSL_SEG labels under {args.data_dir}"
            )
        train_pairs, val_pairs = data.split_patients(pairs)
        return data.load_oasis(train_pairs), data.load_oasis(val_pairs)
    volumes = data.load_templates(args.data_dir)
    for folder in args.add_volumes:
        volumes += data.load_templates(folder)
    if args.hold_out == "none":
        return volumes, volumes
    families = sorted({v.family for v in volumes})
    if args.hold_out not in families:
        raise SystemExit(
            f"error: --hold-out must be one of {', '.join(families)} or none, not '{args.hold_out}'"
        )
    kept = [v for v in volumes if v.family != args.hold_out]
    if not kept:
        raise SystemExit(f"error: holding out '{args.hold_out}' leaves nothing to train on")
    return kept, [v for v in volumes if v.family == args.hold_out]


def segmentation_loss(probabilities, targets, weights, ce_weight, margin_weight=0.0):
    """Class-weighted soft Dice (1 - weighted mean Dice), plus optional cross-entropy and an
    optional penalty on tissue beyond the brain.

    The penalty is the tissue probability summed over pixels more than `MARGIN_PIXELS` from
    the target's brain, divided by the batch's brain pixels: scalp, skull, eyes and neck
    called tissue, as a share of the brain. Unlike cross-entropy it leaves the brain's own
    edge and the classes within it to the Dice term.
    """
    one_hot = mx.nd.one_hot(targets, probabilities.shape[1]).transpose((0, 3, 1, 2))
    overlap = (probabilities * one_hot).sum(axis=(0, 2, 3))
    sizes = probabilities.sum(axis=(0, 2, 3)) + one_hot.sum(axis=(0, 2, 3))
    dice = (2 * overlap + 1) / (sizes + 1)
    loss = 1 - (weights * dice).sum() / weights.sum()
    if ce_weight:
        picked = (probabilities * one_hot).sum(axis=1)
        loss = loss - ce_weight * mx.nd.log(picked + 1e-6).mean()
    if margin_weight:
        brain = (targets > 0).expand_dims(1)
        reach = 2 * MARGIN_PIXELS + 1
        near = mx.nd.Pooling(
            brain, kernel=(reach, reach), pool_type="max", stride=(1, 1),
            pad=(MARGIN_PIXELS, MARGIN_PIXELS),
        )  # fmt: skip
        tissue = 1 - probabilities.slice_axis(axis=1, begin=0, end=1)
        beyond = (tissue * (1 - near)).sum()
        loss = loss + margin_weight * beyond / (brain.sum() + 1)
    return loss


def load_init(net, path):
    """Start from a Gluon parameter file or an exported model's params (`arg:`/`aux:` keys).

    An export numbers its layers after the network that wrote it (conv89_weight where this
    net has conv0_weight); layers of each kind keep their order, so the numbers are shifted.
    """
    saved = mx.nd.load(str(path))
    if not any(":" in key for key in saved):
        net.load_parameters(str(path))
        return
    saved = {key.split(":", 1)[1]: value for key, value in saved.items()}
    params = net.collect_params()

    def first_index(names, kind):
        return min(
            int(m.group(2)) for n in names if (m := LAYER.fullmatch(n)) and m.group(1) == kind
        )

    for name, param in params.items():
        kind, number, rest = LAYER.fullmatch(name).groups()
        shift = first_index(saved, kind) - first_index(params.keys(), kind)
        param.set_data(saved[f"{kind}{int(number) + shift}_{rest}"])


LAYER = re.compile(r"([a-z]+)(\d+)_(.+)")


def resume(run_dir, net, trainer):
    """Load the last checkpoint if the run folder has one."""
    state_path = run_dir / "state.json"
    if not state_path.exists():
        return {"epoch": 0, "best": -1.0, "best_epoch": 0}
    net.load_parameters(str(run_dir / "last.params"))
    trainer.load_states(str(run_dir / "last.states"))
    state = json.loads(state_path.read_text())
    log(f"resumed from {run_dir} at epoch {state['epoch']}")
    return state


def checkpoint(run_dir, net, trainer, state):
    """Write parameters, optimiser state and progress; the state file last, so it is complete."""
    net.save_parameters(str(run_dir / "last.params"))
    trainer.save_states(str(run_dir / "last.states"))
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(run_dir / "state.json")


def export(net, model_dir, args, scores, state):
    """Export the symbol, params, metadata JSON and model.onnx that `load_model.py` reads."""
    epoch = state["epoch"] if args.export == "last" else state["best_epoch"]
    log(f"exporting epoch {epoch} to {model_dir}")
    model_dir.mkdir(parents=True, exist_ok=True)
    params = model_dir / "tmp-export.params"
    net.save_parameters(str(params))
    inference = ENet(len(CLASS_NAMES), net.in_channels)
    inference.load_parameters(str(params))
    params.unlink()
    inference.hybridize()
    side = args.frame_side  # what the server feeds it; the exported graph takes any size
    inference(mx.nd.zeros((1, net.in_channels, side, side)))
    inference.export(str(model_dir / "model"))
    input_name = mx.sym.load(str(model_dir / "model-symbol.json")).list_inputs()[0]
    (model_dir / "model-shapes.json").write_text(
        json.dumps([{"name": input_name, "shape": [1, net.in_channels, side, side]}])
    )
    meta = {
        "name": "enet-brain-tissue",
        "architecture": "ENet (Paszke et al. 2016), MXNet Gluon export",
        "input_name": input_name,
        "input_channels": net.in_channels,
        "size_multiple": net.size_multiple,
        "frame_side": args.frame_side,
        "classes": CLASS_NAMES,
        "colours": [list(c) for c in PALETTE],
        "normalisation": NORMALISATION,
        # what model.onnx and the served MXNet graph output (export_onnx drops the softmax)
        "output": "logits",
        "parameters": sum(int(np.prod(p.shape)) for p in net.collect_params().values()),
        "training": {
            "command": "python -m training.train " + " ".join(sys.argv[1:]),
            "revision": revision(),
            "volumes": args.volumes,
            "source": args.source,
            "data_dir": str(args.data_dir),
            "add_volumes": args.add_volumes,
            "hold_out": args.hold_out,
            "epoch": epoch,
            "selected": args.export,
            "epochs": args.epochs,
            "iterations": args.iterations,
            "batch_size": args.batch_size,
            "size": args.size,
            "lr": args.lr,
            "ce_weight": args.ce_weight,
            "margin_weight": args.margin_weight,
            "pixel_mm": args.pixel_mm,
            "real_fraction": args.real_fraction,
            "beyond_brain": args.beyond_brain,
            "patches": args.patches,
            "thick": args.thick,
            "atrophy": args.atrophy,
            "repaint": args.repaint,
            "init": args.init,
            "class_weights": args.class_weights,
        },
        "validation_dice": {k: round(float(v), 4) for k, v in scores.items()},
    }
    (model_dir / "model-meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        onnx_path, report = export_onnx.export(model_dir)
        log(f"wrote {onnx_path.name}: {export_onnx.describe(report)}")
    except export_onnx.ExportError as error:  # the server then runs the model with MXNet
        log(f"warning: no {load_model.ONNX_NAME} for epoch {epoch}: {error}")


def skull_on(slice_):
    """Validation slices that show the head (`brain_outline` of stripped ones says little)."""
    return slice_["variant"] == "skull"


def validation_title(args):
    """What the validation Dice of a run measures, for its curve."""
    return "Dice on the training brains" if args.hold_out == "none" else "held-out Dice"


def plot_curve(history, path, title="held-out Dice"):
    """Training loss and validation Dice per class, per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    validated = [h for h in history if "dice_background" in h]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (1 - soft Dice)", title="loss")
    for name in CLASS_NAMES:
        right.plot(
            [h["epoch"] for h in validated],
            [h[f"dice_{name}"] for h in validated],
            marker="o",
            label=name,
        )
    right.set(xlabel="epoch", ylabel="Dice", xlim=left.get_xlim(), ylim=(0, 1), title=title)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def revision():
    """The code's git commit (with '+dirty' for uncommitted changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def log(message):
    """One timestamped line on stdout, flushed so a background log file is always current."""
    print(time.strftime("%H:%M:%S"), message, flush=True)


if __name__ == "__main__":
    main()
