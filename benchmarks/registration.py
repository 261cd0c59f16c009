"""Benchmark of deformable registration: every method on the same pairs, one table.

Pairs are built only from allowed sample data (:mod:`meddl.data`):

* ``mni-warp-same``: MNI152 T1 (2 mm) vs a copy warped by a random diffeomorphism (same contrast);
  labels: AAL resampled onto the MNI grid.
* ``mni-warp-t2like``: the same with another random warp and an inverted, T2-like contrast.
* ``colin-warp-gamma``: Colin27 T1 (1 mm, 181x217x181) vs a randomly warped copy with a gamma
  contrast change and a bias field; labels: AAL (defined on Colin27).
* ``colin-to-mni``: inter-subject, moving Colin27 (1 mm) onto fixed MNI152 (2 mm); labels: grey /
  white matter (MNI152 masks from nilearn; Colin27 tissue classes from Otsu thresholds of the
  brain-extracted ch2bet, k-means style, since Colin27 has no allowed tissue map).

The random warps use seeds that training never sees (training synthesises its own pairs from label
maps; no benchmark image is a training image).

Methods: identity, affine only (SimpleITK, as our pre-alignment), SimpleITK B-spline (affine then
a B-spline FFD with Mattes MI), ANTs SyN (``antspyx`` in the separate venv ``.venv-ants``, run as a
subprocess because it pins an older numpy) in two presets: antspyx's default ``SyN`` (fast: no
iterations at full resolution) and ``antsRegistrationSyN[s]`` (ANTs' antsRegistrationSyN.sh script:
CC, 100x70x50x20), and ours: network, optimisation, network+optimisation
(LNCC for same-contrast pairs, MI otherwise) and network+optimisation with DeepSim.

Every method runs in its own process (peak memory = that process's max RSS, Python and libraries
included) and answers a displacement field on the fixed grid; Dice (mean over labels present in
the fixed label map), HD95 (mean over labels, mm), % folding (det J <= 0), SDlogJ are then computed
the same way for all, labels warped nearest-neighbour by :func:`meddl.transforms.warp`.

    python benchmarks/registration.py [--pairs mni-warp-same ...] [--methods syn ours-netopt ...] \\
        [--threads 2] [--out docs/benchmarks/registration.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedDLExtension"))

from _notes import kept_notes  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from meddl import data, io, transforms  # noqa: E402
from meddl.volume import Kind, Volume  # noqa: E402

ANTS_PYTHON = ROOT / ".venv-ants" / "bin" / "python"
PAIRS = ("mni-warp-same", "mni-warp-t2like", "colin-warp-gamma", "colin-to-mni", "mni-small-warp")
#: the macaque-sized pair is opt-in (it checks the working grids' scaling with the field of view)
DEFAULT_PAIRS = PAIRS[:4]
METHODS = ("identity", "affine", "bspline", "syn", "syn-script", "ours-network", "ours-optimisation", "ours-netopt",
           "ours-netopt-deepsim")
LABELS = {"identity": "identity", "affine": "affine only (SimpleITK MI)", "bspline": "SimpleITK B-spline (MI)",
          "syn": "ANTs SyN (antspyx)",
          "syn-script": "ANTs antsRegistrationSyN.sh preset (antspyx 'antsRegistrationSyN[s]')", "ours-network": "ours: network",
          "ours-optimisation": "ours: optimisation", "ours-netopt": "ours: network+optimisation",
          "ours-netopt-deepsim": "ours: network+optimisation, DeepSim"}


# -- pairs ----------------------------------------------------------------------------------------


def _resample_labels(labels: Volume, reference: Volume) -> Volume:
    zero = Volume(np.zeros((reference.ndim, *reference.spatial_shape)), reference.affine, Kind.DISPLACEMENT)
    return transforms.warp(labels, zero, "nearest")


def _colin_tissue(colin: Volume) -> Volume:
    """GM = 1, WM = 2 on Colin27's grid from two Otsu thresholds of the brain-extracted image."""
    from skimage.filters import threshold_multiotsu

    brain = data.load_sample("colin27_brain").numpy()[0]
    inside = brain > 0
    t = threshold_multiotsu(brain[inside], classes=3)
    labels = np.zeros(brain.shape, np.int16)
    labels[inside & (brain > t[0]) & (brain <= t[1])] = 1
    labels[inside & (brain > t[1])] = 2
    return Volume(labels[None], colin.affine, Kind.LABEL)


def _mni_tissue() -> Volume:
    gm = data.load_sample("mni152_gm_mask").numpy()[0] > 0
    wm = data.load_sample("mni152_wm_mask").numpy()[0] > 0
    labels = np.zeros(gm.shape, np.int16)
    labels[gm] = 1
    labels[wm & ~gm] = 2
    return Volume(labels[None], data.load_sample("mni152_gm_mask").affine, Kind.LABEL)


