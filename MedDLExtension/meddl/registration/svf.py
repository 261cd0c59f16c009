"""Stationary velocity fields: warping with ``grid_sample``, scaling and squaring, regularisers.

Conventions (the same as :mod:`meddl.transforms`, in voxel units of one grid):

* tensors are ``(N, C, I, J[, K])`` in voxel-index order, like a :class:`~meddl.volume.Volume`;
* a displacement ``u`` is ``(N, ndim, I, J[, K])`` in **voxels of that grid, index order**, in the
  resampling convention: output voxel ``x`` samples the moving image at ``x + u(x)``;
* converting to RAS millimetres is ``u_mm = A @ u_vox`` with ``A`` the 3x3 (2x2) part of the
  grid's affine (:func:`voxel_to_mm`), which is what :func:`meddl.transforms.write_transform` wants.

``grid_sample`` wants the sampling position as normalised ``(x, y, z)`` = reversed index
order with ``align_corners=True`` (``-1`` is the centre of voxel 0, ``+1`` of the last voxel);
:func:`sample` does that conversion in one place.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "identity_grid",
    "sample",
    "warp",
    "integrate",
    "compose",
    "diffusion",
    "jacobian_determinant",
    "voxel_to_mm",
    "mm_to_voxel",
    "resize_field",
]


def identity_grid(shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel indices ``(1, ndim, *shape)``: channel d holds index d of every voxel."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def sample(x: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``x`` ``(N, C, *S_in)`` at continuous voxel indices ``coords`` ``(N, ndim, *S_out)``.

    ``mode``: ``bilinear`` (trilinear in 3D) or ``nearest``. Returns ``(N, C, *S_out)``.
    """
    nd = coords.shape[1]
    sizes = x.shape[2:]
    parts = []
    for d in reversed(range(nd)):
        n = sizes[d]
        parts.append(coords[:, d] * (2.0 / max(n - 1, 1)) - 1.0)
    grid = torch.stack(parts, dim=-1)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp(x: torch.Tensor, u: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """``x(p + u(p))`` for ``x`` ``(N, C, *S)`` and a voxel displacement ``u`` ``(N, ndim, *S)`` on the same grid."""
    grid = identity_grid(tuple(u.shape[2:]), u.device, u.dtype)
    return sample(x, grid + u, mode=mode, padding_mode=padding_mode)


def compose(u_first: torch.Tensor, u_second: torch.Tensor) -> torch.Tensor:
    """Displacement of ``p -> q = p + u_first(p) -> q + u_second(q)`` (first applied first to points)."""
    return u_first + warp(u_second, u_first, padding_mode="border")


def integrate(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """``exp(v)`` by scaling and squaring: ``u = v / 2**steps``, then ``steps`` self-compositions.

    Arsigny et al. 2006 / VoxelMorph-diff (Dalca et al. 2018). ``v``: ``(N, ndim, *S)`` voxels.
    ``exp(-v)`` is the inverse of ``exp(v)`` (up to discretisation), used for the inverse transform.
    """
    if steps < 0:
        raise ValueError(f"integrate: expected steps >= 0, got {steps}")
    u = v / (2**steps)
    for _ in range(steps):
        u = u + warp(u, u, padding_mode="border")
    return u


def diffusion(u: torch.Tensor, spacing: tuple[float, ...] | None = None) -> torch.Tensor:
    """Diffusion regulariser: mean of squared forward differences ``sum ||grad u||^2`` (per voxel)."""
    nd = u.shape[1]
    total = u.new_zeros(())
    for d in range(nd):
        diff = torch.diff(u, dim=2 + d)
        if spacing is not None:
            diff = diff / spacing[d]
        total = total + diff.pow(2).mean()
    return total


def jacobian_determinant(u: torch.Tensor) -> torch.Tensor:
    """``det(I + du/dx)`` in voxel units with central differences, ``(N, *S)``.

    Same discretisation as :func:`meddl.transforms.jacobian_determinant` (replicated edges), for
    losses and quick folding counts on a working grid.
    """
    nd = u.shape[1]
    grads = []
    for d in range(nd):
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - d)] = 1
        pad[2 * (nd - 1 - d) + 1] = 1
        up = F.pad(u, pad, mode="replicate")
        n = u.shape[2 + d]
        grads.append((up.narrow(2 + d, 2, n) - up.narrow(2 + d, 0, n)) * 0.5)
    # m[c][d] = d u_c / d x_d + delta
    m = [[grads[d][:, c] + (1.0 if c == d else 0.0) for d in range(nd)] for c in range(nd)]
    if nd == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


