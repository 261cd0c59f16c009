"""Multi-coil k-space simulated from images (the training and benchmark data, ``meddl simulate-kspace``).

Forward model (SCIENCE.md): ``y_c = M F S_c x + noise`` with ``x = |image| * exp(i phi)``, a smooth
random phase ``phi``, birdcage-like coil maps ``S_c`` normalised so ``sum_c |S_c|^2 = 1``
everywhere (so the root-sum-of-squares of fully sampled, noiseless coil images equals ``|x|``),
and complex Gaussian noise. A complex image (e.g. a complex MetaImage) keeps its own phase.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .fft import fft2c

__all__ = ["birdcage_maps", "smooth_phase", "scanner_phase", "simulate_kspace", "simulate_file", "image_slices", "pad_to"]


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


def scanner_phase(shape: tuple[int, int], rng: np.random.Generator, max_cycles: float = 4.0,
                  max_phase: float = 3 * np.pi) -> np.ndarray:
    """A phase map ``(H, W)`` like a scanner's, beyond :func:`smooth_phase`'s: a smooth polynomial of up to
    ``max_phase`` radians plus a linear ramp of up to ``max_cycles`` cycles across the field of view along each
    axis (an echo or k-space centre off by that many samples, an object off the isocentre)."""
    h, w = shape
    smooth = smooth_phase(shape, rng, max_phase=float(rng.uniform(np.pi, max_phase)))
    a, b = rng.uniform(-max_cycles, max_cycles, 2)
    ramp = 2 * np.pi * (a * np.arange(h)[:, None] / h + b * np.arange(w)[None, :] / w)
    return smooth + ramp


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
    """Fully sampled multi-coil k-space of an image.

    Args:
        image: real magnitude ``(H, W)``, or a complex image ``(H, W)`` whose phase is kept.
        num_coils: number of receive coils (one: a uniform sensitivity).
        noise: standard deviation of the complex k-space noise relative to the image maximum
            (per real and imaginary part, per coil).
        phase: add a smooth random phase to a real image (complex images keep theirs).

    Returns:
        ``(kspace (C, H, W) complex64, maps (C, H, W) complex64, x (H, W) complex64)`` where ``x`` is
        the complex image (``|x| = image``).
    """
    given_phase = np.iscomplexobj(image)
    image = np.asarray(image, dtype=np.complex128 if given_phase else np.float64)
    if image.ndim != 2:
        raise InputError(f"simulation: expected a 2-D image, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise InputError("simulation: expected finite values, got NaN or infinite pixels; fill them first")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    x = image.astype(np.complex128)
    if phase and not given_phase:
        x = x * np.exp(1j * smooth_phase(image.shape, rng))
    rotation = rng.uniform(0, 2 * np.pi) if coil_rotation is None else coil_rotation
    radius = rng.uniform(1.2, 2.0) if coil_radius is None else coil_radius
    if num_coils == 1:  # one coil: a uniform (body-coil) sensitivity, the image itself is measured
        maps = np.ones((1, *image.shape), dtype=np.complex128)
    else:
        maps = birdcage_maps(num_coils, image.shape, radius=radius, rotation=rotation, dtype=np.complex128)
    k = fft2c(maps * x[None])
    if noise > 0:
        sigma = noise * float(np.abs(image).max())
        k = k + sigma * (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape))
    return k.astype(np.complex64), maps.astype(np.complex64), x.astype(np.complex64)


def image_slices(volume, axis: int = 2, complex_input: str = "auto") -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 2D or 3D :class:`~meddl.volume.Volume` -> ``(slices (S, H, W), (dH, dW, thickness) mm)``.

    ``complex_input``: ``auto`` (complex voxels, or two channels read as real and imaginary
    parts, as SimpleITK reads a complex MetaImage, are complex; one channel is a magnitude),
    ``yes`` or ``no``. Slices run along the spatial ``axis`` (0, 1, 2 = I, J, K) of a 3D volume;
    the other two axes keep their order, so a reconstruction lays the slices out as the input.
    """
    data = np.asarray(volume.numpy())
    channels = data.shape[0]
    if complex_input not in ("auto", "yes", "no"):
        raise InputError(f"--complex: expected auto, yes or no, got '{complex_input}'")
    if np.iscomplexobj(data):
        if channels != 1:
            raise InputError(f"simulation: expected one complex channel, got {channels}")
        x = data[0] if complex_input != "no" else np.abs(data[0])
    elif channels == 2 and complex_input != "no":
        x = data[0].astype(np.float64) + 1j * data[1].astype(np.float64)
    elif channels == 1 and complex_input != "yes":
        x = data[0].astype(np.float64)
        finite = x[np.isfinite(x)]
        low = float(finite.min()) if finite.size else 0.0  # non-finite values are refused just below
        if low < 0:
            raise InputError(
                f"simulation: expected a magnitude image (values >= 0), got a minimum of {low:g}; an MR "
                "magnitude or a complex image (two channels, real and imaginary) is needed, not e.g. CT in HU"
            )
    else:
        want = "two channels (real, imaginary)" if complex_input == "yes" else "one channel (a magnitude image)"
        if complex_input == "auto":
            want = "one channel (magnitude) or two (real, imaginary)"
        raise InputError(f"simulation: expected {want}, got {channels} channel(s)")
    spacing = tuple(float(v) for v in volume.spacing)
    if x.ndim == 2:
        return x[None], (spacing[0], spacing[1], 1.0)
    if axis not in (0, 1, 2):
        raise InputError(f"--axis: expected 0, 1 or 2, got {axis}")
    plane = [a for a in range(3) if a != axis]
    return np.moveaxis(x, axis, 0), (spacing[plane[0]], spacing[plane[1]], spacing[axis])