def build_pair(name: str, folder: Path) -> dict:
    from meddl.registration.demo import synthetic_pair

    folder.mkdir(parents=True, exist_ok=True)
    if name.startswith("mni-warp"):
        fixed = data.load_sample("mni152_t1")
        labels = _resample_labels(data.load_sample("aal"), fixed)
        seed, contrast = (101, "same") if name.endswith("same") else (102, "inverted")
        moving, moving_labels, _ = synthetic_pair(fixed, labels, seed=seed, max_mm=8.0, smooth_mm=30.0,
                                                  contrast=contrast)
        fixed_labels = labels
    elif name == "colin-warp-gamma":
        fixed = data.load_sample("colin27_t1")
        labels = data.load_sample("aal")
        if not labels.same_grid(fixed):
            labels = _resample_labels(labels, fixed)
        moving, moving_labels, _ = synthetic_pair(fixed, labels, seed=103, max_mm=8.0, smooth_mm=30.0,
                                                  contrast="gamma")
        fixed_labels = labels
    elif name == "mni-small-warp":
        # a macaque-sized brain: the MNI152 grid shrunk to 0.8 mm voxels (an ~80-94 mm box), warped alike
        mni = data.load_sample("mni152_t1")
        shrink = np.diag([0.4, 0.4, 0.4, 1.0])
        fixed = Volume(mni.numpy(), shrink @ mni.affine)
        labels = _resample_labels(data.load_sample("aal"), mni)
        labels = Volume(labels.numpy(), fixed.affine, Kind.LABEL)
        moving, moving_labels, _ = synthetic_pair(fixed, labels, seed=101, max_mm=8.0 * 0.4, smooth_mm=30.0 * 0.4,
                                                  contrast="same")
        fixed_labels = labels
    elif name == "colin-to-mni":
        fixed = data.load_sample("mni152_t1")
        fixed_labels = _mni_tissue()
        moving = data.load_sample("colin27_t1")
        moving_labels = _colin_tissue(moving)
    else:
        raise SystemExit(f"unknown pair {name}")
    similarity = "lncc" if name in ("mni-warp-same", "colin-to-mni", "mni-small-warp") else "mind"
    paths = {"fixed": folder / "fixed.nii.gz", "moving": folder / "moving.nii.gz",
             "fixed_labels": folder / "fixed_labels.nii.gz", "moving_labels": folder / "moving_labels.nii.gz"}
    io.write(fixed, paths["fixed"])
    io.write(moving, paths["moving"])
    io.write(fixed_labels, paths["fixed_labels"])
    io.write(moving_labels, paths["moving_labels"])
    return {"paths": {k: str(v) for k, v in paths.items()}, "similarity": similarity,
            "fixed_shape": list(fixed.spatial_shape), "fixed_spacing": [float(s) for s in fixed.spacing],
            "moving_shape": list(moving.spatial_shape), "moving_spacing": [float(s) for s in moving.spacing]}


# -- workers (each in its own process) --------------------------------------------------------------


