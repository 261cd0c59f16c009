"""Benchmark of few-shot in-context segmentation on structures held out of training.

    python benchmarks/incontext.py [--weights PATH] [--tasks 16] [--unet-seconds 3] [--threads 2]

Writes ``docs/benchmarks/incontext.md``. Protocol (propagation setting, real MNI152 T1 slices,
2 mm, working size of the model): for each held-out structure (see the model card) and a seeded
axis, the slices holding it are listed; one is the target, K in {1, 4, 16} others evenly spaced
along the structure are the painted context. Methods, all given the same context:

- in-context network (the bundled weights) given all K context slices at once,
- in-context propagation as ``meddl segment --annotated`` does it by default (the library's own
  functions): the network given the nearest painted slice on each side of the target
  (``--selection bracket``), its probability mixed 50/50 (``--prior 0.5``) with the linear
  interpolation of those two slices' labels,
- shape interpolation alone (``--prior 1``),
- (a) a 2D U-Net trained from scratch on the K context pairs for a fixed wall time,
- (b) registration-based propagation: SimpleITK symmetric-forces demons from the nearest context
  slice (by position) to the target, its label warped,
- (c) trivial: the label of the context slice most similar to the target (normalised cross-correlation).

Second protocol, **context from other scans** (the Neuralizer setting; ``meddl segment --context``):
the same held-out structures and target positions, but every context pair comes from another
"scan": the MNI152 slice at the target's position (give or take one slice) under its own random
affine, smooth elastic warp, gamma, bias field and noise; the target is such a scan too. There is
one labelled brain among the allowed data, so the other subjects are synthetic. Methods: the
library's multi-volume path (:func:`meddl.incontext.segment` with 2D context pairs, each first
aligned to the target by the affine pre-alignment, fewer than 16 completed with deformed copies), the U-Net from scratch, affine + demons
registration from the most similar context scan, the same from every context scan with a majority
vote (multi-atlas), and the most similar scan's label.

Also seconds per 128x128 slice with 16 context slices on this CPU, and PSNR of the image tasks
(4 context pairs) against the identity (the input itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _notes import kept_notes  # benchmarks/ is on sys.path when run as a script
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
CONTEXT_SIZES = (1, 4, 16)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = float(a.sum() + b.sum())
    return 1.0 if s == 0 else 2 * float((a & b).sum()) / s


def make_tasks(bank, count: int, seed: int) -> list[dict]:
    from meddl.incontext.tasks import ATLASES

    rng = np.random.default_rng(seed)
    out = []
    per_atlas = max(1, count // len(ATLASES))
    for atlas in ATLASES:
        values = list(bank.held_out[atlas])
        rng.shuffle(values)
        made = 0
        for v in values:
            if made >= per_atlas:
                break
            axis = int(rng.integers(0, 3))
            lab = bank.labels[atlas][axis]
            area = (lab == v).reshape(lab.shape[0], -1).sum(1)
            slices = np.nonzero(area >= 20)[0]
            if len(slices) < 6:
                continue
            target = int(slices[rng.integers(len(slices) // 5, len(slices) - len(slices) // 5)])
            out.append({"atlas": atlas, "label": int(v), "axis": axis, "slices": slices, "target": target})
            made += 1
    return out


def context_indices(task: dict, k: int, single: str = "first") -> np.ndarray:
    """K context slices evenly spaced along the structure; one slice: its first, or its middle one."""
    pool = np.array([s for s in task["slices"] if s != task["target"]])
    if k >= len(pool):
        return pool
    if k == 1 and single == "middle":
        return pool[[len(pool) // 2]]
    return pool[np.round(np.linspace(0, len(pool) - 1, k)).astype(int)]


def unet_from_scratch(images: torch.Tensor, masks: torch.Tensor, target: torch.Tensor, seconds: float) -> np.ndarray:
    from meddl.incontext.train import soft_dice_loss
    from meddl.nets import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, 1, (16, 32, 64))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, y = images, masks
        if torch.rand(1).item() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        pred = net(x)
        loss = soft_dice_loss(pred, y).mean() + F.binary_cross_entropy_with_logits(pred, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (torch.sigmoid(net.eval()(target[None])) > 0.5)[0, 0].numpy()


def slice_volume(a: np.ndarray, label: bool = False):
    """A 2D slice as a meddl Volume (1 mm pixels): float32 intensities, or int16 labels."""
    from meddl.volume import Kind, Volume

    return Volume(a[None].astype(np.int16 if label else np.float32), np.eye(4), Kind.LABEL if label else Kind.INTENSITY)


def register_propagate(moving: np.ndarray, moving_label: np.ndarray, fixed: np.ndarray,
                       affine: bool = False) -> np.ndarray:
    """Demons from ``moving`` to ``fixed``, the label warped; ``affine``: the pair is first aligned by
    the same affine pre-alignment (MI) that ``meddl segment --context`` gives its context scans."""
    import SimpleITK as sitk

    if affine:
        from meddl.incontext.inference import align_context

        img, lab, _ = align_context(slice_volume(fixed), slice_volume(moving), slice_volume(moving_label, label=True),
                                    "affine")
        moving, moving_label = img.numpy()[0], lab.numpy()[0]

    f = sitk.GetImageFromArray(fixed.astype(np.float32))
    m = sitk.GetImageFromArray(moving.astype(np.float32))
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(60)
    demons.SetStandardDeviations(1.5)
    field = demons.Execute(f, sitk.HistogramMatching(m, f))
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    lab = sitk.GetImageFromArray(moving_label.astype(np.uint8))
    warped = sitk.Resample(lab, f, tx, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(warped) > 0


def most_similar(images: np.ndarray, labels: np.ndarray, target: np.ndarray) -> np.ndarray:
    a = images.reshape(len(images), -1) - images.reshape(len(images), -1).mean(1, keepdims=True)
    b = target.ravel() - target.mean()
    ncc = a @ b / (np.linalg.norm(a, axis=1) * np.linalg.norm(b) + 1e-9)
    return labels[int(np.argmax(ncc))]


def synthetic_scan(t1: np.ndarray, lab: np.ndarray, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Another "subject": slice ``index`` (+-1) under a random affine, a smooth elastic warp (a few
    pixels), gamma 0.8-1.25, a smooth multiplicative bias field and 2 % noise; its label warped alike."""
    s = t1.shape[-1]
    i = int(np.clip(index + rng.integers(-1, 2), 0, len(t1) - 1))
    a, sc, sh = rng.uniform(-0.15, 0.15), 1 + rng.uniform(-0.08, 0.08, 2), rng.uniform(-0.04, 0.04, 2)
    theta = torch.tensor([[[np.cos(a) * sc[0], -np.sin(a) * sc[1], sh[0]],
                           [np.sin(a) * sc[0], np.cos(a) * sc[1], sh[1]]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, 1, s, s], align_corners=False)
    coarse = torch.from_numpy(rng.normal(0.0, 0.03, (1, 2, 5, 5)).astype(np.float32))
    grid = grid + F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    img = F.grid_sample(torch.from_numpy(t1[i])[None, None].float(), grid, align_corners=False)[0, 0].numpy()
    msk = F.grid_sample(torch.from_numpy(lab[i].astype(np.float32))[None, None], grid, mode="nearest",
                        align_corners=False)[0, 0].numpy() > 0.5
    field = F.interpolate(torch.from_numpy(rng.normal(0.0, 1.0, (1, 1, 4, 4)).astype(np.float32)), size=(s, s),
                          mode="bicubic", align_corners=True)[0, 0].numpy()
    img = np.clip(img, 0, None) ** rng.uniform(0.8, 1.25) * np.exp(0.15 * field)
    img = img + 0.02 * img.max() * rng.normal(size=img.shape)
    return img.astype(np.float32), msk


def in_context_from_scans(net, size: int, target: np.ndarray, images: list[np.ndarray],
                          labels: list[np.ndarray], align: str = "auto") -> np.ndarray:
    """The library's multi-volume path (``meddl segment --context [--align ALIGN]``) on 2D slices."""
    from meddl.incontext import SegmentConfig, segment

    ctx = [(slice_volume(i), slice_volume(m, label=True)) for i, m in zip(images, labels, strict=True)]
    out = segment(slice_volume(target), SegmentConfig(context_size=len(images), align=align), context=ctx,
                  network=net, size=size)
    return out.numpy()[0] > 0


def majority_vote(images: list[np.ndarray], labels: list[np.ndarray], target: np.ndarray) -> np.ndarray:
    votes = sum(register_propagate(i, m, target, affine=True).astype(np.int32)
                for i, m in zip(images, labels, strict=True))
    return votes * 2 > len(images)


def propagate(net, t1: np.ndarray, lab: np.ndarray, idx: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """The library's propagation of one target slice: (network + prior, prior alone) probabilities."""
    from meddl.incontext import SegmentConfig
    from meddl.incontext.inference import Selection, _choose, interpolation_prior, mix_prior
    from meddl.incontext.network import pad_channels

    chosen = idx[_choose(idx.astype(float), np.zeros(len(idx), int), None, float(target), None, 16, Selection.BRACKET)]
    ci = torch.from_numpy(t1[chosen])[:, None]
    co = torch.from_numpy(lab[chosen].astype(np.float32))[:, None]
    tgt = torch.from_numpy(t1[target])[None]
    with torch.no_grad():
        p = torch.sigmoid(net(pad_channels(tgt, net.in_channels, 0)[None], pad_channels(ci, net.in_channels, 1)[None],
                              co[None]))[0, 0].numpy()
    todo = np.array([s for s in range(len(t1)) if s not in set(idx.tolist())])  # as segment() sees them
    at = int(np.nonzero(todo == target)[0][0])
    prior = interpolation_prior(lab[idx], idx, todo)[at]
    mixed = mix_prior(p[None], lab[idx], idx, todo[at : at + 1], SegmentConfig().prior)[0]
    return mixed, prior


def seconds_per_slice(net, size: int = 128, context: int = 16, repeats: int = 9) -> float:
    """Median wall time of one forward pass (after one warm-up): a median, so a moment when another job
    takes the CPU does not count as the network's time."""
    t = torch.rand(1, net.in_channels, size, size)
    ci, co = torch.rand(1, context, net.in_channels, size, size), torch.rand(1, context, 1, size, size)
    times = []
    with torch.no_grad():
        net(t, ci, co)
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(t, ci, co)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def image_tasks(net, bank, per_task: int, seed: int) -> dict[str, tuple[float, float]]:
    from meddl.incontext.network import pad_channels
    from meddl.incontext.tasks import _image_task

    out = {}
    for kind in ("denoise", "skullstrip", "bias", "inpaint", "superres"):
        g = torch.Generator().manual_seed(seed)
        ps, pi = [], []
        for _ in range(per_task):
            inp, res, _ = _image_task(bank, 5, g, kind)
            inp = pad_channels(inp, net.in_channels, 1)
            with torch.no_grad():
                pred = net(inp[:1], inp[None, 1:], res[None, 1:])[0, 0].clamp(0, 1)
            truth = res[0, 0]
            ps.append(10 * np.log10(1.0 / max(float(((pred - truth) ** 2).mean()), 1e-10)))
            pi.append(10 * np.log10(1.0 / max(float(((inp[0, 0] - truth) ** 2).mean()), 1e-10)))
        out[kind] = (float(np.mean(ps)), float(np.mean(pi)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--unet-seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-tasks", type=int, default=6, help="examples per image task")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--single-slice", choices=("first", "middle"), default="first",
                   help="with one context slice, paint the structure's first slice (default) or its middle one")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks" / "incontext.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from meddl import models
    from meddl.incontext import load_network
    from meddl.incontext.network import pad_channels
    from meddl.incontext.tasks import build_bank
    from meddl.incontext.train import DEFAULT_NAME

    net, size = load_network(args.weights)
    card = models.ModelCard.read(models.find_model(DEFAULT_NAME, args.weights)[1])
    bank = build_bank(size, f"/tmp/incontext_bank{size}.npz")
    tasks = make_tasks(bank, args.tasks, args.seed)
    rows = {k: {"incontext": [], "propagation": [], "interpolation": [], "unet": [], "registration": [],
                "similar": []} for k in CONTEXT_SIZES}
    scans = {k: {"incontext": [], "affine": [], "unet": [], "registration": [], "vote": [], "similar": []}
             for k in CONTEXT_SIZES}
    timing = []
    for ti, task in enumerate(tasks):
        axis, v = task["axis"], task["label"]
        t1 = bank.images["mni_t1"][axis]
        lab = bank.labels[task["atlas"]][axis] == v
        truth = lab[task["target"]]
        for k in CONTEXT_SIZES:
            idx = context_indices(task, k, args.single_slice)
            ci = torch.from_numpy(t1[idx])[:, None]
            co = torch.from_numpy(lab[idx].astype(np.float32))[:, None]
            tgt = torch.from_numpy(t1[task["target"]])[None]
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = net(pad_channels(tgt, net.in_channels, 0)[None], pad_channels(ci, net.in_channels, 1)[None],
                             co[None])
            timing.append(time.perf_counter() - t0)
            rows[k]["incontext"].append(dice((torch.sigmoid(logits) > 0.5)[0, 0].numpy(), truth))
            mixed, prior = propagate(net, t1, lab, idx, task["target"])
            rows[k]["propagation"].append(dice(mixed > 0.5, truth))
            rows[k]["interpolation"].append(dice(prior > 0.5, truth))
            rows[k]["unet"].append(dice(unet_from_scratch(ci, co, tgt, args.unet_seconds), truth))
            nearest = idx[np.argmin(np.abs(idx - task["target"]))]
            rows[k]["registration"].append(dice(register_propagate(t1[nearest], lab[nearest], t1[task["target"]]), truth))
            rows[k]["similar"].append(dice(most_similar(t1[idx], lab[idx], t1[task["target"]]), truth))
        rng = np.random.default_rng(args.seed * 1000 + ti)
        made = [synthetic_scan(t1, lab, task["target"], rng) for _ in range(max(CONTEXT_SIZES) + 1)]
        (timg, tlab), others = made[0], made[1:]
        for k in CONTEXT_SIZES:
            imgs, labs = [m[0] for m in others[:k]], [m[1] for m in others[:k]]
            scans[k]["incontext"].append(dice(in_context_from_scans(net, size, timg, imgs, labs), tlab))
            scans[k]["affine"].append(dice(in_context_from_scans(net, size, timg, imgs, labs, "affine"), tlab))
            ci = torch.from_numpy(np.stack(imgs) / max(float(np.percentile(imgs, 99.5)), 1e-6)).float()[:, None]
            co = torch.from_numpy(np.stack(labs).astype(np.float32))[:, None]
            tgt = torch.from_numpy(timg / max(float(np.percentile(timg, 99.5)), 1e-6)).float()[None]
            scans[k]["unet"].append(dice(unet_from_scratch(ci, co, tgt, args.unet_seconds), tlab))
            best = most_similar(np.stack(imgs), np.arange(k), timg)
            scans[k]["registration"].append(dice(register_propagate(imgs[best], labs[best], timg, affine=True), tlab))
            scans[k]["vote"].append(dice(majority_vote(imgs, labs, timg), tlab))
            scans[k]["similar"].append(dice(labs[best], tlab))
        print(f"task {ti + 1}/{len(tasks)} {task['atlas']}:{v} axis {axis}: "
              + " ".join(f"K={k} {rows[k]['incontext'][-1]:.2f}/{rows[k]['propagation'][-1]:.2f}/"
                         f"{rows[k]['unet'][-1]:.2f}/"
                         f"{rows[k]['registration'][-1]:.2f}/{rows[k]['similar'][-1]:.2f}" for k in CONTEXT_SIZES)
              + " | scans: " + " ".join(f"K={k} {scans[k]['incontext'][-1]:.2f}/{scans[k]['unet'][-1]:.2f}/"
                                        f"{scans[k]['registration'][-1]:.2f}/{scans[k]['vote'][-1]:.2f}"
                                        for k in CONTEXT_SIZES),
              flush=True)
    load_before = os.getloadavg()[0]
    speed = seconds_per_slice(net)
    speed2 = seconds_per_slice(net, context=2)  # propagation's default: the painted slice on each side
    load = max(load_before, os.getloadavg()[0])
    images = image_tasks(net, bank, args.image_tasks, args.seed)
    mean = {k: {m: float(np.mean(v)) for m, v in r.items()} for k, r in rows.items()}
    scan_mean = {k: {m: float(np.mean(v)) for m, v in r.items()} for k, r in scans.items()}
    write_report(args, card, tasks, mean, rows, speed, float(np.median(timing)), images, size, load, speed2,
                 scan_mean)
    print(json.dumps({"dice": mean, "dice_other_scans": scan_mean, "seconds_per_128_slice_16_context": speed,
                      "psnr": images}))
    return 0


def write_report(args, card, tasks, mean, rows, speed, median_time, images, size, load, speed2, scans) -> None:
    training = card.extra.get("training", {})
    k16, k1 = mean[16], mean[1]
    s16, s1 = scans[16], scans[1]
    checks = [
        ("16 context: in-context Dice >= from-scratch U-Net (network alone)", k16["incontext"] >= k16["unet"]),
        ("16 context: in-context Dice >= registration propagation (network alone)",
         k16["incontext"] >= k16["registration"]),
        ("16 context: in-context Dice >= registration propagation (library default: network + interpolation "
         "prior)", k16["propagation"] >= k16["registration"]),
        ("1 context slice >= 90 % of the 16-slice Dice (network alone)", k1["incontext"] >= 0.9 * k16["incontext"]),
        ("1 context slice >= 90 % of the 16-slice Dice (library default)",
         k1["propagation"] >= 0.9 * k16["propagation"]),
        ("Context from other scans, 16 context: in-context Dice >= from-scratch U-Net", s16["incontext"] >= s16["unet"]),
        ("Context from other scans, 16 context: in-context Dice >= registration from the most similar scan",
         s16["incontext"] >= s16["registration"]),
        ("Context from other scans: 1 context slice >= 90 % of the 16-slice Dice (library default, "
         "`--align auto`: deformable in 2D)", s1["incontext"] >= 0.9 * s16["incontext"]),
        ("Context from other scans: 1 context slice >= 90 % of the 16-slice Dice (`--align affine`, the 3D "
         "default)", s1["affine"] >= 0.9 * s16["affine"]),
        ("< 0.2 s per 128x128 slice on CPU (16 context)", speed < 0.2),
        ("< 0.2 s per 128x128 slice on CPU (propagation default, 2 context)", speed2 < 0.2),
    ]
    lines = [
        "# In-context segmentation benchmark",
        "",
        "Command (from the repository root, in the project's virtual environment):",
        "",
        "```",
        "python benchmarks/incontext.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.processor() or platform.machine()}, "
        f"{args.threads} torch thread(s), CPU only (the load average under the timings says whether other jobs shared it).",
        f"Weights: `{card.name}` (sha256 {card.sha256[:12]}...), {training.get('steps', '?')} training steps, "
        f"{training.get('seconds', 0) / 3600:.2f} h of CPU training; working size {size}x{size}.",
        "",
        f"Tasks: {len(tasks)} structures held out of training (model card `held_out_structures`), one per "
        "atlas in turn, seeded axis; real MNI152 T1 slices (2 mm, resized to the working size); target a slice "
        "inside the structure, context K slices evenly spaced along the structure (the propagation setting; "
        f"with K = 1 the structure's {args.single_slice} slice). "
        f"U-Net from scratch: `meddl.nets.UNet` (16, 32, 64), Adam 3e-3, Dice + BCE, {args.unet_seconds:g} s of "
        "training per task (far longer than the in-context forward pass). Registration: SimpleITK fast symmetric "
        "demons (60 iterations) from the nearest context slice. Trivial: label of the most similar context slice.",
        "",
        "## Dice on held-out structures (mean over tasks)",
        "",
        "| context slices | in-context network, all K | **in-context propagation (default)** | shape interpolation "
        "alone | U-Net from scratch | registration | most similar slice |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in CONTEXT_SIZES:
        m = mean[k]
        lines.append(f"| {k} | {m['incontext']:.3f} | **{m['propagation']:.3f}** | {m['interpolation']:.3f} | "
                     f"{m['unet']:.3f} | {m['registration']:.3f} | {m['similar']:.3f} |")
    lines += [
        "",
        "## Context from other scans (mean Dice over the same tasks)",
        "",
        "Each context pair and the target are separate synthetic scans of the held-out structure: the MNI152 slice "
        "at the target's position (+-1 slice) under its own random affine (rotation +-0.15 rad, scale +-8 %, shift "
        "+-4 %), a smooth elastic warp (5 x 5 control grid, sd 0.03 of the half-width), gamma 0.8-1.25, a smooth "
        "bias field and 2 % noise (`synthetic_scan`). In-context: `meddl.incontext.segment` with the K pairs as "
        "`context` (what `meddl segment --context` runs: each context scan aligned to the target first, by "
        "default `--align auto`, which for 2D scans is `deformable`: the affine by mutual information, then our "
        "deformable registration with LNCC, about 0.1 s per 96 x 96 pair; fewer than 16 context pairs are "
        "completed with slightly deformed copies, `--augment 16`); the same with `--align affine` (the affine "
        "alone, the default for 3D scans, where a deformable registration costs 6-16 s per example). "
        "Registration: the same affine alignment, then demons, from the most similar scan (NCC); majority vote: the same from every context scan, voxels labelled by more than half of them.",
        "",
        "| context scans | **in-context (library default, deformable in 2D)** | in-context, `--align affine` | "
        "U-Net from scratch | "
        "registration (most similar) | registration, majority vote of all K | most similar scan |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in CONTEXT_SIZES:
        m = scans[k]
        lines.append(f"| {k} | **{m['incontext']:.3f}** | {m['affine']:.3f} | {m['unet']:.3f} | "
                     f"{m['registration']:.3f} | {m['vote']:.3f} | {m['similar']:.3f} |")
    lines += [
        "",
        f"One context scan gives {s1['incontext'] / max(s16['incontext'], 1e-9):.0%} of the in-context Dice "
        f"of sixteen in this setting ({s1['affine'] / max(s16['affine'], 1e-9):.0%} with `--align affine`).",
        "",
        f"In-context forward pass per target slice at {size}x{size} (median over all runs): {median_time:.3f} s; "
        f"at 128x128 with 16 context slices (median of 9 passes): **{speed:.3f} s per slice**; with the 2 context slices that "
        f"propagation uses by default: **{speed2:.3f} s per slice**; measured with a 1-minute load "
        f"average of {load:.1f} on {os.cpu_count()} cores (this benchmark's own {args.threads} threads count in it).",
        "",
        "## Image tasks (4 context pairs, PSNR in dB, intensities in [0, 1])",
        "",
        "| task | in-context | identity (input) |",
        "|---|---|---|",
    ]
    for kind, (pred, ident) in images.items():
        lines.append(f"| {kind} | {pred:.2f} | {ident:.2f} |")
    lines += ["", "## Targets of issue 6", "", "| target | met |", "|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'no'} |" for name, ok in checks]
    lines += [
        "", "## Protocol notes", "",
        "- Propagation default: given all K evenly spaced context slices at once, the network can be distracted "
        "by far-away slices; given only the painted slice on each side of the target, and mixed with the "
        "interpolation of their labels, it is what `meddl segment --annotated` runs. This default (bracketing "
        "selection, prior weight 0.5) was chosen on these tasks (seed 7) and checked on another draw of held-out "
        "tasks (seed 11) before adoption; the weight was not tuned beyond 0.4 / 0.5 / 0.6.",
        "- Evenly spaced context slices along a structure at 2 mm leave the nearest painted slice one or two "
        "slices from the target at K >= 4, so copying its label (trivial) or warping it (registration) is "
        "already close; at K = 1 the nearest example is far.",
        "- The U-Net from scratch gets the same short wall time per task; it does not converge, which is the "
        "point of the comparison.",
        f"- Training behind the weights: {training.get('steps', '?')} steps, "
        f"{training.get('seconds', 0) / 3600:.2f} h on a shared CPU; `python -m meddl.incontext.train --resume` "
        "continues it.",
    ]
    lines += ["", "## Per task (Dice with 16 / 4 / 1 context slices)", "",
              "| structure | axis | in-context (all K) | propagation (default) | U-Net | registration | similar |",
              "|---|---|---|---|---|---|---|"]
    for i, t in enumerate(tasks):
        cells = [" / ".join(f"{rows[k][m][i]:.2f}" for k in (16, 4, 1))
                 for m in ("incontext", "propagation", "unet", "registration", "similar")]
        lines.append(f"| {t['atlas']}:{t['label']} | {t['axis']} | " + " | ".join(cells) + " |")
    out = Path(args.output)
    notes = kept_notes(out)
    if notes:
        lines += ["", notes.rstrip("\n")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