def simulate_file(volume, path, coils: int = 8, noise: float = 0.005, seed: int | None = 0, axis: int = 2,
                  complex_input: str = "auto", progress=None, cancel=None):
    """Write a fully sampled multi-coil fastMRI-style file (``.h5``) or BART data (``NAME.cfl`` +
    ``NAME.hdr``, for ``bart pics`` and the other BART tools) simulated from ``volume``.

    Each slice ``x`` (complex: its own phase; magnitude: a smooth random phase) is multiplied by
    birdcage coil maps and Fourier transformed; complex noise of standard deviation ``noise`` x the
    largest ``|x|`` is added. The file holds ``kspace`` ``(S, coils, H, W)``, the header (field of
    view from the voxel size) and ``reconstruction_rss`` = ``|x|``, the reference. A fastMRI file
    has no orientation: a reconstruction keeps the voxel size and the slice layout, not the
    input's position and direction. BART data hold the k-space alone (no geometry, no reference;
    ``facts["notice"]`` says so). Returns ``(path, facts)``.
    """
    from ..progress import Reporter
    from .bart_io import write_kspace_cfl
    from .fastmri import write_fastmri

    bart = Path(path).suffix.lower() in (".cfl", ".hdr")
    if not bart and Path(path).suffix.lower() != ".h5":
        raise InputError(f"--output '{path}': expected a fastMRI file name ending in .h5 or BART data "
                         "ending in .cfl")
    if not isinstance(coils, (int, np.integer)) or not 1 <= coils <= 64:
        raise InputError(f"--coils: expected 1 to 64 receive coils, got {coils}")
    if not (np.isfinite(noise) and 0 <= noise < 1):
        raise InputError(f"--noise: expected a fraction of the image maximum in [0, 1), got {noise}")
    rep = Reporter.of(progress, cancel)
    slices, (dh, dw, thickness) = image_slices(volume, axis, complex_input)
    if min(slices.shape[1:]) < 8:
        raise InputError(f"simulation: expected slices of at least 8 x 8 pixels, got {slices.shape[1:]}")
    if not np.all(np.isfinite(slices)):
        raise InputError("simulation: expected finite values, got NaN or infinite voxels; fill them first")
    peak = float(np.abs(slices).max())
    if peak == 0:
        raise InputError("simulation: expected an image with signal, got only zeros")
    rng = np.random.default_rng(seed)
    ks, refs = [], []
    for i, sl in enumerate(slices):
        rep(i / len(slices), f"simulating slice {i + 1}/{len(slices)}")
        k, _, x = simulate_kspace(sl, int(coils), rng, noise=0.0, coil_rotation=0.0, coil_radius=1.6)
        if noise > 0:  # one noise level for the whole volume
            k = k + (noise * peak) * (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape)).astype(np.complex64)
        ks.append(k)
        refs.append(np.abs(x))
    kspace = np.stack(ks) if coils > 1 else np.stack(ks)[:, 0]
    h, w = slices.shape[1:]
    facts = {"slices": len(slices), "coils": int(coils), "matrix": [int(h), int(w)],
             "complex": bool(np.iscomplexobj(slices)), "noise": float(noise)}
    if bart:
        _, out = write_kspace_cfl(path, kspace)
        facts["format"] = "bart"
        facts["notice"] = ("BART data carry no geometry and no reference image: a reconstruction has 1 mm "
                           f"pixels (these were {dh:g} x {dw:g} mm, slices {thickness:g} mm)")
    else:
        out = write_fastmri(path, kspace, fov_mm=(dh * h, dw * w, thickness),
                            target=np.stack(refs).astype(np.float32), acquisition="SIMULATED",
                            simulated_coils=int(coils), simulated_noise=float(noise))
        facts["format"] = "fastmri"
    rep(1.0, "written")
    return out, facts
