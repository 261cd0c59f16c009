"""Train the in-context network on synthetic multi-task data (resumable, CPU friendly).

    python -m meddl.incontext.train --minutes 120            # fresh run
    python -m meddl.incontext.train --resume --minutes 120   # continue from Resources/models

Every ``--save-minutes`` the weights and their card go to ``Resources/models/NAME.pt/.json``
(via :func:`meddl.models.save_model`) with the step count, the running loss and the Dice on
held-out structures; the optimiser state goes to ``--state`` (a scratch file, optional on resume:
without it Adam restarts its moment estimates).

Losses as in Neuralizer: soft Dice for masks (plus binary cross-entropy: with Dice alone a small
CPU run collapses to "everything is foreground"), MSE / (2 sigma^2) with sigma^2 = 0.05 for images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from .network import InContextNet

__all__ = ["soft_dice_loss", "task_loss", "fit", "evaluate_dice", "main", "DEFAULT_NAME"]

DEFAULT_NAME = "incontext_brain2d"
SIGMA2 = 0.05


def soft_dice_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``1 - soft Dice`` per item: ``(B, 1, H, W)`` logits and truth -> ``(B,)``."""
    p = torch.sigmoid(logits).flatten(1)
    t = truth.flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1e-3) / (p.sum(1) + t.sum(1) + 1e-3)


