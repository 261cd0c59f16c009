"""Train the E2E-VarNet on multi-coil k-space simulated from the allowed sample images.

Resumable: the full training state (network, optimiser, step, random state) goes to
``--work-dir`` every ``--save-minutes``; the bundled weights and card
(``Resources/models/reconstruction_varnet.pt/.json``) are written at the same time. Rerunning
the same command continues from the saved step; on a machine without that state it continues
from the bundled weights and their step with a new optimiser (``--from-scratch`` starts over).

Data (SCIENCE.md, issue 4): MNI152 slices (three orientations, the 1 mm template; ``--mni-mm 2``: the
2 mm one upsampled, as the first phases used), dipy's
T1 slice, ITK's PD and T1 brain slices, and Colin27 axial slices outside the held-out blocks
used by ``benchmarks/reconstruction.py`` (:data:`HELD_OUT_COLIN27_Z`). The ITK slices are
BrainWeb slices of the Colin27 anatomy near z = 88-94, away from the held-out blocks.
Per sample: random flips / 90-degree turns / gamma, a random 128 x 128 crop, a smooth random
phase, birdcage coil maps (4-8 coils per batch, random ring radius and rotation), complex
noise, a new equispaced or random mask at 4x or 8x (fastMRI centre fractions), and a k-space
transpose with p = 0.5 (Defazio et al.'s augmentation against banding). Loss: SSIM to the
clean magnitude, Adam with warm-up and cosine decay, gradient clipping.

    python -m meddl.reconstruction.train --steps 4000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import models
from .fft import ifft2c
from .masks import make_mask
from .metrics import ssim_loss
from .simulate import pad_to, scanner_phase, simulate_kspace
from .varnet import VarNet

__all__ = ["HELD_OUT_COLIN27_Z", "BENCHMARK_COLIN27_Z", "training_slices", "make_batch", "main"]

MODEL_NAME = "reconstruction_varnet"
#: Colin27 axial slice indices never used for training (the benchmark's slices sit inside)
HELD_OUT_COLIN27_Z = tuple(range(50, 90)) + tuple(range(106, 146))
#: the slices ``benchmarks/reconstruction.py`` scores
BENCHMARK_COLIN27_Z = (62, 70, 78, 116, 124, 132)
ARCH = {"num_cascades": 6, "chans": 10, "pools": 3, "sens_chans": 4, "sens_pools": 3, "output": "sense"}


def _normalise(img: np.ndarray) -> np.ndarray:
    img = np.clip(img.astype(np.float32), 0, None)
    peak = np.percentile(img, 99.9)
    return np.clip(img / max(peak, 1e-6), 0, 1.2)


def training_slices(mni_mm: int = 1) -> list[np.ndarray]:
    """The 2-D magnitude training images, each scaled to about [0, 1].

    ``mni_mm``: MNI152 slices from the template at its native 1 mm (default), or from the 2 mm
    template upsampled to 1 mm (the first 46,764 training steps: sharp edges were rare in training).
    """
    from scipy.ndimage import zoom

    from ..data import load_sample

    out: list[np.ndarray] = []
    if mni_mm == 1:
        mni = load_sample("mni152_t1_1mm").numpy()[0]
    else:
        mni = zoom(load_sample("mni152_t1").numpy()[0], 2.0, order=1)
    for axis in range(3):
        n = mni.shape[axis]
        for i in range(int(n * 0.2), int(n * 0.8), 4):
            out.append(_normalise(np.take(mni, i, axis=axis)))
    for name in ("dipy_t1_slice", "itk_brain_pd_slice", "itk_brain_t1_slice"):
        out.append(_normalise(load_sample(name).numpy()[0]))
    colin = load_sample("colin27_t1").numpy()[0]
    held = set(HELD_OUT_COLIN27_Z)
    for z in list(range(20, 50, 2)) + list(range(90, 106, 2)) + list(range(146, 160, 2)):
        if z not in held:
            out.append(_normalise(colin[:, :, z]))
    return [s for s in out if (s > 0.1).mean() > 0.15]


def _diversify(img: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """Images unlike the (mostly template, T1, 1 mm) training slices, each change with probability
    ``p``: another voxel size (zoomed by 0.5-1.2: a 2 mm scan shows the anatomy in fewer pixels),
    another contrast (the intensities mapped through a random curve of 6 knots, not necessarily
    monotonic: PD-, T2- or inverted-like, the background kept dark) and the noise of a single scan
    (Rician, 0.5-3 % of the maximum, background included; templates are averages, nearly noiseless)."""
    from scipy.ndimage import zoom

    if rng.uniform() < p:
        img = zoom(img, float(rng.uniform(0.5, 1.2)), order=1)
    if rng.uniform() < p:
        top = float(img.max()) or 1.0
        knots = np.linspace(0.0, top, 6)
        values = rng.uniform(0.0, 1.0, 6)
        values[0] = rng.uniform(0.0, 0.05)
        img = np.interp(img, knots, values).astype(np.float32)
        img = img / max(float(np.percentile(img, 99.9)), 1e-6)
    if rng.uniform() < p:
        sigma = float(rng.uniform(0.005, 0.03)) * float(img.max())
        img = np.hypot(img + rng.normal(0.0, sigma, img.shape), rng.normal(0.0, sigma, img.shape))
    return np.ascontiguousarray(img, dtype=np.float32)


def phantom_maps() -> list[np.ndarray]:
    """Tissue maps ``(4, H, W)`` float16 of MNI152 1 mm slices (every 4th, three orientations): CSF, grey
    and white matter fractions (nilearn's probabilistic templates inside the brain mask) and the distance
    in mm outside the brain, where :func:`phantom` lays the head's layers (the template is skull-stripped)."""
    from nilearn import datasets
    from scipy.ndimage import distance_transform_edt

    def get(name: str) -> np.ndarray:
        return np.asarray(getattr(datasets, name)(resolution=1).get_fdata(), dtype=np.float32)

    gm, wm, brain = (get(n) for n in ("load_mni152_gm_template", "load_mni152_wm_template", "load_mni152_brain_mask"))
    inside = brain > 0.5
    gm, wm = gm * inside, wm * inside
    tissue = np.stack([np.clip(inside - gm - wm, 0, 1), gm, wm])
    out = []
    for axis in range(3):
        n = inside.shape[axis]
        for i in range(int(n * 0.2), int(n * 0.8), 4):
            t = np.take(tissue, i, axis=axis + 1)
            mask = np.take(inside, i, axis=axis)
            if mask.mean() < 0.1:
                continue
            # room for a head of up to 25 mm around the brain
            t = np.pad(t, ((0, 0), (25, 25), (25, 25)))
            dist = distance_transform_edt(~np.pad(mask, 25))
            out.append(np.concatenate([t, dist[None]]).astype(np.float16))
    return out


# tissue intensity ranges (CSF, GM, WM) of the contrasts a phantom takes: T1-, PD- and T2-like
_CONTRASTS = (((0.1, 0.3), (0.4, 0.6), (0.7, 0.9)), ((0.8, 1.0), (0.65, 0.85), (0.5, 0.7)),
              ((0.9, 1.0), (0.4, 0.6), (0.25, 0.45)))


def phantom(maps: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A BrainWeb-like phantom slice from :func:`phantom_maps`: the brain's tissues (hard labels, or the
    fractions as partial volume) and a head of CSF, skull, fat and skin layers of random thickness, in a
    T1-, PD-, T2-like or random contrast, with fine texture; scaled to about [0, 1]."""
    m = maps[int(rng.integers(0, len(maps)))].astype(np.float32)
    f, dist = m[:3], m[3]
    if rng.uniform() < 0.5:  # hard tissue labels: sharp, piecewise-constant edges
        hard = np.zeros_like(f)
        np.put_along_axis(hard, f.argmax(0)[None], 1.0, axis=0)
        f = hard * (f.sum(0) > 0.5)
    kind = int(rng.integers(0, len(_CONTRASTS) + 1))
    brain = [rng.uniform(*r) for r in _CONTRASTS[kind]] if kind < len(_CONTRASTS) else list(rng.uniform(0, 1, 3))
    img = np.tensordot(np.array(brain, np.float32), f, axes=1)
    edges = np.cumsum([rng.uniform(0, 3), rng.uniform(2, 8), rng.uniform(2, 7), rng.uniform(1, 3)])
    layers = (brain[0], rng.uniform(0, 0.15), rng.uniform(0.3, 1.0), rng.uniform(0.2, 0.7))  # CSF skull fat skin
    for (lo, hi), value in zip(zip([0.0, *edges[:-1]], edges, strict=True), layers, strict=True):
        img = np.where((dist > lo) & (dist <= hi), value, img)
    img = img * (1 + rng.uniform(0, 0.05) * rng.standard_normal(img.shape)) * (img > 0)
    return _normalise(img)


def _augment(img: np.ndarray, rng: np.random.Generator, crop: int, diverse: float = 0.0) -> np.ndarray:
    img = np.rot90(img, int(rng.integers(0, 4)))
    if rng.uniform() < 0.5:
        img = img[::-1]
    if diverse > 0:
        img = _diversify(img, rng, diverse)
    img = np.clip(img, 0, None) ** rng.uniform(0.7, 1.4)
    h, w = img.shape
    if h > crop:
        i0 = int(rng.integers(0, h - crop + 1))
        img = img[i0 : i0 + crop]
    if w > crop:
        j0 = int(rng.integers(0, w - crop + 1))
        img = img[:, j0 : j0 + crop]
    return pad_to(np.ascontiguousarray(img), (crop, crop)) * rng.uniform(0.5, 2.0)


def make_batch(
    pool: list[np.ndarray],
    rng: np.random.Generator,
    batch: int = 2,
    crop: int = 128,
    accelerations: tuple[float, ...] = (4.0, 8.0),
    transpose_p: float = 0.5,
    diverse: float = 0.0,
    phantoms: float = 0.0,
    maps: list[np.ndarray] | None = None,
    scanner_phases: float = 0.0,
):
    """One simulated batch: ``(kspace (B, C, H, W) complex64, mask (B, 1, H, W) bool, target (B, H, W))``.

    ``diverse``: probability of each of :func:`_diversify`'s changes (voxel size, contrast, noise);
    ``phantoms``: probability of a :func:`phantom` from ``maps`` instead of a pool slice;
    ``scanner_phases``: probability of :func:`.simulate.scanner_phase` (larger phase, linear ramps) instead of
    the smooth random phase."""
    coils = int(rng.choice([4, 6, 8]))
    ks, ms, ts = [], [], []
    for _ in range(batch):
        use_phantom = phantoms > 0 and maps is not None and rng.uniform() < phantoms
        source = phantom(maps, rng) if use_phantom else pool[int(rng.integers(0, len(pool)))]
        img = _augment(source, rng, crop, diverse)
        if scanner_phases > 0 and rng.uniform() < scanner_phases:  # a complex image keeps its phase
            img = img * np.exp(1j * scanner_phase(img.shape, rng))
        k, _, _ = simulate_kspace(img, coils, rng, noise=float(rng.uniform(0, 0.01)))
        acc = float(rng.choice(accelerations))
        mask = make_mask(str(rng.choice(["equispaced", "random"])), k.shape, acc, seed=rng)
        mask = np.broadcast_to(mask, k.shape[-2:])
        target = np.abs(img).astype(np.float32)
        if rng.uniform() < transpose_p:
            k, mask, target = k.transpose(0, 2, 1), mask.T, target.T
        ks.append(k * mask)
        ms.append(mask)
        ts.append(target)
    return (
        torch.from_numpy(np.stack(ks)),
        torch.from_numpy(np.stack(ms)[:, None].copy()),
        torch.from_numpy(np.stack(ts)),
    )


def _pool(path: str | None, mni_mm: int) -> list[np.ndarray]:
    """The training slices, from ``path`` (.npz) when it exists; built (and written there) otherwise."""
    if path is not None and not str(path).endswith(".npz"):
        path = f"{path}.npz"  # numpy adds the suffix when it writes
    if path is not None and Path(path).is_file():
        with np.load(path) as z:
            return [z[f"s{i}"] for i in range(len(z.files))]
    pool = training_slices(mni_mm)
    if path is not None:
        np.savez_compressed(path, **{f"s{i}": s for i, s in enumerate(pool)})
    return pool


class _Batches(torch.utils.data.IterableDataset):
    """Endless simulated batches; each worker draws from its own seed (seed, first step, worker)."""

    def __init__(self, pool: list[np.ndarray], batch: int, crop: int, seed: int, step: int,
                 diverse: float = 0.0, phantoms: float = 0.0, maps: list[np.ndarray] | None = None,
                 scanner_phases: float = 0.0) -> None:
        self.pool, self.batch, self.crop, self.seed, self.step = pool, batch, crop, seed, step
        self.diverse, self.phantoms, self.maps, self.scanner_phases = diverse, phantoms, maps, scanner_phases

    def __iter__(self):
        torch.set_num_threads(1)
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.step, info.id if info else 0])
        while True:
            yield make_batch(self.pool, rng, self.batch, self.crop, diverse=self.diverse, phantoms=self.phantoms,
                             maps=self.maps, scanner_phases=self.scanner_phases)


def _parallel_batches(pool: list[np.ndarray], args, step: int, maps: list[np.ndarray] | None = None):
    loader = torch.utils.data.DataLoader(_Batches(pool, args.batch, args.crop, args.seed, step, args.diverse,
                                                  args.phantoms, maps, args.scanner_phases),
                                         batch_size=None,
                                         num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                                         prefetch_factor=4, persistent_workers=True)
    return iter(loader)


def _to_cpu(tree):
    """Tensors of a (nested) state dict on the CPU, so that a state saved on a GPU loads anywhere."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 * peak + 0.9 * peak * 0.5 * (1 + np.cos(np.pi * t))


def _validate(net: VarNet, val) -> dict[str, float]:
    net.eval()
    scores: dict[str, list[float]] = {"4x": [], "8x": []}
    zf: dict[str, list[float]] = {"4x": [], "8x": []}
    with torch.no_grad():
        for key, (k, m, t) in val:
            out = net(k, m)
            r = t.amax(dim=(1, 2))
            scores[key].append(1 - float(ssim_loss(out, t, r)))
            zfi = torch.sqrt((ifft2c(k).abs() ** 2).sum(1))
            zf[key].append(1 - float(ssim_loss(zfi, t, r)))
    net.train()
    return {f"val_ssim_{k}": round(float(np.mean(v)), 4) for k, v in scores.items()} | {
        f"val_ssim_zero_filled_{k}": round(float(np.mean(v)), 4) for k, v in zf.items()
    }


def _appended(name: str, first: int) -> bool:
    """Whether a parameter name belongs to cascade ``first`` or a later one."""
    parts = name.split(".")
    return parts[0] == "cascades" and int(parts[1]) >= first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meddl.reconstruction.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="total optimisation steps (the schedule's length)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-minutes", type=float, default=5.0)
    p.add_argument("--work-dir", default=None, help="resume state folder (default: ~/.cache/meddl/train/NAME)")
    p.add_argument("--models-dir", default=None, help="where the weights and card go (default: Resources/models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mni-mm", type=int, choices=(1, 2), default=1,
                   help="MNI152 slices from the native 1 mm template, or the 2 mm one upsampled (earlier phases)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (after saving) after this long")
    p.add_argument("--from-scratch", action="store_true",
                   help="without a saved training state, start from random weights instead of the bundled ones")
    p.add_argument("--device", default="cpu", help="torch device of the network (cpu, cuda, cuda:N)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes simulating batches in parallel (0: in the training process, the batches then "
                        "follow the saved random state exactly)")
    p.add_argument("--diverse", type=float, default=0.0,
                   help="probability of each change towards images unlike the training slices: another voxel "
                        "size, another contrast, single-scan noise (0: none, as every phase before step 62348)")
    p.add_argument("--phantoms", type=float, default=0.0,
                   help="probability of a BrainWeb-like tissue phantom (MNI152 tissue maps, random contrast) "
                        "instead of a training slice (0: none, as every phase before step 62079)")
    p.add_argument("--scanner-phases", type=float, default=0.0,
                   help="probability of a scanner-like phase (up to 3 pi, plus linear ramps of up to 4 cycles) "
                        "instead of the smooth random one (0: none, as every phase before step 62079)")
    p.add_argument("--extend", type=int, default=0,
                   help="append this many gated cascades (starting as the identity) to the bundled network and "
                        "train only them, the rest frozen")
    p.add_argument("--pool", default=None,
                   help="an .npz of the training slices: read it when it exists, else build the slices from the "
                        "sample data and write it (to train on a machine without the sample data)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from ..data import cache_dir

    work = Path(args.work_dir) if args.work_dir else cache_dir() / "train" / MODEL_NAME
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.models_dir) if args.models_dir else models.models_dir()
    state_path = work / "state.pt"
    log = open(work / "train.log", "a")

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    pool = _pool(args.pool, args.mni_mm)
    say(f"{len(pool)} training slices")
    device = torch.device(args.device)
    maps = phantom_maps() if args.phantoms > 0 else None
    step, history, phases = 0, [], []
    rng = np.random.default_rng(args.seed)
    resumed = state_path.is_file()
    state = torch.load(state_path, map_location="cpu", weights_only=False) if resumed else None
    bundled = card = None
    if not resumed and not args.from_scratch and (out_dir / f"{MODEL_NAME}.json").is_file():
        # a new machine has no state file: continue from the committed weights (a fresh optimiser)
        bundled, card = models.load_model(MODEL_NAME, out_dir / f"{MODEL_NAME}.pt")
    # the network: the saved run's; else the bundled one (gated cascades included) with --extend more; else ARCH
    if resumed and "arch" in state:
        arch, first_trained = state["arch"], state["first_trained"]
    else:
        base_extra = int(card.arguments.get("extra_cascades") or 0) if card is not None else 0
        extra = base_extra + args.extend
        arch = dict(ARCH, extra_cascades=extra) if extra else dict(ARCH)
        first_trained = ARCH["num_cascades"] + base_extra if args.extend else None  # None: every weight learns
    net = VarNet(**arch).to(device)
    if resumed:
        net.load_state_dict(state["net"])
        step, history = state["step"], state["history"]
        phases = state.get("phases", [])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        say(f"resumed at step {step}")
    elif card is not None:

        def layers(a: dict) -> dict:  # the output combination holds no weights
            return {k: v for k, v in a.items() if k != "output" and not (k == "extra_cascades" and not v)}

        base = dict(arch, extra_cascades=arch.get("extra_cascades", 0) - args.extend)
        if layers(card.arguments) == layers(base):
            missing, unexpected = net.load_state_dict(bundled.state_dict(), strict=False)
            if unexpected or (missing and (first_trained is None or not all(_appended(k, first_trained)
                                                                             for k in missing))):
                raise SystemExit(f"bundled weights do not fit {arch}: missing {missing[:4]}, extra {unexpected[:4]}")
            step = int(card.extra.get("step") or 0)
            phases = list(card.extra.get("phases", []))
            say(f"no training state in {work}: continuing from the bundled weights at step {step} (new optimiser)")
    if first_trained is not None:  # only the appended cascades learn
        for name, param in net.named_parameters():
            param.requires_grad_(_appended(name, first_trained))
    opt = torch.optim.Adam([q for q in net.parameters() if q.requires_grad], lr=args.lr)
    if resumed:
        opt.load_state_dict(state["opt"])  # Adam's moments follow the parameters' device
    val_rng = np.random.default_rng(12345)
    val = []
    for acc in (4.0, 8.0):
        for _ in range(3):
            k, m, t = make_batch(pool, val_rng, 2, args.crop, (acc,), transpose_p=0.0)
            val.append((f"{int(acc)}x", (k.to(device), m.to(device), t.to(device))))
    n_params = sum(p.numel() for p in net.parameters())
    say(f"VarNet {arch}: {n_params} parameters, {sum(q.numel() for q in net.parameters() if q.requires_grad)} "
        "trained")
    command = (
        f"python -m meddl.reconstruction.train --steps {args.steps} --batch {args.batch} "
        f"--crop {args.crop} --seed {args.seed} --mni-mm {args.mni_mm}"
        + (f" --lr {args.lr:g}" if args.lr != 1e-3 else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (f" --workers {args.workers}" if args.workers else "")
        + (f" --diverse {args.diverse:g}" if args.diverse else "")
        + (f" --phantoms {args.phantoms:g}" if args.phantoms else "")
        + (f" --scanner-phases {args.scanner_phases:g}" if args.scanner_phases else "")
        + (f" --extend {args.extend}" if args.extend else "")
    )
    # a resumed run may change the schedule or crop: the card lists every phase
    phases.append(f"from step {step}: {command}")

    def save(metrics: dict) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "opt": _to_cpu(opt.state_dict()),
                "step": step,
                "history": history,
                "phases": phases,
                "arch": arch,
                "first_trained": first_trained,
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
            },
            tmp,
        )
        os.replace(tmp, state_path)
        models.save_model(
            net,
            out_dir,
            MODEL_NAME,
            arch,
            training_data={
                "images": "MNI152 2009 T1 (nilearn; axial, coronal, sagittal slices; native 1 mm in phases with "
                "--mni-mm 1, the 2 mm template upsampled to 1 mm in the phases before), "
                "dipy t1_coronal_slice, ITK BrainProtonDensitySlice and BrainT1Slice, Colin27 "
                "(mricron ch2) axial slices z in [20,50) U [90,106) U [146,160), step 2",
                "held_out": "Colin27 axial slices z in [50,90) U [106,146) (benchmark slices "
                f"{list(BENCHMARK_COLIN27_Z)})",
                "simulation": f"random {args.crop}x{args.crop} crops, flips/rot90/gamma, smooth random phase, birdcage maps "
                "(4/6/8 coils), complex noise up to 1% of max, equispaced or random masks at 4x "
                "and 8x (centre fractions 0.08 / 0.04), k-space transpose p=0.5; in phases with --diverse P, "
                "each with probability P: zoom 0.5-1.2, a random 6-knot intensity curve (other contrasts), "
                "Rician image noise 0.5-3% of max; in phases with --phantoms P, with probability P a BrainWeb-like "
                "phantom (MNI152 1 mm tissue maps painted with a T1-, PD-, T2-like or random contrast) instead of "
                "a slice; in phases with --scanner-phases P, with probability P a phase of up to 3 pi plus linear ramps "
                "of up to 4 cycles per axis; with --extend N, N gated cascades appended and trained alone",
                "loss": "SSIM (7x7, data range = target max), Adam, warm-up + cosine decay, clip 1.0",
            },
            command=command,
            phases=phases,
            metrics=metrics,
            step=step,
            parameters=n_params,
            input="masked multi-coil k-space (B, C, H, W) complex64 + mask",
            output="magnitude of the sensitivity-weighted coil combination (B, H, W)",
        )

    net.train()
    last_save = time.time()
    started = time.time()
    running = []
    batches = _parallel_batches(pool, args, step, maps) if args.workers > 0 else None
    while step < args.steps:
        k, m, t = next(batches) if batches is not None else make_batch(
            pool, rng, args.batch, args.crop, diverse=args.diverse, phantoms=args.phantoms, maps=maps,
            scanner_phases=args.scanner_phases)
        k, m, t = k.to(device, non_blocking=True), m.to(device, non_blocking=True), t.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.steps, args.lr)
        out = net(k, m)
        loss = ssim_loss(out, t, t.amax(dim=(1, 2)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in net.parameters() if q.requires_grad], 1.0)
        opt.step()
        step += 1
        running.append(loss.item())
        if step % 25 == 0:
            say(f"step {step} loss {np.mean(running[-25:]):.4f} lr {opt.param_groups[0]['lr']:.2e}")
        done = step >= args.steps
        over = args.max_minutes is not None and time.time() - started > 60 * args.max_minutes
        if done or over or time.time() - last_save > 60 * args.save_minutes:
            metrics = _validate(net, val) | {
                "train_loss_last100": round(float(np.mean(running[-100:])), 4),
                "step": step,
            }
            history.append(metrics)
            save(metrics)
            say(f"saved step {step}: {json.dumps(metrics)}")
            last_save = time.time()
            if over:
                break
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
