"""Registration part of ``meddl demo``, and the synthetic pairs the tests and benchmark share.

The demo registers the 2 mm MNI152 T1 template (fixed) with a copy of itself that was warped by
a random diffeomorphism and given another contrast (moving), across contrasts with mutual
information, in well under a minute on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..volume import Kind, Volume

__all__ = ["run", "synthetic_pair", "change_contrast"]


def change_contrast(image: Volume, contrast: str = "inverted", seed: int = 0) -> Volume:
    """Another MR-like contrast of ``image``: ``same``, ``inverted`` (T2-like inside the head) or ``gamma``.

    Intensities are first scaled to [0, 1]; ``inverted`` maps tissue ``x`` to ``1.1 - x`` where the
    head is (background stays dark), ``gamma`` to ``x ** g`` with a random ``g`` and a bias field.
    """
    arr = image.numpy()[0].astype(np.float32)
    lo, hi = np.percentile(arr, [0.5, 99.5])
    x = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)
    rng = np.random.default_rng(seed)
    if contrast == "same":
        out = x
    elif contrast == "inverted":
        head = x > 0.08
        out = np.where(head, 1.1 - x, x * 0.5)
    elif contrast == "gamma":
        from scipy.ndimage import gaussian_filter

        bias = np.exp(gaussian_filter(rng.normal(size=x.shape), 12) * 8)
        bias = bias / bias.mean()
        out = x ** float(rng.uniform(0.5, 2.0)) * bias
    else:
        raise ValueError(f"contrast: expected same, inverted or gamma, got {contrast!r}")
    return image.with_data(out[None].astype(np.float32), kind=Kind.INTENSITY)


def synthetic_pair(image: Volume, labels: Volume | None = None, seed: int = 0, max_mm: float = 6.0,
                   smooth_mm: float = 24.0, contrast: str = "same") -> tuple[Volume, Volume | None, Volume]:
    """Warp ``image`` (and ``labels``) by a random diffeomorphism: ``(moving, moving_labels, truth)``.

    ``moving(x) = image(x + w(x))`` with ``w = exp(v)``; registering ``moving`` onto ``image``
    should recover ``truth = exp(-v)`` (RAS mm on ``image``'s grid, resampling convention).
    ``max_mm`` is the largest velocity magnitude; ``smooth_mm`` its correlation length.
    """
    from scipy.ndimage import gaussian_filter

    from .. import transforms
    from .svf import integrate, voxel_to_mm

    rng = np.random.default_rng(seed)
    nd = image.ndim
    spacing = image.spacing
    v = np.stack([gaussian_filter(rng.normal(size=image.spatial_shape), smooth_mm / spacing.mean() / 2)
                  for _ in range(nd)])
    v = v / np.abs(v).max() * max_mm  # mm, along voxel axes
    v_vox = torch.from_numpy((v / spacing.reshape(nd, *([1] * nd))).astype(np.float32))[None]
    w = voxel_to_mm(integrate(v_vox, 7), image.affine)[0].numpy()
    truth = voxel_to_mm(integrate(-v_vox, 7), image.affine)[0].numpy()
    w_vol = Volume(w, image.affine, Kind.DISPLACEMENT)
    moving = transforms.warp(change_contrast(image, contrast, seed), w_vol)
    moving_labels = transforms.warp(labels, w_vol, "nearest") if labels is not None else None
    return moving, moving_labels, Volume(truth, image.affine, Kind.DISPLACEMENT, {"description": "true field"})


def run(out_dir: Path, ctx) -> list:
    """Register a warped, contrast-changed MNI152 copy onto MNI152; returns the demo items."""
    from .. import data, io, transforms
    from ..demo import DemoItem
    from . import RegistrationConfig, register

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx.reporter(0.0, "registration: building the pair")
    fixed = data.load_sample("mni152_t1")
    gm = data.load_sample("mni152_gm_mask")
    moving, moving_labels, _ = synthetic_pair(fixed, gm, seed=7, max_mm=8.0, contrast="inverted")
    from ..errors import ModelError

    config = RegistrationConfig(similarity="mind", levels_mm=(4.0,), iterations=40, device=str(ctx.device),
                                inverse=False)
    try:
        result = register(fixed, moving, config, progress=ctx.reporter.stage(0.1, 0.9), moving_labels=moving_labels)
    except ModelError as exc:  # no bundled network in this build: optimisation alone still works
        ctx.log(f"registration demo: {exc}; using instance optimisation only")
        config = RegistrationConfig(**{**config.__dict__, "method": "optimisation"})
        result = register(fixed, moving, config, progress=ctx.reporter.stage(0.1, 0.9), moving_labels=moving_labels)
    paths = {
        "fixed": io.write(fixed, out / "fixed_mni152_t1.nii.gz"),
        "moving": io.write(moving, out / "moving_warped_t2like.nii.gz"),
        "warped": io.write(result.warped, out / "registered.nii.gz"),
        "jacobian": io.write(result.jacobian, out / "jacobian.nii.gz"),
        "labels": io.write(result.warped_labels, out / "registered_gm_labels.nii.gz"),
        "transform": transforms.write_transform(result.displacement, out / "transform.h5"),
    }
    s = result.summary
    ctx.log(f"registration demo: {s['method']} ({s['similarity']}), folding {s['folding_percent']:.2f} %, "
            f"{s['seconds']:.1f} s on {s['device']}")
    ctx.reporter(1.0, "registration done")
    cap = "registration"
    return [
        DemoItem("Registration: fixed (MNI152 T1)", str(paths["fixed"]), "volume", cap),
        DemoItem("Registration: moving (warped, T2-like)", str(paths["moving"]), "volume", cap),
        DemoItem("Registration: moving registered", str(paths["warped"]), "volume", cap),
        DemoItem("Registration: Jacobian determinant", str(paths["jacobian"]), "volume", cap),
        DemoItem("Registration: warped GM labels", str(paths["labels"]), "segmentation", cap),
        DemoItem("Registration: transform", str(paths["transform"]), "transform", cap),
    ]
