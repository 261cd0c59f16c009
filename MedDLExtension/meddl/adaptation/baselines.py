"""Baselines users expect beside Fourier and stain adaptation.

* Histogram matching (Nyúl & Udupa style, SimpleITK's ``HistogramMatchingImageFilter``).
* Class-wise statistics alignment (CateNorm appendix): where labels exist, the voxels of each
  class are shifted and scaled so the class mean and standard deviation match the reference's,
  ``x' = (x - mu_c) / sigma_c * sigma_ref_c + mu_ref_c``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..volume import Kind, Volume, require
from ._common import check_intensity

__all__ = ["histogram_match", "align_class_statistics"]


def histogram_match(
    image: Volume,
    reference: Volume,
    levels: int = 256,
    match_points: int = 7,
    threshold_at_mean: bool = True,
) -> Volume:
    """Match the intensity histogram of ``image`` to ``reference``'s, channel by channel.

    Args:
        levels: histogram bins.
        match_points: quantile points matched (SimpleITK's ``NumberOfMatchPoints``).
        threshold_at_mean: ignore voxels below each image's mean (background), as SimpleITK.
    Returns:
        float32 volume on the image's grid.
    """
    import SimpleITK as sitk

    check_intensity(image, "input", varying=True)
    check_intensity(reference, "reference", varying=True)
    if reference.ndim != image.ndim:
        raise InputError(
            f"reference: expected a {image.ndim}D volume like the input, got {reference.ndim}D with shape "
            f"{reference.spatial_shape}"
        )
    if reference.channels not in (1, image.channels):
        raise InputError(f"reference: expected {image.channels} channel(s) like the input (or 1), got {reference.channels}")
    if not 2 <= levels <= 65536 or not 1 <= match_points <= levels:
        raise InputError(f"histogram matching: expected 2 <= levels <= 65536 and 1 <= match points <= levels, "
                         f"got {levels} levels and {match_points} match points")
    src = image.numpy().astype(np.float32)
    ref = reference.numpy().astype(np.float32)
    out = np.empty_like(src)
    for c in range(image.channels):
        # arrays go in as they are (axis order is irrelevant to a histogram)
        a = sitk.GetImageFromArray(src[c])
        b = sitk.GetImageFromArray(ref[c if ref.shape[0] > 1 else 0])
        f = sitk.HistogramMatchingImageFilter()
        f.SetNumberOfHistogramLevels(int(levels))
        f.SetNumberOfMatchPoints(int(match_points))
        f.SetThresholdAtMeanIntensity(bool(threshold_at_mean))
        out[c] = sitk.GetArrayFromImage(f.Execute(a, b))
    return image.with_data(out, adaptation="histogram matching")


def _mm(values) -> str:
    return " x ".join(f"{float(v):g}" for v in values) + " mm"


def align_class_statistics(
    image: Volume,
    labels: Volume,
    reference: Volume,
    reference_labels: Volume,
    classes: list[int] | None = None,
) -> Volume:
    """Per-class mean/std alignment of ``image`` to ``reference`` (CateNorm's class statistics).

    Args:
        labels: label map of ``image`` on its grid (kind label, one channel).
        reference_labels: label map of ``reference`` on the reference's grid.
        classes: the labels aligned (default: every label > 0 present in both); voxels of other
            labels are left unchanged.
    Returns:
        float32 volume on the image's grid.
    """
    check_intensity(image, "input")
    check_intensity(reference, "reference")
    for vol, role, grid in ((labels, "labels", image), (reference_labels, "reference labels", reference)):
        if not isinstance(vol, Volume):
            raise InputError(f"{role}: expected a meddl.Volume, got {type(vol).__name__}")
        require(vol, role, ndim=(grid.ndim,), scalar=True)
        if vol.spatial_shape != grid.spatial_shape:
            raise InputError(f"{role}: expected the shape {grid.spatial_shape} of its image, got {vol.spatial_shape}")
        if not vol.same_grid(grid, atol=1e-3):
            differ = float(np.abs(np.asarray(vol.affine) - np.asarray(grid.affine)).max())
            raise InputError(
                f"{role}: expected the grid of its image (spacing {_mm(grid.spacing)}, origin {_mm(grid.origin)}), "
                f"got spacing {_mm(vol.spacing)}, origin {_mm(vol.origin)} (voxel-to-world matrices differ by up "
                f"to {differ:.3g}, directions included); resample the labels onto the image first"
            )
    if reference.channels not in (1, image.channels):
        raise InputError(f"reference: expected {image.channels} channel(s) like the input (or 1), got {reference.channels}")
    lab = np.rint(labels.numpy()[0]).astype(np.int64)
    ref_lab = np.rint(reference_labels.numpy()[0]).astype(np.int64)
    if classes is None:
        classes = sorted(set(np.unique(lab).tolist()) & set(np.unique(ref_lab).tolist()) - {0})
    if not classes:
        raise InputError("class alignment: expected labels present in both label maps, found none in common")
    src = image.numpy().astype(np.float32)
    ref = reference.numpy().astype(np.float32)
    out = src.copy()
    for c in range(image.channels):
        rc = ref[c if ref.shape[0] > 1 else 0]
        for k in classes:
            m, rm = lab == k, ref_lab == k
            if not m.any() or not rm.any():
                raise InputError(f"class alignment: label {k} is missing from the {'image' if not m.any() else 'reference'}")
            mu, sd = src[c][m].mean(), src[c][m].std()
            rmu, rsd = rc[rm].mean(), rc[rm].std()
            out[c][m] = (src[c][m] - mu) / max(sd, 1e-12) * rsd + rmu
    return image.with_data(out, adaptation="class statistics", kind=Kind.INTENSITY)
