"""Demo: propagate a structure painted on five axial slices of the MNI152 T1 to the whole volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["run", "painted_slices"]


def painted_slices(labels: np.ndarray, axis: int, count: int) -> tuple[np.ndarray, list[int]]:
    """Keep ``count`` evenly spaced slices (among those holding the structure) of ``labels`` (I, J, K)."""
    moved = np.moveaxis(labels, axis, 0)
    present = np.nonzero(moved.reshape(moved.shape[0], -1).any(1))[0]
    if len(present) == 0:
        return np.zeros_like(labels), []
    chosen = sorted({int(round(v)) for v in np.linspace(present[0], present[-1], count + 2)[1:-1]})
    partial = np.zeros_like(moved)
    partial[chosen] = moved[chosen]
    return np.moveaxis(partial, 0, axis), chosen


def run(out_dir: Path, ctx) -> list:
    from .. import data, io
    from ..demo import DemoItem
    from ..volume import Kind
    from . import SegmentConfig, segment

    out_dir = Path(out_dir)
    target = data.load_sample("mni152_t1")
    truth = data.load_sample("mni152_gm_mask").numpy()[0]
    partial, chosen = painted_slices(truth, axis=2, count=5)
    annotated = target.with_data(partial[None].astype(np.int16), kind=Kind.LABEL)
    result = segment(target, SegmentConfig(axis=2, context_size=5), annotated=annotated, progress=ctx.reporter,
                     device=ctx.device)
    pred = result.numpy()[0] > 0
    fill = np.ones(truth.shape[2], bool)
    fill[chosen] = False
    t = truth[..., fill] > 0
    dice = 2 * float((pred[..., fill] & t).sum()) / max(float(pred[..., fill].sum() + t.sum()), 1.0)
    ctx.log(f"in-context: grey matter painted on axial slices {chosen}; Dice on the other slices {dice:.3f}")
    p_path = io.write(annotated, out_dir / "mni152_gm_painted_5_slices.nii.gz")
    r_path = io.write(result, out_dir / "mni152_gm_propagated.nii.gz")
    return [DemoItem("GM painted on 5 slices", str(p_path), "segmentation", "incontext"),
            DemoItem(f"GM propagated (Dice {dice:.2f})", str(r_path), "segmentation", "incontext")]
