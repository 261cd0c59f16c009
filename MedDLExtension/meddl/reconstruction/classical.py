"""Classical reconstructions in torch (CPU or GPU): zero-filled, CG-SENSE, L1-wavelet and TV CS.

Forward model ``A x = M F (S x)`` for one slice: maps ``S`` ``(C, H, W)``, mask ``M``
broadcastable to ``(H, W)``, centred orthonormal FFT ``F``. With unit-RSS maps ``||A|| <= 1``,
so gradient steps of 1 are safe.

* CG-SENSE (Pruessmann et al. 2001): conjugate gradients on ``(A^H A + lam I) x = A^H y``.
* L1-wavelet CS (Lustig et al. 2007): FISTA on ``1/2 ||A x - y||^2 + lam ||Psi x||_1`` with an
  orthonormal periodic Daubechies-4 pyramid ``Psi`` (the coarsest band is not penalised), started
  from CG-SENSE.
* TV CS: Chambolle-Pock primal-dual (from a CG-SENSE start) on ``1/2 ||A x - y||^2 + lam TV(x)`` (isotropic TV).

Regularisation weights ``lam`` are relative to k-space scaled so the zero-filled RSS image has
maximum 1 (:func:`normalisation`), so the defaults carry across scanners and files.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .coils import rss
from .fft import fft2c, ifft2c

__all__ = [
    "forward_op",
    "adjoint_op",
    "zero_filled",
    "normalisation",
    "cg_sense",
    "l1_wavelet",
    "tv_cs",
    "Wavelet",
    "DEFAULT_LAMBDA",
    "DEFAULT_ITERATIONS",
]

DEFAULT_LAMBDA = {"cg-sense": 0.0, "l1-wavelet": 0.003, "tv": 0.003}
DEFAULT_ITERATIONS = {"cg-sense": 10, "l1-wavelet": 50, "tv": 60}

# Daubechies-4 (8 taps) decomposition low-pass filter (pywt's db4 dec_lo)
_DB4 = (
    -0.010597401784997278,
    0.032883011666982945,
    0.030841381835986965,
    -0.18703481171888114,
    -0.02798376941698385,
    0.6308807679295904,
    0.7148465705525415,
    0.23037781330885523,
)


def forward_op(x: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``A x``: image ``(H, W)`` -> masked coil k-space ``(C, H, W)``."""
    return fft2c(maps * x) * mask


