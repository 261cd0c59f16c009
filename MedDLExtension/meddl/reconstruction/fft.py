"""Centred orthonormal 2-D Fourier transforms (fastMRI's ``fftc`` convention).

``fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))`` over the last two axes, so the
k-space centre (DC) sits at index ``(H // 2, W // 2)`` and Parseval holds exactly. Both torch
(complex tensors, any device) and numpy arrays are accepted; the output type follows the input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["fft2c", "ifft2c"]

_DIMS = (-2, -1)


def fft2c(x: Any) -> Any:
    """Centred orthonormal FFT over the last two axes: image ``(..., H, W)`` -> k-space ``(..., H, W)``."""
    if isinstance(x, np.ndarray):
        return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=_DIMS), norm="ortho"), axes=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"), dim=_DIMS)


def ifft2c(k: Any) -> Any:
    """Centred orthonormal inverse FFT over the last two axes: k-space ``(..., H, W)`` -> image."""
    if isinstance(k, np.ndarray):
        return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=_DIMS), norm="ortho"), axes=_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=_DIMS), norm="ortho"), dim=_DIMS)
