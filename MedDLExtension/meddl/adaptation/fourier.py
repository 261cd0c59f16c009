"""Fourier domain adaptation: give an image the low-frequency amplitude spectrum of references.

* **FDA** (Yang & Soatto, CVPR 2020): ``F = FFT(x)``; inside a centred low-frequency square of
  half-width ``b = floor(min(shape) * beta)`` the amplitude ``|F|`` becomes the reference's, the
  phase stays the input's; inverse FFT.
* **Feather-light FDA** (Zakazov et al., DART 2022): the same with a circular window of radius
  ``min(shape) * beta``, applied at test time (the target is moved into the training style),
  several donors averaged, donors chosen by image similarity, full 3D per volume.

Conventions here:

* Frequencies are integer indices ``k`` (``k = 0`` the mean), so the square window is
  ``max|k_d| <= b`` and the circle ``sum k_d^2 <= r^2``, over the axes transformed: the two axes of
  each slice (``mode = "2d"``, slices along ``slice_axis``) or all three (``"3d"``); a volume of
  one slice (Slicer's 2D image, ``(I, J, 1)``) is transformed as the 2D image it is in either mode.
* ``beta = 0`` returns the input unchanged; any ``beta > 0`` swaps at least the mean (``k = 0``).
* The output spectrum is the input's spectrum times a positive real factor, so its phase *is*
  the input's wherever the input's amplitude is not zero; the window is symmetric (``k`` and
  ``-k``), so the output is real. The one exception is the zero frequency: the output's mean is
  the reference's, sign included (keeping the input's sign would flip the mean of a negative-mean
  image, e.g. CT in HU, against a positive reference).
* Several references: ``combine = "mean"`` uses their mean amplitude, which equals the mean of
  the single-reference outputs (the map is linear in the amplitude); ``"each"`` gives one output
  per reference.
* A reference whose array shape differs from the input's is resampled (linearly) onto the input's
  array shape first, so amplitudes are compared at the same frequency per field of view.
* ``preserve_range`` clips the output to the input's intensity range (the only step that can
  change the phase, and only of voxels pushed outside the range).
* ``domain = "log"`` swaps the amplitudes of ``log(x + c)`` instead of ``x`` (``c`` = ``log_offset``
  times each image's 99th percentile, since background zeros have no logarithm) and returns
  ``exp(y) - c_ref``: a multiplicative shift (an MR bias field, a gain) becomes an additive,
  low-frequency one there, which is what the window replaces. Non-negative intensities only.

``beta`` rule when not given (documented in :func:`default_beta`): 0.01 for the square window (Yang
& Soatto's best single value) and 0.03 for the circle (Zakazov et al.'s figure), raised so the
window always holds at least the first non-zero frequency along the shortest axis.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, Reporter
from ..volume import Volume, one_slice_axis
from ._common import as_tensor, check_intensity, torch_device

__all__ = [
    "Window",
    "FourierMode",
    "FourierDomain",
    "Combine",
    "FourierConfig",
    "adapt_fourier",
    "fda",
    "low_frequency_window",
    "default_beta",
    "rank_donors",
    "ssim",
]


class Window(str, enum.Enum):
    """Shape of the low-frequency window."""

    SQUARE = "square"  #: Yang & Soatto
    CIRCLE = "circle"  #: feather-light FDA


class FourierMode(str, enum.Enum):
    """Which axes one Fourier transform spans."""

    SLICE = "2d"  #: each 2D slice on its own (slices along ``slice_axis``)
    VOLUME = "3d"  #: the whole 3D volume


class FourierDomain(str, enum.Enum):
    """Which signal's spectrum is adapted."""

    INTENSITY = "intensity"  #: the image itself (Yang & Soatto; feather-light FDA)
    LOG = "log"  #: its logarithm, for multiplicative shifts such as bias fields


class Combine(str, enum.Enum):
    """What several references give."""

    MEAN = "mean"  #: one output from the references' mean amplitude
    EACH = "each"  #: one output per reference