def adjoint_op(y: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``A^H y``: coil k-space ``(C, H, W)`` -> image ``(H, W)``."""
    return (maps.conj() * ifft2c(y * mask)).sum(dim=0)


def zero_filled(kspace: torch.Tensor) -> torch.Tensor:
    """RSS of the inverse FFT of (zero-filled) coil k-space ``(..., C, H, W)`` -> ``(..., H, W)``."""
    return rss(ifft2c(kspace))


def normalisation(kspace: torch.Tensor) -> float:
    """The scale that makes the zero-filled RSS image of ``(C, H, W)`` k-space peak at 1."""
    return float(zero_filled(kspace).max().clamp_min(1e-20))


def _vdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.conj() * b).sum().real


def cg_sense(
    kspace: torch.Tensor,
    maps: torch.Tensor,
    mask: torch.Tensor,
    iterations: int = 10,
    lam: float = 0.0,
    tol: float = 1e-6,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """CG-SENSE: the complex image ``(H, W)`` solving ``(A^H A + lam I) x = A^H y``."""
    b = adjoint_op(kspace, maps, mask)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = _vdot(r, r)
    stop = tol**2 * float(_vdot(b, b))
    for it in range(iterations):
        if float(rr) <= stop:
            break
        ap = adjoint_op(forward_op(p, maps, mask), maps, mask) + lam * p
        alpha = rr / _vdot(p, ap).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _vdot(r, r)
        p = r + (rr_new / rr.clamp_min(1e-30)) * p
        rr = rr_new
        if callback is not None:
            callback(it)
    return x


class Wavelet:
    """Orthonormal periodic 2-D Daubechies-4 pyramid on ``(H, W)`` images, as matrix products.

    ``levels`` is limited so every level's size stays even; sizes must be even (pad first).
    """

    def __init__(self, shape: tuple[int, int], levels: int = 4, device=None, dtype=torch.complex64) -> None:
        h, w = shape
        n = 0
        while n < levels and h % (2 ** (n + 1)) == 0 and w % (2 ** (n + 1)) == 0 and min(h, w) >> (n + 1) >= 8:
            n += 1
        self.levels = n
        self.shape = (h, w)
        self.mats = [(self._matrix(h >> i, device, dtype), self._matrix(w >> i, device, dtype)) for i in range(n)]
        coarse = torch.zeros(shape, dtype=torch.bool, device=device)
        coarse[: h >> n, : w >> n] = True
        self.penalised = ~coarse

    @staticmethod
    def _matrix(n: int, device, dtype) -> torch.Tensor:
        lo = torch.tensor(_DB4, dtype=torch.float64)
        taps = lo.numel()
        hi = torch.tensor([(-1) ** k * _DB4[taps - 1 - k] for k in range(taps)], dtype=torch.float64)
        m = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n // 2):
            for k in range(taps):
                m[i, (2 * i + k) % n] += lo[k]
                m[n // 2 + i, (2 * i + k) % n] += hi[k]
        return m.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for i, (mh, mw) in enumerate(self.mats):
            h, w = self.shape[0] >> i, self.shape[1] >> i
            out[:h, :w] = mh @ out[:h, :w] @ mw.T
        return out

    def inverse(self, c: torch.Tensor) -> torch.Tensor:
        out = c.clone()
        for i in reversed(range(self.levels)):
            mh, mw = self.mats[i]
            h, w = self.shape[0] >> i, self.shape[1] >> i
            out[:h, :w] = mh.T @ out[:h, :w] @ mw
        return out


def _soft(c: torch.Tensor, t: float, where: torch.Tensor) -> torch.Tensor:
    mag = c.abs()
    shrunk = c * (1 - t / mag.clamp_min(1e-20)).clamp_min(0)
    return torch.where(where, shrunk, c)


def _padded(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, multiple: int = 16):
    """Embed the image grid in one divisible by ``multiple`` (the regulariser's grid)."""
    h, w = kspace.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    sl = (slice(ph // 2, ph // 2 + h), slice(pw // 2, pw // 2 + w))
    return (h + ph, w + pw), sl


def l1_wavelet(
    kspace: torch.Tensor,
    maps: torch.Tensor,
    mask: torch.Tensor,
    lam: float = DEFAULT_LAMBDA["l1-wavelet"],
    iterations: int = DEFAULT_ITERATIONS["l1-wavelet"],
    seed: int = 0,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """L1-wavelet compressed sensing by FISTA with random cycle spinning; complex image ``(H, W)``."""
    scale = normalisation(kspace)
    y = kspace / scale
    (hp, wp), sl = _padded(kspace, maps, mask)
    wav = Wavelet((hp, wp), device=kspace.device, dtype=kspace.dtype)

    def a_h(v: torch.Tensor) -> torch.Tensor:
        full = torch.zeros((hp, wp), dtype=v.dtype, device=v.device)
        full[sl] = adjoint_op(v, maps, mask)
        return full

    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros((hp, wp), dtype=y.dtype, device=y.device)
    x[sl] = cg_sense(y, maps, mask, iterations=10)  # a warm start
    z, t = x.clone(), 1.0
    for it in range(iterations):
        grad = a_h(forward_op(z[sl], maps, mask) - y)
        # random cycle spinning (as BART's pics): a random circular shift per iteration makes the
        # decimated wavelet's thresholding translation-invariant on average, avoiding block artefacts
        shift = (
            int(torch.randint(0, 2**wav.levels, (1,), generator=gen)),
            int(torch.randint(0, 2**wav.levels, (1,), generator=gen)),
        )
        v = torch.roll(z - grad, shift, dims=(0, 1))
        x_new = torch.roll(wav.inverse(_soft(wav.forward(v), lam, wav.penalised)), (-shift[0], -shift[1]), dims=(0, 1))
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
        if callback is not None:
            callback(it)
    return x[sl] * scale


def _grad(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.roll(x, -1, 0) - x, torch.roll(x, -1, 1) - x])


def _grad_adjoint(q: torch.Tensor) -> torch.Tensor:
    return (torch.roll(q[0], 1, 0) - q[0]) + (torch.roll(q[1], 1, 1) - q[1])


def tv_cs(
    kspace: torch.Tensor,
    maps: torch.Tensor,
    mask: torch.Tensor,
    lam: float = DEFAULT_LAMBDA["tv"],
    iterations: int = DEFAULT_ITERATIONS["tv"],
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Total-variation compressed sensing by Chambolle-Pock; complex image ``(H, W)``."""
    scale = normalisation(kspace)
    y = kspace / scale
    # tau * sigma * (||A||^2 + ||grad||^2) < 1 with ||A|| <= 1, ||grad||^2 <= 8; a large primal step
    # (tau / sigma = 100) and a CG-SENSE start converge in tens of iterations instead of hundreds
    tau, sigma = 0.99 / 3.0 * 10, 0.99 / 3.0 / 10
    x = cg_sense(y, maps, mask, iterations=10)
    x_bar = x.clone()
    p = torch.zeros_like(y)
    q = torch.zeros((2, *x.shape), dtype=x.dtype, device=x.device)
    for it in range(iterations):
        p = (p + sigma * forward_op(x_bar, maps, mask) - sigma * y) / (1 + sigma)
        q = q + sigma * _grad(x_bar)
        norm = torch.sqrt((q.real**2 + q.imag**2).sum(dim=0))
        q = q / (norm / lam).clamp_min(1.0)
        x_new = x - tau * (adjoint_op(p, maps, mask) + _grad_adjoint(q))
        x_bar = 2 * x_new - x
        x = x_new
        if callback is not None:
            callback(it)
    return x * scale
