"""Test-time instance optimisation of a stationary velocity field (Adam, coarse to fine).

Learn2Reg-winner style (ConvexAdam; SCIENCE.md "Instance optimisation"): for the given pair,
minimise ``similarity(moving o exp(v), fixed) + lambda * diffusion(exp(v))`` over ``v`` with
Adam, on a pyramid of working grids, starting from the network's prediction (or from zero),
stopping a level when the loss stops improving.

Grids here are ``(affine, shape)`` pairs built by :func:`make_grid` over the fixed image's field
of view, along its axes; tensors are ``(1, C, *shape)`` and velocities are in voxels of their grid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..optim import Adam
from ..volume import Volume, affine_from_geometry, geometry_from_affine
from .svf import (
    diffusion,
    folding_barrier,
    identity_grid,
    integrate,
    mm_to_voxel,
    resize_field,
    sample,
    voxel_to_mm,
    warp,
)

__all__ = ["Grid", "make_grid", "block_average", "block_factors", "padded_grid", "pad_voxels", "warp_padded", "coarser_grid", "corner_aligned", "upsample_field", "to_grid", "regrid_field",
           "optimise_velocity", "LevelReport"]


@dataclass(frozen=True)
class Grid:
    """A working grid: 4x4 voxel-to-RAS ``affine`` and spatial ``shape``."""

    affine: np.ndarray
    shape: tuple[int, ...]

    @property
    def spacing(self) -> np.ndarray:
        return geometry_from_affine(self.affine)[0][: len(self.shape)]


def make_grid(fixed: Volume, spacing_mm: float, divisor: int = 1, max_size: int = 192) -> Grid:
    """An isotropic grid along the fixed image's axes covering its field of view.

    The spacing is never finer than the fixed image's finest spacing, and grows when an axis
    would exceed ``max_size`` voxels; every size is a multiple of ``divisor`` (the box is
    centred on the fixed image's).
    """
    nd = fixed.ndim
    spacing, _, direction = geometry_from_affine(fixed.affine)
    extent = np.array(fixed.spatial_shape, dtype=np.float64) * spacing[:nd]
    s = max(float(spacing_mm), float(spacing[:nd].min()))
    s = max(s, float(extent.max()) / max_size)
    shape = tuple(int(max(divisor, math.ceil(e / s / divisor) * divisor)) for e in extent)
    while max(shape) > max_size + divisor:
        s *= 1.05
        shape = tuple(int(max(divisor, math.ceil(e / s / divisor) * divisor)) for e in extent)
    centre = fixed.index_to_physical((np.array(fixed.spatial_shape, dtype=np.float64) - 1) / 2)
    d = direction[:nd, :nd]
    origin = centre[:nd] - d @ (s * (np.array(shape) - 1) / 2.0)
    affine = affine_from_geometry([s] * nd, origin, d)
    if nd == 2:
        affine[2, 3] = fixed.affine[2, 3]
    return Grid(affine, shape)


def coarser_grid(grid: Grid, factor: float) -> Grid:
    """A grid about ``factor`` times coarser than ``grid`` whose corner voxels coincide with its corners.

    Each axis keeps ``grid``'s first and last voxel centres with ``ceil((n - 1) / factor) + 1``
    voxels (spacing within a few percent of ``factor`` times ``grid``'s), so a field on it reaches
    ``grid`` by corner-aligned linear interpolation (:func:`upsample_field`), several times cheaper
    than a general resampling.
    """
    nd = len(grid.shape)
    spacing, origin, direction = geometry_from_affine(grid.affine)
    shape = tuple(int(max(2, math.ceil((n - 1) / max(float(factor), 1.0)) + 1)) if n > 1 else 1
                  for n in grid.shape)
    new_spacing = [float(spacing[d]) * (grid.shape[d] - 1) / (shape[d] - 1) if shape[d] > 1 else float(spacing[d])
                   for d in range(nd)]
    affine = affine_from_geometry(new_spacing, origin[:nd], direction[:nd, :nd])
    if nd == 2:
        affine[2, 3] = grid.affine[2, 3]
    return Grid(affine, shape)


def corner_aligned(src: Grid, dst: Grid, atol: float = 1e-4) -> bool:
    """Whether ``src`` and ``dst`` share axes and first and last voxel centres (see :func:`coarser_grid`)."""
    nd = len(dst.shape)
    if len(src.shape) != nd:
        return False
    a, b = np.asarray(src.affine), np.asarray(dst.affine)
    far_src = a[:nd, :nd] @ (np.array(src.shape, dtype=np.float64) - 1) + a[:nd, 3]
    far_dst = b[:nd, :nd] @ (np.array(dst.shape, dtype=np.float64) - 1) + b[:nd, 3]
    dir_src = a[:nd, :nd] / np.linalg.norm(a[:nd, :nd], axis=0)
    dir_dst = b[:nd, :nd] / np.linalg.norm(b[:nd, :nd], axis=0)
    scale = float(np.abs(b[:nd, :nd]).max())
    return bool(np.allclose(a[:nd, 3], b[:nd, 3], atol=atol * scale) and np.allclose(far_src, far_dst, atol=atol * scale)
                and np.allclose(dir_src, dir_dst, atol=1e-6))


def padded_grid(grid: Grid, pad: int) -> Grid:
    """``grid`` grown by ``pad`` voxels on every side (same spacing and axes; voxel ``i`` of ``grid``
    is voxel ``i + pad`` of the result)."""
    if pad <= 0:
        return grid
    nd = len(grid.shape)
    affine = np.array(grid.affine, dtype=np.float64, copy=True)
    affine[:3, 3] -= affine[:3, :nd] @ np.full(nd, float(pad))
    return Grid(affine, tuple(n + 2 * pad for n in grid.shape))


def pad_voxels(pad_mm: float, grid: Grid) -> int:
    """How many voxels of ``grid`` cover ``pad_mm`` (0 for no margin)."""
    return int(math.ceil(pad_mm / float(grid.spacing.min()))) if pad_mm > 0 else 0


def warp_padded(x: torch.Tensor, u: torch.Tensor, pad: int) -> torch.Tensor:
    """:func:`~meddl.registration.svf.warp` of ``x`` given on :func:`padded_grid` ``(grid, pad)`` by a
    displacement ``u`` on ``grid``: ``x(p + pad + u(p))``, so content up to ``pad`` voxels beyond
    ``grid`` can move in."""
    if pad <= 0:
        return warp(x, u)
    return sample(x, identity_grid(tuple(u.shape[2:]), u.device, u.dtype) + (u + float(pad)))


def upsample_field(u: torch.Tensor, src: Grid, dst: Grid) -> torch.Tensor:
    """:func:`regrid_field`, by corner-aligned interpolation when the grids allow it (same numbers)."""
    if corner_aligned(src, dst):
        return resize_field(u, dst.shape)
    return regrid_field(u, src, dst)


def _mapping(src_affine: np.ndarray, dst: Grid, matrix: np.ndarray | None, device, dtype) -> torch.Tensor:
    """Source voxel coordinates ``(1, nd, *dst.shape)`` of the destination voxels (through ``matrix``)."""
    nd = len(dst.shape)
    m = np.eye(4) if matrix is None else np.asarray(matrix, dtype=np.float64)
    t = np.linalg.inv(src_affine) @ m @ dst.affine
    lin = torch.as_tensor(t[:nd, :nd], dtype=dtype, device=device)
    off = torch.as_tensor(t[:nd, 3], dtype=dtype, device=device).view(1, nd, *([1] * nd))
    return torch.einsum("cd,nd...->nc...", lin, identity_grid(dst.shape, device, dtype)) + off


def _blur_axes(x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    nd = x.dim() - 2
    conv = F.conv3d if nd == 3 else F.conv2d
    for d, sigma in enumerate(sigmas):
        if sigma <= 0.1:
            continue
        radius = max(1, int(math.ceil(2.5 * sigma)))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        shape = [1] * nd
        shape[d] = k.numel()
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - d)] = radius
        pad[2 * (nd - 1 - d) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), k.view(1, 1, *shape).repeat(x.shape[1], 1, *([1] * nd)),
                 groups=x.shape[1])
    return x


def block_factors(ratio, shape: tuple[int, ...]) -> list[int]:
    """Blocks of ``floor(ratio)`` voxels per axis (``ratio``: target spacing / voxel spacing), 1 along
    an axis that would keep fewer than two blocks."""
    factors = [max(1, int(math.floor(float(r) + 1e-6))) for r in ratio]
    return [f if n // f >= 2 else 1 for f, n in zip(factors, shape, strict=True)]


def block_average(data: torch.Tensor, affine: np.ndarray, factors: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    """``data`` ``(1, C, *S)`` averaged over blocks of ``factors`` voxels per axis, with its affine.

    The last voxels are replicated up to whole blocks, so the copy reaches as far as the image;
    the new voxel centres are the blocks' centres.
    """
    nd = data.dim() - 2
    if max(factors) < 2:
        return data, affine
    pad = [0, 0] * nd
    for d, (f, n) in enumerate(zip(factors, data.shape[2:], strict=True)):
        pad[2 * (nd - 1 - d) + 1] = (-n) % f
    if any(pad):
        data = F.pad(data, pad, mode="replicate")
    pool = F.avg_pool3d if nd == 3 else F.avg_pool2d
    pooled = pool(data, kernel_size=factors, stride=factors)
    out = np.array(affine, dtype=np.float64, copy=True)  # 4 x 4 (a 2D image's too)
    f = np.asarray(factors, dtype=np.float64)
    out[:3, 3] += out[:3, :nd] @ ((f - 1.0) / 2.0)
    out[:3, :nd] = out[:3, :nd] * f
    return pooled, out


def to_grid(data: torch.Tensor, src_affine: np.ndarray, dst: Grid, matrix: np.ndarray | None = None,
            mode: str = "bilinear", antialias: bool = True) -> torch.Tensor:
    """Resample ``data`` ``(1, C, *S_src)`` on grid ``dst``: ``out(x) = data(matrix @ x)`` (RAS points).

    With ``antialias``, a source finer than ``dst`` is first averaged over blocks of up to ``dst``'s
    spacing (:func:`block_average`: the smoothing and sampling then run on a volume up to
    ``ratio**ndim`` times smaller), then Gaussian-smoothed for the rest of the way: the two together
    have the variance of the Gaussian of sigma ``0.5 sqrt(ratio^2 - 1)`` source voxels used alone.
    Points outside the source read 0.
    """
    nd = len(dst.shape)
    if antialias and mode != "nearest":
        src_spacing = geometry_from_affine(src_affine)[0][:nd]
        ratio = float(dst.spacing.mean()) / src_spacing
        factors = block_factors(ratio, tuple(data.shape[2:]))
        data, src_affine = block_average(data, src_affine, factors)
        # a Gaussian of sigma 0.5 sqrt(r^2 - 1) source voxels in all; a block of p voxels already gave a
        # variance of (p^2 - 1) / 12 of it, the rest is blurred on the block-averaged grid
        sigmas = [math.sqrt(max(0.25 * (r * r - 1.0) - (p * p - 1.0) / 12.0, 0.0)) / p
                  for r, p in zip(ratio, factors, strict=True)]
        data = _blur_axes(data, sigmas)
    coords = _mapping(src_affine, dst, matrix, data.device, data.dtype)
    return sample(data, coords, mode=mode, padding_mode="zeros")


def regrid_field(u: torch.Tensor, src: Grid, dst: Grid) -> torch.Tensor:
    """A voxel displacement/velocity ``(1, nd, *src.shape)`` resampled on ``dst`` (via mm, border padding)."""
    mm = voxel_to_mm(u, src.affine)
    coords = _mapping(src.affine, dst, None, u.device, u.dtype)
    return mm_to_voxel(sample(mm, coords, padding_mode="border"), dst.affine)


@dataclass
class LevelReport:
    """What one pyramid level did."""

    spacing_mm: float
    shape: tuple[int, ...]
    iterations: int
    loss_start: float
    loss_end: float
    converged: bool
    history: list[float] = field(default_factory=list)
    init_rejected: bool = False  #: the given start (network) lost to the identity and was dropped
    seconds: float = 0.0  #: wall time of the level (resampling the images included)


def optimise_velocity(
    fixed: torch.Tensor,
    fixed_affine: np.ndarray,
    moving: torch.Tensor,
    moving_affine: np.ndarray,
    matrix: np.ndarray,
    grids: list[tuple[Grid, Grid]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    init: tuple[torch.Tensor, Grid] | None = None,
    lam: float = 1.0,
    fold_penalty: float = 0.0,
    iterations: int | Sequence[int] = 100,
    lr: float = 0.1,
    tolerance: float = 1e-4,
    steps: int = 7,
    reporter=None,
    moving_pad_mm: float = 0.0,
    last_images: dict | None = None,
) -> tuple[torch.Tensor, Grid, list[LevelReport]]:
    """Optimise ``v`` on each grid in turn (coarse to fine).

    Args:
        fixed, moving: ``(1, 1, *S)`` images on their own grids (``fixed_affine``/``moving_affine``),
            intensities scaled to about [0, 1].
        matrix: 4x4 RAS affine pre-alignment (fixed point -> moving point).
        grids: ``(image grid, velocity grid)`` per level, coarse to fine. The velocity lives on the
            (coarser) velocity grid, is integrated there and its displacement resampled on the
            image grid (a cheap, smooth parameterisation).
        loss_fn: similarity loss ``(warped, fixed) -> scalar`` to minimise. One with
            ``warps_descriptors`` (MIND) has its descriptors computed once per level and warped.
        init: a starting velocity and its grid (the network's), else zero. It is used only if its
            loss at the first level beats the identity's (a network that does not fit the pair
            must not make the answer worse).
        lam: weight of the diffusion regulariser on ``exp(v)`` (voxel units: dimensionless).
        fold_penalty: weight of :func:`~meddl.registration.svf.folding_barrier` on the displacement
            of each image grid (0: none), evaluated at every k-th voxel for a velocity grid k times
            coarser.
        iterations: at most this many Adam steps per level, or one number per level.
        lr: Adam step (voxels).
        tolerance: a level stops when the loss improved by less than this (relative) over 10 steps.
        moving_pad_mm: the moving image is resampled on each image grid grown by this margin, so
            content from beyond the grid can move in (the grids may cover only the fixed image's
            foreground). A level with 0 iterations is skipped (no report).
        last_images: a dict that receives the last level's resampled images (before any
            descriptors): ``grid``, ``fixed``, ``moving`` (on ``padded_grid(grid, pad)``) and ``pad``.

    Returns:
        ``(v, grid, reports)``: the final velocity ``(1, nd, *grid.shape)`` in voxels of ``grid``
        (the last velocity grid).
    """
    v_prev, g_prev = init if init is not None else (None, None)
    reports: list[LevelReport] = []
    init_rejected = False
    per_level = [int(iterations)] * len(grids) if isinstance(iterations, int) else [int(n) for n in iterations]
    if len(per_level) != len(grids):
        raise ValueError(f"optimise_velocity: {len(per_level)} iteration counts for {len(grids)} levels")
    total = max(1, sum(per_level))
    done = 0
    for level, (grid, vgrid) in enumerate(grids):
        iterations = per_level[level]
        if iterations <= 0:
            continue
        started = time.perf_counter()
        f = to_grid(fixed, fixed_affine, grid)
        pad = pad_voxels(moving_pad_mm, grid)
        m = to_grid(moving, moving_affine, padded_grid(grid, pad), matrix)
        if last_images is not None:
            last_images.update(grid=grid, fixed=f, moving=m, pad=pad)
        compare = loss_fn
        if getattr(loss_fn, "warps_descriptors", False):  # warp descriptors computed once (MIND)
            f, m, compare = loss_fn.descriptors(f), loss_fn.descriptors(m), loss_fn.compare
        nd = len(grid.shape)
        # the barrier at every ``stride``-th voxel: u is interpolated from the about ``stride``x coarser vgrid
        stride = max(1, min(int(round((n - 1) / max(k - 1, 1))) for n, k in zip(grid.shape, vgrid.shape,
                                                                                 strict=True)))
        zero = torch.zeros((1, nd, *vgrid.shape), dtype=f.dtype, device=f.device)
        if v_prev is None:
            v0 = zero
        else:
            v0 = regrid_field(v_prev, g_prev, vgrid)
            if not reports and init is not None:
                # keep the network's start only if it beats the identity on this pair
                with torch.no_grad():
                    def cost(vv, m=m, f=f, grid=grid, vgrid=vgrid, compare=compare, pad=pad):
                        u_v = integrate(vv, steps)
                        moved = warp_padded(m, upsample_field(u_v, vgrid, grid), pad)
                        return float(compare(moved, f) + lam * diffusion(u_v))
                    if cost(zero) <= cost(v0):
                        v0 = zero
                        init_rejected = True
        v = v0.clone().requires_grad_(True)
        opt = Adam([v], lr=lr)
        history: list[float] = []
        converged = False
        best = (math.inf, v0)
        for it in range(iterations):
            u_v = integrate(v, steps)
            u = upsample_field(u_v, vgrid, grid)
            loss = compare(warp_padded(m, u, pad), f) + lam * diffusion(u_v)
            if fold_penalty > 0:
                loss = loss + fold_penalty * folding_barrier(u, stride=stride)
            value = float(loss.detach())
            history.append(value)
            if value < best[0]:  # the loss belongs to v before this step
                best = (value, v.detach().clone())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if reporter is not None:
                reporter(done / total, f"optimising at {grid.spacing[0]:.1f} mm")
            if it >= 20:
                ref = history[-11]
                if (ref - value) <= tolerance * max(abs(ref), 1e-8):
                    converged = True
                    break
        done = sum(per_level[: level + 1])
        reports.append(LevelReport(float(grid.spacing[0]), tuple(grid.shape), len(history),
                                   history[0] if history else math.nan, history[-1] if history else math.nan,
                                   converged, history[:: max(1, len(history) // 20)],
                                   seconds=time.perf_counter() - started))
        v_prev, g_prev = best[1], vgrid
    if reports:
        reports[0].init_rejected = init_rejected
    return v_prev, g_prev, reports
