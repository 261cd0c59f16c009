"""The Volume type: construction checks, geometry, and input requirements."""

from __future__ import annotations

import numpy as np
import pytest
from meddl.errors import InputError
from meddl.volume import Kind, Volume, affine_from_geometry, geometry_from_affine, require


def test_affine_from_geometry_matches_ijk_to_ras_definition(oblique):
    aff = oblique(3)
    spacing, origin, direction = geometry_from_affine(aff)
    np.testing.assert_allclose(spacing, [0.7, 1.3, 2.5])
    np.testing.assert_allclose(origin, [12.5, -30.25, 7.0])
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-12)
    # voxel (i, j, k) -> origin + direction @ (spacing * index)
    idx = np.array([2.0, 3.0, 1.0])
    vol = Volume(np.zeros((1, 4, 5, 6), np.float32), aff)
    np.testing.assert_allclose(vol.index_to_physical(idx), origin + direction @ (spacing * idx))
    np.testing.assert_allclose(vol.physical_to_index(vol.index_to_physical(idx)), idx, atol=1e-12)


def test_repr_shows_shape_spacing_and_orientation():
    vol = Volume(np.zeros((1, 4, 5, 6), np.float32), affine_from_geometry([1, 1, 2], [0, 0, 0], np.diag([-1, 1, 1])))
    assert repr(vol) == (
        "Volume(kind=intensity, channels=1, shape=(4, 5, 6), spacing=(1, 1, 2), orientation=LAS, dtype=float32)"
    )


@pytest.mark.parametrize("shape", [(4, 5), (1, 2, 3, 4, 5), (7,)])
def test_data_must_be_channel_first_2d_or_3d(shape):
    with pytest.raises(InputError, match=r"expected a channel-first array of 3 \(C, I, J\) or 4"):
        Volume(np.zeros(shape))


def test_singular_or_nonfinite_affine_is_refused():
    with pytest.raises(InputError, match="singular"):
        Volume(np.zeros((1, 2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(InputError, match="finite 4x4"):
        Volume(np.zeros((1, 2, 2, 2)), bad)


def test_displacement_needs_one_channel_per_dimension():
    with pytest.raises(InputError, match=r"expected 3 channels for 3D, got 1"):
        Volume(np.zeros((1, 2, 2, 2)), kind=Kind.DISPLACEMENT)


def test_negative_spacing_is_refused():
    with pytest.raises(InputError, match="positive finite spacing"):
        affine_from_geometry([1.0, -1.0, 1.0], [0, 0, 0])


def test_with_data_keeps_geometry_and_merges_meta(oblique):
    vol = Volume(np.zeros((1, 3, 3, 3)), oblique(3), meta={"a": 1})
    other = vol.with_data(np.ones((1, 3, 3, 3), np.int16), kind="label", b=2)
    assert other.kind is Kind.LABEL and other.meta == {"a": 1, "b": 2}
    np.testing.assert_array_equal(other.affine, vol.affine)
    assert vol.same_grid(other)


def test_torch_tensor_data_is_accepted():
    import torch

    vol = Volume(torch.zeros(1, 4, 4, 4))
    assert vol.spatial_shape == (4, 4, 4) and isinstance(vol.numpy(), np.ndarray)


def test_require_reports_each_problem(volume_factory):
    rgb = volume_factory("rgb", 2)
    with pytest.raises(InputError, match=r"fixed image: expected a 3D image, got 2D"):
        require(rgb, "fixed image", ndim=(3,))
    with pytest.raises(InputError, match=r"expected a scalar \(single-component\) image, got an RGB image"):
        require(rgb, "fixed image", scalar=True)
    grey = volume_factory("float", 3)
    with pytest.raises(InputError, match=r"expected an RGB colour image"):
        require(grey, "slide", rgb=True)
    data = grey.numpy().copy()
    data[0, 1, 1, 1] = np.nan
    data[0, 2, 2, 2] = np.inf
    with pytest.raises(InputError, match=r"got 2 NaN/infinite voxel\(s\)"):
        require(grey.with_data(data), "moving image")
    with pytest.raises(InputError, match=r"expected a label volume, got a intensity volume"):
        require(grey, "labels", kinds=(Kind.LABEL,))
    assert require(grey, "ok", ndim=(3,), scalar=True) is grey
