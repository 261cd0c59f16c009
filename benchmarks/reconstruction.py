"""Reconstruction benchmark: zero-filled, CG-SENSE, L1-wavelet / TV CS, sigpy, BART, VarNet.

Test data: multi-coil k-space simulated (8 birdcage coils, smooth random phase, complex noise
0.5 % of the maximum) from Colin27 axial slices that training never saw
(``meddl.reconstruction.train.BENCHMARK_COLIN27_Z``, inside the held-out blocks), zero-padded
to 192 x 224. Equispaced masks at 4x (centre 0.08) and 8x (centre 0.04), one mask per volume.
Metrics with fastMRI's conventions: SSIM per slice (7x7, data range = volume maximum), PSNR,
NMSE against the clean magnitude. Regularised methods report the best lambda of a small grid
(chosen on these test slices: an oracle choice, generous to the classical methods).

    python benchmarks/reconstruction.py [--slices 6] [--threads 1] [--out docs/benchmarks/reconstruction.md]

``--device cuda`` runs our torch methods (zero-filled, CG-SENSE, L1-wavelet, TV, VarNet) on the GPU,
after one untimed warm-up slice, with the device synchronised around each timing; sigpy and BART
always run on the CPU, so leave them out there (``--methods``) to keep the comparison on one device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _notes import kept_notes  # benchmarks/ is on sys.path when run as a script
from meddl.data import load_sample
from meddl.errors import DependencyError
from meddl.reconstruction import classical
from meddl.reconstruction.bart_io import load_cfl, write_cfl
from meddl.reconstruction.coils import calibration_block, espirit_maps
from meddl.reconstruction.masks import equispaced_mask
from meddl.reconstruction.metrics import nmse, psnr, ssim
from meddl.reconstruction.simulate import pad_to, simulate_kspace
from meddl.reconstruction.train import BENCHMARK_COLIN27_Z, HELD_OUT_COLIN27_Z

SHAPE = (192, 224)
COILS = 8
NOISE = 0.005
GRIDS = {
    "l1-wavelet": (1e-3, 3e-3, 1e-2),
    "tv": (1e-3, 3e-3, 1e-2),
    "sigpy": (3e-4, 1e-3, 3e-3),
    "bart": (1e-3, 3e-3, 1e-2),
}


def test_data(n_slices: int):
    vol = load_sample("colin27_t1").numpy()[0]
    zs = BENCHMARK_COLIN27_Z[:n_slices]
    assert all(z in HELD_OUT_COLIN27_Z for z in zs)
    imgs = np.stack([pad_to(vol[:, :, z], SHAPE) for z in zs]).astype(np.float32)
    imgs /= imgs.max()
    rng = np.random.default_rng(2024)
    ks = np.stack([simulate_kspace(im, COILS, rng, noise=NOISE)[0] for im in imgs])
    return imgs, ks, zs


def bart_recon(k: np.ndarray, lam: float, tmp: Path, threads: int = 1) -> tuple[np.ndarray, float]:
    """``bart ecalib`` + ``bart pics -l1 -r lam`` on one slice ``(C, H, W)``; BART's dims are (x, y, z, coil)."""
    write_cfl(tmp / "k", np.transpose(k, (1, 2, 0))[:, :, None, :])
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # -c 0: no eigenvalue crop (the default crop zeroes maps inside the object at 8x)
    subprocess.run(
        ["bart", "ecalib", "-m1", "-c", "0", str(tmp / "k"), str(tmp / "s")], check=True, capture_output=True, env=env
    )
    subprocess.run(
        ["bart", "pics", "-S", "-l1", "-r", str(lam), "-i", "50", str(tmp / "k"), str(tmp / "s"), str(tmp / "x")],
        check=True,
        capture_output=True,
    )
    return np.abs(np.asarray(load_cfl(tmp / "x"))).reshape(k.shape[1:]), time.perf_counter() - t0


def sigpy_recon(k: np.ndarray, mask_cols: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    import sigpy.mri as mr

    t0 = time.perf_counter()
    scale = float(
        np.sqrt(
            (
                np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)))
                ** 2
            ).sum(0)
        ).max()
    )
    ks = k / scale
    maps = mr.app.EspiritCalib(ks, calib_width=int(min(24, mask_cols.sum())), crop=0.0, show_pbar=False).run()
    x = mr.app.L1WaveletRecon(ks, maps, lam, max_iter=50, show_pbar=False).run()
    return np.abs(x) * scale, time.perf_counter() - t0


