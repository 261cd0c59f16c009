"""Undersampling masks with fastMRI's conventions, and mask detection in acquired data.

Columns of k-space (the last axis, ``W``) are phase-encoding lines. A 1-D mask is a boolean
array of length ``W``; a 2-D mask (Poisson disc) has shape ``(H, W)``.

* **random** (fastMRI ``RandomMaskFunc``): the centre block of ``round(W * center_fraction)``
  lines is always kept; every other line is kept with probability
  ``(W / R - n_centre) / (W - n_centre)`` so the expected total is ``W / R``.
* **equispaced** (fastMRI ``EquispacedMaskFractionFunc``): the centre block plus every
  ``R'``-th line from a random offset, with ``R'`` adjusted so the total is ``W / R``.
* **poisson**: a 2-D variable-density Poisson-disc pattern with a fully sampled square
  calibration region (sigpy's ``poisson`` when installed, else variable-density random).

Default centre fractions follow fastMRI: 0.08 at 4x, 0.04 at 8x (``0.32 / R`` in general).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

__all__ = [
    "MaskType",
    "default_center_fraction",
    "random_mask",
    "equispaced_mask",
    "poisson_mask",
    "make_mask",
    "MaskInfo",
    "detect_mask",
    "center_block",
    "kspace_peak_offset",
    "recentre",
]


class MaskType(str, enum.Enum):
    EQUISPACED = "equispaced"
    RANDOM = "random"
    POISSON = "poisson"


def default_center_fraction(acceleration: float) -> float:
    """fastMRI's pairing: 0.08 at 4x, 0.04 at 8x (``0.32 / R``)."""
    return 0.32 / float(acceleration)


def _check(width: int, acceleration: float, center_fraction: float) -> int:
    if width < 4:
        raise InputError(f"mask: expected at least 4 phase-encoding lines, got {width}")
    if not np.isfinite(acceleration) or acceleration < 1:
        raise InputError(f"--acceleration: expected a number >= 1, got {acceleration}")
    if not 0 < center_fraction < 1:
        raise InputError(f"--center-fraction: expected a fraction in (0, 1), got {center_fraction}")
    num_low = int(round(width * center_fraction))
    if num_low * acceleration > width + 1e-9:
        raise InputError(
            f"mask: expected at most {width / acceleration:.0f} centre lines of {width} at acceleration "
            f"{acceleration}, got {num_low} (centre fraction {center_fraction}); lower the centre fraction "
            "(--center-fraction)"
        )
    return max(num_low, 1)


def center_block(width: int, num_low: int) -> slice:
    """The centred block of ``num_low`` lines (fastMRI's placement: ``(W - n + 1) // 2``)."""
    pad = (width - num_low + 1) // 2
    return slice(pad, pad + num_low)