@dataclass(frozen=True)
class FourierConfig:
    """Options of Fourier domain adaptation (validated on creation).

    Attributes:
        beta: window size as a fraction of the shortest transformed axis, in [0, 0.5];
            ``None``: :func:`default_beta`.
        window: ``square`` or ``circle``.
        mode: ``2d`` (slice-wise) or ``3d``; the same for 2D images.
        combine: ``mean`` or ``each``.
        slice_axis: the spatial axis (0, 1 or 2 = I, J, K) that indexes slices in ``2d`` mode.
        donors: keep only this many references, the most similar to the input
            (:func:`rank_donors`); ``None`` keeps all.
        preserve_range: clip the output to the input's intensity range.
        domain: ``intensity`` or ``log`` (multiplicative shifts; non-negative images only).
        log_offset: in the ``log`` domain, ``log(x + c)`` with ``c`` this fraction of each image's
            99th percentile, in (0, 1].
    """

    beta: float | None = None
    window: Window | str = Window.CIRCLE
    mode: FourierMode | str = FourierMode.VOLUME
    combine: Combine | str = Combine.MEAN
    slice_axis: int = 2
    donors: int | None = None
    preserve_range: bool = True
    domain: FourierDomain | str = FourierDomain.INTENSITY
    log_offset: float = 0.05

    def __post_init__(self) -> None:
        for name, enum_type in (("window", Window), ("mode", FourierMode), ("combine", Combine),
                                ("domain", FourierDomain)):
            try:
                object.__setattr__(self, name, enum_type(getattr(self, name)))
            except ValueError:
                choices = ", ".join(m.value for m in enum_type)
                raise InputError(f"Fourier {name}: expected one of {choices}, got '{getattr(self, name)}'") from None
        if self.beta is not None:
            ok = isinstance(self.beta, (int, float, np.floating, np.integer)) and np.isfinite(self.beta)
            if not ok or not (0.0 <= float(self.beta) <= 0.5):
                raise InputError(
                    f"Fourier beta: expected a number in [0, 0.5], got {self.beta!r}. "
                    "beta is the window size as a fraction of the image size (0 = unchanged; usual 0.01-0.09)"
                )
        if self.slice_axis not in (0, 1, 2):
            raise InputError(f"Fourier slice_axis: expected 0, 1 or 2, got {self.slice_axis!r}")
        if self.donors is not None and (not isinstance(self.donors, (int, np.integer)) or self.donors < 1):
            raise InputError(f"Fourier donors: expected a positive number of references, got {self.donors!r}")
        ok = isinstance(self.log_offset, (int, float, np.floating, np.integer)) and np.isfinite(self.log_offset)
        if not ok or not 0.0 < float(self.log_offset) <= 1.0:
            raise InputError(f"Fourier log offset: expected a number in (0, 1], got {self.log_offset!r}")


def default_beta(window: Window | str, shape: Sequence[int]) -> float:
    """The ``beta`` used when none is given.

    0.01 for the square window (the best single value of Yang & Soatto) and 0.03 for the circle
    (the value of Zakazov et al.'s figure); raised to ``1 / min(shape)`` when smaller, so the window
    holds at least the first non-zero frequency of the shortest axis (on a 64-voxel axis 0.01
    would swap the mean only).
    """
    base = 0.01 if Window(window) is Window.SQUARE else 0.03
    return float(max(base, 1.0 / max(min(shape), 2)))


def low_frequency_window(shape: Sequence[int], beta: float, window: Window | str, device=None):
    """Boolean mask over unshifted FFT indices of ``shape`` (2 or 3 axes): the swapped frequencies.

    Square: ``max_d |k_d| <= floor(min(shape) * beta)``; circle: ``sum_d k_d^2 <= (min(shape) * beta)^2``.
    Empty for ``beta = 0``.
    """
    import torch

    window = Window(window)
    if beta <= 0:
        return torch.zeros(tuple(shape), dtype=torch.bool, device=device)
    grids = torch.meshgrid(
        *[torch.fft.fftfreq(n, d=1.0 / n, device=device).abs() for n in shape], indexing="ij"
    )
    if window is Window.SQUARE:
        half = float(np.floor(min(shape) * beta + 1e-9))  # 49 * (1 / 49) is 0.999...: still one step
        return torch.stack(grids).amax(0) <= half
    radius = min(shape) * beta
    return sum(g * g for g in grids) <= radius * radius + 1e-9


