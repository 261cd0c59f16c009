"""GPU check: every capability through the ``meddl`` command, on the CPU and on an accelerator.

    python benchmarks/device_check.py prepare DIR           # here, where the sample data are installed
    python benchmarks/device_check.py run DIR --device cuda [--out docs/benchmarks/device.md]

``prepare`` writes small inputs built from the offline samples (MNI152 2 mm T1 and brain mask from
nilearn, a warped and re-contrasted copy of them as a moving image, a partial labelmap with every
8th axial slice painted, two crops of scikit-image's IHC slide): a few MB, so that they travel to a
machine that has a GPU but not the sample data.

``run`` runs each command twice on the same inputs, once with ``--device cpu`` and once with
``--device DEVICE``, and compares the two outputs: relative RMS difference for images (their
magnitude), Dice between the two answers for labels, plus each answer's own quality where the
truth is known (registration: Dice of the warped brain mask; propagation: Dice on the unpainted
slices). Seconds are the whole command's wall time (process start, imports and model loading
included), so small jobs understate what the GPU does for large ones. It also times the in-context
network's forward pass (128 x 128, 16 context slices) on both devices. The report is Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedDLExtension"))


def prepare(folder: Path) -> None:
    import torch
    import torch.nn.functional as F
    from meddl import data, io
    from meddl.transforms import warp
    from meddl.volume import Kind, Volume

    folder.mkdir(parents=True, exist_ok=True)
    t1 = data.load_sample("mni152_t1")
    mask = data.load_sample("mni152_brain_mask")
    # stored as int16 (a few MB less to carry; the check compares CPU and GPU on the same files)
    t1 = t1.with_data(np.rint(t1.numpy() / t1.numpy().max() * 1000.0).astype(np.int16))
    io.write(t1, folder / "fixed.nii.gz")
    io.write(mask, folder / "fixed_mask.nii.gz")
    # moving image: a smooth random displacement (a few mm), gamma 0.7 and a bias field
    rng = np.random.default_rng(0)
    shape = t1.spatial_shape
    coarse = torch.from_numpy(rng.normal(0.0, 3.0, (1, 3, 5, 6, 5)).astype(np.float32))
    field = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0].numpy()
    disp = Volume(field.astype(np.float32), t1.affine, Kind.DISPLACEMENT)
    moved = warp(t1.with_data(t1.numpy().astype(np.float32)), disp).numpy()[0]
    bias = F.interpolate(torch.from_numpy(rng.normal(0, 0.15, (1, 1, 3, 3, 3)).astype(np.float32)), size=shape,
                         mode="trilinear", align_corners=True)[0, 0].numpy()
    moved = (np.clip(moved, 0, None) / moved.max()) ** 0.7 * np.exp(bias) * 1000.0
    io.write(t1.with_data(np.rint(moved[None]).astype(np.int16)), folder / "moving.nii.gz")
    io.write(warp(mask, disp), folder / "moving_mask.nii.gz")
    partial = np.zeros_like(mask.numpy())
    painted = np.arange(5, shape[2], 8)
    partial[..., painted] = mask.numpy()[..., painted]
    io.write(mask.with_data(partial), folder / "partial.nii.gz")
    ihc = data.load_sample("ihc_rgb")
    io.write(ihc.with_data(np.ascontiguousarray(ihc.numpy()[:, :256, :256])), folder / "ihc_a.nrrd")
    io.write(ihc.with_data(np.ascontiguousarray(ihc.numpy()[:, -256:, -256:])), folder / "ihc_b.nrrd")
    print(f"wrote {sorted(p.name for p in folder.iterdir())}")


def _meddl(args: list[str], log) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "MedDLExtension"),
                                                                        os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "meddl", *args, "--progress", "none"], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.write(f"$ meddl {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise RuntimeError(f"meddl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.abs(a).astype(np.float64), np.abs(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))


def run(folder: Path, device: str, work: Path, log) -> list[dict]:
    from meddl import io

    fixed_mask = io.read(folder / "fixed_mask.nii.gz").numpy()[0]
    partial = io.read(folder / "partial.nii.gz").numpy()[0]
    unpainted = ~np.isin(np.arange(partial.shape[2]), np.arange(5, partial.shape[2], 8))
    work.mkdir(parents=True, exist_ok=True)
    kspace = work / "kspace.h5"
    _meddl(["simulate-kspace", str(folder / "fixed.nii.gz"), "-o", str(kspace), "--coils", "8", "--axis", "2",
            "--device", "cpu"], log)
    jobs = [
        ("register (network+optimisation, LNCC)", "image",
         lambda d, o: ["register", str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"), "-o", str(o),
                       "--moving-labels", str(folder / "moving_mask.nii.gz"), "--labels-out", str(o) + ".labels.nii.gz",
                       "--device", d],
         lambda o: f"warped mask Dice {_dice(io.read(str(o) + '.labels.nii.gz').numpy()[0], fixed_mask):.3f}"),
        ("register (optimisation, MIND)", "image",
         lambda d, o: ["register", str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"), "-o", str(o),
                       "--method", "optimisation", "--similarity", "mind", "--moving-labels",
                       str(folder / "moving_mask.nii.gz"), "--labels-out", str(o) + ".labels.nii.gz", "--device", d],
         lambda o: f"warped mask Dice {_dice(io.read(str(o) + '.labels.nii.gz').numpy()[0], fixed_mask):.3f}"),
        ("reconstruct VarNet, 4x, 8 slices", "image",
         lambda d, o: ["reconstruct", str(kspace), "-o", str(o), "--method", "varnet", "--undersample", "equispaced",
                       "--acceleration", "4", "--slices", "30:38", "--uncertainty", str(o) + ".sure.nii.gz",
                       "--device", d], None),
        ("reconstruct TV, 4x, 8 slices", "image",
         lambda d, o: ["reconstruct", str(kspace), "-o", str(o), "--method", "tv", "--undersample", "equispaced",
                       "--acceleration", "4", "--slices", "30:38", "--device", d], None),
        ("adapt stain (Macenko)", "image",
         lambda d, o: ["adapt", "stain", str(folder / "ihc_a.nrrd"), str(folder / "ihc_b.nrrd"), "-o", str(o),
                       "--method", "macenko", "--device", d], None),
        ("adapt stain (Vahadane)", "image",
         lambda d, o: ["adapt", "stain", str(folder / "ihc_a.nrrd"), str(folder / "ihc_b.nrrd"), "-o", str(o),
                       "--method", "vahadane", "--device", d], None),
        ("adapt fourier (3D, circle)", "image",
         lambda d, o: ["adapt", "fourier", str(folder / "moving.nii.gz"), str(folder / "fixed.nii.gz"), "-o", str(o),
                       "--mode", "3d", "--beta", "0.05", "--device", d], None),
        ("segment --annotated (propagation)", "label",
         lambda d, o: ["segment", str(folder / "fixed.nii.gz"), "--annotated", str(folder / "partial.nii.gz"),
                       "-o", str(o), "--device", d],
         lambda o: "Dice on unpainted slices "
                   f"{_dice(io.read(o).numpy()[0][..., unpainted], fixed_mask[..., unpainted]):.3f}"),
        ("segment --context (another scan, affine)", "label",
         lambda d, o: ["segment", str(folder / "fixed.nii.gz"), "--context", str(folder / "moving.nii.gz"),
                       str(folder / "moving_mask.nii.gz"), "-o", str(o), "--device", d],
         lambda o: f"Dice {_dice(io.read(o).numpy()[0], fixed_mask):.3f}"),
        ("segment --context (another scan, deformable)", "label",
         lambda d, o: ["segment", str(folder / "fixed.nii.gz"), "--context", str(folder / "moving.nii.gz"),
                       str(folder / "moving_mask.nii.gz"), "--align", "deformable", "-o", str(o), "--device", d],
         lambda o: f"Dice {_dice(io.read(o).numpy()[0], fixed_mask):.3f}"),
    ]
    rows = []
    for name, kind, command, quality in jobs:
        suffix = ".nrrd" if "stain" in name else ".nii.gz"
        outs, secs = {}, {}
        for d in ("cpu", device):
            outs[d] = work / f"{name.split()[0]}_{len(rows)}_{d.replace(':', '')}{suffix}"
            try:
                secs[d] = _meddl(command(d, outs[d]), log)
            except RuntimeError as exc:
                secs[d] = float("nan")
                rows.append({"job": name, "error": str(exc)})
                print(f"{name}: {exc}", flush=True)
                break
        else:
            a, b = io.read(outs["cpu"]).numpy(), io.read(outs[device]).numpy()
            agreement = f"Dice {_dice(a, b):.4f}" if kind == "label" else f"rel. RMS diff {_rel(a, b):.2e}"
            row = {"job": name, "cpu_s": secs["cpu"], "device_s": secs[device], "agreement": agreement}
            if quality is not None:
                row["quality_cpu"], row["quality_device"] = quality(outs["cpu"]), quality(outs[device])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def incontext_forward(device: str) -> dict[str, float]:
    import torch
    from meddl.incontext import load_network
    from meddl.incontext.network import pad_channels

    out = {}
    for d in ("cpu", device):
        net, _ = load_network(None, device=d)
        g = torch.Generator().manual_seed(0)
        tgt = pad_channels(torch.rand(1, 128, 128, generator=g), net.in_channels, 0).to(d)
        ci = pad_channels(torch.rand(16, 1, 128, 128, generator=g), net.in_channels, 1).to(d)
        co = (torch.rand(16, 1, 128, 128, generator=g) > 0.5).float().to(d)
        times = []
        for _ in range(6):
            if d != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                net(tgt[None], ci[None], co[None])
            if d != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[d] = float(np.median(times[1:]))
    return out


def report(rows: list[dict], forward: dict[str, float], device: str, out: Path) -> None:
    import torch

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
    lines = [
        "# Device check: the same commands on the CPU and on a GPU",
        "",
        f"Command: `python benchmarks/device_check.py run DIR --device {device}` (inputs from "
        "`python benchmarks/device_check.py prepare DIR`).",
        "",
        f"Machine: {gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, Python {platform.python_version()}. "
        "Seconds are whole `meddl` commands (process start, imports, model loading and file I/O included).",
        "",
        "| command | CPU s | GPU s | CPU / GPU | CPU vs GPU output | quality (CPU / GPU) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['job']} | | | | **failed**: {r['error'][:300]} | |")
            continue
        q = f"{r['quality_cpu']} / {r['quality_device']}" if "quality_cpu" in r else ""
        lines.append(f"| {r['job']} | {r['cpu_s']:.1f} | {r['device_s']:.1f} | {r['cpu_s'] / r['device_s']:.1f}x | "
                     f"{r['agreement']} | {q} |")
    lines += ["", "In-context network forward pass, 128 x 128 target, 16 context slices (median of 5 after a "
              "warm-up): " + ", ".join(f"{d}: {s * 1000:.1f} ms" for d, s in forward.items()), ""]
    from _notes import kept_notes  # benchmarks/ is on sys.path when run as a script

    notes = kept_notes(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("prepare", "run"))
    p.add_argument("folder", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", type=Path, default=Path("/tmp/meddl-device-check"))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "device.md")
    args = p.parse_args(argv)
    if args.action == "prepare":
        prepare(args.folder)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    with open(args.work / "device_check.log", "w") as log:  # every command's output
        rows = run(args.folder, args.device, args.work, log)
    forward = incontext_forward(args.device)
    report(rows, forward, args.device, args.out)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
