"""Reconstruction on images of other kinds than the benchmark's: is the VarNet still ahead?

The main benchmark (``benchmarks/reconstruction.py``) scores six held-out Colin27 axial slices,
images like most of the VarNet's training set. This one asks how far that carries, on allowed
images that training never saw, in three groups:

- ``colin27-other``: Colin27 axial slices inside the training hold-out blocks that the main
  benchmark does not score (the same kind of image as the benchmark);
- ``itk-brainweb``: the ITK example BrainWeb phantom slices not used in training
  (``BrainMidSagittalSlice.png``; the three slices of ``BrainProtonDensity3Slices.mha``, neighbours
  of the training PD slice, correlation 0.93-0.97 with it): piecewise-constant tissue classes with
  fine noise, the image model of total variation;
- ``itk-kmeans-t1``: axial slices of the ITK example ``KmeansTest_T1UCharRaw.nii.gz``, a real T1
  volume of another scanner at 2 mm in-plane (128 x 128);
- ``shepp-logan``: scikit-image's modified Shepp-Logan phantom at 256 x 256, the classic test object of
  compressed sensing (and of ISMRMRD's ``ismrmrd_generate_cartesian_shepp_logan``), nothing like a brain scan.

``auto`` is the library's ``--method auto`` (``meddl.reconstruction.select``): the VarNet or TV, whichever
predicts held-out k-space lines better (below 6x); its time includes that check.

Same simulation and metrics as the main benchmark (8 birdcage coils, smooth random phase, complex
noise 0.5 % of the maximum, equispaced masks at 4x / 8x, fastMRI SSIM with data range = the
image maximum), but every method with its library default (no lambda chosen on the test images).
Needs the Debian package ``insighttoolkit4-examples`` for the ITK groups (skipped without it).

A second table asks the same of the image's **phase**: training draws a smooth random phase of at most pi,
while a scanner's images carry larger phase, linear ramps (an echo off the k-space centre by a few samples, an
object off the isocentre) and quadratic terms. Every image is simulated again with each phase of
:data:`PHASES` (same coils, noise and masks), VarNet and TV with their defaults. Like the library's
``reconstruct``, every method gets k-space rolled so its energy peak sits at the centre (``masks.recentre``),
which removes whole cycles of a linear ramp (the "ramp 2.5 both" column keeps half a cycle).

    python benchmarks/reconstruction_robustness.py [--threads 1] [--out docs/benchmarks/reconstruction_robustness.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _notes import kept_notes  # benchmarks/ is on sys.path when run as a script
from meddl.data import load_sample
from meddl.reconstruction import classical
from meddl.reconstruction.coils import calibration_block, espirit_maps
from meddl.reconstruction.masks import equispaced_mask, recentre
from meddl.reconstruction.metrics import psnr, ssim
from meddl.reconstruction.simulate import simulate_kspace, smooth_phase
from meddl.reconstruction.train import BENCHMARK_COLIN27_Z, HELD_OUT_COLIN27_Z, training_slices

ITK = Path("/usr/share/doc/insighttoolkit4-examples/examples/Data")
COILS, NOISE = 8, 0.005
COLIN_Z = (58, 86, 110, 140)
METHODS = ("zero-filled", "cg-sense", "l1-wavelet", "tv", "varnet", "auto")
#: phase maps of the phase table: name -> (description, function of (H, W) -> radians)
PHASES = {
    "none": ("zero (a real image)", lambda h, w: np.zeros((h, w))),
    "smooth": ("smooth random, at most pi (as in training; fixed seed)",
               lambda h, w: smooth_phase((h, w), np.random.default_rng(3))),
    "smooth x3": ("the same, three times larger", lambda h, w: 3 * smooth_phase((h, w), np.random.default_rng(3))),
    "ramp PE": ("3 cycles across the field of view along the phase-encode axis (k-space off by 3 lines)",
                lambda h, w: 2 * np.pi * 3 * np.arange(w)[None, :] / w + np.zeros((h, 1))),
    "ramp RO": ("3 cycles along the readout axis",
                lambda h, w: 2 * np.pi * 3 * np.arange(h)[:, None] / h + np.zeros((1, w))),
    "ramp 2.5 both": ("2.5 cycles along each axis (half a sample between k-space lines: rolling to the centre "
                      "leaves half a cycle)",
                      lambda h, w: 2 * np.pi * 2.5 * (np.arange(h)[:, None] / h + np.arange(w)[None, :] / w)),
    "quadratic": ("0 at the centre, pi at the middle of each edge, 2 pi in the corners",
                  lambda h, w: 2 * np.pi * (((np.arange(h)[:, None] - h / 2) / h) ** 2
                                            + ((np.arange(w)[None, :] - w / 2) / w) ** 2) * 2),
}


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    return a[..., 0] if a.ndim == 3 and a.shape[-1] in (3, 4) else a


def _unseen(img: np.ndarray, seen: list[np.ndarray]) -> bool:
    """False when ``img`` (normalised like the training slices) equals a training slice in any of the
    8 orientations training draws (turns and flips; SimpleITK reads rows first, the library (i, j))."""
    from meddl.reconstruction.train import _normalise

    x = _normalise(img)
    poses = [np.rot90(v, k) for v in (x, x[::-1]) for k in range(4)]
    return not any(s.shape == p.shape and np.allclose(s, p, atol=1e-3) for s in seen for p in poses)


def groups() -> dict[str, list[tuple[str, np.ndarray]]]:
    colin = load_sample("colin27_t1").numpy()[0]
    assert all(z in HELD_OUT_COLIN27_Z and z not in BENCHMARK_COLIN27_Z for z in COLIN_Z)
    out = {"colin27-other": [(f"Colin27 z={z}", colin[:, :, z]) for z in COLIN_Z]}
    if ITK.is_dir():
        seen = training_slices()
        web = [("BrainMidSagittalSlice", _read(ITK / "BrainMidSagittalSlice.png"))]
        three = _read(ITK / "BrainProtonDensity3Slices.mha")  # (3, 217, 181) as ITK reads it
        web += [(f"BrainProtonDensity3Slices[{i}]", three[i]) for i in range(len(three))]
        out["itk-brainweb"] = [(n, im) for n, im in web if _unseen(im, seen)]
        t1 = _read(ITK / "KmeansTest_T1UCharRaw.nii.gz")  # (z, y, x)
        out["itk-kmeans-t1"] = [(f"KmeansTest_T1 z={z}", t1[z]) for z in (24, 31, 38)]
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    out["shepp-logan"] = [("Shepp-Logan 256", resize(shepp_logan_phantom(), (256, 256), order=1,
                                                     anti_aliasing=True).astype(np.float32))]
    return out


def reconstruct(k: torch.Tensor, mask: torch.Tensor, block: slice, net,
                methods: tuple[str, ...] = METHODS) -> dict[str, tuple[np.ndarray, float]]:
    """Each of ``methods`` on one undersampled slice: magnitude image and seconds."""
    res = {}
    # as the library's reconstruct() does: an energy peak two or more samples off the centre is rolled to it
    k_np, mask_np, block, _ = recentre(k.numpy(), mask.numpy(), block)
    k, mask = torch.from_numpy(np.ascontiguousarray(k_np)), torch.from_numpy(np.ascontiguousarray(mask_np))
    t0 = time.perf_counter()
    if "zero-filled" in methods:
        res["zero-filled"] = (classical.zero_filled(k).numpy(), time.perf_counter() - t0)
    scale = classical.normalisation(k)
    kn = k / scale
    t0 = time.perf_counter()
    maps = espirit_maps(kn, calib_cols=block, crop=0.0)
    t_maps = time.perf_counter() - t0
    for name, fn in (("cg-sense", classical.cg_sense), ("l1-wavelet", classical.l1_wavelet), ("tv", classical.tv_cs)):
        if name not in methods:
            continue
        t0 = time.perf_counter()
        x = fn(kn, maps, mask, lam=classical.DEFAULT_LAMBDA[name], iterations=classical.DEFAULT_ITERATIONS[name])
        res[name] = ((x.abs() * scale).numpy(), t_maps + time.perf_counter() - t0)
    t0 = time.perf_counter()
    with torch.no_grad():
        y = net(kn[None], mask)[0]
    res["varnet"] = ((y * scale).numpy(), time.perf_counter() - t0)
    if "auto" in methods:
        from meddl.reconstruction.select import choose_method

        t0 = time.perf_counter()
        chosen, _ = choose_method([k.numpy()], mask.numpy()[0], block, 24, k.shape[-1] / float(mask[0].sum()), net)
        res["auto"] = (res[chosen][0], time.perf_counter() - t0 + res[chosen][1])
        res["auto-choice"] = chosen
    return res


def phase_table(data, net) -> dict:
    """(group, acc, phase, method) -> SSIMs: every image simulated again with each phase of :data:`PHASES`."""
    out: dict = {}
    for group, images in data.items():
        for name, img in images:
            img = np.clip(img, 0, None) / float(img.max())
            h, w = img.shape
            for phase, (_, make) in PHASES.items():
                x = img * np.exp(1j * make(h, w))
                k_full = simulate_kspace(x, COILS, np.random.default_rng(7), noise=NOISE)[0]
                for acc, cf in ((4, 0.08), (8, 0.04)):
                    cols = equispaced_mask(w, acc, cf, np.random.default_rng(acc))
                    mask = torch.from_numpy(np.broadcast_to(cols, (h, w)).copy())
                    k = torch.from_numpy((k_full * cols).astype(np.complex64))
                    res = reconstruct(k, mask, calibration_block(cols), net, methods=("tv", "varnet"))
                    for method, (y, _) in res.items():
                        out.setdefault((group, acc, phase, method), []).append(ssim(img[None], y[None], 1.0))
            print(f"phases: {group} {name}", flush=True)
    return out


def reference_noise(img: np.ndarray) -> float:
    """SSIM of a reference against its own 3 x 3 median: near 1 for a clean image, lower when the
    reference carries noise of its own, which a reconstruction that denoises is then marked down for."""
    from scipy.ndimage import median_filter

    return ssim(img[None], median_filter(img, 3)[None], 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--weights", default=None, help="VarNet weights (default: the bundled ones)")
    p.add_argument("--out", default="docs/benchmarks/reconstruction_robustness.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from meddl import models

    net, card = models.load_model("reconstruction_varnet", args.weights)
    started = time.time()
    rng = np.random.default_rng(2025)
    scores: dict = {}  # (group, acc, method) -> list of (ssim, psnr)
    per_image: list[str] = []
    data = groups()
    for group, images in data.items():
        for name, img in images:
            img = np.clip(img, 0, None) / float(img.max())
            scores.setdefault((group, "reference"), []).append(reference_noise(img))
            k_full = simulate_kspace(img, COILS, rng, noise=NOISE)[0]
            h, w = img.shape
            cells = []
            for acc, cf in ((4, 0.08), (8, 0.04)):
                cols = equispaced_mask(w, acc, cf, np.random.default_rng(acc))
                mask = torch.from_numpy(np.broadcast_to(cols, (h, w)).copy())
                k = torch.from_numpy((k_full * cols).astype(np.complex64))
                res = reconstruct(k, mask, calibration_block(cols), net)
                choice = res.pop("auto-choice")
                scores.setdefault((group, acc, "choices"), []).append(choice)
                for method, (x, _) in res.items():
                    s = (ssim(img[None], x[None], 1.0), psnr(img, x, 1.0))
                    scores.setdefault((group, acc, method), []).append(s)
                cells.append(f"{scores[(group, acc, 'varnet')][-1][0]:.3f} / {scores[(group, acc, 'tv')][-1][0]:.3f}"
                             f" (auto: {choice})")
            per_image.append(f"| {group} | {name} | {h} x {w} | " + " | ".join(cells) + " |")
            print(per_image[-1], flush=True)
    phase_scores = phase_table(data, net)
    write(args, card, data, scores, per_image, time.time() - started, phase_scores)
    return 0


def write(args, card, data, scores, per_image, seconds, phase_scores) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Reconstruction robustness: images unlike the benchmark's",
        "",
        "Written by `benchmarks/reconstruction_robustness.py`; reproduce with:",
        "",
        "```",
        f"python benchmarks/reconstruction_robustness.py --threads {args.threads}",
        "```",
        "",
        f"Machine: {platform.machine()}, torch threads {args.threads}, CPU only (1-min load average {load:.1f} at "
        f"the end); {seconds:.0f} s in all. VarNet weights: `{card.name}` (sha256 {card.sha256[:12]}, training step "
        f"{card.extra.get('step')}).",
        "",
        "Images that training never saw (see the script's docstring): " + "; ".join(
            f"{g}: {len(v)} ({', '.join(n for n, _ in v)})" for g, v in data.items()) + ". "
        f"{COILS}-coil k-space simulated with complex noise {NOISE:.1%} of the maximum; equispaced masks (4x, centre "
        "0.08; 8x, centre 0.04). Every method with its library default, no lambda chosen on these images. SSIM "
        "(fastMRI: 7x7, data range = image maximum) and PSNR against the clean magnitude, mean per group.",
        "",
    ]
    for acc in (4, 8):
        lines += [f"## {acc}x", "", "| group | " + " | ".join(f"{m} SSIM" for m in METHODS)
                  + " | VarNet - TV | auto - the better of the two | auto chose |",
                  "|---|" + "---|" * (len(METHODS) + 3)]
        for group in data:
            if not data[group]:
                continue
            means = {m: float(np.mean([s[0] for s in scores[(group, acc, m)]])) for m in METHODS}
            better = float(np.mean([max(a[0], b[0]) for a, b in zip(scores[(group, acc, "varnet")],
                                                                      scores[(group, acc, "tv")], strict=True)]))
            chose = scores[(group, acc, "choices")]
            lines.append(f"| {group} | " + " | ".join(f"{means[m]:.4f}" for m in METHODS)
                         + f" | {means['varnet'] - means['tv']:+.4f} | {means['auto'] - better:+.4f} | "
                         + ", ".join(f"{m} {chose.count(m)}" for m in ("varnet", "tv") if chose.count(m)) + " |")
        lines += ["", "| group | " + " | ".join(f"{m} PSNR" for m in METHODS) + " |", "|---|" + "---|" * len(METHODS)]
        for group in data:
            if not data[group]:
                continue
            lines.append(f"| {group} | " + " | ".join(
                f"{np.mean([s[1] for s in scores[(group, acc, m)]]):.2f}" for m in METHODS) + " |")
        lines.append("")
    lines += ["## How noisy the references are", "",
              "SSIM of each reference against its own 3 x 3 median (mean per group): near 1 for a clean image. A "
              "reference with noise of its own scores lower, and a reconstruction that removes that noise loses SSIM "
              "against it.", "", "| group | SSIM(reference, median3(reference)) |", "|---|---|"]
    lines += [f"| {g} | {np.mean(scores[(g, 'reference')]):.3f} |" for g in data if data[g]]
    lines += ["", "## Phase unlike the training's (SSIM, VarNet / TV, mean per group)", "",
              "Each image again, with each of these phases (same coils, noise and masks; every method with its "
              "default): " + "; ".join(f"**{n}**: {d}" for n, (d, _) in PHASES.items()) + ".", ""]
    for acc in (4, 8):
        lines += [f"### {acc}x", "", "| group | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
        rows = [g for g in data if data[g]]
        for group in rows + ["all images"]:
            cells = []
            for phase in PHASES:
                pick = rows if group == "all images" else [group]
                v, t = (float(np.mean([x for g in pick for x in phase_scores[(g, acc, phase, m)]]))
                        for m in ("varnet", "tv"))
                cells.append(f"{v:.3f} / {t:.3f} ({v - t:+.3f})")
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Per image (SSIM, VarNet / TV, and what auto chose)", "", "| group | image | size | 4x | 8x |",
              "|---|---|---|---|---|",
              *per_image, ""]
    notes = kept_notes(Path(args.out))
    Path(args.out).write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
