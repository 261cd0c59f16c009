"""Per-pixel uncertainty of a reconstruction by Stein's unbiased risk estimate (SURE).

Edupuganti et al. (seed notes): with the zero-filled image ``x_zf = x + v``, ``v ~ N(0, s2 I)``,
the risk of a reconstruction ``f`` is ``E||f(x_zf) - x||^2 ~ -n s2 + ||f(x_zf) - x_zf||^2 +
2 s2 tr(df/dx_zf)``; the trace comes from a Monte-Carlo probe ``b ~ N(0, I)``:
``b^T (f(x_zf + eps b) - f(x_zf)) / eps``. Kept per pixel (each term's pixel contribution),
averaged over probes and smoothed, this is a map of the expected squared error.

For multi-coil k-space the image-domain input acts through the coil maps: a perturbation
``eps b`` of the (sensitivity-combined) zero-filled image enters as ``M F S (eps b e^{i phi})``
in k-space, along the zero-filled image's phase ``phi`` so it moves the magnitude. ``s2`` is
estimated as the mean squared difference between the zero-filled magnitude and the
reconstruction over the object (the aliasing energy the method removed). The map is
``sqrt(max(smooth(u), 0))``: an estimated root-mean-square error per pixel, in image units.
This is an approximation (the aliasing is neither white nor Gaussian); it ranks regions by
error, it is not a calibrated confidence interval.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .coils import sense_combine
from .fft import fft2c, ifft2c

__all__ = ["sure_map"]


def _gaussian_smooth(img: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return img
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    x = img[None, None]
    x = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect"), g.view(1, 1, 1, -1)
    )
    x = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (0, 0, radius, radius), mode="reflect"), g.view(1, 1, -1, 1)
    )
    return x[0, 0]


def sure_map(
    recon: Callable[[torch.Tensor], torch.Tensor],
    kspace: torch.Tensor,
    mask: torch.Tensor,
    maps: torch.Tensor,
    probes: int = 4,
    eps: float = 1e-3,
    smooth: float = 2.0,
    generator: torch.Generator | None = None,
    output: torch.Tensor | None = None,
) -> torch.Tensor:
    """Estimated per-pixel RMS error ``(H, W)`` of ``recon`` (k-space ``(C, H, W)`` -> magnitude ``(H, W)``).

    Args:
        recon: the reconstruction to assess (called ``probes + 1`` times, or ``probes`` when
            ``output`` = its result on ``kspace`` is given).
        kspace: measured (masked) coil k-space ``(C, H, W)``.
        mask: sampling mask broadcastable to ``(H, W)``.
        maps: coil sensitivities ``(C, H, W)`` (e.g. ESPIRiT), unit RSS.
        eps: finite-difference step relative to the zero-filled image maximum.
        smooth: Gaussian sigma (pixels) applied to the per-pixel risk.
    """
    x_hat = recon(kspace) if output is None else output
    z = sense_combine(ifft2c(kspace), maps)
    zf = z.abs()
    phase = torch.where(zf > 0, z / zf.clamp_min(1e-20), torch.ones_like(z))
    step = eps * float(zf.max().clamp_min(1e-20))
    div = torch.zeros_like(zf)
    for _ in range(probes):
        b = torch.randn(zf.shape, generator=generator, dtype=zf.dtype, device="cpu").to(zf.device)
        dk = fft2c(maps * (b * phase)) * mask
        div += b * (recon(kspace + step * dk) - x_hat) / step
    div /= probes
    resid = (x_hat - zf) ** 2
    obj = zf > 0.1 * zf.max()
    s2 = resid[obj].mean() if bool(obj.any()) else resid.mean()
    risk = resid - s2 + 2 * s2 * div
    return torch.sqrt(_gaussian_smooth(risk, smooth).clamp_min(0))
