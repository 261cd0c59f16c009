"""Resumable training of the registration network and of the DeepSim feature extractor.

    python -m meddl.registration.train --model registration --hours 2 --resume
    python -m meddl.registration.train --model segmentation --hours 0.5 --resume

Pairs are synthesised on the fly (:mod:`meddl.registration.synth`, SynthMorph-style), so there
is no dataset to prepare. Every ``--checkpoint-minutes`` the weights and their card go to
``Resources/models/NAME.{pt,json}`` (:func:`meddl.models.save_model`) and the full training
state (optimiser, step, random state, loss curve) to ``--state-dir``; ``--resume`` continues
from that state, or from the bundled weights (step taken from the card) when the state is gone.

Registration loss (Hoffmann et al., SynthMorph): ``1 - soft Dice(labels_moving o phi, labels_fixed)
+ lambda * diffusion(phi) + supervised * |phi - d|^2``, ``d`` the pair's true displacement (a dense
target where the Dice pulls only at label edges). Segmentation loss: cross-entropy + soft Dice on
tissue classes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import models
from .network import SegmentationNet, VelocityNet
from .svf import diffusion, jacobian_determinant, warp
from .synth import TISSUE_CLASSES, SynthPairs, label_sources

__all__ = ["main", "soft_dice", "MODEL_NAMES"]

MODEL_NAMES = {"registration": "registration_synthmorph", "segmentation": "registration_deepsim_seg"}
DEFAULT_STATE_DIR = Path(os.environ.get("MEDDL_TRAIN_STATE_DIR", "/tmp/meddl_registration_train"))
log = logging.getLogger("meddl.registration.train")


def soft_dice(a: torch.Tensor, b: torch.Tensor, present_only: bool = True) -> torch.Tensor:
    """Mean soft Dice over channels of ``(N, G, *S)`` probabilities (channels absent from ``b`` skipped)."""
    dims = tuple(range(2, a.dim()))
    inter = (a * b).sum(dims)
    denom = a.sum(dims) + b.sum(dims)
    dice = 2 * inter / denom.clamp_min(1e-6)
    if present_only:
        mask = b.sum(dims) > 0
        return dice[mask].mean()
    return dice.mean()


def _build(kind: str, args) -> torch.nn.Module:
    if kind == "registration":
        return VelocityNet(3, tuple(args.features or (16, 32, 32)), steps=7,
                           correlation_radius=args.correlation_radius)
    return SegmentationNet(3, len(TISSUE_CLASSES), tuple(args.features or (8, 16, 32)))


def _arguments(net) -> dict:
    if isinstance(net, VelocityNet):
        return {"spatial_dims": net.spatial_dims, "features": list(net.features), "steps": net.steps,
                "correlation_radius": net.correlation_radius, "feature_channels": net.feature_channels}
    return {"spatial_dims": net.spatial_dims, "classes": net.classes, "features": list(net.features)}


def _registration_step(net, pair, lam, supervised=0.0):
    v, u = net.displacement(pair["fixed"], pair["moving"])
    warped = warp(pair["moving_labels"], u)
    dice = soft_dice(warped, pair["fixed_labels"])
    reg = diffusion(u)
    # squared end-point error against the pair's true displacement (voxels^2): a dense signal
    # everywhere, where the label Dice only pulls at label boundaries
    epe2 = ((u - pair["displacement"]) ** 2).sum(1).mean()
    loss = 1 - dice + lam * reg + supervised * epe2
    return loss, {"dice": float(dice.detach()), "reg": float(reg.detach()), "epe_rms": float(epe2.detach().sqrt())}


def _segmentation_step(net, sample):
    image, target = sample
    logits = net(image)
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)
    onehot = F.one_hot(target, prob.shape[1]).movedim(-1, 1).float()
    dice = soft_dice(prob, onehot)
    return ce + 1 - dice, {"dice": float(dice.detach()), "ce": float(ce.detach())}


@torch.no_grad()
def _validate(kind, net, synth, count=4) -> dict:
    """Fixed synthetic validation pairs (their own seed, never seen in training)."""
    net.eval()
    gen = torch.Generator().manual_seed(987654)
    before, after, folding, epe, epe_before = [], [], [], [], []
    for _ in range(count):
        if kind == "registration":
            pair = synth(gen)
            _, u = net.displacement(pair["fixed"], pair["moving"])
            before.append(float(soft_dice(pair["moving_labels"], pair["fixed_labels"])))
            after.append(float(soft_dice(warp(pair["moving_labels"], u), pair["fixed_labels"])))
            folding.append(float((jacobian_determinant(u) <= 0).float().mean() * 100))
            epe.append(float((u - pair["displacement"]).norm(dim=1).mean()))
            epe_before.append(float(pair["displacement"].norm(dim=1).mean()))
        else:
            image, target = synth.segmentation_sample(gen)
            pred = net(image).argmax(1)
            onehot = F.one_hot(pred, len(TISSUE_CLASSES)).movedim(-1, 1).float()
            after.append(float(soft_dice(onehot, F.one_hot(target, len(TISSUE_CLASSES)).movedim(-1, 1).float())))
    net.train()
    out = {"val_dice": round(sum(after) / len(after), 4)}
    if before:
        out["val_dice_before"] = round(sum(before) / len(before), 4)
        out["val_folding_percent"] = round(sum(folding) / len(folding), 4)
        out["val_end_point_error_voxels"] = round(sum(epe) / len(epe), 4)
        out["val_end_point_error_before_voxels"] = round(sum(epe_before) / len(epe_before), 4)
    return out


def _save(kind, net, opt, step, gen, history, args, started_seconds, metrics) -> None:
    name = MODEL_NAMES[kind]
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / f"{name}_state.pt"
    tmp = state_path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "generator": gen.get_state(), "history": history, "seconds": started_seconds}, tmp)
    os.replace(tmp, state_path)
    curve = [[h[0], round(h[1], 4), round(h[2], 4)] for h in history[-40:]]
    training_data = (
        "synthetic pairs (SynthMorph-style) from label maps: MNI152 tissue masks, AAL, JHU white matter, "
        f"Harvard-Oxford cortical, NatBrainLab, procedural random label maps; {args.spacing:g} mm grid, "
        f"{args.shape[0]}x{args.shape[1]}x{args.shape[2]} crops"
        if kind == "registration" else
        "synthetic images (random contrasts) from MNI152 tissue masks with AAL/JHU sub-labels; target tissue class"
    )
    models.save_model(
        net, args.out_dir, name, _arguments(net), training_data,
        command=f"python -m meddl.registration.train --model {kind} --spacing {args.spacing:g} "
                f"--shape {' '.join(str(n) for n in args.shape)} --features {' '.join(str(f) for f in net.features)} "
                + (f"--correlation-radius {net.correlation_radius} " if kind == "registration" else "") +
                f"--max-velocity {args.max_velocity:g} --p-same-contrast {args.p_same_contrast:g} "
                f"--lr {args.lr:g} --lam {args.lam:g} --supervised {args.supervised:g} "
                f"--affine {' '.join(f'{a:g}' for a in args.affine)} --resume",
        metrics={"step": step, **metrics},
        spacing_mm=args.spacing, steps_trained=step, training_seconds=round(started_seconds, 1),
        loss_curve_step_loss_dice=curve, classes=list(TISSUE_CLASSES) if kind == "segmentation" else None,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meddl.registration.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(MODEL_NAMES), default="registration")
    p.add_argument("--resume", action="store_true", help="continue from --state-dir or the bundled weights")
    p.add_argument("--hours", type=float, default=2.0, help="stop after this much wall time")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48))
    p.add_argument("--spacing", type=float, default=4.0, help="training grid spacing (mm) of the label maps")
    p.add_argument("--features", type=int, nargs="+")
    p.add_argument("--correlation-radius", type=int, default=2,
                   help="registration network: largest matching offset (voxels) of its cost volume; 0 stacks "
                        "the two images into a plain U-Net")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=1.0, help="diffusion regulariser weight")
    p.add_argument("--supervised", type=float, default=0.1,
                   help="weight of the squared end-point error against the synthetic pair's true displacement")
    p.add_argument("--affine", type=float, nargs=3, default=(2.0, 0.02, 1.0), metavar=("DEG", "SCALE", "SHIFT"),
                   help="largest random rotation (degrees), scaling and shift (voxels) of each image")
    p.add_argument("--max-velocity", type=float, default=3.0, help="largest random velocity std (voxels)")
    p.add_argument("--p-same-contrast", type=float, default=0.5,
                   help="probability that a pair shares its random contrast (else independent, SynthMorph)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=20261122)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--out-dir", default=str(models.models_dir()))
    p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    p.add_argument("--log", default=None, help="log file (default: stderr)")
    p.add_argument("--procedural-only", action="store_true",
                   help="random label maps only (no atlases; for quick checks)")
    args = p.parse_args(argv)

    logging.basicConfig(filename=args.log, level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    kind = args.model
    name = MODEL_NAMES[kind]
    net = _build(kind, args)
    gen = torch.Generator().manual_seed(args.seed)
    step, history, seconds = 0, [], 0.0
    state_path = Path(args.state_dir) / f"{name}_state.pt"
    opt_state = None
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        try:
            net.load_state_dict(state["model"])
        except RuntimeError as exc:
            p.error(f"--resume: the training state in {state_path} is of another network than these options "
                    f"build ({str(exc).splitlines()[0][:120]}); give the options it was trained with")
        opt_state = state["optimizer"]
        gen.set_state(state["generator"])
        step, history, seconds = int(state["step"]), list(state["history"]), float(state["seconds"])
        log.info("resumed %s from %s at step %d", name, state_path, step)
    elif args.resume and (Path(args.out_dir) / f"{name}.pt").is_file():
        loaded, card = models.load_model(name, Path(args.out_dir) / f"{name}.pt")
        net = loaded  # the card's architecture (its own arguments), whatever the options here say
        step = int(card.metrics.get("step", 0))
        history = [list(h) for h in card.extra.get("loss_curve_step_loss_dice", [])]
        seconds = float(card.extra.get("training_seconds", 0.0))
        gen.manual_seed(args.seed + step)
        log.info("resumed %s from bundled weights at step %d (fresh optimiser)", name, step)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    net.train()
    if args.procedural_only and kind == "segmentation":
        p.error("--procedural-only: the segmentation model needs the atlas tissue maps")
    sources = [] if args.procedural_only else label_sources(args.spacing)
    synth = SynthPairs(sources, tuple(args.shape), max_velocity_std=args.max_velocity,
                       p_same_contrast=args.p_same_contrast, affine=tuple(args.affine))
    start = time.perf_counter()
    last_ckpt = start
    window: list[tuple[float, float]] = []
    while step < args.max_steps and time.perf_counter() - start < args.hours * 3600:
        t0 = time.perf_counter()
        if kind == "registration":
            loss, facts = _registration_step(net, synth(gen), args.lam, args.supervised)
        else:
            loss, facts = _segmentation_step(net, synth.segmentation_sample(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        step += 1
        window.append((float(loss.detach()), facts["dice"]))
        if step % 25 == 0:
            mean_loss = sum(w[0] for w in window) / len(window)
            mean_dice = sum(w[1] for w in window) / len(window)
            history.append([step, mean_loss, mean_dice])
            window.clear()
            log.info("step %d loss %.4f dice %.4f (%s) %.2f s/step", step, mean_loss, mean_dice,
                     json.dumps({k: round(v, 4) for k, v in facts.items()}), time.perf_counter() - t0)
        now = time.perf_counter()
        if now - last_ckpt > args.checkpoint_minutes * 60:
            metrics = _validate(kind, net, synth)
            _save(kind, net, opt, step, gen, history, args, seconds + now - start, metrics)
            log.info("checkpoint step %d %s", step, json.dumps(metrics))
            last_ckpt = time.perf_counter()
    metrics = _validate(kind, net, synth)
    _save(kind, net, opt, step, gen, history, args, seconds + time.perf_counter() - start, metrics)
    log.info("finished at step %d %s", step, json.dumps(metrics))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
