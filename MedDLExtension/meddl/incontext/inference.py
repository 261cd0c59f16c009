"""Slice-wise in-context inference on volumes: propagation, multi-volume and 2D modes.

- **Propagation** (``annotated``): a label map on the target's grid in which a few slices along one
  axis are painted. Every unpainted slice is predicted with the painted slices nearest to it as
  context; painted slices are copied unchanged. Each label value is its own binary task, with the
  slices where that label is painted as its context.
- **Multi-volume** (``context``): (image, label) pairs from other scans. Each scan is first
  brought onto the target's grid by an affine pre-alignment (``align``: centre of mass, rigid,
  affine; Mattes MI, as the registration module does; or that plus a deformable registration)
  and resampled there, its label
  nearest-neighbour; slices the scan does not cover are dropped. For each target slice the context
  slices at the nearest *relative* position along the axis are taken, alternating between the
  scans. 2D context pairs are used for every slice of a 3D target (not aligned).
- **2D**: a 2D target with 2D context pairs (aligned in 2D the same way).

Slices are resized to the network's working size (``input_size`` in the model card), intensities
divided per volume by the 99.9th percentile of their absolute values (so a non-negative MR scan
lies in about [0, 1]; negative values such as CT's air stay negative). Image tasks (denoising and others) take
image outputs in the context and return an intensity volume in the target's scale.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import InputError
from ..optim import Adam
from ..progress import Reporter
from ..volume import Kind, Volume, as_plain_2d, one_slice_axis
from .network import InContextNet, pad_channels

__all__ = ["Task", "Selection", "SegmentConfig", "segment", "load_network", "interpolation_prior", "mix_prior",
           "MAX_CONTEXT", "ALIGN_MODES", "resolve_align", "align_context", "augment_context", "context_warps"]

MAX_CONTEXT = 32
#: how context scans are brought onto the target's grid (``SegmentConfig.align``)
ALIGN_MODES = ("auto", "affine", "center", "deformable", "none")
#: the longest side, in pixels, of the grid a 2D pair is affinely aligned on (larger images are block-averaged)
ALIGN_2D_PIXELS = 256


def resolve_align(mode: str, target: Volume) -> str:
    """``auto`` -> ``deformable`` for a 2D target (a tenth of a second per example, and better at every
    context size on the benchmark's 2D scans), ``affine`` for a 3D one (a deformable registration costs
    6-16 s per example on a CPU); any other mode unchanged."""
    if mode != "auto":
        return mode
    return "deformable" if target.ndim == 2 else "affine"


class Task(str, enum.Enum):
    """What the context pairs show: a mask (segmentation) or an image-to-image task."""

    SEGMENTATION = "segmentation"
    DENOISE = "denoise"
    SKULLSTRIP = "skullstrip"
    BIAS = "bias"
    INPAINT = "inpaint"
    SUPERRES = "superres"
    IMAGE = "image"  #: any other image-to-image task shown by the context


class Selection(str, enum.Enum):
    """How context slices are chosen for each target slice."""

    AUTO = "auto"  #: ``bracket`` when propagating between painted slices, else ``nearest``
    NEAREST = "nearest"  #: nearest in position along the axis
    BRACKET = "bracket"  #: the nearest slice on each side of the target (one side at the ends; the nearer one for k = 1)
    SIMILAR = "similar"  #: most similar in appearance (normalised cross-correlation)


@dataclass(frozen=True)
class SegmentConfig:
    """Options of :func:`segment`.

    Attributes:
        task: ``segmentation`` (default) or an image task (``denoise``, ``skullstrip``, ``bias``,
            ``inpaint``, ``superres``, ``image``).
        axis: voxel axis the slices are cut along (0, 1, 2); None: in propagation mode the axis
            along which the fewest slices are painted (preferring axes with unpainted slices
            between painted ones), otherwise the axis of coarsest spacing (axis 2 on ties).
        context_size: context slices per target slice, 1-32; fewer when fewer exist. More than
            the memory budget allows is subsampled with a notice. ``bracket`` uses at most 2.
        selection: ``auto`` (default: ``bracket`` in propagation mode, ``nearest`` otherwise),
            ``nearest`` (position), ``bracket`` (the nearest painted slice on each side;
            propagation only) or ``similar`` (appearance).
        prior: propagation mode only: weight of the slice-interpolation prior (the painted
            labels of the two bracketing slices, linearly interpolated by distance) mixed with the
            network's probability, ``p = (1 - prior) * network + prior * interpolation``, between
            painted slices; beyond the outermost painted slice the prior's weight fades to 0 over
            one painting gap (:func:`mix_prior`). 0: the network alone; 1: shape interpolation
            between painted slices.
        threshold: probability above which a voxel belongs to a segment.
        labels: label values to segment (default: every non-zero value in the context).
        align: multi-volume / 2D mode: how each context scan is brought onto the target's grid
            before its slices are used: ``auto`` (default: ``deformable`` for a 2D target, where it
            costs about 0.1 s per example, ``affine`` for a 3D one; :func:`resolve_align`),
            ``affine`` (centre of mass, rigid, then affine by mutual information), ``deformable``
            (the affine, then the registration module's instance optimisation with LNCC: one
            registration per example, 6-16 s for a 3D brain on a CPU, a little more accurate; see
            :func:`align_context`), ``center`` (centres of mass only) or ``none`` (slices matched by
            relative position, the scans taken as they are).
        atlas_prior: multi-volume / 2D segmentation with aligned examples (``align`` not ``none``):
            weight of the examples' own labels at the target slice (their mean over the examples
            that reach it, a multi-atlas vote after the affine alignment) mixed with the network's
            probability, ``p = (1 - w) * network + w * vote``; 0: the network alone. The default
            0.25 was chosen on synthetic other-scan tasks (seed 11, not the benchmark's) and on the
            Colin27 -> MNI152 pair with AAL labels; with one example, 0.5 or more is the aligned
            example's label alone.
        augment: multi-volume / 2D segmentation: when a target slice gets fewer context slices than
            this, randomly deformed copies of them (the same few small warps for every slice:
            rotation up to 0.06 rad, scale 4 %, shift 2 %, a smooth elastic field) are added until
            there are at least this many; 0: none. Not used in propagation mode.
        finetune_steps: test-time fine-tuning steps on the context pairs (leave-one-out); 0: none.
        finetune_lr: its learning rate.
        weights: a weights file (its card beside it) instead of the bundled model.
        batch: target slices per forward pass.
        memory_mb: activation budget per forward pass; the context is subsampled to fit it.
    """

    task: Task = Task.SEGMENTATION
    axis: int | None = None
    context_size: int = 16
    selection: Selection = Selection.AUTO
    prior: float = 0.5
    threshold: float = 0.5
    labels: tuple[int, ...] | None = None
    align: str = "auto"
    atlas_prior: float = 0.25
    augment: int = 16
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    weights: str | None = None
    batch: int = 4
    memory_mb: float = 2048.0
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "task", Task(self.task))
        except ValueError:
            raise InputError(f"task: expected one of {', '.join(t.value for t in Task)}, got '{self.task}'") from None
        try:
            object.__setattr__(self, "selection", Selection(self.selection))
        except ValueError:
            raise InputError(f"selection: expected one of {', '.join(s.value for s in Selection)}, "
                             f"got '{self.selection}'") from None
        if self.align not in ALIGN_MODES:
            raise InputError(f"align: expected one of {', '.join(ALIGN_MODES)}, got '{self.align}'")
        if not 0.0 <= float(self.prior) <= 1.0:
            raise InputError(f"prior: expected a weight between 0 and 1, got {self.prior}")
        if self.axis is not None and self.axis not in (0, 1, 2):
            raise InputError(f"axis: expected 0, 1 or 2, got {self.axis}")
        if not 1 <= int(self.context_size) <= MAX_CONTEXT:
            raise InputError(f"context size: expected 1 to {MAX_CONTEXT}, got {self.context_size}")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold: expected a probability in (0, 1), got {self.threshold}")
        if not 0.0 <= float(self.atlas_prior) <= 1.0:
            raise InputError(f"atlas prior: expected a weight between 0 and 1, got {self.atlas_prior}")
        if not 0 <= int(self.augment) <= MAX_CONTEXT:
            raise InputError(f"augment: expected 0 to {MAX_CONTEXT} context slices, got {self.augment}")
        if not 0 <= self.finetune_steps <= 10000:
            raise InputError(f"fine-tuning steps: expected 0 to 10000, got {self.finetune_steps}")
        if self.batch < 1 or self.memory_mb <= 0:
            raise InputError(f"batch/memory: expected positive values, got {self.batch}/{self.memory_mb}")
        if self.labels is not None:
            labels = tuple(int(v) for v in self.labels)
            if any(v <= 0 for v in labels):
                raise InputError(f"labels: expected positive label values, got {list(labels)}")
            object.__setattr__(self, "labels", labels)

    @property
    def is_mask(self) -> bool:
        return self.task is Task.SEGMENTATION


_CACHE: dict[str, tuple[InContextNet, int]] = {}


def load_network(weights: str | None = None, device: torch.device | str = "cpu") -> tuple[InContextNet, int]:
    """The bundled (or given) network and its working slice size."""
    from .. import models
    from .train import DEFAULT_NAME

    key = f"{weights}|{device}"
    if key not in _CACHE:
        net, card = models.load_model(DEFAULT_NAME, weights, device=device,
                                       architecture="meddl.incontext.network:InContextNet")
        _CACHE[key] = (net, int(card.extra.get("input_size", 96)))
    return _CACHE[key]


# -- helpers ------------------------------------------------------------------------------------


def _scale_of(arr: np.ndarray) -> float:
    """Robust intensity scale: the 99.9th percentile of the absolute values (1 when empty)."""
    flat = np.abs(arr.astype(np.float32, copy=False)).ravel()
    step = max(1, flat.size // 200000)
    s = float(np.percentile(flat[::step], 99.9)) if flat.size else 0.0
    return s if s > 0 else max(float(flat.max()) if flat.size else 1.0, 1.0)


def _slices(arr: np.ndarray, axis: int | None) -> np.ndarray:
    """``(C, I, J[, K])`` -> ``(n, C, H, W)``: every slice along ``axis`` (a 2D array is one slice)."""
    if arr.ndim == 3 or axis is None:
        return arr[None]
    return np.moveaxis(arr, 1 + axis, 0)


def _unslice(stack: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if ndim == 2 or axis is None:
        return stack[0]
    return np.moveaxis(stack, 0, 1 + axis)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _integer_labels(vol: Volume, role: str) -> np.ndarray:
    arr = vol.numpy()
    if arr.shape[0] != 1:
        raise InputError(f"{role}: expected a single-component label map, got {arr.shape[0]} components")
    arr = arr[0]
    if np.iscomplexobj(arr) or (np.issubdtype(arr.dtype, np.floating) and not np.all(np.equal(np.mod(arr, 1), 0))):
        raise InputError(
            f"{role}: expected integer labels (a label map or segmentation), got non-integer values; "
            "for a probability map threshold it first"
        )
    if np.any(arr < 0):
        raise InputError(f"{role}: expected non-negative labels, got a minimum of {arr.min()}")
    return arr.astype(np.int64)


def _label_dtype(labels: np.ndarray) -> type:
    """int16 (what Slicer's label maps use) unless a label value needs more."""
    return np.int16 if labels.size == 0 or int(labels.max()) <= np.iinfo(np.int16).max else np.int32


@dataclass
class _Pool:
    """Candidate context slices at working size: images ``(n, Cin, S, S)``, outputs ``(n, 1, S, S)``
    (a label map for masks), position along the axis in [0, 1] and the scan they come from."""

    images: torch.Tensor
    outputs: torch.Tensor
    position: np.ndarray
    source: np.ndarray
    #: only slices within this distance of the target's position are candidates (the nearest ones
    #: when none is): scans aligned onto the target's grid, whose far slices show other anatomy
    reach: float | None = None


def _choose(pool_pos: np.ndarray, pool_src: np.ndarray, pool_img: torch.Tensor, where: float,
            image: torch.Tensor | None, k: int, selection: Selection, reach: float | None = None) -> np.ndarray:
    """Indices of the ``k`` context slices for a target slice at relative position ``where``
    (``reach``: see :class:`_Pool`)."""
    n = len(pool_pos)
    if reach is not None and selection is not Selection.BRACKET:
        dist = np.abs(pool_pos - where)
        near = np.nonzero(dist <= max(reach, float(dist.min())) + 1e-9)[0]
        if len(near) < n:
            sub = _choose(pool_pos[near], pool_src[near], pool_img[near], where, image, k, selection)
            return near[sub]
    if selection is Selection.BRACKET:
        below = np.nonzero(pool_pos < where)[0]
        above = np.nonzero(pool_pos > where)[0]
        if len(below) and len(above) and k >= 2:
            return np.array(sorted({int(below[np.argmax(pool_pos[below])]), int(above[np.argmin(pool_pos[above])])}))
        return np.sort(np.argsort(np.abs(pool_pos - where), kind="stable")[: min(k, 2, n)])  # the nearest
    if k >= n:
        return np.arange(n)
    if selection is Selection.SIMILAR and image is not None:
        a = pool_img[:, 0].flatten(1)
        b = image[0].flatten()
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean()
        ncc = (a @ b) / (a.norm(dim=1) * b.norm() + 1e-6)
        score = -ncc.cpu().numpy()
    else:
        score = np.abs(pool_pos - where)
    # alternate between scans: rank within each scan, then interleave by rank
    order = np.lexsort((score, pool_src))
    rank = np.empty(n, dtype=np.int64)
    for s in np.unique(pool_src):
        members = order[pool_src[order] == s]
        rank[members] = np.arange(len(members))
    chosen = np.lexsort((score, rank))[:k]
    return np.sort(chosen)


def _interpolation(masks: np.ndarray, painted: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(shape (len(targets), H, W), support (len(targets),))`` for slices around painted ones.

    Between two painted slices ``shape`` is their distance-weighted linear interpolation and the
    support is 1; beyond the outermost painted slice ``shape`` is that slice's mask and the support
    falls linearly to 0 over one painting gap (the median distance between painted slices; a tenth
    of the span of ``targets`` and ``painted`` together when only one slice is painted).
    """
    painted = np.asarray(painted)
    order = np.argsort(painted)
    painted, masks = painted[order], np.asarray(masks, dtype=np.float32)[order]
    if len(painted) > 1:
        gap = float(np.median(np.diff(painted)))
    else:
        span = np.concatenate([painted, np.asarray(targets)])
        gap = max(1.0, (span.max() - span.min()) / 10.0)
    shape = np.zeros((len(targets), *masks.shape[1:]), dtype=np.float32)
    support = np.zeros(len(targets), dtype=np.float32)
    for i, t in enumerate(targets):
        j = int(np.searchsorted(painted, t))
        if 0 < j < len(painted):
            lo, hi = painted[j - 1], painted[j]
            w = (hi - t) / (hi - lo)
            shape[i] = w * masks[j - 1] + (1 - w) * masks[j]
            support[i] = 1.0
        else:
            edge = 0 if j == 0 else len(painted) - 1
            shape[i] = masks[edge]
            support[i] = max(0.0, 1.0 - abs(float(t) - float(painted[edge])) / gap)
    return shape, support


def interpolation_prior(masks: np.ndarray, painted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Shape-interpolation prior ``(len(targets), H, W)`` in [0, 1] for slices between painted ones.

    ``masks`` ``(len(painted), H, W)`` are the painted binary masks at slice indices ``painted``
    (sorted or not). Between two painted slices the prior is their distance-weighted linear
    interpolation; beyond the outermost painted slice it fades linearly to empty over one
    painting gap (the median distance between painted slices; a tenth of the span of
    ``targets`` and ``painted`` together when only one slice is painted).
    """
    shape, support = _interpolation(masks, painted, targets)
    return shape * support[:, None, None]


def mix_prior(network: np.ndarray, masks: np.ndarray, painted: np.ndarray, targets: np.ndarray,
              weight: float) -> np.ndarray:
    """Propagation's probability: the network's ``(len(targets), H, W)`` mixed with the shape prior.

    ``p = (1 - w s) network + w s shape`` with ``s`` the prior's support (:func:`_interpolation`):
    between painted slices the prior counts with ``weight``; beyond the outermost painted slice its
    weight fades with its support, so far from every painted slice the network answers alone (a
    prior that had faded to empty would otherwise veto the network there).
    """
    shape, support = _interpolation(masks, painted, targets)
    ws = float(weight) * support[:, None, None]
    return (1.0 - ws) * network + ws * shape


def _label_reach(painted: np.ndarray, has: np.ndarray, todo: np.ndarray) -> np.ndarray:
    """Which unpainted slices ``todo`` a label can reach: those whose nearest painted slice on either
    side holds it (one side only beyond the outermost painted slice).

    A painted slice is a fully annotated one, so a label missing from both painted slices around a
    slice is not there (the structure ended before them); segmenting it only where it can be saves
    most of the work for atlases of many small labels and keeps it from appearing far away.
    """
    marks = np.nonzero(painted)[0]
    holds = np.zeros(len(painted), dtype=bool)
    holds[has] = True
    idx = np.searchsorted(marks, todo)  # marks[idx - 1] < t < marks[idx]
    below = np.where(idx > 0, holds[marks[np.clip(idx - 1, 0, len(marks) - 1)]], False)
    above = np.where(idx < len(marks), holds[marks[np.clip(idx, 0, len(marks) - 1)]], False)
    return below | above


class _Best:
    """The most probable label per voxel, kept as labels are segmented one after another.

    Memory of one probability map for all target slices, not one per label (116 AAL labels on a
    1 mm brain needed 2.9 GB for the stacked maps). Ties go to the label segmented first, as
    ``argmax`` over the stacked maps would.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.prob = np.zeros(shape, dtype=np.float32)
        self.value = np.zeros(shape, dtype=np.int32)

    def update(self, prob: np.ndarray, value: int, rows: np.ndarray | None = None) -> None:
        """Offer label ``value`` with probabilities ``prob`` for the slices ``rows`` (mask; default all)."""
        if rows is None:
            rows = slice(None)
        current = self.prob[rows]
        wins = prob > current
        self.prob[rows] = np.where(wins, prob, current)
        self.value[rows] = np.where(wins, value, self.value[rows])

    def labels(self, threshold: float) -> np.ndarray:
        """The label map: the winning label where its probability exceeds ``threshold``, else 0."""
        return np.where(self.prob > threshold, self.value, 0)


def _budget(k: int, size: int, net: InContextNet, batch: int, memory_mb: float) -> int:
    """Largest context size whose activations fit ``memory_mb`` (rough: 12 maps of width features[0])."""
    per_slice = 12 * net.features[0] * size * size * 4 / 2**20
    fit = int(memory_mb / max(per_slice * batch, 1e-9)) - 1
    return max(1, min(k, fit))


def _finetune(net: InContextNet, pool: _Pool, is_mask: bool, steps: int, lr: float, seed: int,
              rep: Reporter) -> InContextNet:
    """Leave-one-out fine-tuning on the context pairs (a copy of the network; seconds on a CPU)."""
    from .train import task_loss

    n = pool.images.shape[0]
    if n < 2 or steps <= 0:
        return net
    tuned = copy.deepcopy(net)
    tuned.train()
    opt = Adam(tuned.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for step in range(steps):
            rep(step / steps, f"fine-tuning {step + 1}/{steps}")
            perm = torch.randperm(n, generator=g)
            t, ctx = perm[0], perm[1:1 + min(n - 1, 8)]
            pred = tuned(pool.images[t:t + 1], pool.images[ctx][None], pool.outputs[ctx][None])
            loss = task_loss(pred, pool.outputs[t:t + 1], torch.tensor([is_mask]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    tuned.eval()
    return tuned


def context_warps(copies: int, size: int, seed: int, device=None) -> torch.Tensor:
    """``copies`` small random deformations as sampling grids ``(copies, S, S, 2)`` (see
    ``SegmentConfig.augment``), the same for a given seed."""
    g = torch.Generator().manual_seed(int(seed) + 7919)

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * 2 - 1

    a, scale, shift = 0.06 * u(copies), 1 + 0.04 * u(copies, 2), 0.02 * u(copies, 2)
    theta = torch.stack([torch.stack([a.cos() * scale[:, 0], -a.sin() * scale[:, 1], shift[:, 0]], 1),
                         torch.stack([a.sin() * scale[:, 0], a.cos() * scale[:, 1], shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [copies, 1, size, size], align_corners=False)
    coarse = 0.015 * torch.randn(copies, 2, 5, 5, generator=g)
    grid = grid + F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    return grid.to(device)


def augment_context(images: torch.Tensor, outputs: torch.Tensor, grids: torch.Tensor,
                    binary: bool | torch.Tensor = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Context ``(B, k, C, S, S)`` / outputs ``(B, k, 1, S, S)`` plus each slice under every warp of
    ``grids``: ``k * (1 + len(grids))`` pairs, in an order that follows the given one, so the set
    (hence the network's answer) does not depend on it. Warped outputs are thresholded again where
    ``binary`` (a bool, or one per item ``(B,)``: masks yes, image-task outputs no)."""
    b, k, c, s, _ = images.shape
    m = grids.shape[0]
    both = torch.cat([images, outputs], 2).reshape(b * k, c + 1, s, s)
    warped = F.grid_sample(both.repeat_interleave(m, 0), grids.repeat(b * k, 1, 1, 1), mode="bilinear",
                           padding_mode="zeros", align_corners=False).reshape(b, k * m, c + 1, s, s)
    outs = warped[:, :, c:]
    binary = torch.as_tensor(binary, device=outs.device).reshape(-1, 1, 1, 1, 1)
    outs = torch.where(binary, (outs > 0.5).to(outputs.dtype), outs)
    return torch.cat([images, warped[:, :, :c]], 1), torch.cat([outputs, outs], 1)


#: a target slice whose chosen context slices all lack the structure is not run through the network:
#: its mask is empty (logit :data:`EMPTY_LOGIT`). With an atlas of many labels most slices lack most
#: labels (Colin27 + 20 AAL labels -> MNI152: most of the forward passes saved).
SKIP_EMPTY_CONTEXT = True
EMPTY_LOGIT = -20.0


@torch.no_grad()
def _predict(net: InContextNet, targets: torch.Tensor, where: np.ndarray, pool: _Pool, k: int,
             config: SegmentConfig, rep: Reporter, augment_to: int = 0, is_mask: bool = False) -> torch.Tensor:
    """Raw outputs ``(n, 1, S, S)`` for target slices ``(n, Cin, S, S)``; contexts of fewer than
    ``augment_to`` slices get deformed copies (:func:`augment_context`). For masks, a target slice
    whose context holds no foreground at all is answered empty without the network
    (:data:`SKIP_EMPTY_CONTEXT`)."""
    out = torch.empty(targets.shape[0], 1, *targets.shape[2:], device=targets.device)
    present = None
    if is_mask and SKIP_EMPTY_CONTEXT:
        present = (pool.outputs.flatten(1) > 0).any(1).cpu().numpy()
    grids: dict[int, torch.Tensor] = {}

    def forward(t, ci, co):
        kk = ci.shape[1]
        if kk < augment_to:
            copies = -(-(augment_to - kk) // kk)
            if copies not in grids:
                grids[copies] = context_warps(copies, ci.shape[-1], config.seed, ci.device)
            ci, co = augment_context(ci, co, grids[copies])
        return net(t, ci, co)

    n = targets.shape[0]
    for start in range(0, n, config.batch):
        rep(start / n, f"slice {start + 1}/{n}")
        stop = min(n, start + config.batch)
        rows = list(range(start, stop))
        picks = [_choose(pool.position, pool.source, pool.images, float(where[i]), targets[i], k,
                         config.selection, pool.reach) for i in rows]
        if present is not None:  # no foreground in the chosen context: an empty mask, no forward pass
            empty = [i for i, p in zip(rows, picks, strict=True) if not present[p].any()]
            out[empty] = EMPTY_LOGIT
            rows, picks = [i for i in rows if i not in empty], [p for p in picks if present[p].any()]
        if not rows:
            continue
        if len({len(p) for p in picks}) == 1:
            idx = torch.as_tensor(np.stack(picks), device=targets.device)
            out[rows] = forward(targets[rows], pool.images[idx], pool.outputs[idx])
        else:  # e.g. bracketing: one context slice at the ends, two elsewhere
            for i, p in zip(rows, picks, strict=True):
                idx = torch.as_tensor(p[None], device=targets.device)
                out[i:i + 1] = forward(targets[i:i + 1], pool.images[idx], pool.outputs[idx])
    return out


# -- entry --------------------------------------------------------------------------------------


def _check_target(target: Volume, net: InContextNet) -> None:
    from ..volume import require

    require(target, "target image", ndim=(2, 3), finite=True, varying="there is nothing to segment")
    if target.channels > net.in_channels:
        raise InputError(
            f"target image: expected at most {net.in_channels} channels, got {target.channels}; "
            "take one component first: meddl convert IN -o OUT --component grey (or magnitude, or a channel number)"
        )


def _pick_axis(target: Volume, config: SegmentConfig, painted: np.ndarray | None) -> int | None:
    if target.ndim == 2:
        return None
    if config.axis is not None:
        return config.axis
    if painted is not None:
        # the painting axis is the one whose painted slices leave gaps (unpainted slices between
        # painted ones) and, among those, the one with the fewest painted slices; counting slices,
        # not the painted fraction of the axis, so a thin axis (60 CT slices against 512 rows) with
        # 3 painted slices still beats 20 rows that cross a small painted structure
        count, gaps = [], []
        for ax in range(3):
            idx = np.nonzero(np.any(painted != 0, axis=tuple(a for a in range(3) if a != ax)))[0]
            count.append(len(idx))
            gaps.append(len(idx) < idx[-1] - idx[0] + 1)
        return int(np.argmin([c if g or not any(gaps) else np.inf for c, g in zip(count, gaps, strict=True)]))
    spacing = target.spacing
    return int(np.argmax(spacing + np.array([0.0, 0.0, 1e-6])))


def _to_work(arr: np.ndarray, axis: int | None, size: int, channels: int, scale: float,
             device) -> torch.Tensor:
    """Volume data ``(C, ...)`` -> working slices ``(n, channels, S, S)`` scaled by ``1 / scale``."""
    s = torch.from_numpy(np.ascontiguousarray(_slices(arr, axis)).astype(np.float32) / scale).to(device)
    return pad_channels(_resize(s, (size, size)), channels, 1)


def align_context(target: Volume, image: Volume, output: Volume, mode: str = "affine", seed: int = 0,
                  reporter=None, nearest: bool | None = None,
                  device: torch.device | str = "cpu") -> tuple[Volume, Volume, np.ndarray]:
    """One context pair brought onto ``target``'s grid: ``(image, output, covered)``.

    ``mode``: ``affine`` / ``center`` (:func:`meddl.registration.affine.prealign` of the image's
    first channel to the target's; a 2D pair on a grid of at most :data:`ALIGN_2D_PIXELS` pixels a
    side, a 3D one at 3 mm), ``deformable`` (that same affine, then
    :func:`meddl.registration.register`'s diffeomorphic instance optimisation with LNCC, which
    tolerates smooth contrast changes between scans, on ``device``; image and output are
    resampled once, through the composition of the two), ``none`` (returned as is, every voxel
    covered) or ``auto`` (:func:`resolve_align`). The image is
    resampled linearly (float32; outside the scan, each channel's minimum), the output
    nearest-neighbour when ``nearest`` (default: when it is a label map), else linearly.
    ``covered``: whether each voxel of the target's grid maps inside the context scan, so that
    slices the scan does not reach can be left out.
    """
    from ..registration.affine import apply_matrix, prealign

    mode = resolve_align(mode, target)
    if mode == "none" or image.ndim != target.ndim:
        return image, output, np.ones(image.spatial_shape, bool)

    def first_channel(v: Volume) -> Volume:
        return v.with_data(v.numpy()[:1].astype(np.float32), kind=Kind.INTENSITY)

    if target.ndim == 3:
        working = 3.0
    else:  # 2D: full resolution up to ALIGN_2D_PIXELS a side (a 1024^2 pair took 18 s at full resolution)
        sides = [(float(sp) * n, n) for v in (target, image)
                 for sp, n in zip(v.spacing[: v.ndim], v.spatial_shape, strict=True)]
        working = max((extent / ALIGN_2D_PIXELS for extent, n in sides if n > ALIGN_2D_PIXELS), default=None)
    fixed, moving = first_channel(target), first_channel(image)
    matrix = prealign(fixed, moving, "affine" if mode == "deformable" else mode, seed=seed, reporter=reporter,
                      working_mm=working, option="--align")
    if mode != "deformable":
        def resample(vol: Volume, nearest: bool, default: float) -> Volume:
            return apply_matrix(vol, target, matrix, nearest=nearest, default_value=default)
    else:
        from ..registration.pipeline import RegistrationConfig, register
        from ..transforms import warp

        # the registration network is 3D and trained on brains: instance optimisation serves any example;
        # it starts from this affine, and its displacement includes it (one resampling from the original)
        config = RegistrationConfig(method="optimisation", similarity="lncc", inverse=False, seed=seed,
                                    device=str(device))
        # the registration's messages and cancel checks, at the caller's current fraction
        quiet = reporter.stage(0.0, 0.0) if isinstance(reporter, Reporter) else reporter
        field = register(fixed, moving, config, progress=quiet, initial_matrix=matrix).displacement

        def resample(vol: Volume, nearest: bool, default: float) -> Volume:
            return warp(vol, field, "nearest" if nearest else "linear", default_value=default)

    arr = image.numpy().astype(np.float32)
    moved = resample(image.with_data(arr), False, float("nan")).numpy()
    covered = np.isfinite(moved[0])
    lowest = arr.reshape(arr.shape[0], -1).min(1)
    moved = np.where(np.isfinite(moved), moved, lowest.reshape(-1, *[1] * target.ndim)).astype(np.float32)
    nearest = output.kind is Kind.LABEL if nearest is None else nearest
    out = resample(output, nearest, 0.0)
    return Volume(moved, target.affine, image.kind, dict(image.meta)), out, covered


def segment(target: Volume, config: SegmentConfig | None = None,
            context: list[tuple[Volume, Volume]] | None = None, annotated: Volume | None = None,
            progress=None, cancel=None, network: InContextNet | None = None, size: int | None = None,
            device: torch.device | str = "cpu") -> Volume:
    """Segment (or process) ``target`` from a few examples, with no retraining.

    Args:
        target: ``(C, I, J[, K])`` image, C <= 2.
        config: options (:class:`SegmentConfig`).
        context: (image, label-or-output) pairs from other scans (multi-volume / 2D mode).
        annotated: a label map on the target's grid with a few painted slices (propagation mode).
        network, size: a network and its working size (default: the bundled model, or
            ``config.weights``).

    Returns:
        A label volume ``(1, I, J[, K])`` int16 on the target's grid for segmentation (painted slices
        unchanged in propagation mode), or an intensity volume ``(1, ...)`` float32 for image tasks.
        ``meta["notices"]`` lists what was adjusted (context subsampled, slices skipped).
    """
    config = config or SegmentConfig()
    rep = Reporter.of(progress, cancel)
    if (context is None) == (annotated is None):
        raise InputError("segment: expected either context pairs or an annotated label map, got "
                         + ("both" if context is not None else "neither"))
    flat = one_slice_axis(target)
    if context and flat is not None and all(
            isinstance(img, Volume) and isinstance(out, Volume) and img.same_grid(out)
            and (img.ndim == 2 or one_slice_axis(img) is not None) for img, out in context):
        # a one-slice target with 2D or one-slice examples (Slicer's 2D images): the 2D path, whose
        # alignment and slicing expect a plane, then the answer back on the target's grid
        flat_context = [(as_plain_2d(img), as_plain_2d(out)) for img, out in context]
        result = segment(as_plain_2d(target), config, context=flat_context, progress=rep, network=network,
                         size=size, device=device)
        return Volume(np.expand_dims(result.numpy(), flat + 1), target.affine, result.kind, dict(result.meta))
    if network is None:
        network, size = load_network(config.weights, device)
    size = size or 96
    if size % network.multiple:
        raise InputError(f"working size: expected a multiple of {network.multiple}, got {size}")
    _check_target(target, network)
    notices: list[str] = []
    tarr = target.numpy().astype(np.float32)
    tscale = _scale_of(tarr)
    cin = network.in_channels

    if annotated is not None:
        if not config.is_mask:
            raise InputError(f"annotated: propagation is for segmentation, got task '{config.task.value}'; "
                             "give --context IMAGE OUTPUT pairs for image tasks")
        if target.ndim != 3:
            raise InputError("annotated: expected a 3D target for propagation between slices, got a 2D image; "
                             "give --context IMAGE LABEL pairs for 2D images")
        if annotated.spatial_shape != target.spatial_shape:
            raise InputError(f"annotated: expected the target's size {target.spatial_shape}, "
                             f"got {annotated.spatial_shape}")
        if not annotated.same_grid(target, atol=1e-3):
            raise InputError("annotated: expected the target's grid, got the same size at another position or "
                             "orientation; resample the label map onto the target first")
        labels_arr = _integer_labels(annotated, "annotated")
        if not labels_arr.any():
            raise InputError("annotated: expected at least one painted slice, got an empty label map; "
                             "paint the structure on a few slices first")
        axis = _pick_axis(target, config, labels_arr)
        lab_slices = np.moveaxis(labels_arr, axis, 0)
        painted = lab_slices.reshape(lab_slices.shape[0], -1).any(1)
        n = len(painted)
        values = _values(labels_arr, config.labels, "annotated")
        images = _to_work(tarr, axis, size, cin, tscale, device)
        positions = np.arange(n) / max(n - 1, 1)
        todo = np.nonzero(~painted)[0]
        result = lab_slices.copy()
        if len(todo) == 0:
            notices.append("every slice is painted; nothing to propagate")
        else:
            best = _Best((len(todo), *lab_slices.shape[1:]))
            marks = np.nonzero(painted)[0]
            mark_images, mark_positions = images[marks], positions[marks]  # the same examples for every label
            for li, v in enumerate(values):
                stage = rep.stage(li / len(values), (li + 1) / len(values),
                                  f"label {v} ({li + 1}/{len(values)}): " if len(values) > 1 else "")
                masks = lab_slices[marks] == v
                has = marks[masks.reshape(len(marks), -1).any(1)]
                reach = _label_reach(painted, has, todo)
                if not reach.any():
                    continue
                # every painted slice is an example, those without the label too: a painted slice is
                # fully annotated, so its empty mask says where the structure has ended
                out = torch.from_numpy(masks.astype(np.float32))[:, None].to(device)
                pool = _Pool(mark_images, _resize(out, (size, size)), mark_positions, np.zeros(len(marks), int))
                near = todo[reach]
                p = _run(network, images[near], positions[near], pool, config, size,
                         tuple(lab_slices.shape[1:]), True, notices, stage, Selection.BRACKET)
                if config.prior > 0:
                    p = mix_prior(p, masks, marks, near, config.prior)
                best.update(p, v, reach)
            result[todo] = best.labels(config.threshold)
        data = np.moveaxis(result, 0, axis)[None].astype(_label_dtype(result))
        rep(1.0, "done")
        return Volume(data, target.affine, Kind.LABEL,
                      {"task": "segmentation", "mode": "propagation", "axis": axis, "notices": notices,
                       "filled_slices": int(len(todo))})

    # multi-volume / 2D
    if not context:
        raise InputError("context: expected at least one (image, label) pair, got none")
    if config.selection is Selection.BRACKET:
        raise InputError("selection 'bracket': expected painted slices (--annotated) to bracket the target; "
                         "with context scans, which share positions, use nearest or similar")
    for i, (img, lab) in enumerate(context, 1):
        if img.spatial_shape != lab.spatial_shape:
            raise InputError(f"context pair {i}: expected the label to have the image's size {img.spatial_shape}, "
                             f"got {lab.spatial_shape}")
        if not lab.same_grid(img, atol=1e-3):
            raise InputError(f"context pair {i}: expected the label on its image's grid, got the same size at another "
                             "position or orientation; resample the label onto its image first")
        if img.channels != target.channels:
            raise InputError(f"context pair {i}: expected {target.channels} channel(s) like the target, "
                             f"got {img.channels}")
        if img.ndim == 3 and target.ndim == 2:
            raise InputError(f"context pair {i}: expected a 2D image like the target, got 3D; "
                             "cut the matching slice out first")
    axis = _pick_axis(target, config, None)
    timages = _to_work(tarr, axis, size, cin, tscale, device)
    n = timages.shape[0]
    tpos = np.arange(n) / max(n - 1, 1) if n > 1 else np.array([0.5])
    if config.is_mask:
        label_arrays = [_integer_labels(lab, f"context label {i}") for i, (_, lab) in enumerate(context, 1)]
        for i, la in enumerate(label_arrays, 1):
            if not la.any():
                raise InputError(f"context label {i}: expected a segmentation with at least one labelled voxel, "
                                 "got an empty label map")
        values = _values(np.concatenate([la.ravel() for la in label_arrays]), config.labels, "context labels")
    if config.align != "none":
        aligned, covered = [], []
        for i, (img, lab) in enumerate(context, 1):
            rep(0.0, f"aligning context scan {i} of {len(context)} to the target "
                     f"({resolve_align(config.align, target)})")
            try:
                moved, out, cov = align_context(target, img, lab, config.align, config.seed, rep, config.is_mask,
                                                device=device)
            except InputError as exc:
                advice = "" if "--align" in str(exc) else " (--align none uses the scans as they are)"
                raise InputError(f"context scan {i}: {exc}{advice}") from None
            aligned.append((moved, out))
            covered.append(cov)
        if any(img.ndim != target.ndim for img, _ in context):
            notices.append("2D context pairs are used as they are (not aligned to the 3D target)")
        context = aligned
        if config.is_mask:
            label_arrays = [_integer_labels(lab, f"context label {i}") for i, (_, lab) in enumerate(context, 1)]
    else:
        covered = [np.ones(img.spatial_shape, bool) for img, _ in context]
    pool_img, pool_lab, pool_pos, pool_src = [], [], [], []
    uncovered = np.ones(n, bool)  # target slices no aligned 3D scan reaches
    # the aligned examples' labels on the target's slices, for the atlas prior: (kept slices, labels)
    voters: list[tuple[np.ndarray, np.ndarray]] = []
    vote = config.is_mask and config.atlas_prior > 0 and config.align != "none" and \
        all(img.ndim == target.ndim for img, _ in context)
    for i, (img, lab) in enumerate(context):
        arr = img.numpy().astype(np.float32)
        ax = axis if img.ndim == 3 else None
        # slices of a 3D scan that reach the target after alignment: at least half as much of the slice
        # covered as in the scan's best-covered slice (a scan cropped around an organ covers little of
        # every slice); a 2D example is kept whenever it overlaps the target at all
        cover = _slices(covered[i][None], ax)
        frac = cover.reshape(cover.shape[0], -1).mean(1)
        keep = (frac >= 0.5 * frac.max()) & (frac > 0)
        if not keep.any():
            notices.append(f"context scan {i + 1} does not overlap the target after alignment; left out")
            continue
        if not keep.all():
            where = np.nonzero(keep)[0]
            notices.append(f"context scan {i + 1} covers {len(where)} of the target's {len(keep)} slices "
                           f"({where.min()}-{where.max()})")
        if config.align != "none" and ax is not None:  # aligned: the scan's slices are the target's
            uncovered &= ~keep
        scale = _scale_of(arr[:, covered[i]] if covered[i].any() else arr)
        ci = _to_work(arr, ax, size, cin, scale, device)
        if config.is_mask:
            lo = torch.from_numpy(_slices(label_arrays[i][None], ax).astype(np.float32)).to(device)
        else:
            lo = torch.from_numpy(_slices(lab.numpy()[:1].astype(np.float32) / scale, ax).astype(np.float32)).to(device)
        m = ci.shape[0]
        pos = np.arange(m) / max(m - 1, 1) if m > 1 else np.array([0.5])
        sel = torch.from_numpy(np.nonzero(keep)[0]).to(device)
        pool_img.append(ci[sel])
        pool_lab.append(lo[sel])
        pool_pos.append(pos[keep])
        pool_src.append(np.full(int(keep.sum()), i))
        if vote:
            voters.append((keep, _slices(label_arrays[i][None], ax)[:, 0]))
    if not pool_img:
        raise InputError("context: no context scan overlaps the target after alignment; "
                         "check the scans, or give --align none to use them as they are")
    if config.align != "none" and 0 < uncovered.sum() < n and all(img.ndim == 3 for img, _ in context):
        where = np.nonzero(uncovered)[0]
        notices.append(f"{len(where)} target slice(s) ({where.min()}-{where.max()}) lie outside every context "
                       "scan; they take the nearest covered slices as context")
    images = torch.cat(pool_img)
    raw_out = pool_lab
    positions = np.concatenate(pool_pos)
    sources = np.concatenate(pool_src)
    tshape = tuple(_slices(tarr, axis).shape[2:])
    # scans aligned onto a 3D target: each target slice takes the slices at its position and the one
    # on either side (far slices of a scan show other anatomy), completed by deformed copies
    reach = 1.0 / (n - 1) if (config.align != "none" and n > 1 and
                              all(img.ndim == 3 for img, _ in context)) else None
    if config.is_mask:
        best = _Best((n, *tshape))
        for li, v in enumerate(values):
            stage = rep.stage(li / len(values), (li + 1) / len(values),
                              f"label {v} ({li + 1}/{len(values)}): " if len(values) > 1 else "")
            outs = torch.cat([_resize((o == v).float(), (size, size)) for o in raw_out])
            pool = _Pool(images, outs, positions, sources, reach)
            p = _run(network, timages, tpos, pool, config, size, tshape, True, notices, stage, Selection.NEAREST)
            if voters:
                p = _mix_votes(p, voters, v, config.atlas_prior)
            best.update(p, v)
        result = best.labels(config.threshold)
        data = _unslice(result[:, None], axis, target.ndim).astype(_label_dtype(result))
        kind = Kind.LABEL
    else:
        outs = torch.cat([_resize(o, (size, size)) for o in raw_out])
        pool = _Pool(images, outs, positions, sources, reach)
        pred = _run(network, timages, tpos, pool, config, size, tshape, False, notices, rep, Selection.NEAREST)
        data = (_unslice(pred[:, None], axis, target.ndim) * tscale).astype(np.float32)
        kind = Kind.INTENSITY
    rep(1.0, "done")
    return Volume(data, target.affine, kind,
                  {"task": config.task.value, "mode": "context", "axis": axis, "notices": notices})


def _mix_votes(network: np.ndarray, voters: list[tuple[np.ndarray, np.ndarray]], value: int,
               weight: float) -> np.ndarray:
    """``(1 - w) * network + w * vote`` per target slice ``(n, H, W)``, the vote being the mean of
    the aligned examples' masks of ``value`` over the examples that reach that slice (the network
    alone on slices none reaches)."""
    total = np.zeros(network.shape, np.float32)
    count = np.zeros(network.shape[0], np.float32)
    for keep, labels in voters:
        total[keep] += labels[keep] == value
        count += keep
    has = count > 0
    out = network.copy()
    out[has] = (1 - weight) * network[has] + weight * total[has] / count[has, None, None]
    return out


def _values(arr: np.ndarray, wanted: tuple[int, ...] | None, role: str) -> list[int]:
    present = [int(v) for v in np.unique(arr) if v != 0]
    if wanted is None:
        return present
    missing = [v for v in wanted if v not in present]
    if missing:
        raise InputError(f"labels: expected values present in the {role} ({present[:20]}), got {missing}")
    return list(wanted)


def _run(net: InContextNet, targets: torch.Tensor, where: np.ndarray, pool: _Pool, config: SegmentConfig,
         size: int, out_shape: tuple[int, int], is_mask: bool, notices: list[str], rep: Reporter,
         auto: Selection) -> np.ndarray:
    """Predict target slices from a pool: probabilities (masks) or values ``(n, H, W)`` at the slices' size.

    ``auto`` is the selection that ``Selection.AUTO`` stands for here.
    """
    selection = auto if config.selection is Selection.AUTO else config.selection
    config = replace(config, selection=selection)
    k = min(config.context_size, pool.images.shape[0])
    if selection is Selection.BRACKET:
        k = min(k, 2)
    fit = _budget(k, size, net, config.batch, config.memory_mb)
    if fit < k:
        notices.append(f"context subsampled from {k} to {fit} slices to stay within {config.memory_mb:g} MB")
        k = fit
    if pool.reach is not None and selection is not Selection.BRACKET:
        if "at the target slice's position" not in " ".join(notices):
            notices.append(f"context: each example's slices at the target slice's position and next to it "
                           f"(at most {k}, {selection.value})")
    elif pool.images.shape[0] > k and f"context: {k} of {pool.images.shape[0]}" not in " ".join(notices):
        notices.append(f"context: {k} of {pool.images.shape[0]} slices per target slice ({selection.value})")
    if config.finetune_steps:
        net = _finetune(net, pool, is_mask, config.finetune_steps, config.finetune_lr, config.seed, rep.stage(0, 0.5))
        rep = rep.stage(0.5, 1.0)
    augment_to = 0
    # multi-volume / 2D segmentation; a slice's context can be smaller than k when the pool has a reach
    if is_mask and auto is not Selection.BRACKET and (config.augment > k or pool.reach is not None):
        augment_to = min(config.augment, _budget(config.augment, size, net, config.batch, config.memory_mb))
        if augment_to > 1 and "deformed copies" not in " ".join(notices):
            notices.append(f"context: fewer than {augment_to} slices per target slice are completed with "
                           "deformed copies (--augment)")
    raw = _predict(net, targets, where, pool, k, config, rep, augment_to, is_mask=is_mask)
    raw = _resize(raw, out_shape)
    out = torch.sigmoid(raw) if is_mask else raw
    return out[:, 0].cpu().numpy()
