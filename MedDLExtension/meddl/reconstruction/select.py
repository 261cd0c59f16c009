"""The ``auto`` method: the VarNet or TV compressed sensing, whichever predicts held-out k-space lines better.

The VarNet is trained on brain MR images; on images of another kind (a piecewise-constant phantom, an
image of another scanner) TV can beat it at moderate accelerations, by up to 0.3 SSIM on a Shepp-Logan
phantom at 4x. Which one to trust is read from the data itself, as cross-validation does: every third
sampled column outside the calibration block is held out, both methods reconstruct from the rest, and
each one's image predicts the held-out lines (the VarNet through its own final multi-coil k-space, TV
through the ESPIRiT maps it used). The method with the smaller relative error on them wins.

The rule was set on validation images of its own (``benchmarks/reconstruction_auto_validation.py``: MNI152
and Colin27 training slices, BrainWeb-like tissue phantoms, random-ellipse phantoms). It holds where both
reconstructions still work without a third of the outer lines: at 4x it chose the better method (by SSIM)
on 16 of those 18 images and on 11 of the 12 robustness images. At 8x the held-out reconstruction runs at
about 12x and its error no longer tracks SSIM (9 of 18 right), while the VarNet was better on 16 of 18
validation and all 12 robustness images. So from :data:`VARNET_FROM` on, ``auto`` is the VarNet without a
check (``docs/benchmarks/reconstruction_robustness.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from . import classical
from .coils import espirit_maps
from .fft import fft2c

__all__ = ["VARNET_FROM", "heldout_columns", "choose_method"]

#: from this acceleration on, ``auto`` is the VarNet (the check needs a third of the outer lines)
VARNET_FROM = 6.0
#: slices scored (the ones holding the most k-space energy)
CHECK_SLICES = 3
#: held-out columns needed for a check: fewer and ``auto`` is the VarNet
MIN_HELD_OUT = 3


def heldout_columns(columns: np.ndarray, calib: slice, every: int = 3) -> np.ndarray:
    """Every ``every``-th sampled column outside the calibration block (indices into ``columns``)."""
    outer = [c for c in np.flatnonzero(columns) if not (calib.start <= c < calib.stop)]
    return np.asarray(outer[::every], dtype=np.int64)


def _relative_error(predicted: torch.Tensor, measured: torch.Tensor, held: torch.Tensor) -> float:
    d = (predicted - measured)[..., held]
    return float((d.abs() ** 2).sum() / ((measured[..., held].abs() ** 2).sum() + 1e-30))


def _errors(k: torch.Tensor, columns: np.ndarray, calib: slice, calib_rows: int, net,
            held: np.ndarray, lam: float, iterations: int,
            check: Callable[[], None] | None = None) -> tuple[float, float]:
    """(VarNet, TV) relative errors on the ``held`` columns of one normalised slice ``k`` ``(C, H, W)``;
    ``check`` is called between the steps (and TV's iterations), e.g. to honour Cancel."""
    check = check or (lambda: None)
    h, w = k.shape[-2:]
    kept = columns.copy()
    kept[held] = False
    mask = torch.from_numpy(np.broadcast_to(kept, (h, w)).copy()).to(k.device)
    k_in = k * mask
    held_t = torch.from_numpy(held).to(k.device)
    with torch.no_grad():
        image, maps_net = net.image_and_maps(k_in[None], mask)
        e_net = _relative_error(fft2c(maps_net[0] * image[0][None]), k, held_t)
    check()
    maps = espirit_maps(k_in, calib_width=calib_rows, calib_cols=calib, crop=0.0)
    check()
    tv = classical.tv_cs(k_in, maps, mask, lam=lam, iterations=iterations, callback=lambda _: check())
    e_tv = _relative_error(fft2c(maps * tv[None]), k, held_t)
    return e_net, e_tv


def choose_method(kspace: Sequence[np.ndarray], columns: np.ndarray, calib: slice, calib_rows: int,
                  acceleration: float, net, device: torch.device | str = "cpu", lam: float | None = None,
                  iterations: int | None = None, progress: Callable[[float, str], None] | None = None,
                  slice_numbers: Sequence[int] | None = None) -> tuple[str, dict[str, Any]]:
    """``"varnet"`` or ``"tv"`` for undersampled k-space slices ``kspace`` (each ``(C, H, W)`` complex)
    sampled on ``columns`` (a 1-D column mask) with the calibration block ``calib``, and the facts
    behind the choice.

    ``acceleration``: the nominal one (a retrospective mask's requested R; a file's detected R).
    The slices scored are the :data:`CHECK_SLICES` with the most energy; the errors are their means.
    ``progress(fraction, message)`` is called between the steps (a :class:`~meddl.progress.Reporter`
    also raises Cancelled there); ``slice_numbers``: the slices' numbers in the file, for the facts.
    """
    report = progress or (lambda fraction, message: None)
    lam = classical.DEFAULT_LAMBDA["tv"] if lam is None else lam
    iterations = iterations or classical.DEFAULT_ITERATIONS["tv"]
    held = heldout_columns(np.asarray(columns, dtype=bool), calib)
    if acceleration >= VARNET_FROM:
        return "varnet", {"rule": f"acceleration {acceleration:.1f} >= {VARNET_FROM:g}: the VarNet"}
    if len(held) < MIN_HELD_OUT:
        outer = int(np.asarray(columns, dtype=bool).sum() - (calib.stop - calib.start))
        return "varnet", {"rule": f"{outer} sampled columns outside the calibration block, too few to hold out "
                                  f"{MIN_HELD_OUT} (every third): the VarNet"}
    energy = [float(np.vdot(s, s).real) for s in kspace]
    order = sorted(range(len(kspace)), key=lambda i: (-energy[i], i))[:CHECK_SLICES]
    pairs = []
    started = time.perf_counter()
    for j, i in enumerate(sorted(order)):
        report(j / len(order), f"auto: comparing the VarNet and TV on held-out k-space lines ({j + 1}/{len(order)})")
        k = torch.from_numpy(np.ascontiguousarray(kspace[i])).to(device)
        k = k / classical.normalisation(k)
        pairs.append(_errors(k, np.asarray(columns, dtype=bool), calib, calib_rows, net, held, lam, iterations,
                             check=lambda j=j: report(j / len(order), "")))
    e_net, e_tv = (float(np.mean(v)) for v in zip(*pairs, strict=True))
    chosen = "tv" if e_tv < e_net else "varnet"
    numbers = list(slice_numbers) if slice_numbers is not None else list(range(len(kspace)))
    return chosen, {
        "rule": "the smaller relative error on held-out k-space lines",
        "heldout_error": {"varnet": round(e_net, 4), "tv": round(e_tv, 4)},
        "heldout_columns": int(len(held)),
        "checked_slices": [int(numbers[i]) for i in sorted(order)],
        "seconds": round(time.perf_counter() - started, 3),
    }
