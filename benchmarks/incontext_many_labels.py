"""Many labels at once: propagation of a multi-label segmentation painted on a few slices.

    python benchmarks/incontext_many_labels.py [--labels 20] [--every 8 4] [--threads 1]

The first N labels of the AAL atlas (mricron-data, resampled nearest-neighbour onto the MNI152
2 mm T1 template) are painted on every k-th axial slice; ``meddl.incontext.segment`` fills the other
slices (``--annotated``, default options) and is scored against the atlas on the unpainted slices:
Dice per label (labels present there), its mean, and seconds. Shape interpolation alone
(``prior = 1``) is the baseline that uses the same painted slices and no image. Writes
``docs/benchmarks/incontext_many_labels.md``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedDLExtension"))

from _notes import kept_notes  # noqa: E402  benchmarks/ is on sys.path when run as a script
from meddl import data  # noqa: E402
from meddl.incontext import SegmentConfig, segment  # noqa: E402
from meddl.io import from_sitk, to_sitk  # noqa: E402
from meddl.volume import Kind, Volume  # noqa: E402

OUT = ROOT / "docs" / "benchmarks" / "incontext_many_labels.md"


def atlas_on_template(n_labels: int) -> tuple[Volume, np.ndarray, list[int]]:
    import SimpleITK as sitk

    t1 = data.load_sample("mni152_t1")
    aal = data.load_sample("aal")
    lab = sitk.Resample(to_sitk(aal), to_sitk(t1), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    arr = from_sitk(lab, Kind.LABEL).numpy()[0]
    values = [int(v) for v in np.unique(arr) if v > 0][:n_labels]
    return t1, np.where(np.isin(arr, values), arr, 0).astype(np.int16), values


def score(out: np.ndarray, truth: np.ndarray, values: list[int], unpainted: np.ndarray) -> list[float]:
    dices = []
    for v in values:
        a, b = out[..., unpainted] == v, truth[..., unpainted] == v
        if b.any():
            dices.append(2 * float((a & b).sum()) / float(a.sum() + b.sum()))
    return dices


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=int, default=20)
    p.add_argument("--every", type=int, nargs="+", default=[8, 4])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t1, truth, values = atlas_on_template(args.labels)
    rows = []
    for every in args.every:
        painted_idx = np.arange(0, truth.shape[2], every)
        painted = np.zeros_like(truth)
        painted[..., painted_idx] = truth[..., painted_idx]
        annotated = Volume(painted[None], t1.affine, Kind.LABEL)
        unpainted = np.setdiff1d(np.arange(truth.shape[2]), painted_idx)
        for name, config in (("in-context propagation (default)", SegmentConfig(axis=2)),
                             ("shape interpolation alone (prior 1)", SegmentConfig(axis=2, prior=1.0))):
            t = time.perf_counter()
            out = segment(t1, config, annotated=annotated).numpy()[0]
            sec = time.perf_counter() - t
            d = score(out, truth, values, unpainted)
            rows.append((every, len(painted_idx), name, float(np.mean(d)), float(np.median(d)), len(d), sec))
            print(rows[-1], flush=True)
    command = "python benchmarks/incontext_many_labels.py " + " ".join(sys.argv[1:])
    lines = ["# In-context propagation of many labels at once", "",
             f"Command: `{command.strip()}`", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
             f"{args.threads} torch thread(s), 1-minute load average {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cores.", "",
             f"The first {args.labels} AAL labels on the MNI152 2 mm template ({truth.shape}), painted on every k-th "
             "axial slice; Dice on the unpainted slices, per label present there.", "",
             "| painted | slices painted | method | mean Dice | median Dice | labels | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| every {e}th | {n} | {name} | {m:.3f} | {med:.3f} | {k} | {s:.1f} |"
              for e, n, name, m, med, k, s in rows]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    notes = kept_notes(out)
    out.write_text(text + ("\n" + notes if notes else ""))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