def fda(image, reference_amplitude, beta: float, window: Window | str = Window.CIRCLE, ndim: int = 2):
    """Swap the low-frequency amplitude of ``image`` for ``reference_amplitude``; keep the phase.

    The tensor-level core, for training pipelines. Like every other frequency, the zero frequency
    keeps the input's phase, i.e. the sign of its mean; :func:`adapt_fourier` sets the mean apart
    and gives the output the reference's mean, sign included.

    Args:
        image: real tensor ``(..., *S)``; the last ``ndim`` axes are transformed.
        reference_amplitude: ``|FFT|`` of the reference(s) over the same axes, broadcastable to
            ``image``'s spectrum (e.g. ``torch.fft.fftn(ref, dim=...).abs()``).
        beta: window size in [0, 0.5].
    Returns:
        Real tensor like ``image`` (float32/64).
    """
    import torch

    if beta == 0:
        return image
    dims = tuple(range(-ndim, 0))
    spectrum = torch.fft.fftn(image, dim=dims)
    # only the window's few frequencies change: work on those entries, not on full-size temporaries
    inside = low_frequency_window(image.shape[-ndim:], beta, window, device=image.device).expand(spectrum.shape)
    values = spectrum[inside]
    target = reference_amplitude.to(device=spectrum.device, dtype=spectrum.real.dtype).expand(spectrum.shape)[inside]
    amplitude = values.abs()
    # |F| -> reference amplitude by a positive real factor: the phase is untouched. Where the
    # input's amplitude is 0 its phase is undefined; the reference amplitude goes in with phase 0.
    safe = amplitude > 0
    factor = target / torch.where(safe, amplitude, torch.ones_like(amplitude))
    spectrum[inside] = torch.where(safe, values * factor, target.to(values.dtype))
    return torch.fft.ifftn(spectrum, dim=dims).real


def _resample_to(ref, shape: tuple[int, ...]):
    """``(C, *S)`` tensor -> ``(C, *shape)`` by linear interpolation (no-op when equal)."""
    import torch.nn.functional as F

    if tuple(ref.shape[1:]) == tuple(shape):
        return ref
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(ref.unsqueeze(0), size=tuple(shape), mode=mode, align_corners=True).squeeze(0)


def _check_references(image: Volume, references: Sequence[Volume]) -> None:
    if isinstance(references, Volume):
        references = [references]
    if len(references) == 0:
        raise InputError("Fourier adaptation: expected at least one reference volume, got none")
    for i, ref in enumerate(references, start=1):
        role = f"reference {i}"
        if not isinstance(ref, Volume):
            raise InputError(f"{role}: expected a meddl.Volume, got {type(ref).__name__}")
        if ref.ndim != image.ndim:
            raise InputError(
                f"{role}: expected a {image.ndim}D volume like the input, got {ref.ndim}D with shape "
                f"{ref.spatial_shape}; give references of the same dimensionality"
            )
        check_intensity(ref, role, varying=True)
        if ref.channels not in (1, image.channels):
            raise InputError(
                f"{role}: expected {image.channels} channel(s) like the input (or 1), got {ref.channels}"
            )