def score(gt: np.ndarray, pred: np.ndarray) -> dict:
    maxval = float(gt.max())
    return {
        "ssim": ssim(gt, pred, maxval),
        "psnr": float(np.mean([psnr(g, p, maxval) for g, p in zip(gt, pred, strict=True)])),
        "nmse": nmse(gt, pred),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=len(BENCHMARK_COLIN27_Z))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--methods", default="zero-filled,cg-sense,l1-wavelet,tv,sigpy,bart,varnet")
    p.add_argument("--weights", default=None, help="VarNet weights (default: the bundled ones)")
    p.add_argument("--out", default="docs/benchmarks/reconstruction.md")
    p.add_argument("--merge", action="store_true", help="keep the previous run's rows for methods not rerun")
    p.add_argument("--device", default="cpu", help="torch device of our methods (cpu, cuda, cuda:N)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    methods = args.methods.split(",")
    imgs, ks, zs = test_data(args.slices)
    results: dict = {}
    timings: dict = {}
    net = card = None
    if "varnet" in methods or "auto" in methods:
        from meddl import models

        net, card = models.load_model("reconstruction_varnet", args.weights)
        net = net.to(dev)
    have_bart = shutil.which("bart") is not None
    try:
        import sigpy  # noqa: F401

        have_sigpy = True
    except ImportError:
        have_sigpy = False
    tmp = Path(tempfile.mkdtemp(prefix="meddl-bench-"))
    for acc, cf in ((4, 0.08), (8, 0.04)):
        cols = equispaced_mask(SHAPE[1], acc, cf, np.random.default_rng(acc))
        mask = torch.from_numpy(np.broadcast_to(cols, SHAPE).copy()).to(dev)
        block = calibration_block(cols)
        out: dict[str, dict[float, list]] = {}
        secs: dict[str, dict[float, list]] = {}

        state = {"warm_up": False}

        def add(name, lam, img, sec, out=out, secs=secs, state=state):
            if state["warm_up"]:
                return
            img = img.cpu().numpy() if isinstance(img, torch.Tensor) else img
            out.setdefault(name, {}).setdefault(lam, []).append(img)
            secs.setdefault(name, {}).setdefault(lam, []).append(sec)

        chosen, t_check = None, 0.0
        if "auto" in methods:  # the library's --method auto: one choice for the volume, as reconstruct() makes it
            from meddl.reconstruction.select import choose_method

            t0 = clock()
            chosen, facts = choose_method([(k * cols).astype(np.complex64) for k in ks], cols, block, 24,
                                          SHAPE[1] / float(cols.sum()), net, dev)
            t_check = (clock() - t0) / len(ks)
            print(f"auto at {acc}x: {chosen} {facts}", flush=True)
        # on a GPU the first slice also pays for FFT plans and kernel selection: run it once untimed
        order = ([0] if dev.type != "cpu" else []) + list(range(len(ks)))
        for step, i in enumerate(order):
            warm_up = state["warm_up"] = len(order) > len(ks) and step == 0
            k_np = (ks[i] * cols).astype(np.complex64)
            k = torch.from_numpy(k_np).to(dev)
            print(f"{acc}x slice {i + 1}/{len(ks)}" + (" (warm-up)" if warm_up else ""), flush=True)
            t0 = clock()
            zf = classical.zero_filled(k)
            add("zero-filled", 0.0, zf, clock() - t0)
            scale = classical.normalisation(k)
            kn = k / scale
            t0 = clock()
            maps = espirit_maps(kn, calib_cols=block, crop=0.0)
            t_maps = clock() - t0
            if "cg-sense" in methods:
                t0 = clock()
                x = classical.cg_sense(kn, maps, mask)
                add("cg-sense", 0.0, x.abs() * scale, t_maps + clock() - t0)
            for name, fn in (("l1-wavelet", classical.l1_wavelet), ("tv", classical.tv_cs)):
                if name in methods:
                    for lam in GRIDS[name]:
                        t0 = clock()
                        x = fn(kn, maps, mask, lam=lam)
                        add(name, lam, x.abs() * scale, t_maps + clock() - t0)
            if warm_up:
                pass
            elif "sigpy" in methods and have_sigpy:
                for lam in GRIDS["sigpy"]:
                    img, sec = sigpy_recon(k_np, cols, lam)
                    add("sigpy L1-wavelet", lam, img, sec)
            if "bart" in methods and have_bart and not warm_up:
                for lam in GRIDS["bart"]:
                    img, sec = bart_recon(k_np, lam, tmp, args.threads)
                    add("BART pics L1-wavelet", lam, img, sec)
            if net is not None:
                t0 = clock()
                with torch.no_grad():
                    y = net(kn[None], mask)[0]
                add("VarNet (ours)", 0.0, y * scale, clock() - t0)
            if chosen is not None:  # auto: the chosen method at its library default, plus the check's share
                t0 = clock()
                if chosen == "varnet":
                    with torch.no_grad():
                        y = net(kn[None], mask)[0]
                    add(f"auto (ours; chose {chosen})", 0.0, y * scale, t_check + clock() - t0)
                else:
                    x = classical.tv_cs(kn, maps, mask)
                    add(f"auto (ours; chose {chosen})", 0.0, x.abs() * scale, t_check + t_maps + clock() - t0)
        rows = {}
        for name, by_lam in out.items():
            scored = {lam: score(imgs, np.stack(v)) for lam, v in by_lam.items()}
            best = max(scored, key=lambda lam: scored[lam]["ssim"])
            rows[name] = scored[best] | {
                "lambda": best if len(scored) > 1 else None,
                "seconds_per_slice": float(np.mean(secs[name][best])),
                "grid": {str(k): round(v["ssim"], 4) for k, v in scored.items()},
            }
        results[f"{acc}x"] = rows
        print(
            json.dumps({n: {k: v for k, v in r.items() if k != "grid"} for n, r in rows.items()}, indent=1), flush=True
        )
    # the speed target: a 16-coil 320 x 320 slice on the CPU
    if net is not None:
        try:
            big = pad_to(load_sample("dipy_t1_slice").numpy()[0], (320, 320))
        except DependencyError:  # a machine without dipy (the GPU check): a test slice, for timing only
            big = pad_to(imgs[-1], (320, 320))
        kb = simulate_kspace(big / big.max(), 16, np.random.default_rng(0), noise=NOISE)[0]
        cols = equispaced_mask(320, 4, 0.08, np.random.default_rng(0))
        kb = torch.from_numpy(kb * cols)
        net_cpu = net.to("cpu")
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.no_grad():
                net_cpu(kb[None] / classical.normalisation(kb), torch.from_numpy(cols))
            runs.append(time.perf_counter() - t0)
        timings["varnet_16coil_320_cpu_seconds"] = float(np.median(runs))
        if dev.type != "cpu":
            net_dev, kd, cd = net.to(dev), kb.to(dev), torch.from_numpy(cols).to(dev)
            runs = []
            for _ in range(4):
                t0 = clock()
                with torch.no_grad():
                    net_dev(kd[None] / classical.normalisation(kd), cd)
                runs.append(clock() - t0)
            timings[f"varnet_16coil_320_{dev.type}_seconds"] = float(np.median(runs[1:]))
    shutil.rmtree(tmp, ignore_errors=True)
    commands = ["python benchmarks/reconstruction.py " + " ".join(sys.argv[1:] if argv is None else argv)]
    json_path = Path(args.out).with_suffix(".json")
    merged = False  # True when rows of an earlier run are kept (their timings are from another load)
    if args.merge and json_path.is_file():
        # keep rows of methods not rerun this time (e.g. slow classical baselines) from the last run
        old = json.loads(json_path.read_text())
        if old.get("slices") == list(zs):
            for acc, rows in old["results"].items():
                results.setdefault(acc, {})
                kept = {n: r for n, r in rows.items() if n not in results[acc]}
                merged = merged or bool(kept)
                results[acc] = {**kept, **results[acc]}
            timings = {**old.get("timings", {}), **timings}
            earlier = old.get("commands", ["python benchmarks/reconstruction.py (earlier run)"])
            commands = [c for c in earlier if c not in commands] + commands
    write_report(Path(args.out), results, timings, zs, card, args, have_sigpy, have_bart, commands, merged)
    return 0


def _budget(phases: list[str], last: int) -> str:
    """Steps and slices seen on the CPU and on a GPU, from the model card's phases ("from step N: COMMAND")."""
    import re

    spans = []
    for text in phases:
        found = re.match(r"from step (\d+): (.*)", text)
        if found:
            batch = re.search(r"--batch (\d+)", found.group(2))
            device = re.search(r"--device (\S+)", found.group(2))
            spans.append((int(found.group(1)), int(batch.group(1)) if batch else 2,
                          device.group(1) if device else "cpu"))
    seen: dict[tuple[str, int], int] = {}  # (device, batch) -> steps
    for (start, batch, device), nxt in zip(spans, [s[0] for s in spans[1:]] + [last], strict=True):
        seen[(device, batch)] = seen.get((device, batch), 0) + max(nxt - start, 0)
    parts = [f"{n} steps of batch {b} on " + ("the CPU" if d == "cpu" else f"`{d}`") for (d, b), n in seen.items()]
    slices = sum(n * b for (_, b), n in seen.items())
    before = spans[0][0] if spans else last
    if before:
        parts.insert(0, f"{before} early steps that predate the phase log")
    return ", ".join(parts) + f" ({slices} logged simulated slices)"


def _gpu_name(device: str) -> str:
    try:
        return torch.cuda.get_device_name(torch.device(device))
    except Exception:  # noqa: BLE001 - a label only
        return device


def write_report(
    path: Path, results: dict, timings: dict, zs, card, args, have_sigpy: bool, have_bart: bool, commands: list[str],
    merged: bool = False,
) -> None:
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Reconstruction benchmark",
        "",
        "Commands (rows of a method come from the last command that ran it): "
        + "; ".join(f"`{c.strip()}`" for c in commands),
        "",
        f"Data: {len(zs)} Colin27 (mricron `ch2`) axial slices z = {list(zs)}, never used in training (the "
        "VarNet's training set excludes z in [50, 90) and [106, 146)), zero-padded to 192 x 224, intensities / volume max. "
        f"Simulated {COILS}-coil k-space (birdcage maps, smooth random phase, complex noise {NOISE:.1%} of max). "
        "Equispaced masks (fastMRI `EquispacedMaskFractionFunc`), 4x with centre fraction 0.08 and 8x with 0.04, one "
        "mask per volume. Reference: the clean magnitude. SSIM per slice (7x7, k1 0.01, k2 0.03, data range = volume "
        "max), PSNR with the same range, NMSE over the volume (fastMRI `evaluate.py`).",
        "",
        "Methods: zero-filled RSS; CG-SENSE (10 iterations, ESPIRiT maps from the ACS block, our torch code); "
        "L1-wavelet (db4, FISTA 50 iterations, random cycle spinning) and TV (Chambolle-Pock 60 iterations), both started from CG-SENSE; "
        "sigpy `L1WaveletRecon` (50 iterations, sigpy ESPIRiT); BART `ecalib -m1 -c 0` + `pics -S -l1 -i 50` (OMP threads = torch threads) via .cfl "
        "files; our E2E-VarNet. For regularised methods the row is the best lambda of the grid shown, picked on "
        "these same slices (oracle tuning, which favours the classical methods). Seconds per slice include "
        "coil-map estimation.",
        "",
        (f"Machine: {platform.processor() or platform.machine()}, torch threads {args.threads}, CPU only, shared with "
         f"other jobs (1-min load average {load:.1f} on {os.cpu_count()} cores at the end): absolute timings are "
         "inflated and noisy; ratios between methods run in the same process are the meaningful part."
         if getattr(args, "device", "cpu") == "cpu" else
         f"Machine: {_gpu_name(args.device)} (`--device {args.device}`), torch {torch.__version__}; our torch methods "
         "ran on the GPU (one untimed warm-up slice first, the device synchronised around each timing), "
         "sigpy and BART (when listed) on the CPU."),
        "",
    ]
    if card is not None:
        lines += [
            f"VarNet weights: `{getattr(args, 'weights', None) or 'Resources/models/reconstruction_varnet.pt'}` "
            f"(sha256 {card.sha256[:12]}, "
            f"training step {card.extra.get('step')}, {card.extra.get('parameters')} parameters, "
            f"architecture {json.dumps(card.arguments)}).",
            "",
        ]
    for acc, rows in results.items():
        lines += [
            f"## {acc}",
            "",
            "| method | SSIM | PSNR (dB) | NMSE | s / slice | best lambda (SSIM per lambda) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            grid = ", ".join(f"{k}: {v}" for k, v in r["grid"].items()) if r["lambda"] is not None else ""
            lam = f"{r['lambda']:g} ({grid})" if r["lambda"] is not None else ""
            lines.append(
                f"| {name} | {r['ssim']:.4f} | {r['psnr']:.2f} | {r['nmse']:.4f} | "
                f"{r['seconds_per_slice']:.3g} | {lam} |"
            )
        lines.append("")
    lines += ["## Targets (issue 4)", ""]
    for acc, rows in results.items():
        if "VarNet (ours)" not in rows:
            continue
        classical_rows = {n: r for n, r in rows.items()
                          if n not in ("VarNet (ours)", "zero-filled") and not n.startswith("auto")}
        best_name = max(classical_rows, key=lambda n: classical_rows[n]["ssim"])
        best = classical_rows[best_name]
        v = rows["VarNet (ours)"]
        gain = v["ssim"] - best["ssim"]
        speeds = {
            n: rows[n]["seconds_per_slice"] / v["seconds_per_slice"]
            for n in ("l1-wavelet", "tv", "BART pics L1-wavelet", "sigpy L1-wavelet")
            if n in rows
        }
        fastest = min(speeds, key=speeds.get) if speeds else None
        speed_text = ", ".join(f"{sp:.1f}x vs {n}" for n, sp in speeds.items())
        met = fastest is not None and speeds[fastest] >= 10
        lines.append(
            f"- {acc}: VarNet SSIM {v['ssim']:.4f} vs best classical ({best_name}) {best['ssim']:.4f}: "
            f"{gain:+.4f} (target >= +0.03: {'met' if gain >= 0.03 else 'NOT met'}); per-slice speed-up "
            f"{speed_text} (target >= 10x against every CS solver: {'met' if met else 'NOT met'}; "
            + ("all timed in one run, one process" if not merged else
               "timings merged from several runs, possibly at different machine loads")
            + ")."
        )
    for key, t in timings.items():
        if key.startswith("varnet_16coil_320_") and key != "varnet_16coil_320_cpu_seconds":
            lines.append(f"- 16-coil 320 x 320 slice on {key[len('varnet_16coil_320_'):-len('_seconds')]}: {t:.3f} s.")
    if "varnet_16coil_320_cpu_seconds" in timings:
        t = timings["varnet_16coil_320_cpu_seconds"]
        lines.append(
            f"- 16-coil 320 x 320 slice on the CPU ({args.threads} thread(s), shared machine): {t:.2f} s "
            f"(target < 2 s: {'met' if t < 2 else 'NOT met'})."
        )
    if card is not None:
        lines += [
            "",
            "## Training budget behind these VarNet numbers",
            "",
            f"The bundled VarNet was trained for {card.extra.get('step')} steps: "
            + _budget(card.extra.get("phases", []), int(card.extra.get("step") or 0))
            + ", mostly on this shared 2-core CPU (1-2 torch threads, often beside other training jobs), versus "
            "~10^6 slice-steps on GPUs for the published E2E-VarNet. Training phases: "
            + "; ".join(card.extra.get("phases", [card.command]))
            + ". The training is resumable: rerunning the last command (with a larger `--steps`) continues "
            "from the saved optimiser state in `~/.cache/meddl/train/reconstruction_varnet/state.pt` (elsewhere "
            "from the bundled weights with a new optimiser), and rewrites the weights and card.",
        ]
    if not have_sigpy:
        lines.append("- sigpy is not installed: its row is missing.")
    if not have_bart:
        lines.append("- BART is not installed (`apt-get install bart`): its row is missing.")
    lines.append("")
    notes = kept_notes(path)
    if notes:
        lines += ["", notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    body = {"slices": list(zs), "results": results, "timings": timings, "commands": commands, "merged": merged}
    path.with_suffix(".json").write_text(json.dumps(body, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
