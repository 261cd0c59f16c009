"""Synthetic multi-task data for training the in-context network (Neuralizer-style).

A *task* is a set of ``L + 1`` aligned 2D (input, output) pairs sharing one contrast and one
meaning; the first pair is the target, the rest the context. Sources, all from the offline
samples of :mod:`meddl.data` resampled onto the MNI152 2 mm grid and cut into slices along the
three axes, resized to ``size x size``:

- **segmentation**: a random subset of the *training* labels of an atlas (AAL, Harvard-Oxford
  cortical, JHU white matter, natbrainlab), the MNI152 brain / grey-matter masks, or procedural
  shapes; inputs are either images synthesised from the label maps with a random contrast per
  task (so the task must be read from the context, not the modality) or the real MNI152 /
  Colin27 T1 under a random intensity mapping. Task augmentations: mask inversion, contour,
  dilation.
- **image-to-image**: denoising, skull stripping, bias-field correction, inpainting and
  super-resolution of MNI152 / Colin27 T1 slices.

Targets and contexts are slices near each other along one axis (the propagation setting), under
one random affine per task and a small random jitter per slice. With ``scans > 0`` a share of the
segmentation tasks imitates context from *other scans* (``meddl segment --context``, after its
affine alignment): every pair is the same position (+-1 slice) under its own residual affine,
smooth elastic warp, gamma and bias field, as different subjects' slices would differ.

Held-out structures (``SliceBank.held_out``, from :func:`held_out_labels`: every fifth label of
each atlas) never appear as targets, nor does the MNI152 white-matter mask; validation and the
benchmark use the held-out atlas labels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["ATLASES", "SliceBank", "Batch", "held_out_labels", "training_labels",
           "build_bank", "sample_batch", "with_copies", "validation_tasks"]

ATLASES = ("aal", "harvard_oxford_cortical", "jhu_white_matter", "natbrainlab")


def held_out_labels(values: np.ndarray) -> list[int]:
    """Every fifth non-zero label (3rd, 8th, 13th, ... in sorted order): spread over the atlas."""
    vals = sorted(int(v) for v in np.unique(values) if v != 0)
    return vals[2::5]


def training_labels(values: np.ndarray) -> list[int]:
    held = set(held_out_labels(values))
    return [int(v) for v in np.unique(values) if v != 0 and int(v) not in held]


@dataclass
class SliceBank:
    """All slices, per axis: ``images[name][axis]`` ``(N, S, S)`` float32 in [0, 1] and
    ``labels[name][axis]`` ``(N, S, S)`` int16; ``valid[axis]``: slice indices with enough brain."""

    size: int
    images: dict[str, list[np.ndarray]]
    labels: dict[str, list[np.ndarray]]
    valid: list[np.ndarray]
    train_labels: dict[str, list[int]]
    held_out: dict[str, list[int]]


def _resample_to(vol, ref_affine: np.ndarray, ref_shape: tuple[int, ...], order: int) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    m = np.linalg.inv(vol.affine) @ ref_affine
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in ref_shape], indexing="ij"), 0).reshape(3, -1)
    coords = m[:3, :3] @ grid + m[:3, 3:4]
    arr = vol.numpy()[0].astype(np.float32 if order else np.int32)
    out = map_coordinates(arr, coords, order=order, mode="constant", cval=0)
    return out.reshape(ref_shape)


def _ras_box(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(arr > 0)
    pts = np.concatenate([idx.min(0), idx.max(0)]).reshape(2, 3)
    ras = pts @ affine[:3, :3].T + affine[:3, 3]
    return ras.min(0), ras.max(0)


def _recentre(vol, brain_box: tuple[np.ndarray, np.ndarray]):
    """Some atlas files carry no origin (Harvard-Oxford and natbrainlab in mricron-data read with
    origin 0): shift those so their labelled box is centred on the MNI152 brain."""
    lo, hi = _ras_box(vol.numpy()[0], vol.affine)
    shift = (brain_box[0] + brain_box[1]) / 2 - (lo + hi) / 2
    if np.abs(shift).max() < 20:
        return vol
    affine = vol.affine.copy()
    affine[:3, 3] += shift
    return type(vol)(vol.data, affine, vol.kind, vol.meta)


def _slices(arr: np.ndarray, axis: int, size: int, label: bool) -> np.ndarray:
    s = np.moveaxis(arr, axis, 0)
    t = torch.from_numpy(np.ascontiguousarray(s).astype(np.float32))[:, None]
    if label:
        t = F.interpolate(t, size=(size, size), mode="nearest-exact")
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    out = t[:, 0].numpy()
    return out.astype(np.int16) if label else np.clip(out, 0, 1).astype(np.float32)


def build_bank(size: int = 96, cache: str | os.PathLike | None = None) -> SliceBank:
    """Resample the samples onto the MNI152 2 mm grid and cut them into ``size x size`` slices."""
    from .. import data

    if cache is not None and Path(cache).is_file():
        return _load_bank(cache)
    ref = data.load_sample("mni152_t1")
    shape = ref.spatial_shape
    vols: dict[str, np.ndarray] = {}
    t1 = ref.numpy()[0]
    vols["mni_t1"] = t1 / max(float(np.percentile(t1, 99.9)), 1e-6)
    for name in ("mni152_brain_mask", "mni152_gm_mask", "mni152_wm_mask"):
        vols[name] = data.load_sample(name).numpy()[0].astype(np.int16)
    colin = _resample_to(data.load_sample("colin27_t1"), ref.affine, shape, 1)
    vols["colin_t1"] = colin / max(float(np.percentile(colin, 99.9)), 1e-6)
    colin_brain = _resample_to(data.load_sample("colin27_brain"), ref.affine, shape, 1)
    vols["colin_brain_mask"] = (colin_brain > 0.5).astype(np.int16)
    brain_box = _ras_box(vols["mni152_brain_mask"], ref.affine)
    for name in ATLASES:
        atlas = _recentre(data.load_sample(name), brain_box)
        vols[name] = _resample_to(atlas, ref.affine, shape, 0).astype(np.int16)
    images: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[np.ndarray]] = {}
    for name, arr in vols.items():
        is_label = arr.dtype == np.int16
        target = labels if is_label else images
        target[name] = [_slices(arr, a, size, is_label) for a in range(3)]
    valid = [np.nonzero((labels["mni152_brain_mask"][a] > 0).mean(axis=(1, 2)) > 0.08)[0] for a in range(3)]
    train = {n: training_labels(vols[n]) for n in ATLASES}
    held = {n: held_out_labels(vols[n]) for n in ATLASES}
    bank = SliceBank(size, images, labels, valid, train, held)
    if cache is not None:
        _save_bank(bank, cache)
    return bank


def _save_bank(bank: SliceBank, path) -> None:
    flat = {"size": np.array(bank.size)}
    for kind, store in (("img", bank.images), ("lab", bank.labels)):
        for name, per_axis in store.items():
            for a, arr in enumerate(per_axis):
                flat[f"{kind}:{name}:{a}"] = arr
    for a, v in enumerate(bank.valid):
        flat[f"valid:{a}"] = v
    for n in ATLASES:
        flat[f"train:{n}"] = np.array(bank.train_labels[n])
        flat[f"held:{n}"] = np.array(bank.held_out[n])
    tmp = str(path) + ".tmp.npz"
    np.savez_compressed(tmp, **flat)
    os.replace(tmp, path)


def _load_bank(path) -> SliceBank:
    z = np.load(path)
    images: dict[str, list] = {}
    labels: dict[str, list] = {}
    for key in z.files:
        parts = key.split(":")
        if parts[0] in ("img", "lab"):
            store = images if parts[0] == "img" else labels
            store.setdefault(parts[1], [None, None, None])[int(parts[2])] = z[key]
    valid = [z[f"valid:{a}"] for a in range(3)]
    return SliceBank(int(z["size"]), images, labels, valid,
                     {n: z[f"train:{n}"].tolist() for n in ATLASES}, {n: z[f"held:{n}"].tolist() for n in ATLASES})


# -- augmentation helpers (torch, batched over the L + 1 slices of one task) ---------------------


def _smooth_field(n: int, size: int, g: torch.Generator, coarse: int = 4) -> torch.Tensor:
    """``(n, 1, size, size)`` smooth random field ~N(0, 1) upsampled from a coarse grid."""
    f = torch.randn(n, 1, coarse, coarse, generator=g)
    return F.interpolate(f, size=(size, size), mode="bicubic", align_corners=False)


def _random_affine(n: int, g: torch.Generator, rot: float, scale: float, shift: float, shared: bool) -> torch.Tensor:
    k = 1 if shared else n
    a = (torch.rand(k, generator=g) * 2 - 1) * rot
    s = 1 + (torch.rand(k, 2, generator=g) * 2 - 1) * scale
    t = (torch.rand(k, 2, generator=g) * 2 - 1) * shift
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.stack([torch.stack([cos * s[:, 0], -sin * s[:, 1], t[:, 0]], 1),
                         torch.stack([sin * s[:, 0], cos * s[:, 1], t[:, 1]], 1)], 1)
    return theta.expand(n, 2, 3) if shared else theta


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _intensity_map(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random piecewise-linear intensity curve (sometimes non-monotone), one per task."""
    knots = 6
    if torch.rand(1, generator=g).item() < 0.5:
        ys = torch.sort(torch.rand(knots, generator=g))[0]
        if torch.rand(1, generator=g).item() < 0.3:
            ys = ys.flip(0)
    else:
        ys = torch.rand(knots, generator=g)
    ys = torch.cat([torch.zeros(1), ys]) if torch.rand(1, generator=g).item() < 0.7 else torch.cat([ys[:1], ys])
    pos = x.clamp(0, 1) * knots
    lo = pos.floor().long().clamp(max=knots - 1)
    w = pos - lo
    return ys[lo] * (1 - w) + ys[lo + 1] * w


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale a task's slices jointly to [0, 1] (robust max)."""
    lo = x.amin()
    hi = torch.quantile(x.flatten()[:: max(1, x.numel() // 20000)], 0.995)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def _synth_from_labels(lab: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """SynthSeg-like image: a random intensity per label, blur, bias field and noise. ``lab`` (n, 1, S, S) long."""
    n, _, s, _ = lab.shape
    lut = torch.rand(int(lab.max()) + 1, generator=g)
    if torch.rand(1, generator=g).item() < 0.7:
        lut[0] = 0.0
    img = lut[lab].float()
    img = img + 0.05 * torch.rand(1, generator=g) * torch.randn(lab.shape, generator=g)
    sigma = float(torch.rand(1, generator=g)) * 1.2
    if sigma > 0.3:
        img = _blur(img, sigma)
    bias = torch.exp(0.3 * torch.rand(1, generator=g) * _smooth_field(1, s, g))
    img = img * bias
    img = img + 0.04 * torch.rand(1, generator=g) * torch.randn(img.shape, generator=g)
    return _normalise(img)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _shapes(n: int, s: int, g: torch.Generator) -> torch.Tensor:
    """Procedural label maps: argmax of smooth random fields, deformed a little per slice. (n, 1, s, s) long."""
    k = int(torch.randint(3, 8, (1,), generator=g))
    base = torch.cat([_smooth_field(1, s, g, coarse=int(torch.randint(3, 7, (1,), generator=g))) for _ in range(k)], 1)
    fields = base.expand(n, k, s, s)
    disp = 0.04 * torch.stack([_smooth_field(n, s, g)[:, 0], _smooth_field(n, s, g)[:, 0]], -1)
    ident = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), [n, k, s, s], align_corners=False)
    warped = F.grid_sample(fields, ident + disp, mode="bilinear", padding_mode="border", align_corners=False)
    return warped.argmax(1, keepdim=True)


# -- tasks ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """``target`` (B, Cin, S, S), ``context_in`` (B, L, Cin, S, S), ``context_out`` (B, L, 1, S, S),
    ``truth`` (B, 1, S, S), ``is_mask`` (B,) bool, ``names`` list of task names."""

    target: torch.Tensor
    context_in: torch.Tensor
    context_out: torch.Tensor
    truth: torch.Tensor
    is_mask: torch.Tensor
    names: list[str]


def _pick_indices(bank: SliceBank, n: int, g: torch.Generator, spread: int | None = None) -> tuple[int, np.ndarray]:
    axis = int(torch.randint(0, 3, (1,), generator=g))
    valid = bank.valid[axis]
    centre = int(valid[int(torch.randint(0, len(valid), (1,), generator=g))])
    spread = spread if spread is not None else int(torch.randint(1, 16, (1,), generator=g))
    idx = centre + torch.randint(-spread, spread + 1, (n,), generator=g).numpy()
    idx = np.clip(idx, valid.min(), valid.max())
    return axis, idx


def _mask_task(bank: SliceBank, n: int, g: torch.Generator, held_out: bool = False, spread: int | None = None):
    """(input (n, 1, S, S), mask (n, 1, S, S), name). ``held_out`` draws only held-out structures."""
    s = bank.size
    axis, idx = _pick_indices(bank, n, g, spread)
    lab_map = None
    r = float(torch.rand(1, generator=g))
    source = "shapes" if (r < 0.15 and not held_out) else None
    if source is None:
        if held_out or r < 0.85:
            source = ATLASES[int(torch.randint(0, len(ATLASES), (1,), generator=g))]
        else:
            source = "mni152_gm_mask" if torch.rand(1, generator=g).item() < 0.5 else "mni152_brain_mask"
    if source == "shapes":
        lab_map = _shapes(n, s, g)
        present = torch.unique(lab_map[0]).tolist()
        chosen = [present[int(torch.randint(0, len(present), (1,), generator=g))]]
        mask = (lab_map == chosen[0]).float()
        name = "shapes"
        structural = lab_map
    else:
        structural = torch.from_numpy(bank.labels["mni152_gm_mask"][axis][idx].astype(np.int64))[:, None] + \
            2 * torch.from_numpy(bank.labels["mni152_wm_mask"][axis][idx].astype(np.int64))[:, None] + \
            3 * torch.from_numpy(bank.labels["mni152_brain_mask"][axis][idx].astype(np.int64))[:, None]
        lab = torch.from_numpy(bank.labels[source][axis][idx].astype(np.int64))[:, None]
        if source in ATLASES:
            allowed = bank.held_out[source] if held_out else bank.train_labels[source]
            present, counts = torch.unique(lab[0], return_counts=True)
            cand = [int(v) for v, c in zip(present.tolist(), counts.tolist(), strict=False) if v in allowed and c >= 12]
            if not cand:
                return None
            k = 1 if held_out else min(len(cand), int(torch.randint(1, 4, (1,), generator=g)))
            perm = torch.randperm(len(cand), generator=g)[:k]
            chosen = [cand[i] for i in perm.tolist()]
            mask = torch.zeros_like(lab, dtype=torch.float32)
            for v in chosen:
                mask = torch.maximum(mask, (lab == v).float())
            name = f"{source}:{'+'.join(map(str, chosen))}"
            structural = structural * 200 + lab
        else:
            mask = (lab > 0).float()
            name = source
            if mask[0].sum() < 12:
                return None
    # input image: synthetic contrast from the label maps, or a real T1 with a random intensity mapping
    if source == "shapes" or (not held_out and torch.rand(1, generator=g).item() < 0.5):
        _, inv = torch.unique(structural, return_inverse=True)
        img = _synth_from_labels(inv.view_as(structural), g)
    else:
        which = "mni_t1" if held_out or torch.rand(1, generator=g).item() < 0.6 else "colin_t1"
        img = torch.from_numpy(bank.images[which][axis][idx])[:, None]
        if not held_out:
            img = _normalise(_intensity_map(img, g))
    return img, mask, name


def _image_task(bank: SliceBank, n: int, g: torch.Generator, kind: str | None = None):
    axis, idx = _pick_indices(bank, n, g)
    s = bank.size
    use_colin = torch.rand(1, generator=g).item() < 0.4
    t1 = torch.from_numpy(bank.images["colin_t1" if use_colin else "mni_t1"][axis][idx])[:, None]
    brain = torch.from_numpy(bank.labels["colin_brain_mask" if use_colin else "mni152_brain_mask"][axis][idx])[:, None].float()
    if kind is None or kind != "skullstrip":
        t1 = _normalise(_intensity_map(t1, g)) if torch.rand(1, generator=g).item() < 0.5 else t1
    kinds = ("denoise", "skullstrip", "bias", "inpaint", "superres")
    kind = kind or kinds[int(torch.randint(0, len(kinds), (1,), generator=g))]
    out = t1
    if kind == "denoise":
        sigma = 0.03 + 0.12 * torch.rand(1, generator=g)
        inp = (t1 + sigma * torch.randn(t1.shape, generator=g)).clamp(0, 1)
    elif kind == "skullstrip":
        inp, out = t1, t1 * brain
    elif kind == "bias":
        inp = (t1 * torch.exp(0.4 * _smooth_field(n, s, g, coarse=3))).clamp(0, 1)
    elif kind == "inpaint":
        inp = t1.clone()
        for i in range(n):
            h, w = (int(v) for v in torch.randint(s // 8, s // 3, (2,), generator=g))
            y, x = (int(v) for v in torch.randint(0, s - max(h, w), (2,), generator=g))
            inp[i, :, y:y + h, x:x + w] = 0
    else:
        f = int(torch.randint(2, 5, (1,), generator=g))
        inp = F.interpolate(F.avg_pool2d(t1, f, ceil_mode=True), size=(s, s), mode="bilinear", align_corners=False)
    return inp, out, kind


def _augment_mask(mask: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, str]:
    r = float(torch.rand(1, generator=g))
    if r < 0.08:
        return 1 - mask, "inverted"
    if r < 0.16:
        eroded = -F.max_pool2d(-mask, 3, 1, 1)
        return (mask - eroded).clamp(0, 1), "contour"
    if r < 0.24:
        return F.max_pool2d(mask, 3, 1, 1), "dilated"
    return mask, ""


def _as_other_scans(inp: torch.Tensor, out: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair as another subject's scan after affine alignment: its own residual affine (rotation
    +-0.08 rad, scale +-5 %, shift +-3 %), a smooth elastic warp (sd up to 0.035 of the half-width on a
    5 x 5 grid), gamma 0.75-1.35 and a smooth multiplicative bias field."""
    n, _, s, _ = inp.shape
    theta = _random_affine(n, g, rot=0.08, scale=0.05, shift=0.03, shared=False)
    grid = F.affine_grid(theta, [n, 1, s, s], align_corners=False)
    amp = 0.035 * torch.rand(n, 1, 1, 1, generator=g)
    disp = torch.cat([_smooth_field(n, s, g, coarse=5), _smooth_field(n, s, g, coarse=5)], 1) * amp
    both = F.grid_sample(torch.cat([inp, out], 1), grid + disp.permute(0, 2, 3, 1), mode="bilinear",
                         padding_mode="zeros", align_corners=False)
    gamma = 0.75 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    bias = torch.exp(0.15 * _smooth_field(n, s, g, coarse=3))
    img = (both[:, :1].clamp(0, 1) ** gamma * bias).clamp(0, 1)
    return img, (both[:, 1:] > 0.5).float()


def sample_task(bank: SliceBank, n: int, g: torch.Generator, mask_fraction: float = 0.75,
                held_out: bool = False, augment: bool = True, scans: float = 0.0):
    """One task of ``n`` aligned pairs: ``(inputs (n, 2, S, S), outputs (n, 1, S, S), is_mask, name)``.

    ``scans``: probability that a segmentation task imitates context from other scans (every pair
    at the same position, +-1 slice, each under its own warp and intensity changes).
    """
    for _ in range(20):
        if held_out or torch.rand(1, generator=g).item() < mask_fraction:
            other = scans > 0 and torch.rand(1, generator=g).item() < scans
            got = _mask_task(bank, n, g, held_out, spread=1 if other else None)
            if got is None:
                continue
            inp, out, name = got
            if other:
                inp, out = _as_other_scans(inp, out, g)
                name += " scans"
            is_mask = True
            if augment:
                out, how = _augment_mask(out, g)
                name += f" {how}" if how else ""
        else:
            inp, out, name = _image_task(bank, n, g)
            is_mask = False
        break
    else:  # pragma: no cover - the bank always has brain slices
        raise RuntimeError("tasks: could not draw a task")
    # second input channel: usually empty (zero padding), sometimes a second contrast or a duplicate
    second = torch.zeros_like(inp)
    if augment and torch.rand(1, generator=g).item() < 0.15:
        second = _normalise(_intensity_map(inp, g))
    inp = torch.cat([inp, second], 1)
    if augment:
        theta = _random_affine(n, g, rot=0.25, scale=0.12, shift=0.1, shared=True)
        jitter = _random_affine(n, g, rot=0.05, scale=0.04, shift=0.04, shared=False)
        theta = theta.clone()
        theta[:, :, :2] = theta[:, :, :2] @ jitter[:, :, :2]
        theta[:, :, 2] = theta[:, :, 2] + jitter[:, :, 2]
        if torch.rand(1, generator=g).item() < 0.5:
            theta[:, :, 0] = -theta[:, :, 0]
        both = _warp(torch.cat([inp, out], 1), theta, "bilinear")
        inp, out = both[:, :2], both[:, 2:]
        if is_mask:
            out = (out > 0.5).float()
    return inp, out, is_mask, name


def sample_batch(bank: SliceBank, batch: int, context: int, g: torch.Generator, **kw) -> Batch:
    """``batch`` tasks, each with ``context`` context pairs and one target."""
    items = [sample_task(bank, context + 1, g, **kw) for _ in range(batch)]
    inp = torch.stack([i[0] for i in items])
    out = torch.stack([i[1] for i in items])
    return Batch(inp[:, 0], inp[:, 1:], out[:, 1:], out[:, 0], torch.tensor([i[2] for i in items]),
                 [i[3] for i in items])


def with_copies(batch: Batch, total: int, g: torch.Generator) -> Batch:
    """``batch`` with its context completed to ``total`` pairs by deformed copies, as inference does
    for a context smaller than ``SegmentConfig.augment`` (``meddl.incontext.inference.augment_context``
    with ``context_warps`` of a seed drawn from ``g``); image-task outputs are warped, not thresholded."""
    from .inference import augment_context, context_warps

    k, s = batch.context_in.shape[1], batch.context_in.shape[-1]
    if k >= total:
        return batch
    grids = context_warps(-(-(total - k) // k), s, int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    ci, co = augment_context(batch.context_in, batch.context_out, grids, binary=batch.is_mask)
    return Batch(batch.target, ci, co, batch.truth, batch.is_mask, batch.names)


def validation_tasks(bank: SliceBank, count: int = 24, context: int = 4, seed: int = 1234,
                     scans: bool = False, copies_to: int = 0) -> list[Batch]:
    """Fixed held-out segmentation tasks (held-out structures, real MNI152 T1 inputs, no augmentation);
    ``scans``: every task in the other-scans form (see :func:`sample_task`); ``copies_to``: contexts
    completed with deformed copies as inference completes them (:func:`with_copies`, fixed warps)."""
    g = torch.Generator().manual_seed(seed)
    tasks = [sample_batch(bank, 1, context, g, held_out=True, augment=False, scans=1.0 if scans else 0.0)
             for _ in range(count)]
    if copies_to:
        tasks = [with_copies(t, copies_to, g) for t in tasks]
    return tasks