def adapt_fourier(
    image: Volume,
    references: Sequence[Volume] | Volume,
    config: FourierConfig | None = None,
    progress: ProgressCallback | Reporter | None = None,
    cancel: CancelToken | None = None,
    device: Any = None,
) -> Volume | list[Volume]:
    """Fourier domain adaptation of ``image`` towards the style of ``references``.

    Args:
        image: intensity volume ``(C, I, J)`` or ``(C, I, J, K)``, finite values.
        references: one or more intensity volumes of the same dimensionality (any array shape:
            resampled onto the input's), 1 or ``C`` channels.
        config: window, beta, mode, combination (:class:`FourierConfig`).
        device: torch device (``None``: CUDA, then MPS, then CPU).
    Returns:
        One volume on the input's grid (``combine="mean"``) or a list, one per reference kept
        (``combine="each"``). The input's dtype (float32 for other types, and for integer input
        without ``preserve_range``).
    Raises:
        InputError: NaNs, references of another dimensionality, bad options.
    """
    import torch

    config = config if config is not None else FourierConfig()
    rep = Reporter.of(progress, cancel)
    check_intensity(image, "input", varying=True)
    refs = [references] if isinstance(references, Volume) else list(references)
    _check_references(image, refs)
    if config.domain is FourierDomain.LOG:
        _check_non_negative(image, "input")
        for i, ref in enumerate(refs, start=1):
            _check_non_negative(ref, f"reference {i}")
    dev = torch_device(device)
    x = as_tensor(image.data, dev, torch.float64)
    # a volume of one slice (how Slicer holds a 2D image) is a 2D image: transformed along its
    # singleton axis too, the window's size (set by the shortest axis) would hold the mean only
    slice_axis = config.slice_axis
    by_slice = config.mode is FourierMode.SLICE and image.ndim == 3
    if not by_slice and (single := one_slice_axis(image)) is not None:
        by_slice, slice_axis = True, single
    if by_slice:
        x = torch.movedim(x, 1 + slice_axis, 1)  # (C, slices, a, b)
        ndim = 2
    else:
        ndim = image.ndim
    shape = tuple(x.shape[-ndim:])
    beta = config.beta if config.beta is not None else default_beta(config.window, shape)
    rep(0.0, "preparing references")
    ref_tensors = []
    for ref in refs:
        r = _resample_to(as_tensor(ref.data, dev, torch.float64), image.spatial_shape)
        if r.shape[0] != x.shape[0]:
            r = r.expand(x.shape[0], *r.shape[1:])
        if by_slice:
            r = torch.movedim(r, 1 + slice_axis, 1)
        ref_tensors.append(r)
    if config.donors is not None and config.donors < len(refs):
        order = rank_donors(image, refs, device=dev)
        keep = [i for i, _ in order[: config.donors]]
        ref_tensors = [ref_tensors[i] for i in keep]
        refs = [refs[i] for i in keep]
    lo, hi = float(x.min()), float(x.max())
    x_in = x
    ref_offsets = [0.0] * len(ref_tensors)
    if config.domain is FourierDomain.LOG:
        x, _ = _to_log(x, config.log_offset)
        logged = [_to_log(r, config.log_offset) for r in ref_tensors]
        ref_tensors = [r for r, _ in logged]
        ref_offsets = [c for _, c in logged]
    dims = tuple(range(-ndim, 0))
    # The mean (zero frequency) is set apart and replaced by the reference's with its sign: keeping
    # the input's phase there would keep the input's sign, and flip the mean of an image whose mean
    # is negative (CT in HU; the log of an image scaled to [0, 1]) against a positive reference.
    x_mean = x.mean(dim=dims, keepdim=True)
    ref_means = [r.mean(dim=dims, keepdim=True) for r in ref_tensors]
    amplitudes = []
    for i, (r, m) in enumerate(zip(ref_tensors, ref_means, strict=True)):
        amplitudes.append(torch.fft.fftn(r - m, dim=dims).abs())
        rep(0.1 + 0.3 * (i + 1) / len(ref_tensors), "reference spectra")
    if config.combine is Combine.MEAN:
        groups = [(torch.stack(amplitudes).mean(0), torch.stack(ref_means).mean(0), float(np.mean(ref_offsets)))]
    else:
        groups = list(zip(amplitudes, ref_means, ref_offsets, strict=True))
    outputs = []
    for i, (amplitude, mean, offset) in enumerate(groups):
        rep.check()
        y = fda(x - x_mean, amplitude, beta, config.window, ndim) + mean if beta > 0 else x
        if config.domain is FourierDomain.LOG:
            y = torch.exp(y) - offset if beta > 0 else x_in
        if config.preserve_range:
            y = y.clamp(lo, hi)
        if by_slice:
            y = torch.movedim(y, 1, 1 + slice_axis)
        outputs.append(_to_output(image, y, config, beta))
        rep(0.4 + 0.6 * (i + 1) / len(groups), "swapping low frequencies")
    return outputs[0] if config.combine is Combine.MEAN else outputs


