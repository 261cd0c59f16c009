"""Baselines: histogram matching and class-wise statistics alignment (meddl.adaptation.baselines)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from meddl import InputError, Volume
from meddl.adaptation import align_class_statistics, histogram_match


def test_histogram_matching_is_simpleitks(rng, oblique):
    src = rng.gamma(2.0, 30.0, (1, 20, 24, 16)).astype(np.float32)
    ref = (rng.normal(400, 60, (1, 18, 22, 14))).astype(np.float32)
    out = histogram_match(Volume(src, oblique(3)), Volume(ref))
    f = sitk.HistogramMatchingImageFilter()
    f.SetNumberOfHistogramLevels(256)
    f.SetNumberOfMatchPoints(7)
    f.SetThresholdAtMeanIntensity(True)
    expected = sitk.GetArrayFromImage(f.Execute(sitk.GetImageFromArray(src[0]), sitk.GetImageFromArray(ref[0])))
    assert np.allclose(out.numpy()[0], expected)
    assert np.allclose(out.affine, oblique(3))
    # the matched intensities sit where the reference's do
    assert abs(np.median(out.numpy()) - np.median(ref)) < 0.2 * np.median(ref)


def test_class_statistics_are_aligned_exactly(rng):
    labels = rng.integers(0, 3, (1, 30, 20)).astype(np.int32)
    src = rng.normal(0, 1, (1, 30, 20)) + labels * 5.0
    ref_labels = rng.integers(0, 3, (1, 25, 25)).astype(np.int32)
    ref = rng.normal(0, 1, (1, 25, 25)) * (1 + ref_labels) + 100.0 - 20.0 * ref_labels
    out = align_class_statistics(Volume(src), Volume(labels, kind="label"), Volume(ref),
                                 Volume(ref_labels, kind="label")).numpy()
    for k in (1, 2):
        m, rm = labels == k, ref_labels == k
        assert out[m].mean() == pytest.approx(ref[rm].mean(), rel=1e-5)
        assert out[m].std() == pytest.approx(ref[rm].std(), rel=1e-4)
    assert np.allclose(out[labels == 0], src[labels == 0])  # background (label 0) untouched


def test_baselines_refuse_bad_input(rng):
    img = Volume(rng.random((1, 8, 8)))
    with pytest.raises(InputError, match=r"reference: expected a 2D volume like the input, got 3D"):
        histogram_match(img, Volume(rng.random((1, 8, 8, 8))))
    with pytest.raises(InputError, match=r"labels: expected the shape \(8, 8\) of its image, got \(8, 9\)"):
        align_class_statistics(img, Volume(np.ones((1, 8, 9), np.int32), kind="label"), img,
                               Volume(np.ones((1, 8, 8), np.int32), kind="label"))
    with pytest.raises(InputError, match=r"expected labels present in both label maps"):
        align_class_statistics(img, Volume(np.ones((1, 8, 8), np.int32), kind="label"), img,
                               Volume(np.full((1, 8, 8), 2, np.int32), kind="label"))