def _peak_mb() -> float:
    """This process's peak resident memory (MB): VmHWM, which starts afresh at exec. (``ru_maxrss`` does not:
    on Linux a child started by this script inherits the parent's high-water mark, e.g. the 1 mm pair it built.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(method: str, pair_json: str, out_field: str, threads: int) -> None:
    """Run one method on one pair; write the displacement on the fixed grid; print a JSON line."""
    import torch

    torch.set_num_threads(threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    pair = json.loads(Path(pair_json).read_text())
    fixed = io.read(pair["paths"]["fixed"])
    moving = io.read(pair["paths"]["moving"])
    extra: dict = {}
    t0 = time.perf_counter()
    if method == "identity":
        field = Volume(np.zeros((3, *fixed.spatial_shape), np.float32), fixed.affine, Kind.DISPLACEMENT)
    elif method == "affine":
        from meddl.registration.affine import prealign

        m = prealign(fixed, moving, "affine")
        field = _matrix_field(m, fixed)
    elif method == "bspline":
        field = _bspline(fixed, moving)
    elif method.startswith("ours"):
        from meddl.registration import RegistrationConfig, register

        kw = {"ours-network": dict(method="network"),
              "ours-optimisation": dict(method="optimisation", similarity=pair["similarity"]),
              "ours-netopt": dict(method="network+optimisation", similarity=pair["similarity"]),
              "ours-netopt-deepsim": dict(method="network+optimisation", similarity="deepsim")}[method]
        result = register(fixed, moving, RegistrationConfig(inverse=False, **kw))
        field = result.displacement
        extra = {"summary": result.summary}
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    transforms.write_transform(field, out_field)
    print(json.dumps({"seconds": seconds, "peak_mb": _peak_mb(), **extra}))


def _matrix_field(m: np.ndarray, fixed: Volume) -> Volume:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in fixed.spatial_shape], indexing="ij"), -1).reshape(-1, 3)
    p = fixed.index_to_physical(idx.astype(np.float64))
    d = p @ m[:3, :3].T + m[:3, 3] - p
    return Volume(d.T.reshape(3, *fixed.spatial_shape).astype(np.float32), fixed.affine, Kind.DISPLACEMENT)


def _bspline(fixed: Volume, moving: Volume) -> Volume:
    """SimpleITK: affine (our pre-alignment) then a B-spline FFD (mesh ~ 20 mm), Mattes MI, L-BFGS-B, shrink 4 and 2
    (a full-resolution level took over 5 minutes here)."""
    import SimpleITK as sitk
    from meddl.registration.affine import prealign

    m = prealign(fixed, moving, "affine")
    f = sitk.Cast(io.to_sitk(fixed), sitk.sitkFloat32)
    mv = sitk.Cast(io.to_sitk(moving), sitk.sitkFloat32)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ m @ flip
    affine_tx = sitk.AffineTransform(3)
    affine_tx.SetMatrix(lps[:3, :3].ravel().tolist())
    affine_tx.SetTranslation(lps[:3, 3].tolist())
    mesh = [max(2, int(round(sz * sp / 20.0))) for sz, sp in zip(f.GetSize(), f.GetSpacing(), strict=False)]
    bspline = sitk.BSplineTransformInitializer(f, mesh, 3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=30, maximumNumberOfCorrections=5,
                             maximumNumberOfFunctionEvaluations=60)
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2, 1])
    reg.SetMovingInitialTransform(affine_tx)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(f, mv)
    composite = sitk.CompositeTransform([affine_tx, bspline])
    # ITK composite applies the last-added first: point -> bspline -> affine (fixed -> moving)
    return transforms._sample_transform(composite, fixed)


#: antspyx's type_of_transform per method: "SyN" is antspyx's default (affine, then SyN on MI with
#: 40x20x0 iterations at shrink 4x2x1, i.e. nothing at full resolution); "antsRegistrationSyN[s]"
#: recreates ANTs' antsRegistrationSyN.sh script (rigid + affine on MI, then SyN on CC radius 4 with
#: 100x70x50x20 iterations at shrink 8x4x2x1), the configuration most papers mean by "ANTs SyN".
ANTS_PRESETS = {"syn": "SyN", "syn-script": "antsRegistrationSyN[s]"}

ANTS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, os
    import ants
    fixed_path, moving_path, out_field, threads, preset = sys.argv[1:6]
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = threads
    fixed = ants.image_read(fixed_path)
    moving = ants.image_read(moving_path)
    t0 = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform=preset, random_seed=1)
    seconds = time.perf_counter() - t0
    composed = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], compose=out_field[:-len(".nii.gz")])
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")] if os.path.exists("/proc/self/status") else []
    peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak,
                      "version": getattr(ants, "__version__", "?"), "composed": composed}))
""")


def run_method(method: str, pair_json: Path, folder: Path, threads: int, timeout: float) -> dict:
    out_field = folder / f"{method}_field.nii.gz"
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    if method in ANTS_PRESETS:
        if not ANTS_PYTHON.is_file():
            return {"error": f"ANTs venv missing ({ANTS_PYTHON}); python -m venv .venv-ants && .venv-ants/bin/pip install antspyx"}
        pair = json.loads(pair_json.read_text())
        cmd = [str(ANTS_PYTHON), "-c", ANTS_SCRIPT, pair["paths"]["fixed"], pair["paths"]["moving"], str(out_field),
               str(threads), ANTS_PRESETS[method]]
    else:
        cmd = [sys.executable, __file__, "--worker", method, str(pair_json), str(out_field), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 and not (lines and lines[-1].startswith("{") and out_field.is_file()):
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:200]}
    info = json.loads(lines[-1])
    if proc.returncode != 0:  # answered, then crashed while exiting (seen with SimpleITK threads)
        info["exit_code"] = proc.returncode
    if method in ANTS_PRESETS:
        # antspy's composed field: a displacement image in the resampling convention (ITK/LPS)
        out_field = Path(info.pop("composed"))
    info["field"] = str(out_field)
    return info


# -- metrics ----------------------------------------------------------------------------------------


def hd95(a: np.ndarray, b: np.ndarray, spacing: np.ndarray) -> float:
    """95th percentile of the symmetric surface distance (mm) between two masks (cropped to their box)."""
    from scipy.ndimage import binary_erosion, distance_transform_edt

    if not a.any() or not b.any():
        return float("nan")
    box = np.argwhere(a | b)
    lo, hi = np.maximum(box.min(0) - 3, 0), box.max(0) + 4
    sl = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi, strict=False))
    a, b = a[sl], b[sl]
    sa = a & ~binary_erosion(a)
    sb = b & ~binary_erosion(b)
    da = distance_transform_edt(~sa, sampling=spacing)
    db = distance_transform_edt(~sb, sampling=spacing)
    d = np.concatenate([db[sa], da[sb]])
    return float(np.percentile(d, 95))


