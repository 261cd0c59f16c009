"""Coil combination and ESPIRiT coil-sensitivity estimation (in torch: runs on CPU or GPU).

ESPIRiT (Uecker et al. 2014), following sigpy's ``EspiritCalib``: the calibration (ACS) block
of k-space gives a block-Hankel matrix; its dominant right singular vectors are k-space kernels;
in the image domain each pixel's ``C x C`` matrix ``sum_n v_n v_n^H`` of the transformed kernels
has the coil sensitivities as its eigenvector of eigenvalue ~1. Pixels whose top eigenvalue is
below ``crop`` (outside the object) get zero maps.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from .fft import ifft2c
from .masks import center_block, centre_run

__all__ = ["rss", "sense_combine", "calibration_block", "espirit_maps", "espirit_factor", "MIN_CALIBRATION_LINES"]

#: fewer fully sampled centre lines than this cannot calibrate coil sensitivities
MIN_CALIBRATION_LINES = 4


def rss(images: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Root-sum-of-squares over the coil axis of complex coil images ``(..., C, H, W)``."""
    return torch.sqrt((images.real**2 + images.imag**2).sum(dim=dim))


def sense_combine(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Sensitivity-weighted combination ``sum_c conj(S_c) x_c / sum_c |S_c|^2`` of ``(..., C, H, W)``."""
    num = (maps.conj() * images).sum(dim=-3)
    den = (maps.real**2 + maps.imag**2).sum(dim=-3)
    return torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.zeros_like(num))


def calibration_block(mask: np.ndarray, what: str = "k-space") -> slice:
    """The fully sampled centre columns of a 1-D column mask ``(W,)``; refuse too few."""
    block = centre_run(np.asarray(mask, dtype=bool).reshape(-1))
    n = block.stop - block.start
    if n < MIN_CALIBRATION_LINES:
        raise InputError(
            f"{what}: expected a fully sampled calibration (ACS) block of at least {MIN_CALIBRATION_LINES} "
            f"central phase-encoding lines, got {n}; coil sensitivities cannot be estimated "
            "(use --method zero-filled, or data acquired with a calibration region)"
        )
    return block


#: the coarse ESPIRiT grid keeps at least this many pixels along each axis
MIN_ESPIRIT_GRID = 48


def espirit_factor(shape: tuple[int, int], kernel: int = 6) -> int:
    """How much coarser than the image ESPIRiT's eigen-decomposition may run: the largest power of two
    that leaves at least ``max(48, 8 * kernel)`` pixels along each axis (1 for small images)."""
    least = max(MIN_ESPIRIT_GRID, 8 * kernel)
    factor = 1
    while min(shape) // (2 * factor) >= least:
        factor *= 2
    return factor


def _periodic_linear(x: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """Linear interpolation along ``dim`` from a centred FFT grid of ``n_in`` to one of ``n_out`` pixels
    over the same field of view (pixel ``i`` at ``(i - n // 2) / n`` FOV), periodic like the FFT."""
    n_in = x.shape[dim]
    if n_in == n_out:
        return x
    pos = (torch.arange(n_out, dtype=torch.float64, device=x.device) - n_out // 2) * (n_in / n_out) + n_in // 2
    j0 = torch.floor(pos)
    frac = (pos - j0).to(x.dtype)
    j0 = j0.long()
    j1 = (j0 + 1) % n_in
    j0 = j0 % n_in
    shape = [1] * x.dim()
    shape[dim] = n_out
    frac = frac.view(shape)
    return x.index_select(dim, j0) * (1 - frac) + x.index_select(dim, j1) * frac


def espirit_maps(
    kspace: torch.Tensor,
    calib_width: int = 24,
    kernel: int = 6,
    threshold: float = 0.02,
    crop: float = 0.95,
    calib_cols: slice | None = None,
    factor: int | None = None,
) -> torch.Tensor:
    """ESPIRiT sensitivity maps ``(C, H, W)`` complex from one slice of k-space ``(C, H, W)``.

    The calibration region is the central ``calib_width x calib_width`` block, narrowed to the
    fully sampled columns ``calib_cols`` when given.

    ``factor`` (default :func:`espirit_factor`): the per-pixel ``C x C`` eigen-decomposition runs
    on a grid this much coarser over the same field of view, and the (smooth) maps and eigenvalues
    are interpolated to the image grid, then renormalised. The kernel images are band-limited to
    ``kernel`` frequencies, so the coarse grid samples them exactly; on the reconstruction
    benchmark's 192 x 224 slices a factor of 4 left TV's SSIM within 0.0002 of full resolution at
    20x less cost. ``factor=1`` is the classic full-resolution ESPIRiT.
    """
    if kspace.dim() != 3:
        raise InputError(f"ESPIRiT: expected k-space (C, H, W), got shape {tuple(kspace.shape)}")
    c, h, w = kspace.shape
    ch = min(calib_width, h)
    r0 = center_block(h, ch).start  # the rows a Poisson mask samples fully (same placement as its square)
    if calib_cols is not None:
        width = min(calib_cols.stop - calib_cols.start, calib_width)
        mid = (calib_cols.start + calib_cols.stop) // 2
        c0 = mid - width // 2
    else:
        width = min(calib_width, w)
        c0 = w // 2 - width // 2
    kernel = min(kernel, ch, width)
    if factor is None:
        factor = espirit_factor((h, w), kernel)
    if factor < 1:
        raise InputError(f"ESPIRiT: expected a grid factor >= 1, got {factor}")
    gh, gw = max(kernel, h // factor), max(kernel, w // factor)
    calib = kspace[:, r0 : r0 + ch, c0 : c0 + width]
    # Hankel matrix: one row per kernel position, columns (coil, ky, kx)
    blocks = calib.unfold(1, kernel, 1).unfold(2, kernel, 1)  # (C, nh, nw, k, k)
    mat = blocks.permute(1, 2, 0, 3, 4).reshape(-1, c * kernel * kernel)
    _, s, vh = torch.linalg.svd(mat, full_matrices=False)
    vh = vh[s > threshold * s.max()]
    kernels = vh.reshape(-1, c, kernel, kernel)
    # each kernel, zero-padded to the (coarse) grid (centred) and transformed to the image domain
    padded = torch.zeros((kernels.shape[0], c, gh, gw), dtype=kspace.dtype, device=kspace.device)
    p0, q0 = gh // 2 - kernel // 2, gw // 2 - kernel // 2
    padded[:, :, p0 : p0 + kernel, q0 : q0 + kernel] = kernels
    aha = torch.zeros((gh * gw, c, c), dtype=kspace.dtype, device=kspace.device)
    scale = (gh * gw) / kernel**2
    for start in range(0, padded.shape[0], 16):
        v = ifft2c(padded[start : start + 16]).reshape(-1, c, gh * gw).permute(2, 1, 0)  # (HW, C, n)
        aha += v @ v.conj().transpose(1, 2)
    aha *= scale
    evals, evecs = torch.linalg.eigh(aha)  # ascending
    top = evecs[..., -1]  # (HW, C)
    lam = evals[..., -1]
    # phase relative to the first coil, as sigpy does, so maps vary smoothly
    ref = top[:, :1]
    top = top * (ref.conj() / ref.abs().clamp_min(1e-12))
    maps = top.T.reshape(c, gh, gw)
    lam = lam.reshape(1, gh, gw)
    if (gh, gw) != (h, w):
        parts = torch.cat([maps.real, maps.imag, lam], dim=0)
        parts = _periodic_linear(_periodic_linear(parts, h, 1), w, 2)
        maps = torch.complex(parts[:c], parts[c : 2 * c])
        maps = maps / torch.sqrt((maps.real**2 + maps.imag**2).sum(0, keepdim=True)).clamp_min(1e-12)
        lam = parts[2 * c :]
    maps = maps * (lam > crop)
    return maps.contiguous()
