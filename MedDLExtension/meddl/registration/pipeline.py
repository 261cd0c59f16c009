"""The full registration pipeline behind :func:`meddl.registration.register`.

fixed + moving (any grids, sizes and spacings) -> affine pre-alignment -> network velocity on
the grid it was trained at (the model card's ``spacing_mm``) -> instance optimisation on a pyramid -> displacement on the fixed grid (RAS mm,
resampling convention) -> warped image, Jacobian determinant, inverse, warped labels, summary.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, Reporter
from ..volume import Kind, Volume, as_plain_2d, geometry_from_affine, one_slice_axis, require
from .affine import AffineMode, overlap_fraction, prealign
from .optimise import (
    Grid,
    LevelReport,
    block_average,
    block_factors,
    coarser_grid,
    make_grid,
    optimise_velocity,
    pad_voxels,
    padded_grid,
    to_grid,
    upsample_field,
    warp_padded,
)
from .similarity import DeepSimLoss, LnccLoss, MindLoss, Similarity, mi_loss
from .svf import integrate, sample, voxel_to_mm, warp

__all__ = ["Method", "RegistrationConfig", "RegistrationResult", "register", "auto_levels", "REGISTRATION_MODEL",
           "DEEPSIM_MODEL", "DEFAULT_LEVELS_MM"]

REGISTRATION_MODEL = "registration_synthmorph"
DEEPSIM_MODEL = "registration_deepsim_seg"


class Method(str, enum.Enum):
    """Which stages produce the deformable field."""

    NETWORK_OPTIMISATION = "network+optimisation"  #: network prediction refined by instance optimisation
    NETWORK = "network"  #: one network pass (fastest)
    OPTIMISATION = "optimisation"  #: instance optimisation from a zero field


#: diffusion-regulariser weight per similarity when none is given (chosen on the benchmark's synthetic
#: MNI152 pairs: MIND 0.03 / 0.05 / 0.1 / 0.3 / 1.0 gave Dice 0.870 / 0.901 / 0.906 / 0.866 / 0.829)
DEFAULT_REGULARISATION = {
    Similarity.LNCC: 1.0,
    Similarity.MI: 1.0,
    Similarity.MIND: 0.1,
    Similarity.DEEPSIM: 1.0,
}


@dataclass(frozen=True)
class RegistrationConfig:
    """Everything that controls :func:`register` (CLI flags mirror the fields in kebab-case).

    Attributes:
        method: network+optimisation (default), network or optimisation.
        similarity: lncc (same contrast), mi or mind (across contrasts; MIND-SSC descriptors) or
            deepsim (semantic features).
        affine: pre-alignment: affine (default), center (centre of mass) or none (trust headers).
        iterations: most Adam steps per pyramid level of instance optimisation, one number for
            every level or a tuple with one per level (coarse to fine). Each level starts
            from the coarser one's answer; on the four benchmark pairs 15 steps per level scored
            within 0.002 Dice of 30 in half the time (10: within 0.003).
        levels_mm: working-grid spacings of instance optimisation, coarse to fine (never finer
            than the fixed image). ``None`` (default): :func:`auto_levels`, i.e. (5, 3, 2) mm
            for a field of view of an adult human head or larger (the 2 mm level adds about 0.01
            Dice over (5, 3) on the benchmark pairs for about 3x the time), scaled down for a
            smaller field of view (a macaque or rodent brain, a cropped region).
        regularisation: weight of the diffusion regulariser during optimisation (None: the
            similarity's default, :data:`DEFAULT_REGULARISATION`; MIND's loss is about ten times
            smaller than the others', hence its smaller weight).
        fold_penalty: weight of a barrier on ``det J < 0.1`` of each working grid's displacement
            (:func:`~meddl.registration.svf.folding_barrier`). It leaves smooth regions alone and
            removes the few folded voxels that large inter-subject deformations otherwise keep
            (benchmark `colin-to-mni`: 13 voxels -> 0, Dice unchanged); 0 turns it off.
        learning_rate: Adam step in voxels of each level's grid.
        tolerance: relative loss improvement over 10 steps below which a level stops.
        steps: scaling-and-squaring steps.
        velocity_factor: the velocity of each level lives on a grid this much coarser than its
            image grid (smooth and cheap; 1 = same grid). 3 (default) against 2 on the benchmark pairs:
            Dice within -0.0013 / +0.0033 on each, about 20 % less time (docs/benchmarks/registration.md).
        network_spacing_mm: grid spacing the network runs at, for a model card that does not give
            its training resolution (``spacing_mm``; the bundled one does).
        max_grid: most voxels along an axis of any working grid (coarser spacing beyond).
        crop_margin_mm: instance optimisation works on the bounding box of the fixed image's
            foreground (above 5 % of its intensity range, on 4 mm blocks) grown by this margin, not on
            the whole field of view: the air around a head costs time and carries no signal. The
            field beyond the box continues its border values (smooth, no folding). ``None``: the
            whole field of view.
        max_voxels: largest fixed grid answered at full resolution; beyond, an error says how
            much memory it would need.
        inverse: also compute the inverse transform (on the moving grid).
        weights: registration-network weights file (default: the bundled model).
        deepsim_weights: DeepSim feature-extractor weights (default: the bundled model).
        device: torch device string ("cpu", "cuda", ...).
        seed: seeds the affine metric sampling (reproducible runs).
    """

    method: Method = Method.NETWORK_OPTIMISATION
    similarity: Similarity = Similarity.LNCC
    affine: AffineMode = AffineMode.AFFINE
    iterations: int | tuple[int, ...] = 15
    levels_mm: tuple[float, ...] | None = None
    regularisation: float | None = None
    fold_penalty: float = 100.0
    learning_rate: float = 0.1
    tolerance: float = 1e-3
    steps: int = 7
    velocity_factor: float = 3.0
    network_spacing_mm: float = 4.0
    max_grid: int = 128
    crop_margin_mm: float | None = 10.0
    max_voxels: int = 64 * 1024 * 1024
    inverse: bool = True
    weights: str | None = None
    deepsim_weights: str | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, enum_cls in (("method", Method), ("similarity", Similarity), ("affine", AffineMode)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_cls(value))
            except ValueError:
                choices = ", ".join(e.value for e in enum_cls)
                raise InputError(f"registration {name}: expected one of {choices}, got {value!r}") from None
        its = self.iterations
        if isinstance(its, (list, tuple)):
            if not its or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in its):
                raise InputError(f"registration iterations: expected integers >= 0, one per level, got {its!r}")
            object.__setattr__(self, "iterations", tuple(int(n) for n in its))
        elif isinstance(its, bool) or not isinstance(its, (int, np.integer)) or its < 0:
            raise InputError(f"registration iterations: expected an integer >= 0, got {its!r}")
        else:
            object.__setattr__(self, "iterations", int(its))
        if self.levels_mm is not None:
            levels = tuple(float(x) for x in self.levels_mm)
            if not levels or any(not math.isfinite(x) or x <= 0 for x in levels):
                raise InputError(f"registration levels_mm: expected positive spacings, got {self.levels_mm!r}")
            object.__setattr__(self, "levels_mm", levels)
        if self.regularisation is None:
            object.__setattr__(self, "regularisation", DEFAULT_REGULARISATION[self.similarity])
        if not self.velocity_factor >= 1:
            raise InputError(f"registration velocity_factor: expected >= 1, got {self.velocity_factor!r}")
        for name in ("regularisation", "fold_penalty", "learning_rate", "tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"registration {name}: expected a finite number >= 0, got {value!r}")
        margin = self.crop_margin_mm
        if margin is not None and (isinstance(margin, (bool, np.bool_)) or not isinstance(margin, (int, float, np.number))
                                   or not math.isfinite(margin) or margin < 0):
            raise InputError(f"registration crop_margin_mm: expected a finite number >= 0 or None, got {margin!r}")
        if not 0 <= int(self.steps) <= 12:
            raise InputError(f"registration steps: expected 0..12 scaling-and-squaring steps, got {self.steps}")
        if self.max_grid < 16 or self.max_voxels < 1:
            raise InputError("registration max_grid/max_voxels: expected max_grid >= 16 and max_voxels >= 1")


@dataclass
class RegistrationResult:
    """What :func:`register` returns; every volume is on the fixed grid unless said otherwise.

    Attributes:
        warped: the moving image resampled onto the fixed grid ``(1, *fixed.spatial_shape)``.
        displacement: kind displacement ``(ndim, *fixed.spatial_shape)``, RAS mm, resampling
            convention (fixed point ``p`` -> ``p + u(p)`` in the moving image), affine included.
        jacobian: ``det(I + du/dx)`` ``(1, *fixed.spatial_shape)``; ``<= 0`` is folding.
        inverse: displacement on the moving grid mapping moving points to fixed ones (or None).
        warped_labels: moving labels resampled nearest-neighbour onto the fixed grid (or None).
        affine_matrix: 4x4 RAS pre-alignment (fixed point -> moving point).
        summary: facts for the summary line: folding_percent, sdlogj, seconds, device, ...
    """

    warped: Volume
    displacement: Volume
    jacobian: Volume
    inverse: Volume | None
    warped_labels: Volume | None
    affine_matrix: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


# -- input checks -------------------------------------------------------------------------------


def _normalise(vol: Volume) -> np.ndarray:
    """Intensities to [0, 1] by the 0.5 / 99.5 percentiles (contrast- and scanner-agnostic)."""
    arr = vol.numpy()[0].astype(np.float32)
    flat = arr.ravel()[:: max(1, arr.size // 2_000_000)]
    lo, hi = (float(x) for x in np.percentile(flat, [0.5, 99.5]))
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        lo, hi = float(arr.min()), float(arr.max())
    return np.clip((arr - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def _working_copy(data: torch.Tensor, affine: np.ndarray, finest_mm: float) -> tuple[torch.Tensor, np.ndarray]:
    """``data`` ``(1, 1, *S)`` block-averaged to at most the finest working spacing, with its affine.

    Every working grid is at least ``finest_mm`` coarse, so an image of finer voxels (a 1 mm scan at
    the default 2 mm finest level) is first averaged over blocks of ``floor(finest / spacing)``
    voxels per axis, once (:func:`~meddl.registration.optimise.block_average`); each level's
    smoothing and resampling then start from a volume up to 8x smaller (a 0.5 mm scan: 64x). On the
    1 mm benchmark pair this kept the Dice (0.9528 -> 0.9529) and cut the time by a quarter (blocks
    of half the finest spacing before). Images at the finest spacing or coarser are returned unchanged.
    """
    nd = data.dim() - 2
    spacing = geometry_from_affine(affine)[0][:nd]
    return block_average(data, affine, block_factors(finest_mm / spacing, tuple(data.shape[2:])))


def _foreground_box(normalised: np.ndarray, vol: Volume, margin_mm: float | None) -> Volume:
    """``vol`` cropped to the bounding box of its foreground grown by ``margin_mm`` (see
    :attr:`RegistrationConfig.crop_margin_mm`), or ``vol`` itself when the box is most of it.

    ``normalised``: ``vol``'s intensities in [0, 1] (:func:`_normalise`). The foreground is
    ``> 0.05`` after averaging over blocks of about 4 mm, so isolated noisy voxels in the air do
    not stretch the box. Only the geometry of the result matters (it defines the working grids).
    """
    if margin_mm is None:
        return vol
    nd = vol.ndim
    spacing = geometry_from_affine(vol.affine)[0][:nd]
    block = [max(1, min(int(round(4.0 / s)), n)) for s, n in zip(spacing, vol.spatial_shape, strict=True)]
    t = torch.from_numpy(np.ascontiguousarray(normalised))[None, None]
    pool = torch.nn.functional.avg_pool3d if nd == 3 else torch.nn.functional.avg_pool2d
    pooled = pool(t, kernel_size=block, stride=block, ceil_mode=True)[0, 0].numpy()
    found = np.argwhere(pooled > 0.05)
    if found.size == 0:
        return vol
    lo = found.min(0) * np.array(block)
    hi = (found.max(0) + 1) * np.array(block)
    shape = np.array(vol.spatial_shape)
    grow = np.ceil(np.minimum(float(margin_mm) / spacing, shape)).astype(int)  # no wider than the image
    lo = np.maximum(lo - grow, 0)
    hi = np.minimum(hi + grow, shape)
    if np.prod(hi - lo) > 0.9 * np.prod(shape):
        return vol
    view = vol.numpy()[(slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)))]
    affine = np.array(vol.affine, dtype=np.float64, copy=True)
    affine[:3, 3] = affine[:3, 3] + affine[:3, :nd] @ lo.astype(np.float64)
    return Volume(view, affine, vol.kind)


def _check_inputs(fixed: Volume, moving: Volume, labels: Volume | None, config: RegistrationConfig) -> None:
    for role, vol in (("fixed image", fixed), ("moving image", moving)):
        if not isinstance(vol, Volume):
            raise InputError(f"{role}: expected a meddl Volume, got {type(vol).__name__}")
        require(vol, role, ndim=(2, 3), scalar=True)
        if vol.kind not in (Kind.INTENSITY, Kind.LABEL):
            raise InputError(f"{role}: expected an intensity image, got a {vol.kind.value} volume")
        arr = vol.numpy()
        if arr.size == 0 or min(vol.spatial_shape) < 4:
            raise InputError(f"{role}: expected at least 4 voxels along every axis, got shape {vol.spatial_shape}")
        require(vol, role, ndim=(2, 3), finite=False, varying="nothing to register")
    if fixed.ndim != moving.ndim:
        raise InputError(f"moving image: expected {fixed.ndim}D like the fixed image, got {moving.ndim}D")
    n = int(np.prod(fixed.spatial_shape))
    if n > config.max_voxels:
        need = n * 4 * 3 * 6 / 2**30
        raise InputError(
            f"fixed image: {n / 1e6:.0f} M voxels {fixed.spatial_shape} is above the limit of "
            f"{config.max_voxels / 1e6:.0f} M (the full-resolution outputs would need about {need:.1f} GiB); "
            "resample it to a coarser grid first or raise max_voxels"
        )
    if labels is not None:
        if not isinstance(labels, Volume):
            raise InputError(f"moving labels: expected a meddl Volume, got {type(labels).__name__}")
        if labels.ndim != moving.ndim or labels.channels != 1:
            raise InputError(
                f"moving labels: expected a single-channel {moving.ndim}D label map, got {labels.ndim}D with "
                f"{labels.channels} channel(s)"
            )
        if not labels.same_grid(moving, atol=1e-3):
            raise InputError(
                f"moving labels: expected the moving image's grid {moving.spatial_shape}, got "
                f"{labels.spatial_shape} on another grid; resample the labels onto the moving image first"
            )
        arr = labels.numpy()
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.equal(np.mod(arr, 1), 0)):
            raise InputError("moving labels: expected integer label values, got fractional values")


# -- helpers ------------------------------------------------------------------------------------


def _similarity(config: RegistrationConfig, device) -> Any:
    if config.similarity is Similarity.LNCC:
        return LnccLoss(radius=2)
    if config.similarity is Similarity.MI:
        return lambda w, f: mi_loss(w, f)
    if config.similarity is Similarity.MIND:
        return MindLoss()
    from ..models import load_model

    net, _ = load_model(DEEPSIM_MODEL, config.deepsim_weights, device=device,
                       architecture="meddl.registration.network:SegmentationNet")
    return DeepSimLoss(net)


def _fixed_points_field(u_vox: torch.Tensor, grid: Grid, target: Volume, matrix: np.ndarray | None,
                        inverse: bool = False) -> np.ndarray:
    """Total displacement (RAS mm) on ``target``'s grid, chunked along the first axis.

    Forward (on the fixed grid): ``d(p) = M (p + u(p)) - p``.
    Inverse (on the moving grid): ``d(m) = q + u(q) - m`` with ``q = M^-1 m`` and ``u = exp(-v)``.

    Both are ``(A - I) p + L u(S p)`` for affines ``A`` (``M`` or ``M^-1``) and ``S`` (target voxel -> working
    grid voxel) and ``L`` the linear part of ``M`` (forward) or the identity: the affine parts are evaluated per
    axis and broadcast, ``L`` is applied on the working grid, so the full-size work is one trilinear sample
    and one sum (a 57 M-voxel target would otherwise need float64 coordinate grids).
    """
    nd = len(grid.shape)
    m = np.eye(4) if matrix is None else np.asarray(matrix, dtype=np.float64)
    outer = np.linalg.inv(m) if inverse else m
    t = np.asarray(target.affine, dtype=np.float64)
    to_grid = np.linalg.inv(grid.affine) @ (outer if inverse else np.eye(4)) @ t  # target index -> grid index
    offset = (outer - np.eye(4)) @ t  # target index -> (A - I) p
    lin = np.eye(nd) if inverse else m[:nd, :nd]
    dev, dtype = u_vox.device, u_vox.dtype
    lu = torch.einsum("cd,nd...->nc...", torch.as_tensor(lin, dtype=dtype, device=dev), voxel_to_mm(u_vox, grid.affine))
    shape = target.spatial_shape
    out = np.empty((nd, *shape), dtype=np.float32)
    per_slice = int(np.prod(shape[1:]))
    step = max(1, (1 << 21) // max(per_slice, 1))

    def affine_of_index(a: np.ndarray, axes: list[torch.Tensor]) -> torch.Tensor:
        """``a[:nd, :nd] @ index + a[:nd, 3]`` on the chunk ``(nd, *chunk)``, float64, by broadcasting."""
        total = torch.as_tensor(a[:nd, 3], dtype=torch.float64, device=dev).view(nd, *([1] * nd))
        for k, ax in enumerate(axes):
            col = torch.as_tensor(a[:nd, k], dtype=torch.float64, device=dev).view(nd, *([1] * nd))
            total = total + col * ax.view(*([1] * (k + 1)), -1, *([1] * (nd - k - 1)))
        return total

    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        axes = [torch.arange(start, stop, dtype=torch.float64, device=dev)]
        axes += [torch.arange(n, dtype=torch.float64, device=dev) for n in shape[1:]]
        coords = affine_of_index(to_grid, axes).to(dtype)[None]
        d = sample(lu, coords, padding_mode="border")[0].double() + affine_of_index(offset, axes)
        out[:, start:stop] = d.float().cpu().numpy()
    return out


#: how far beyond the optimised box (mm) the moving image is sampled, i.e. the largest displacement
#: that brings content from outside the box in (beyond the crop margin itself)
MOVING_PAD_MM = 30.0

#: a deformable answer whose mutual information with the fixed image falls below this share of the
#: affine start's is flagged in the notes (DeepSim across contrasts on the benchmark: 0.609 -> 0.527;
#: good registrations raise it, e.g. 0.609 -> 0.739 with MIND on the same pair)
MI_WARNING_RATIO = 0.97


def _information_check(fixed_t, fixed_aff, moving_t, moving_aff, matrix, u, vgrid: Grid, grid: Grid,
                       moving_pad_mm: float = 0.0) -> tuple[float, float]:
    """Mutual information (nats, 32 bins) between the fixed image and the moving one after the affine
    alone and after the whole registration, on ``grid`` (a check independent of the similarity used)."""
    f = to_grid(fixed_t, fixed_aff, grid)
    pad = pad_voxels(moving_pad_mm, grid)
    m = to_grid(moving_t, moving_aff, padded_grid(grid, pad), matrix)
    return _information_from(f, m, pad, u, vgrid, grid)


def _information_from(f: torch.Tensor, m: torch.Tensor, pad: int, u: torch.Tensor, vgrid: Grid,
                      grid: Grid) -> tuple[float, float]:
    """:func:`_information_check` on images already on ``grid`` (the moving one ``pad`` voxels wider)."""
    start = m[(slice(None), slice(None), *[slice(pad, pad + n) for n in grid.shape])]
    moved = warp_padded(m, upsample_field(u, vgrid, grid), pad)
    return -float(mi_loss(start, f)), -float(mi_loss(moved, f))


class _TooSmallForNetwork(InputError):
    """The fixed image's field of view is smaller than the network's coarsest level needs."""


def _extent_mm(vol: Volume) -> np.ndarray:
    spacing, _, _ = geometry_from_affine(vol.affine)
    return np.asarray(vol.spatial_shape, dtype=np.float64) * spacing[: vol.ndim]


def _improves(v, f, m, loss_fn, steps: int) -> bool:
    """Whether the velocity ``v`` matches the images ``f``, ``m`` (on its grid) better than no deformation."""
    with torch.no_grad():
        compare = loss_fn
        if getattr(loss_fn, "warps_descriptors", False):
            f, m, compare = loss_fn.descriptors(f), loss_fn.descriptors(m), loss_fn.compare
        return float(compare(warp(m, integrate(v, steps)), f)) < float(compare(m, f))


def _network_velocity(fixed_t, fixed_aff, moving_t, moving_aff, matrix, fixed: Volume, config, device,
                      reporter) -> tuple[torch.Tensor, Grid, dict, tuple[torch.Tensor, torch.Tensor]]:
    """The network's velocity on its grid, the grid, facts, and the (fixed, moving) images it saw."""
    from ..models import load_model

    net, card = load_model(REGISTRATION_MODEL, config.weights, device=device,
                           architecture="meddl.registration.network:VelocityNet")
    spacing = float(card.extra.get("spacing_mm", config.network_spacing_mm))
    grid = make_grid(fixed, spacing, divisor=net.divisor, max_size=config.max_grid)
    if min(grid.shape) < 2 * net.divisor:  # the deepest level would hold a single voxel
        least = 2 * net.divisor * spacing
        raise _TooSmallForNetwork(
            f"fixed image: the registration network needs at least {least:g} mm along every axis "
            f"(it runs on a {spacing:g} mm grid), got a field of view of "
            f"{' x '.join(f'{e:.0f}' for e in _extent_mm(fixed))} mm"
        )
    f = to_grid(fixed_t, fixed_aff, grid)
    m = to_grid(moving_t, moving_aff, grid, matrix)
    reporter(0.5, "network")
    with torch.no_grad():
        v = net(f, m)
    return v, grid, {"network": card.name, "network_step": card.metrics.get("step")}, (f, m)


# -- the pipeline -------------------------------------------------------------------------------


#: the default working grids (mm) for a field of view of an adult human head (MNI152: 182 mm)
DEFAULT_LEVELS_MM = (5.0, 3.0, 2.0)
#: the field of view those levels are meant for (mm, largest extent)
REFERENCE_EXTENT_MM = 180.0


def _json_number(x: float, digits: int = 5) -> float | None:
    return round(float(x), digits) if math.isfinite(x) else None


def _level_iterations(iterations: int | tuple[int, ...], levels_mm: tuple[float, ...],
                      pyramid: int | None) -> list[int]:
    """Adam steps per level: one number for every level, or one per level (coarse to fine).

    ``pyramid``: the number of automatic levels before a tiny field of view dropped the coarsest
    ones (None when the levels were given); counts written for that whole pyramid keep their finest
    entries.
    """
    if isinstance(iterations, int):
        return [iterations] * len(levels_mm)
    counts = list(iterations)
    if len(counts) == len(levels_mm):
        return counts
    if pyramid is not None and len(counts) == pyramid > len(levels_mm):
        return counts[-len(levels_mm):]
    raise InputError(
        f"iterations: expected one number, or one per level ({len(levels_mm)}: "
        f"{' '.join(f'{s:g}' for s in levels_mm)} mm), got {len(counts)}"
    )


def auto_levels(fixed: Volume) -> tuple[float, ...]:
    """The default working-grid spacings for ``fixed``: :data:`DEFAULT_LEVELS_MM` times
    ``min(1, max(extent / 180 mm, finest spacing / 2 mm))``, ``extent`` the largest side of the
    fixed image's field of view.

    A human head keeps (5, 3, 2) mm; a macaque brain imaged at 0.5 mm in an ~80 mm box gets about
    (2.2, 1.3, 0.9) mm, so its working grids hold as many voxels across the brain as a human's
    (and cost about the same time). The finest level is never scaled below the image's own
    spacing, so a small, coarse image keeps its coarse-to-fine pyramid (a 40 mm box at 2 mm keeps
    5, 3, 2 mm).
    """
    spacing, _, _ = geometry_from_affine(fixed.affine)
    extent = float(_extent_mm(fixed).max())
    finest = float(np.min(spacing[: fixed.ndim]))
    scale = min(1.0, max(extent / REFERENCE_EXTENT_MM, finest / DEFAULT_LEVELS_MM[-1]))
    return tuple(round(level * scale, 4) for level in DEFAULT_LEVELS_MM)


def _plane_voxels(vol: Volume) -> np.ndarray:
    """4 x 3 matrix: a one-slice volume's in-plane voxel indices ``(a, b, 1)`` -> its 3D voxel
    indices (the slice index 0), homogeneous."""
    axis = one_slice_axis(vol)
    kept = [a for a in range(3) if a != axis]
    out = np.zeros((4, 3))
    out[kept[0], 0] = out[kept[1], 1] = 1.0
    out[3, 2] = 1.0
    return out


def _lift_field(u2: np.ndarray, source: Volume, target: Volume) -> np.ndarray:
    """A 2D displacement on ``source``'s plain grid (:func:`~meddl.volume.as_plain_2d`; RAS mm,
    source point -> target point) as a 3D one on ``source``'s one-slice grid, in world RAS mm: the
    in-plane voxel reached in ``target`` is placed on ``target``'s slice."""
    shape2 = u2.shape[1:]
    ii, jj = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape2], indexing="ij")
    s_src, s_tgt = ([float(v.spacing[a]) for a in range(3) if a != one_slice_axis(v)] for v in (source, target))
    reached = np.stack([(ii * s_src[0] + u2[0]) / s_tgt[0], (jj * s_src[1] + u2[1]) / s_tgt[1], np.ones_like(ii)])
    here = np.stack([ii, jj, np.ones_like(ii)])
    world_to = (target.affine @ _plane_voxels(target) @ reached.reshape(3, -1))[:3]
    world_from = (source.affine @ _plane_voxels(source) @ here.reshape(3, -1))[:3]
    u3 = (world_to - world_from).reshape(3, *shape2)
    return np.expand_dims(u3, one_slice_axis(source) + 1).astype(np.float32)