def random_mask(
    width: int, acceleration: float, center_fraction: float | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """fastMRI random column mask ``(W,)`` bool."""
    rng = rng if rng is not None else np.random.default_rng()
    cf = default_center_fraction(acceleration) if center_fraction is None else center_fraction
    num_low = _check(width, acceleration, cf)
    prob = (width / acceleration - num_low) / (width - num_low)
    mask = rng.uniform(size=width) < prob
    mask[center_block(width, num_low)] = True
    return mask


def equispaced_mask(
    width: int, acceleration: float, center_fraction: float | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """fastMRI equispaced column mask ``(W,)`` bool with exactly about ``W / R`` lines."""
    rng = rng if rng is not None else np.random.default_rng()
    cf = default_center_fraction(acceleration) if center_fraction is None else center_fraction
    num_low = _check(width, acceleration, cf)
    mask = np.zeros(width, dtype=bool)
    mask[center_block(width, num_low)] = True
    if acceleration <= 1:
        mask[:] = True
    elif num_low * acceleration < width - 1e-9:  # else the centre block alone is W / R lines
        # spacing so that centre + equispaced lines total W / R (EquispacedMaskFractionFunc)
        adjusted = (acceleration * (num_low - width)) / (num_low * acceleration - width)
        offset = int(rng.integers(0, max(int(round(adjusted)), 1)))
        lines = np.round(np.arange(offset, width - 1, adjusted)).astype(np.int64)
        mask[lines[lines < width]] = True
    return mask


def poisson_mask(
    shape: tuple[int, int], acceleration: float, calib: int = 24, rng: np.random.Generator | None = None
) -> np.ndarray:
    """2-D variable-density Poisson-disc mask ``(H, W)`` bool with a ``calib x calib`` centre.

    sigpy's Poisson-disc sampler when it is installed and the case is one it settles quickly (both
    sides >= 64, acceleration <= 10: its slope search can run for minutes on small grids or at
    high accelerations); otherwise independent variable-density sampling with the same density
    shape. Acceleration 1 is full sampling. A centre block holding more samples than the
    acceleration allows is refused.
    """
    rng = rng if rng is not None else np.random.default_rng()
    h, w = int(shape[0]), int(shape[1])
    if acceleration < 1 or not np.isfinite(acceleration):
        raise InputError(f"--acceleration: expected a number >= 1, got {acceleration}")
    if acceleration == 1:
        return np.ones((h, w), dtype=bool)
    ch, cw = min(calib, h), min(calib, w)
    if ch * cw > h * w / acceleration:
        raise InputError(
            f"poisson mask: the {ch} x {cw} calibration centre alone holds {ch * cw} of {h * w} samples, more than "
            f"acceleration {acceleration:g} allows ({h * w / acceleration:.0f}); lower --acceleration or --center-fraction"
        )
    seed = int(rng.integers(0, 2**31 - 1))
    try:
        if min(h, w) < 64 or acceleration > 10:
            raise ImportError("outside the cases sigpy's sampler settles quickly")
        import sigpy.mri

        mask = (
            np.asarray(sigpy.mri.poisson((h, w), acceleration, calib=(calib, calib), seed=seed, dtype=np.complex64))
            != 0
        )
    except ImportError:
        # variable density: probability ~ 1 / (1 + r^2 / r0^2), scaled to hit W H / R samples
        ky, kx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        density = 1.0 / (1.0 + (kx**2 + ky**2) / 0.1)
        target = h * w / acceleration
        lo, hi = 0.0, 100.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.minimum(density * mid, 1).sum() < target else (lo, mid)
        mask = rng.uniform(size=(h, w)) < np.minimum(density * hi, 1)
    ch, cw = center_block(h, min(calib, h)), center_block(w, min(calib, w))
    mask[ch, cw] = True
    return mask


def make_mask(
    kind: MaskType | str,
    shape: tuple[int, int],
    acceleration: float,
    center_fraction: float | None = None,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """A mask broadcastable to k-space ``(..., H, W)``: ``(1, W)`` for column masks, ``(H, W)`` for Poisson."""
    try:
        kind = MaskType(kind)
    except ValueError:
        raise InputError(
            f"--undersample: expected one of {', '.join(m.value for m in MaskType)}, got '{kind}'"
        ) from None
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    h, w = int(shape[-2]), int(shape[-1])
    if kind is MaskType.POISSON:
        cf = default_center_fraction(acceleration) if center_fraction is None else center_fraction
        return poisson_mask((h, w), acceleration, calib=max(4, int(round(cf * min(h, w)))), rng=rng)
    fn = random_mask if kind is MaskType.RANDOM else equispaced_mask
    return fn(w, acceleration, center_fraction, rng)[None, :]


@dataclass(frozen=True)
class MaskInfo:
    """What was found in acquired data: the column mask, its acceleration and its centre block."""

    mask: np.ndarray  # (W,) bool
    acceleration: float
    center_fraction: float
    calibration: slice  # the contiguous fully sampled block around the centre


def centre_run(mask: np.ndarray) -> slice:
    """The contiguous sampled run through the centre of a 1-D mask (empty when the centre is not sampled)."""
    w = mask.size
    c = w // 2
    if not mask[c]:
        # the DC line may sit one off the exact middle for even widths
        c = c - 1 if c > 0 and mask[c - 1] else c
        if not mask[c]:
            return slice(c, c)
    lo = c
    while lo > 0 and mask[lo - 1]:
        lo -= 1
    hi = c
    while hi < w - 1 and mask[hi + 1]:
        hi += 1
    return slice(lo, hi + 1)


def detect_mask(kspace: np.ndarray, mask: np.ndarray | None = None, band: tuple[int, int] | None = None) -> MaskInfo:
    """The sampling of k-space ``(..., H, W)``: a given 1-D mask, else the non-zero columns.

    Acceleration is ``acquirable lines / sampled lines`` and the centre fraction is the length of
    the contiguous sampled block through the centre over ``W``. ``band`` = ``(left, right)`` is
    the acquirable column range (fastMRI's zero padding outside it, from the header's
    ``kspace_encoding_step_1`` limits, is not undersampling). Fully sampled data gives ``R = 1``.
    """
    w = kspace.shape[-1]
    if mask is None:
        power = np.abs(kspace).reshape(-1, kspace.shape[-2], w).sum(axis=(0, 1))
        mask = power > 0
    mask = np.asarray(mask).astype(bool).reshape(-1)
    if mask.size != w:
        raise InputError(f"mask: expected {w} entries (one per k-space column), got {mask.size}")
    left, right = (0, w) if band is None else (max(int(band[0]), 0), min(int(band[1]), w))
    if right - left < 1:
        left, right = 0, w
    n = int(mask[left:right].sum())
    if n == 0:
        raise InputError("k-space: expected sampled lines, got only zeros; the file holds no data")
    block = centre_run(mask)
    return MaskInfo(mask, (right - left) / n, (block.stop - block.start) / w, block)


def kspace_peak_offset(kspace: np.ndarray, columns: slice | None = None) -> tuple[int, int]:
    """How far k-space's energy peak sits from the matrix centre: the roll ``(rows, columns)`` that brings it
    to ``(H // 2, W // 2)``, where the centred FFT keeps the DC sample.

    A peak off the centre means a linear phase ramp across the image (an echo off the k-space centre, an
    object off the isocentre). Rolling k-space by whole samples removes that much of the ramp and leaves
    every magnitude image unchanged. ``columns``: where along W the peak may be (the calibration block of
    undersampled data, where the rolled mask must keep its centre sampled); ``None``: anywhere.
    """
    h, w = kspace.shape[-2:]
    rows, cols = np.zeros(h), np.zeros(w)
    for part in np.asarray(kspace).reshape(-1, h, w):  # one coil image at a time: no full-size copy
        power = np.abs(part) ** 2
        rows += power.sum(axis=1)
        cols += power.sum(axis=0)
    columns = columns if columns is not None else slice(0, w)
    peak_col = columns.start + int(np.argmax(cols[columns]))
    return h // 2 - int(np.argmax(rows)), w // 2 - peak_col


def recentre(kspace: np.ndarray, mask: np.ndarray, columns: slice | None = None, least: int = 2
             ) -> tuple[np.ndarray, np.ndarray, slice | None, tuple[int, int]]:
    """Roll k-space ``(..., H, W)`` and its mask ``(H, W)`` so the energy peak sits at the centre
    (:func:`kspace_peak_offset`), when it is ``least`` samples off or more: one sample (a ramp of one cycle) is
    within the training's phases and common. Returns ``(kspace, mask, columns, shift)``, ``columns`` (the
    calibration block) moved along; unchanged inputs and ``(0, 0)`` when nothing moves."""
    shift = kspace_peak_offset(kspace, columns)
    if max(abs(shift[0]), abs(shift[1])) < least:
        return kspace, mask, columns, (0, 0)
    if columns is not None:
        columns = slice(columns.start + shift[1], columns.stop + shift[1])
    return np.roll(kspace, shift, axis=(-2, -1)), np.roll(mask, shift, axis=(-2, -1)), columns, shift