def metrics(field: Volume, pair: dict) -> dict:
    fixed_labels = io.read(pair["paths"]["fixed_labels"], kind="label").numpy()[0]
    moving_labels = io.read(pair["paths"]["moving_labels"], kind="label")
    warped = transforms.warp(moving_labels, field, "nearest").numpy()[0]
    spacing = np.asarray(pair["fixed_spacing"])
    dice, hd = [], []
    for lab in np.unique(fixed_labels):
        if lab == 0:
            continue
        a, b = warped == lab, fixed_labels == lab
        dice.append(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
        hd.append(hd95(a, b, spacing))
    j = transforms.jacobian_determinant(field).numpy()[0]
    positive = j[j > 0]
    return {"dice": float(np.mean(dice)), "hd95": float(np.nanmean(hd)), "folding": float((j <= 0).mean() * 100),
            "sdlogj": float(np.log(positive).std()) if positive.size else float("nan"), "labels": len(dice)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), choices=PAIRS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--work", default=None, help="folder for pairs and fields (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "registration.md"))
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "PAIR_JSON", "OUT_FIELD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker, threads=args.threads)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="meddl_reg_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results_json = work / "results.json"
    # a rerun with the same --work keeps the rows already measured (and skips them)
    rows = json.loads(results_json.read_text()) if results_json.is_file() else []
    done = {(r["pair"], r["method"]) for r in rows if "error" not in r}
    rows = [r for r in rows if (r["pair"], r["method"]) in done]
    for pair_name in args.pairs:
        folder = work / pair_name
        pair_json = folder / "pair.json"
        if pair_json.is_file():
            pair = json.loads(pair_json.read_text())
        else:
            pair = build_pair(pair_name, folder)
            pair_json.write_text(json.dumps(pair))
        for method in args.methods:
            if (pair_name, method) in done:
                continue
            print(f"{pair_name}: {method} ...", flush=True)
            info = run_method(method, pair_json, folder, args.threads, args.timeout)
            row = {"pair": pair_name, "method": method, **{k: v for k, v in info.items() if k != "summary"}}
            if "error" not in info:
                field = transforms.read_transform(info["field"])
                fixed = io.read(pair["paths"]["fixed"])
                if not field.same_grid(fixed, atol=1e-3):
                    field = transforms.read_transform(info["field"], reference=fixed)
                row.update(metrics(field, pair))
                if "summary" in info:
                    row["network_step"] = info["summary"].get("network_step")
                    row["stage_seconds"] = info["summary"].get("stage_seconds")
            print("   ", json.dumps({k: v for k, v in row.items() if k not in ("field",)}), flush=True)
            rows.append(row)
            results_json.write_text(json.dumps(rows, indent=1))
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (PAIRS.index(r["pair"]), order.get(r["method"], 99)))
    write_table(rows, Path(args.out), args)
    return 0


def write_table(rows: list[dict], out: Path, args) -> None:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Registration benchmark",
        "",
        f"Command: `python benchmarks/registration.py --pairs {' '.join(args.pairs)} --methods {' '.join(args.methods)} "
        f"--threads {args.threads}`",
        "",
        f"Machine: {cpu}, {os.cpu_count()} CPU cores shared with other jobs while this ran (timings are wall "
        f"seconds under that load, {args.threads} threads per method), no GPU. Peak memory is the max RSS of the "
        "process that ran the method (Python, torch/ITK included).",
        "",
        "Dice: mean over the labels of the fixed label map; HD95: mean over labels of the 95th-percentile "
        "symmetric surface distance (mm); folding: % voxels with det J <= 0; SDlogJ: std of log det J over the "
        "fixed grid. Labels are warped nearest-neighbour with each method's displacement field.",
        "",
        "| pair | method | Dice | HD95 mm | folding % | SDlogJ | seconds | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = LABELS.get(r["method"], r["method"])
        if "error" in r:
            lines.append(f"| {r['pair']} | {name} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['pair']} | {name} | {r['dice']:.3f} | {r['hd95']:.2f} | {r['folding']:.3f} | "
                     f"{r['sdlogj']:.3f} | {r['seconds']:.1f} | {r['peak_mb']:.0f} |")
    steps = {r.get("network_step") for r in rows if r.get("network_step") is not None}
    if steps:
        lines += ["", f"Registration network checkpoint used: step {', '.join(str(s) for s in sorted(steps))} "
                      "(`Resources/models/registration_synthmorph.json`)."]
    notes = kept_notes(out)
    if notes:
        lines += ["", notes.rstrip("\n")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