def _check_non_negative(volume: Volume, role: str) -> None:
    minimum = float(np.min(volume.numpy()))
    if minimum < 0:
        raise InputError(
            f"{role}: the log domain needs non-negative intensities (MR magnitude, microscopy), got a "
            f"minimum of {minimum:g}; use the intensity domain"
        )


def _to_log(t, fraction: float):
    """``(log(t + c), c)`` with ``c = fraction x`` the 99th percentile of ``t`` (its max if that is 0)."""
    import torch

    flat = t.reshape(-1)
    step = max(1, flat.numel() // 200_000)
    scale = float(torch.quantile(flat[::step], 0.99))
    if scale <= 0:
        scale = float(flat.max()) if float(flat.max()) > 0 else 1.0
    offset = fraction * scale
    return torch.log(t + offset), offset


def _to_output(image: Volume, y, config: FourierConfig, beta: float) -> Volume:
    src = image.numpy().dtype
    arr = y.cpu().numpy()  # float64
    if np.issubdtype(src, np.integer) and config.preserve_range:
        arr = np.rint(arr).astype(src)  # in the input's range, so the integer type holds it
    else:
        arr = arr.astype(src if src in (np.float32, np.float64) else np.float32)
    return image.with_data(
        arr, fda_beta=round(float(beta), 6), fda_window=config.window.value, fda_mode=config.mode.value,
        fda_domain=config.domain.value,
    )


def ssim(a, b, window: int = 7):
    """Mean structural similarity (Wang et al. 2004) of two tensors ``(C, *S)`` (2D or 3D).

    Both are scaled to [0, 1] by their own 1st-99th percentiles first (so contrast scales do not
    matter); uniform ``window``-voxel windows, ``k1 = 0.01``, ``k2 = 0.03``.
    """
    import torch
    import torch.nn.functional as F

    def norm(t):
        flat = t.reshape(-1).float()
        step = max(1, flat.numel() // 200_000)
        q = torch.quantile(flat[::step], torch.tensor([0.01, 0.99], device=t.device))
        return ((t.float() - q[0]) / (q[1] - q[0]).clamp_min(1e-12)).clamp(0, 1)

    a, b = norm(a), norm(b)
    pool = F.avg_pool2d if a.dim() == 3 else F.avg_pool3d
    stack = torch.stack((a, b, a * a, b * b, a * b)).flatten(0, 1)  # (5C, *S)
    ks = tuple(min(window, s) for s in a.shape[1:])  # a thin axis (one slice, a short stack) gets a thinner window
    m = pool(stack, ks, stride=1).view(5, a.shape[0], *[s - k + 1 for s, k in zip(a.shape[1:], ks, strict=True)])
    mu_a, mu_b, aa, bb, ab = m
    va, vb, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(s.mean())


def rank_donors(image: Volume, references: Sequence[Volume], device: Any = None) -> list[tuple[int, float]]:
    """References ordered from most to least similar to ``image``: ``[(index, ssim), ...]``.

    Similarity is SSIM on images scaled by their own percentiles, after resampling each reference
    onto the input's array shape (feather-light FDA used SR-SIM; SSIM is the close, common cousin).
    """
    import torch

    check_intensity(image, "input")
    _check_references(image, references)
    dev = torch_device(device)
    x = as_tensor(image.data, dev, torch.float32)
    scores = []
    for i, ref in enumerate(references):
        r = _resample_to(as_tensor(ref.data, dev, torch.float32), image.spatial_shape)
        if r.shape[0] != x.shape[0]:
            r = r.expand_as(x)
        scores.append((i, ssim(x, r)))
    return sorted(scores, key=lambda s: -s[1])