def folding_barrier(u: torch.Tensor, margin: float = 0.1, stride: int = 1) -> torch.Tensor:
    """Mean of ``relu(margin - det J)`` over the grid: zero while every voxel keeps ``det J >=
    margin``, growing linearly as a voxel approaches or crosses folding (``det J <= 0``).

    Added to the optimisation loss it removes the few folded voxels that a rough velocity can leave
    after scaling and squaring (large inter-subject deformations), without touching smooth regions.
    ``stride > 1`` evaluates ``det J`` (central differences) only at every ``stride``-th interior
    voxel along each axis: for a displacement interpolated from a ``stride`` times coarser grid
    (the optimiser's), those voxels see every coarse cell, at a ``stride**ndim`` of the cost.
    """
    if stride <= 1:
        return torch.relu(margin - jacobian_determinant(u)).mean()
    nd = u.shape[1]
    sizes = u.shape[2:]
    if min(sizes) < 3:
        return torch.relu(margin - jacobian_determinant(u)).mean()

    def view(axis: int, offset: int) -> torch.Tensor:
        index = [slice(None), slice(None)]
        for a, n in enumerate(sizes):
            index.append(slice(1 + offset, n - 1 + offset, stride) if a == axis else slice(1, n - 1, stride))
        return u[tuple(index)]

    grads = [(view(d, 1) - view(d, -1)) * 0.5 for d in range(nd)]
    m = [[grads[d][:, c] + (1.0 if c == d else 0.0) for d in range(nd)] for c in range(nd)]
    if nd == 2:
        det = m[0][0] * m[1][1] - m[0][1] * m[1][0]
    else:
        det = (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
               - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
               + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    return torch.relu(margin - det).mean()


def voxel_to_mm(u: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """Voxel displacement ``(N, nd, *S)`` of a grid with 4x4 ``affine`` -> RAS mm (same shape)."""
    nd = u.shape[1]
    a = torch.as_tensor(np.asarray(affine)[:nd, :nd], dtype=u.dtype, device=u.device)
    return torch.einsum("cd,nd...->nc...", a, u)


def mm_to_voxel(u: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """RAS mm displacement ``(N, nd, *S)`` -> voxels of the grid with 4x4 ``affine``."""
    nd = u.shape[1]
    inv = np.linalg.inv(np.asarray(affine)[:nd, :nd])
    a = torch.as_tensor(inv, dtype=u.dtype, device=u.device)
    return torch.einsum("cd,nd...->nc...", a, u)


def resize_field(u: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resample a voxel displacement to another grid over the same box (corner-aligned), rescaling voxels.

    Both grids span the same field of view with voxel centres at the ends (``align_corners=True``),
    so a displacement of one voxel on the old grid is ``(new - 1) / (old - 1)`` voxels on the new one.
    """
    nd = u.shape[1]
    old = u.shape[2:]
    mode = "trilinear" if nd == 3 else "bilinear"
    out = F.interpolate(u, size=tuple(shape), mode=mode, align_corners=True)
    scale = torch.tensor([(shape[d] - 1) / max(old[d] - 1, 1) for d in range(nd)], dtype=u.dtype, device=u.device)
    return out * scale.view(1, nd, *([1] * nd))