def task_loss(pred: torch.Tensor, truth: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of soft Dice + BCE (mask items) and MSE / (2 sigma^2) (image items)."""
    bce = F.binary_cross_entropy_with_logits(pred, truth, reduction="none").flatten(1).mean(1)
    dice = soft_dice_loss(pred, truth) + bce
    mse = ((pred - truth) ** 2).flatten(1).mean(1) / (2 * SIGMA2)
    return torch.where(is_mask, dice, mse).mean()


def fit(net: InContextNet, sample: Callable[[int], object], steps: int, lr: float = 1e-3,
        optimizer: torch.optim.Optimizer | None = None, log: Callable[[int, float], None] | None = None,
        stop: Callable[[], bool] | None = None, start_step: int = 0) -> tuple[int, float]:
    """Adam on ``sample(step) -> Batch`` for ``steps`` steps (or until ``stop()``); returns
    ``(last step, running loss)``."""
    opt = optimizer or torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    running = math.nan
    step = start_step
    for step in range(start_step + 1, start_step + steps + 1):
        b = sample(step)
        pred = net(b.target, b.context_in, b.context_out)
        loss = task_loss(pred, b.truth, b.is_mask)
        if not torch.isfinite(loss):  # a degenerate task draw: skip it rather than poison Adam's moments
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
        if log is not None:
            log(step, running)
        if stop is not None and stop():
            break
    net.eval()
    return step, running


@torch.no_grad()
def evaluate_dice(net: InContextNet, batches: list) -> float:
    """Mean hard Dice (threshold 0.5) over single-item mask batches."""
    net.eval()
    scores = []
    for b in batches:
        p = (torch.sigmoid(net(b.target, b.context_in, b.context_out)) > 0.5).float()
        t = b.truth
        denom = float(p.sum() + t.sum())
        scores.append(1.0 if denom == 0 else float(2 * (p * t).sum()) / denom)
    return float(sum(scores) / max(len(scores), 1))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meddl.incontext.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--out", default=None, help="models folder (default: Resources/models)")
    p.add_argument("--resume", action="store_true", help="continue from the saved weights and card")
    p.add_argument("--minutes", type=float, default=120.0, help="wall-time budget of this run")
    p.add_argument("--steps", type=int, default=10**9, help="step budget of this run")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-context", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--features", default="16,32,48,64,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-minutes", type=float, default=5.0)
    p.add_argument("--bank", default="/tmp/incontext_bank96.npz", help="cache of the slice bank")
    p.add_argument("--state", default=None, help="optimiser state file (default: /tmp/NAME.optim.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scans", type=float, default=0.0,
                   help="share of segmentation tasks whose context imitates other scans (same position, each "
                        "pair with its own warp and intensities) instead of nearby slices of one scan")
    p.add_argument("--copies", type=float, default=0.0,
                   help="share of batches drawn with 1 to 3 context pairs completed to --copies-to by deformed "
                        "copies, as `meddl segment` completes a small context (SegmentConfig.augment)")
    p.add_argument("--copies-to", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    from .. import models
    from . import tasks

    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else models.models_dir()
    state_path = Path(args.state or f"/tmp/{args.name}.optim.pt")
    features = [int(f) for f in args.features.split(",")]
    arguments = {"in_channels": 2, "out_channels": 1, "features": features}
    history: dict = {"steps": 0, "seconds": 0.0, "runs": []}
    if args.resume:
        net, card = models.load_model(args.name, out / f"{args.name}.pt")
        arguments = card.arguments
        history = card.extra.get("training", history)
        args.size = history.get("size", args.size)
    else:
        torch.manual_seed(args.seed)
        net = InContextNet(**arguments)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    if args.resume and state_path.is_file():
        saved = torch.load(state_path, weights_only=True)
        if saved.get("step") == history["steps"]:
            opt.load_state_dict(saved["optimizer"])
            for group in opt.param_groups:  # the saved state carries the old rate: --lr of this run wins
                group["lr"] = args.lr
    bank = tasks.build_bank(args.size, args.bank)
    val = tasks.validation_tasks(bank, 24, context=4)
    val1 = tasks.validation_tasks(bank, 24, context=1)
    scans1 = tasks.validation_tasks(bank, 24, context=1, scans=True)
    scans8 = tasks.validation_tasks(bank, 24, context=8, scans=True)
    scans1c = tasks.validation_tasks(bank, 24, context=1, scans=True, copies_to=16)
    start = history["steps"]
    g = torch.Generator().manual_seed(args.seed * 1000003 + start)
    t0 = time.time()
    budget = args.minutes * 60
    last_save = [time.time()]
    done = [start]
    log_every = 20

    def sample(step: int):
        if args.copies and torch.rand(1, generator=g).item() < args.copies:
            ctx = int(torch.randint(1, 4, (1,), generator=g))
            return tasks.with_copies(tasks.sample_batch(bank, args.batch, ctx, g, scans=args.scans),
                                     args.copies_to, g)
        ctx = int(torch.randint(1, args.max_context + 1, (1,), generator=g))
        return tasks.sample_batch(bank, args.batch, ctx, g, scans=args.scans)

    def save(step: int, running: float) -> None:
        d4, d1 = evaluate_dice(net, val), evaluate_dice(net, val1)
        s1, s8, s1c = evaluate_dice(net, scans1), evaluate_dice(net, scans8), evaluate_dice(net, scans1c)
        net.train()
        elapsed = history["seconds"] + (time.time() - t0)
        training = {**history, "steps": step, "seconds": round(elapsed, 1), "size": args.size,
                    "batch": args.batch, "max_context": args.max_context, "lr": args.lr, "scans": args.scans,
                    "copies": args.copies}
        loss = None if math.isnan(running) else round(running, 4)  # unknown after an interrupt
        metrics = {"train_loss_ema": loss, "val_dice_heldout_context4": round(d4, 4),
                   "val_dice_heldout_context1": round(d1, 4), "val_dice_heldout_scans_context1": round(s1, 4),
                   "val_dice_heldout_scans_context8": round(s8, 4),
                   "val_dice_heldout_scans_context1_copies16": round(s1c, 4)}
        models.save_model(
            net, out, args.name, arguments,
            training_data={
                "description": "synthetic multi-task 2D slices (size x size, all three axes) from meddl.data "
                               "samples on the MNI152 2 mm grid: label subsets of AAL, Harvard-Oxford cortical, "
                               "JHU white matter, natbrainlab, MNI152 brain/grey-matter masks and procedural "
                               "shapes with synthetic contrasts or real T1; denoising, skull stripping, bias, "
                               "inpainting and super-resolution of MNI152/Colin27 T1",
                "held_out_structures": {**bank.held_out, "mni152": ["mni152_wm_mask"]},
                "held_out_rule": "every fifth non-zero label of each atlas (3rd, 8th, ...) and the MNI152 "
                                 "white-matter mask: never a training target",
            },
            command=f"python -m meddl.incontext.train --resume --minutes {args.minutes:g} --lr {args.lr:g}"
                    + (f" --scans {args.scans:g}" if args.scans else "")
                    + (f" --copies {args.copies:g} --copies-to {args.copies_to}" if args.copies else ""),
            metrics=metrics,
            training=training,
            input_size=args.size,
        )
        torch.save({"step": step, "optimizer": opt.state_dict()}, state_path)
        print(json.dumps({"saved": step, **metrics, "seconds": round(elapsed)}), flush=True)
        last_save[0] = time.time()

    def log(step: int, running: float) -> None:
        done[0] = step
        if step % log_every == 0:
            rate = (time.time() - t0) / max(step - start, 1)
            print(f"step {step} loss {running:.4f} {rate:.2f}s/step", flush=True)
        if time.time() - last_save[0] > args.save_minutes * 60:
            save(step, running)

    def stop() -> bool:
        return time.time() - t0 > budget

    history.setdefault("runs", []).append({"start_step": start, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           "lr": args.lr, "threads": args.threads, "scans": args.scans,
                                           "copies": args.copies})
    try:
        step, running = fit(net, sample, args.steps, optimizer=opt, log=log, stop=stop, start_step=start)
    except KeyboardInterrupt:
        step, running = done[0], math.nan
    save(step, running)
    return 0


if __name__ == "__main__":
    sys.exit(main())
