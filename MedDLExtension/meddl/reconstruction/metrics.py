"""Image-quality metrics with fastMRI's conventions (``fastmri/evaluate.py``) and the SSIM loss.

NMSE = ||gt - pred||^2 / ||gt||^2; PSNR with data range = gt max; SSIM per slice (7x7 uniform
window, k1 = 0.01, k2 = 0.03) with data range = the maximum of the whole ground-truth volume.
Volumes are ``(S, H, W)`` arrays of magnitude slices.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["nmse", "psnr", "ssim", "ssim_loss"]


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    return float(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)


def psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(gt, pred, data_range=gt.max() if maxval is None else maxval))


def ssim(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Mean SSIM over slices of ``(S, H, W)`` volumes (a 2-D pair is one slice)."""
    from skimage.metrics import structural_similarity

    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.ndim == 2:
        gt, pred = gt[None], pred[None]
    maxval = float(gt.max()) if maxval is None else maxval
    return float(np.mean([structural_similarity(g, p, data_range=maxval) for g, p in zip(gt, pred, strict=True)]))


def ssim_loss(
    pred: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor, win: int = 7, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """``1 - SSIM`` of ``(B, H, W)`` images, ``data_range`` ``(B,)``; fastMRI's ``SSIMLoss``."""
    x, y = pred.unsqueeze(1), target.unsqueeze(1)
    w = torch.ones(1, 1, win, win, dtype=x.dtype, device=x.device) / win**2
    cov_norm = win**2 / (win**2 - 1)
    r = data_range.view(-1, 1, 1, 1)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    conv = torch.nn.functional.conv2d
    ux, uy = conv(x, w), conv(y, w)
    uxx, uyy, uxy = conv(x * x, w), conv(y * y, w), conv(x * y, w)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return 1 - s.mean()