def _register_one_slice(fixed: Volume, moving: Volume, config: RegistrationConfig, rep: Reporter,
                        moving_labels: Volume | None, initial_matrix: np.ndarray | None) -> RegistrationResult:
    """Two one-slice volumes (how Slicer holds 2D images; any orientation, the planes need not
    coincide): registered as 2D images, in each one's plane, and every answer put back on the
    one-slice grids. With ``affine none`` the scanner coordinates relate the two planes (each point
    of the fixed slice to the nearest point of the moving one)."""
    if initial_matrix is not None:
        raise InputError("initial matrix: not supported for one-slice volumes; register them as 2D images")
    if moving_labels is not None and not (isinstance(moving_labels, Volume) and moving_labels.same_grid(moving, 1e-3)):
        raise InputError(f"moving labels: expected the moving image's grid {moving.spatial_shape}, got "
                         + (f"{moving_labels.spatial_shape}" if isinstance(moving_labels, Volume) else "no volume")
                         + " or another position; resample them onto the moving image first")
    f2, m2 = as_plain_2d(fixed), as_plain_2d(moving)
    # in-plane voxel (a, b, 1) -> plain 2D point (mm, homogeneous)
    s_f, s_m = np.diag([*np.diag(f2.affine)[:2], 1.0]), np.diag([*np.diag(m2.affine)[:2], 1.0])
    p_f, p_m = _plane_voxels(fixed), _plane_voxels(moving)
    matrix = None
    if config.affine is AffineMode.NONE:  # the scanner's relation of the two planes, as a 2D matrix
        plane = s_m @ p_m.T @ np.linalg.inv(moving.affine) @ fixed.affine @ p_f @ np.linalg.inv(s_f)
        matrix = np.eye(4)
        matrix[:2, :2], matrix[:2, 3] = plane[:2, :2], plane[:2, 2]
    flat = register(f2, m2, config, progress=rep, moving_labels=None if moving_labels is None
                    else as_plain_2d(moving_labels), initial_matrix=matrix)

    def lift(vol: Volume | None, like: Volume) -> Volume | None:
        if vol is None:
            return None
        return Volume(np.expand_dims(vol.numpy(), one_slice_axis(like) + 1), like.affine, vol.kind, dict(vol.meta))

    displacement = Volume(_lift_field(flat.displacement.numpy().astype(np.float64), fixed, moving), fixed.affine,
                          Kind.DISPLACEMENT, dict(flat.displacement.meta))
    inverse = None
    if flat.inverse is not None:
        inverse = Volume(_lift_field(flat.inverse.numpy().astype(np.float64), moving, fixed), moving.affine,
                         Kind.DISPLACEMENT, dict(flat.inverse.meta))
    summary = dict(flat.summary)
    summary["affine"] = config.affine.value
    summary["notes"] = ["one-slice volumes: registered as the 2D images they are"] + summary.get("notes", [])
    # the 2D matrix as a 3D one, fixed world point -> moving world point (the slice axis onto the slice axis)
    voxel = p_m @ np.linalg.inv(s_m) @ flat.affine_matrix[[0, 1, 3]][:, [0, 1, 3]] @ s_f @ p_f.T
    voxel[one_slice_axis(moving), one_slice_axis(fixed)] = 1.0
    matrix3 = moving.affine @ voxel @ np.linalg.inv(fixed.affine)
    return RegistrationResult(lift(flat.warped, fixed), displacement, lift(flat.jacobian, fixed), inverse,
                              lift(flat.warped_labels, fixed), matrix3, summary)


