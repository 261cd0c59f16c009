"""Multi-coil k-space simulated from magnitude images (the training and benchmark data).

Forward model (SCIENCE.md): ``y_c = M F S_c x + noise`` with ``x = |image| * exp(i phi)``, a smooth
random phase ``phi``, birdcage-like coil maps ``S_c`` normalised so ``sum_c |S_c|^2 = 1``
everywhere (so the root-sum-of-squares of fully sampled, noiseless coil images equals ``|x|``),
and complex Gaussian noise.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .fft import fft2c

__all__ = ["birdcage_maps", "smooth_phase", "simulate_kspace", "pad_to"]


def birdcage_maps(
    num_coils: int,
    shape: tuple[int, int],
    radius: float = 1.5,
    rotation: float = 0.0,
    falloff: float = 1.0,
    dtype=np.complex64,
) -> np.ndarray:
    """Coil sensitivities ``(C, H, W)`` of ``num_coils`` loops on a ring around the field of view.

    Each coil sees ``exp(i angle) / distance**falloff`` from its centre (the Biot-Savart-like
    decay of sigpy's ``birdcage_maps``); ``radius`` is in units of the half field of view and
    ``rotation`` (radians) turns the ring. The maps are normalised to unit root-sum-of-squares.
    """
    if num_coils < 1:
        raise InputError(f"coils: expected at least 1, got {num_coils}")
    h, w = shape
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    maps = np.empty((num_coils, h, w), dtype=np.complex128)
    for c in range(num_coils):
        theta = rotation + 2 * np.pi * c / num_coils
        cy, cx = radius * np.sin(theta), radius * np.cos(theta)
        dy, dx = y - cy, x - cx
        dist = np.sqrt(dx**2 + dy**2)
        maps[c] = np.exp(1j * (np.arctan2(dy, dx) - theta)) / np.maximum(dist, 1e-3) ** falloff
    maps /= np.sqrt((np.abs(maps) ** 2).sum(axis=0, keepdims=True))
    return maps.astype(dtype)


def smooth_phase(
    shape: tuple[int, int], rng: np.random.Generator, max_phase: float = np.pi, order: int = 3
) -> np.ndarray:
    """A smooth random phase map ``(H, W)`` in radians: a random 2-D polynomial of low order."""
    h, w = shape
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    phase = np.zeros((h, w))
    for i in range(order + 1):
        for j in range(order + 1 - i):
            phase += rng.normal() / (1 + i + j) * x**i * y**j
    peak = np.abs(phase).max()
    return (phase / max(peak, 1e-12) * rng.uniform(0.2, 1.0) * max_phase).astype(np.float64)


def pad_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-pad or centre-crop a 2-D image ``(H, W)`` to ``shape``."""
    out = np.zeros(shape, dtype=image.dtype)
    h, w = image.shape
    th, tw = shape
    sh, sw = max((h - th) // 2, 0), max((w - tw) // 2, 0)
    dh, dw = max((th - h) // 2, 0), max((tw - w) // 2, 0)
    ch, cw = min(h, th), min(w, tw)
    out[dh : dh + ch, dw : dw + cw] = image[sh : sh + ch, sw : sw + cw]
    return out


def simulate_kspace(
    image: np.ndarray,
    num_coils: int = 8,
    rng: np.random.Generator | int | None = None,
    noise: float = 0.0,
    phase: bool = True,
    coil_rotation: float | None = None,
    coil_radius: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fully sampled multi-coil k-space of a magnitude image.

    Args:
        image: real magnitude ``(H, W)``.
        num_coils: number of receive coils.
        noise: standard deviation of the complex k-space noise relative to the image maximum
            (per real and imaginary part, per coil).
        phase: add a smooth random phase.

    Returns:
        ``(kspace (C, H, W) complex64, maps (C, H, W) complex64, x (H, W) complex64)`` where ``x`` is
        the complex image (``|x| = image``).
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise InputError(f"simulation: expected a 2-D magnitude image, got shape {image.shape}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    x = image.astype(np.complex128)
    if phase:
        x = x * np.exp(1j * smooth_phase(image.shape, rng))
    rotation = rng.uniform(0, 2 * np.pi) if coil_rotation is None else coil_rotation
    radius = rng.uniform(1.2, 2.0) if coil_radius is None else coil_radius
    maps = birdcage_maps(num_coils, image.shape, radius=radius, rotation=rotation, dtype=np.complex128)
    k = fft2c(maps * x[None])
    if noise > 0:
        sigma = noise * float(np.abs(image).max())
        k = k + sigma * (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape))
    return k.astype(np.complex64), maps.astype(np.complex64), x.astype(np.complex64)
