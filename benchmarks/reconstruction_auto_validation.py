"""How ``--method auto`` was set: the held-out k-space rule on validation images of its own.

``auto`` (``meddl.reconstruction.select``) holds out every third sampled column outside the calibration
block, reconstructs with the VarNet and with TV from the rest, and keeps the method whose image predicts
the held-out lines better. This script scores that rule on images that neither benchmark uses, so the
robustness table (``benchmarks/reconstruction_robustness.py``) is not where it was tuned:

- ``training-like``: 6 MNI152 / Colin27 slices of the VarNet's own training pool (its home ground);
- ``tissue phantoms``: 6 BrainWeb-like phantoms (``meddl.reconstruction.train.phantom``, MNI152 tissue maps in
  random T1 / PD / T2 contrasts with skull, fat and skin);
- ``ellipse phantoms``: 6 random-ellipse phantoms (a bright rim, 4-8 inner ellipses; 128-256 pixels), the
  Shepp-Logan kind of image.

8 coils, complex noise 0.5 % of the maximum, equispaced masks at 4x (centre 0.08) and 8x (0.04), every
method with its library default. For each image: SSIM of VarNet and TV on the full mask, their relative
errors on the held-out lines, and whether "the smaller error" picks the better SSIM; then the mean SSIM of
the rule for a few margins (TV only when its error is below ``margin`` times the VarNet's).

    python benchmarks/reconstruction_auto_validation.py [--threads 1]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from meddl import models
from meddl.reconstruction import classical
from meddl.reconstruction.coils import calibration_block, espirit_maps
from meddl.reconstruction.masks import equispaced_mask
from meddl.reconstruction.metrics import ssim
from meddl.reconstruction.select import _errors, heldout_columns
from meddl.reconstruction.simulate import simulate_kspace
from meddl.reconstruction.train import phantom, phantom_maps, training_slices


def ellipses(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random-ellipse phantom: a bright rim around a dim inside holding 4-8 ellipses of other values."""
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    img = np.zeros((n, n))
    a, b = rng.uniform(0.7, 0.9), rng.uniform(0.55, 0.75)
    img[(x / b) ** 2 + (y / a) ** 2 < 1] = 1.0
    img[(x / (b - 0.05)) ** 2 + (y / (a - 0.05)) ** 2 < 1] = 0.2
    for _ in range(rng.integers(4, 9)):
        cx, cy = rng.uniform(-0.4, 0.4, 2)
        ra, rb = rng.uniform(0.05, 0.25, 2)
        th = rng.uniform(0, np.pi)
        xr = (x - cx) * np.cos(th) + (y - cy) * np.sin(th)
        yr = -(x - cx) * np.sin(th) + (y - cy) * np.cos(th)
        img[(xr / ra) ** 2 + (yr / rb) ** 2 < 1] += rng.uniform(-0.1, 0.3)
    return np.clip(img, 0, None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, _ = models.load_model("reconstruction_varnet")
    rng = np.random.default_rng(11)
    pool = training_slices()
    maps = phantom_maps()
    data = {"training-like": [pool[i] for i in rng.choice(len(pool), 6, replace=False)],
            "tissue phantoms": [phantom(maps, rng) for _ in range(6)],
            "ellipse phantoms": [ellipses(int(rng.choice([128, 192, 256])), rng) for _ in range(6)]}
    rows = []
    print("| group | size | R | VarNet SSIM | TV SSIM | held-out error VarNet | TV | smaller error picks the better |")
    print("|---|---|---|---|---|---|---|---|")
    for group, images in data.items():
        for img in images:
            img = np.clip(img, 0, None) / float(img.max())
            h, w = img.shape
            k_full = simulate_kspace(img, 8, rng, noise=0.005)[0]
            for acc, cf in ((4, 0.08), (8, 0.04)):
                cols = equispaced_mask(w, acc, cf, np.random.default_rng(acc))
                block = calibration_block(cols)
                mask = torch.from_numpy(np.broadcast_to(cols, (h, w)).copy())
                k = torch.from_numpy((k_full * cols).astype(np.complex64))
                scale = classical.normalisation(k)
                kn = k / scale
                tv = classical.tv_cs(kn, espirit_maps(kn, calib_cols=block, crop=0.0), mask)
                with torch.no_grad():
                    vn = net(kn[None], mask)[0]
                s_tv = ssim(img[None], (tv.abs() * scale).numpy()[None], 1.0)
                s_vn = ssim(img[None], (vn * scale).numpy()[None], 1.0)
                held = heldout_columns(cols, block)
                e_vn, e_tv = _errors(kn, cols, block, 24, net, held, classical.DEFAULT_LAMBDA["tv"],
                                     classical.DEFAULT_ITERATIONS["tv"])
                rows.append({"acc": acc, "vn": s_vn, "tv": s_tv, "evn": e_vn, "etv": e_tv})
                right = (e_tv < e_vn) == (s_tv > s_vn)
                print(f"| {group} | {h} x {w} | {acc}x | {s_vn:.3f} | {s_tv:.3f} | {e_vn:.3f} | {e_tv:.3f} | "
                      f"{'yes' if right else 'no'} |", flush=True)
    print()
    print("| R | margin | rule: mean SSIM | always VarNet | always TV | the better of the two | right picks |")
    print("|---|---|---|---|---|---|---|")
    for acc in (4, 8):
        sel = [r for r in rows if r["acc"] == acc]
        for margin in (1.0, 0.8, 0.6):
            pick = [r["tv"] if r["etv"] < margin * r["evn"] else r["vn"] for r in sel]
            right = sum((r["etv"] < margin * r["evn"]) == (r["tv"] > r["vn"]) for r in sel)
            print(f"| {acc}x | {margin:g} | {np.mean(pick):.4f} | {np.mean([r['vn'] for r in sel]):.4f} | "
                  f"{np.mean([r['tv'] for r in sel]):.4f} | {np.mean([max(r['vn'], r['tv']) for r in sel]):.4f} | "
                  f"{right} of {len(sel)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