def register(
    fixed: Volume,
    moving: Volume,
    config: RegistrationConfig | None = None,
    progress: ProgressCallback | Reporter | None = None,
    cancel: CancelToken | None = None,
    moving_labels: Volume | None = None,
    initial_matrix: np.ndarray | None = None,
) -> RegistrationResult:
    """Deformable, diffeomorphic registration of ``moving`` onto ``fixed``.

    Args:
        fixed: scalar image ``(1, I, J[, K])``; the answer lives on its grid.
        moving: scalar image of the same dimension, any grid, size and spacing.
        config: :class:`RegistrationConfig` (defaults: network + optimisation, LNCC).
        progress: callback ``(fraction, message)`` or a :class:`~meddl.progress.Reporter`.
        cancel: token; a cancel stops at the next step with :class:`~meddl.errors.Cancelled`.
        moving_labels: a label map on the moving grid, warped nearest-neighbour.
        initial_matrix: a pre-alignment the caller already has (4x4 RAS, fixed point -> moving
            point), used instead of ``config.affine``'s; the displacement includes it.

    Returns:
        :class:`RegistrationResult` (warped image, displacement, Jacobian, inverse, labels, summary).

    2D pairs run instance optimisation only (the network is 3D): ``network`` is refused and
    ``network+optimisation`` runs as ``optimisation`` (noted in the summary). Images whose fields
    of view do not overlap are brought together by their centres of mass (affine modes other
    than ``none``); with ``none`` they are refused.
    """
    from .. import transforms

    config = config or RegistrationConfig()
    rep = Reporter.of(progress, cancel)
    started = time.perf_counter()
    if all(isinstance(v, Volume) and one_slice_axis(v) is not None for v in (fixed, moving)):
        return _register_one_slice(fixed, moving, config, rep, moving_labels, initial_matrix)
    _check_inputs(fixed, moving, moving_labels, config)
    device = torch.device(config.device)
    nd = fixed.ndim
    method = config.method
    notes: list[str] = []
    if config.similarity is Similarity.DEEPSIM and (nd == 2 or min(fixed.spatial_shape) < 8):
        raise InputError(
            f"--similarity deepsim: its feature extractor is a 3D network that needs at least 8 voxels along "
            f"every axis, got a {nd}D fixed image of shape {fixed.spatial_shape}; use lncc (same contrast), "
            "mind or mi (across contrasts)")
    if nd == 2 and method is not Method.OPTIMISATION:
        if method is Method.NETWORK:
            raise InputError("method network: the registration network is 3D; use --method optimisation for 2D images")
        method = Method.OPTIMISATION
        notes.append("2D pair: the 3D network was skipped (optimisation only)")
    # options given for a path this run does not take: said, not silently dropped
    if config.weights and method is Method.OPTIMISATION:
        notes.append("the network weights given are not used by the optimisation-only method")
    if config.deepsim_weights and config.similarity is not Similarity.DEEPSIM:
        notes.append(f"the DeepSim weights given are not used with the {config.similarity.value} similarity")
    if initial_matrix is None and config.affine is AffineMode.NONE and overlap_fraction(fixed, moving) <= 0.0:
        raise InputError(
            "fixed and moving images: their fields of view do not overlap in physical space; "
            "use --affine center or affine to bring them together"
        )

    widest = float(_extent_mm(fixed).max())
    automatic: tuple[float, ...] = ()
    if config.levels_mm is None:
        automatic = auto_levels(fixed)  # a tiny field of view keeps only the levels that fit in it
        levels_mm = tuple(level for level in automatic if level <= widest / 2) or automatic[-1:]
    else:
        levels_mm = config.levels_mm
    if config.levels_mm is not None and max(levels_mm) > widest / 2:
        raise InputError(
            f"--levels: expected working-grid spacings below half the fixed image's field of view "
            f"({widest:.0f} mm), got {max(levels_mm):g} mm"
        )
    iterations = [0] * len(levels_mm)
    if method in (Method.OPTIMISATION, Method.NETWORK_OPTIMISATION):
        iterations = _level_iterations(config.iterations, levels_mm, len(automatic) if config.levels_mm is None else None)
    rep(0.0, "affine pre-alignment")
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    if initial_matrix is None:
        matrix = prealign(fixed, moving, config.affine, seed=config.seed, reporter=rep)
    else:
        matrix = np.asarray(initial_matrix, dtype=np.float64)
    timings["affine"] = time.perf_counter() - tick
    rep(0.15, "preparing")
    facts: dict[str, Any] = {}
    fixed_norm = _normalise(fixed)
    optimising = method in (Method.OPTIMISATION, Method.NETWORK_OPTIMISATION) and max(iterations) > 0
    box = _foreground_box(fixed_norm, fixed, config.crop_margin_mm) if optimising else fixed
    # the moving image is sampled beyond the box, so its content there can still move in
    moving_pad_mm = MOVING_PAD_MM if box is not fixed else 0.0
    if box is not fixed:
        facts["optimised_box"] = {"shape": list(box.spatial_shape), "fraction": round(
            float(np.prod(box.spatial_shape) / np.prod(fixed.spatial_shape)), 3)}
    fixed_t, fixed_aff = _working_copy(torch.from_numpy(fixed_norm)[None, None].to(device), fixed.affine,
                                       min(levels_mm))
    moving_t, moving_aff = _working_copy(torch.from_numpy(_normalise(moving))[None, None].to(device),
                                         moving.affine, min(levels_mm))
    v, grid = None, None
    tick = time.perf_counter()
    if method in (Method.NETWORK, Method.NETWORK_OPTIMISATION):
        try:
            v, grid, net_facts, seen = _network_velocity(fixed_t, fixed_aff, moving_t, moving_aff, matrix, fixed,
                                                   config, device, rep.stage(0.15, 0.25))
            facts.update(net_facts)
        except _TooSmallForNetwork as exc:
            if method is Method.NETWORK:
                raise InputError(f"{exc}; use --method optimisation") from None
            method = Method.OPTIMISATION
            notes.append(f"{exc}: optimisation only")
        if method is Method.NETWORK and not _improves(v, *seen, _similarity(config, device), config.steps):
            # (network+optimisation compares the two, with its regulariser, on its first level)
            v = torch.zeros_like(v)
            facts["network_rejected"] = True
            notes.append("the network's field matched the images worse than none: not used "
                         "(--method network+optimisation refines from the better of the two)")
        timings["network"] = time.perf_counter() - tick
    tick = time.perf_counter()
    reports: list[LevelReport] = []
    last_images: dict = {}
    if optimising:
        image_grids = [make_grid(box, s, max_size=config.max_grid) for s in levels_mm]
        grids = [(g, coarser_grid(g, config.velocity_factor)) for g in image_grids]
        loss_fn = _similarity(config, device)
        with torch.enable_grad():
            v, grid, reports = optimise_velocity(
                fixed_t, fixed_aff, moving_t, moving_aff, matrix, grids, loss_fn,
                init=(v, grid) if v is not None else None, lam=config.regularisation,
                fold_penalty=config.fold_penalty,
                iterations=iterations, lr=config.learning_rate, tolerance=config.tolerance,
                steps=config.steps, reporter=rep.stage(0.25, 0.8), moving_pad_mm=moving_pad_mm,
                last_images=last_images)
        timings["optimisation"] = time.perf_counter() - tick
    tick = time.perf_counter()
    if v is None:  # optimisation with 0 iterations: identity deformable part
        grid = make_grid(fixed, levels_mm[-1], max_size=config.max_grid)
        v = torch.zeros((1, nd, *grid.shape), device=device)

    rep(0.8, "full-resolution field")
    with torch.no_grad():
        u = integrate(v.detach(), config.steps)
        if bool(u.abs().max() > 0):
            if last_images:  # the images the last level compared, as they are
                before, after = _information_from(last_images["fixed"], last_images["moving"], last_images["pad"],
                                                  u, grid, last_images["grid"])
            else:
                before, after = _information_check(fixed_t, fixed_aff, moving_t, moving_aff, matrix, u, grid,
                                                   make_grid(box, levels_mm[-1], max_size=config.max_grid))
            facts["mutual_information"] = {"affine": round(before, 4), "deformable": round(after, 4)}
            if method is Method.NETWORK and after < MI_WARNING_RATIO * before:
                # one network pass has nothing to refine it: a field that loses shared information
                # (e.g. a contrast it misreads) is worse than none, as when its similarity gets worse
                v, u = torch.zeros_like(v), torch.zeros_like(u)
                facts["network_rejected"] = True
                notes.append(f"the network's field shares less information with the fixed image than the affine "
                             f"alone (mutual information {before:.3f} -> {after:.3f}): not used; try --method "
                             "network+optimisation")
            elif after < MI_WARNING_RATIO * before:
                notes.append(
                    f"the deformable result shares less information with the fixed image than the affine "
                    f"alone (mutual information {before:.3f} -> {after:.3f}): the {config.similarity.value} "
                    "similarity may not suit these images; check the result, or try --similarity mind (across "
                    "contrasts) or lncc (same contrast)")
        field_np = _fixed_points_field(u, grid, fixed, matrix)
        displacement = Volume(field_np, fixed.affine, Kind.DISPLACEMENT, {"description": "meddl registration"})
        inverse = None
        if config.inverse:
            u_inv = integrate(-v.detach(), config.steps)
            inv_np = _fixed_points_field(u_inv, grid, moving, matrix, inverse=True)
            inverse = Volume(inv_np, moving.affine, Kind.DISPLACEMENT, {"description": "meddl registration inverse"})
    rep(0.88, "warping")
    warped = transforms.warp(moving, displacement, "linear")
    warped_labels = None
    if moving_labels is not None:
        warped_labels = transforms.warp(moving_labels.with_data(moving_labels.numpy(), kind=Kind.LABEL),
                                        displacement, "nearest")
    rep(0.95, "Jacobian")
    jac = transforms.jacobian_determinant(displacement)
    j = jac.numpy()[0]
    folding = float((j <= 0).mean() * 100)
    positive = j[j > 0]
    sdlogj = float(np.log(positive).std()) if positive.size else math.nan
    seconds = time.perf_counter() - started
    timings["outputs"] = time.perf_counter() - tick
    summary = {
        "method": method.value,
        "similarity": config.similarity.value if method is not Method.NETWORK else None,
        "affine": config.affine.value if initial_matrix is None else "given",
        "regularisation": config.regularisation if method is not Method.NETWORK else None,
        "fold_penalty": config.fold_penalty if method is not Method.NETWORK else None,
        "folding_percent": round(folding, 4),
        "sdlogj": round(sdlogj, 4),
        "seconds": round(seconds, 2),
        "device": str(device),
        "grid_mm": round(float(grid.spacing[0]), 3),
        "stage_seconds": {k: round(t, 2) for k, t in timings.items()},
        "levels": [{"spacing_mm": round(r.spacing_mm, 3), "shape": list(r.shape), "iterations": r.iterations,
                    "loss_start": _json_number(r.loss_start), "loss_end": _json_number(r.loss_end), "converged": r.converged,
                    "seconds": round(r.seconds, 2)}
                   for r in reports],
        **facts,
    }
    if reports and "network" in facts:
        summary["network_init_used"] = not reports[0].init_rejected
    if notes:
        summary["notes"] = notes
    rep(1.0, "done")
    return RegistrationResult(warped, displacement, jac, inverse, warped_labels, matrix, summary)

