"""Displacement fields: ITK transform files, warping, Jacobian determinant.

References are built independently of meddl.io: SimpleITK images are filled from numpy with the
LPS flip written out here, so a convention slip in the converter cannot cancel itself out.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_geometry import FLIP, oblique_affine, rotation
from meddl.errors import InputError
from meddl.transforms import (
    displacement_to_sitk_transform,
    jacobian_determinant,
    read_transform,
    warp,
    write_transform,
)
from meddl.volume import Volume, affine_from_geometry


def grid_points(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RAS positions ``(*shape, 3)`` of every voxel."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    pad = np.zeros(idx.shape[:-1] + (3,))
    pad[..., : len(shape)] = idx
    return pad @ affine[:3, :3].T + affine[:3, 3]


def rotation_like_field(affine: np.ndarray, shape: tuple[int, ...]) -> Volume:
    """u(p) = w(p) (R - I)(p - c): a rotation about the grid centre fading out with distance."""
    nd = len(shape)
    p = grid_points(affine, shape)
    c = p.reshape(-1, 3).mean(axis=0)
    r = rotation(0.0, 0.0, 0.25) if nd == 2 else rotation(0.1, -0.15, 0.25)
    d = p - c
    w = np.exp(-np.sum(d**2, axis=-1) / (2 * 12.0**2))[..., None]
    u = w * (d @ (r - np.eye(3)).T)
    data = np.moveaxis(u[..., :nd], -1, 0)
    return Volume(np.ascontiguousarray(data), affine, "displacement")


def reference_sitk_field(field: Volume) -> sitk.Image:
    """The same field as an LPS SimpleITK vector image, built by hand (not with meddl.io)."""
    nd = field.ndim
    u = field.numpy().astype(np.float64)
    u_lps = u * FLIP[:nd].reshape((nd,) + (1,) * nd)
    arr = np.moveaxis(u_lps, 0, -1).transpose(tuple(range(nd - 1, -1, -1)) + (nd,))
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=True)
    m = field.affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = (FLIP[:, None] * (m / spacing))[:nd, :nd]
    image.SetSpacing(spacing[:nd].tolist())
    image.SetOrigin((FLIP * field.affine[:3, 3])[:nd].tolist())
    image.SetDirection(direction.ravel().tolist())
    return image


def inside_points(field: Volume, n: int = 40, seed: int = 0) -> np.ndarray:
    """Random RAS points well inside the field's grid, ``(n, 3)``."""
    rng = np.random.default_rng(seed)
    shape = np.array(field.spatial_shape, dtype=float)
    idx = rng.uniform(1.0, shape - 2.0, size=(n, field.ndim))
    return field.index_to_physical(idx)


def ras_transform_point(transform, p_ras: np.ndarray, nd: int) -> np.ndarray:
    """Apply an LPS sitk transform to a RAS point."""
    q = np.asarray(transform.TransformPoint(tuple(float(v) for v in (FLIP * p_ras)[:nd])))
    out = p_ras.copy()
    out[:nd] = FLIP[:nd] * q
    return out


# -- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("nd", [3, 2])
@pytest.mark.parametrize("suffix", [".h5", ".nii.gz", ".tfm", ".nrrd", ".mha"])
def test_written_field_moves_points_like_itk(tmp_path, nd, suffix):
    shape = (20, 24, 16) if nd == 3 else (30, 26)
    field = rotation_like_field(oblique_affine(nd), shape)
    reference = sitk.DisplacementFieldTransform(reference_sitk_field(field))
    path = write_transform(field, tmp_path / f"field{suffix}")
    assert path.exists() and not list(tmp_path.glob(".*part*"))

    # NIfTI stores the orientation in float32; the other formats are exact.
    atol = 1e-5 if suffix == ".nii.gz" else 1e-9
    back = read_transform(path)
    assert back.kind.value == "displacement"
    assert back.spatial_shape == field.spatial_shape
    np.testing.assert_allclose(back.affine, field.affine, atol=atol)
    np.testing.assert_allclose(back.numpy(), field.numpy(), atol=1e-9)

    # The file as ITK itself reads it.
    if suffix in (".h5", ".tfm"):
        from_file = sitk.ReadTransform(str(path))
    else:
        from_file = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    ours = displacement_to_sitk_transform(back)
    for p in inside_points(field):
        expected = ras_transform_point(reference, p, nd)
        np.testing.assert_allclose(ras_transform_point(from_file, p, nd), expected, atol=atol)
        np.testing.assert_allclose(ras_transform_point(ours, p, nd), expected, atol=atol)


@pytest.mark.parametrize("nd", [3, 2])
def test_field_values_are_ras_resampling_displacements(nd):
    # At a grid node, ITK's fixed->moving transform maps p to p + u(p) with u read straight
    # from the Volume in RAS: this pins both the sign of the LPS flip and the convention.
    shape = (12, 10, 9) if nd == 3 else (12, 10)
    field = rotation_like_field(oblique_affine(nd), shape)
    transform = displacement_to_sitk_transform(field)
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = tuple(int(rng.integers(0, n)) for n in shape)
        p = field.index_to_physical(np.array(idx, dtype=float))
        u = np.zeros(3)
        u[:nd] = field.numpy()[(slice(None),) + idx]
        np.testing.assert_allclose(ras_transform_point(transform, p, nd), p + u, atol=1e-9)


def test_read_linear_transform_needs_reference(tmp_path):
    affine_tx = sitk.AffineTransform(3)
    affine_tx.SetMatrix([1.02, 0.01, 0.0, -0.02, 0.98, 0.03, 0.0, 0.01, 1.01])
    affine_tx.SetTranslation([2.0, -1.0, 0.5])
    affine_tx.SetCenter([1.0, 2.0, 3.0])
    path = tmp_path / "affine.tfm"
    sitk.WriteTransform(affine_tx, str(path))
    with pytest.raises(InputError, match="reference"):
        read_transform(path)
    ref = Volume(np.zeros((1, 6, 7, 5), np.float32), oblique_affine(3))
    field = read_transform(path, reference=ref)
    assert field.same_grid(ref) and field.kind.value == "displacement"
    p = grid_points(ref.affine, ref.spatial_shape)
    for idx in [(0, 0, 0), (5, 6, 4), (2, 3, 1)]:
        expected = ras_transform_point(affine_tx, p[idx], 3)
        np.testing.assert_allclose(p[idx] + field.numpy()[(slice(None),) + idx], expected, atol=1e-9)


def test_composite_wrapped_field_is_unwrapped(tmp_path):
    field = rotation_like_field(oblique_affine(3), (8, 9, 7))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.DisplacementFieldTransform(reference_sitk_field(field)))
    path = tmp_path / "composite.h5"
    sitk.WriteTransform(composite, str(path))
    back = read_transform(path)
    np.testing.assert_allclose(back.numpy(), field.numpy(), atol=1e-12)
    np.testing.assert_allclose(back.affine, field.affine, atol=1e-9)


def test_transform_errors(tmp_path):
    image = Volume(np.zeros((3, 4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(InputError, match="expected a volume of kind 'displacement', got kind 'intensity'"):
        write_transform(image, tmp_path / "x.h5")
    field = Volume(np.zeros((3, 4, 4, 4)), np.eye(4), "displacement")
    with pytest.raises(InputError, match="unknown format '.png'"):
        write_transform(field, tmp_path / "x.png")
    with pytest.raises(InputError, match="no such file"):
        read_transform(tmp_path / "missing.h5")
    scalar = tmp_path / "scalar.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkFloat32), str(scalar))
    with pytest.raises(InputError, match="expected 3 vector components per voxel"):
        read_transform(scalar)
    with pytest.raises(InputError, match="expected 3D like the displacement field, got 2D"):
        warp(Volume(np.zeros((1, 4, 4), np.float32), np.eye(4)), field)
    with pytest.raises(InputError, match="interpolation: expected one of linear, nearest"):
        warp(image, field, interpolation="cubic")


# -- warping ----------------------------------------------------------------------------------


def smooth_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(4):
        f = rng.uniform(1, 3, size=len(shape))
        ph = rng.uniform(0, np.pi, size=len(shape))
        term = np.ones(shape)
        for a, fi, pi in zip(axes, f, ph, strict=True):
            term = term * np.cos(2 * np.pi * fi * a + pi)
        out += term
    return out.astype(np.float32)


@pytest.mark.parametrize("nd", [3, 2])
def test_translation_field_warps_like_sitk_translation(nd):
    t = np.array([3.1, -2.4, 1.7])[:nd]
    fixed_shape = (18, 20, 14) if nd == 3 else (30, 28)
    fixed_affine = oblique_affine(nd)
    field = Volume(
        np.broadcast_to(t.reshape((nd,) + (1,) * nd), (nd,) + fixed_shape).copy(), fixed_affine, "displacement"
    )
    # The moving image on another oblique grid.
    moving_affine = (
        affine_from_geometry((1.0, 1.1, 0.9), (-25.0, 5.0, 0.0), rotation(-0.1, 0.2, 0.1))
        if nd == 3
        else affine_from_geometry((0.9, 1.1), (0.0, -15.0))
    )
    moving_shape = (30, 32, 26) if nd == 3 else (40, 42)
    moving = Volume(smooth_image(moving_shape)[None], moving_affine)

    result = warp(moving, field)

    from meddl.io import to_sitk  # moving/fixed images; the transform is built here, by hand

    reference_grid = to_sitk(Volume(np.zeros((1,) + fixed_shape, np.float32), fixed_affine))
    translation = sitk.TranslationTransform(nd, (FLIP[:nd] * t).tolist())
    expected = sitk.Resample(to_sitk(moving), reference_grid, translation, sitk.sitkLinear, 0.0)
    expected_arr = sitk.GetArrayFromImage(expected).transpose(tuple(range(nd - 1, -1, -1)))
    assert result.same_grid(field) and result.numpy().dtype == np.float32
    assert np.count_nonzero(expected_arr) > 0.3 * expected_arr.size
    np.testing.assert_allclose(result.numpy()[0], expected_arr, atol=1e-5)


def test_warp_labels_default_to_nearest_and_keep_dtype():
    shape = (10, 11, 9)
    labels = np.zeros((1,) + shape, np.int16)
    labels[0, 2:6, 3:8, 1:5] = 3
    labels[0, 6:9, 1:4, 4:8] = 7
    moving = Volume(labels, np.eye(4), "label")
    field = Volume(np.zeros((3,) + shape), np.eye(4), "displacement")
    field.numpy()[0] = 1.0  # RAS +x by one voxel: out[i] = moving[i + 1]
    out = warp(moving, field)
    assert out.kind.value == "label" and out.numpy().dtype == np.int16
    np.testing.assert_array_equal(out.numpy()[0, :-1], labels[0, 1:])
    assert set(np.unique(out.numpy())) <= {0, 3, 7}


def test_warp_of_integer_intensities_rounds_instead_of_truncating():
    shape = (6, 5, 4)
    data = np.zeros((1,) + shape, np.int16)
    data[0, 1::2] = 1  # alternating planes of 0 and 1 along x, and negative ones elsewhere
    data[0, :, :, 2:] *= -3
    moving = Volume(data, np.eye(4), "intensity")
    field = Volume(np.zeros((3,) + shape), np.eye(4), "displacement")
    field.numpy()[0] = 0.4  # 0.4 voxel along x: out = 0.6 a + 0.4 b, rounded
    out = warp(moving, field).numpy()[0]
    expected = np.rint(0.6 * data[0, :-1].astype(float) + 0.4 * data[0, 1:])
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out[:-1], expected)


def test_warp_complex_and_multichannel():
    shape = (9, 8, 7)
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((2,) + shape) + 1j * rng.standard_normal((2,) + shape)).astype(np.complex64)
    field = Volume(np.zeros((3,) + shape), oblique_affine(3), "displacement")
    moving = Volume(data[:1], oblique_affine(3), "complex")
    out = warp(moving, field)
    assert out.numpy().dtype == np.complex64
    np.testing.assert_allclose(out.numpy(), data[:1], atol=1e-5)
    rgb = Volume(rng.integers(0, 255, size=(3,) + shape).astype(np.uint8), oblique_affine(3))
    np.testing.assert_array_equal(warp(rgb, field, "nearest").numpy(), rgb.numpy())


# -- Jacobian ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nd", [3, 2])
def test_jacobian_of_zero_field_is_one(nd):
    shape = (7, 8, 6) if nd == 3 else (7, 8)
    field = Volume(np.zeros((nd,) + shape), oblique_affine(nd), "displacement")
    jac = jacobian_determinant(field)
    assert jac.numpy().shape == (1,) + shape and jac.same_grid(field)
    np.testing.assert_allclose(jac.numpy(), 1.0, atol=1e-12)


@pytest.mark.parametrize("nd", [3, 2])
def test_jacobian_of_affine_field_is_analytic_on_oblique_grid(nd):
    # u(p) = (M - I)(p - c)  =>  det J = det M at every interior voxel.
    shape = (9, 10, 8) if nd == 3 else (11, 9)
    affine = oblique_affine(nd)
    p = grid_points(affine, shape)[..., :nd]
    c = np.array([1.0, -2.0, 3.0])[:nd]
    for m in (1.3 * np.eye(nd), np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [0.0, -0.2, 1.2]])[:nd, :nd]):
        u = (p - c) @ (m - np.eye(nd)).T
        field = Volume(np.moveaxis(u, -1, 0).copy(), affine, "displacement")
        jac = jacobian_determinant(field, chunk_voxels=37).numpy()[0]
        interior = jac[(slice(1, -1),) * nd]
        np.testing.assert_allclose(interior, np.linalg.det(m), rtol=1e-5)
        if np.allclose(m, 1.3 * np.eye(nd)):
            np.testing.assert_allclose(interior, 1.3**nd, rtol=1e-5)


@pytest.mark.parametrize("nd", [3, 2])
def test_jacobian_matches_sitk_filter(nd):
    # SimpleITK's filter ignores the direction, so compare on an LPS-identity grid (RAS
    # direction diag(-1, -1, 1)), anisotropic, non-zero origin; boundaries included.
    shape = (12, 14, 10) if nd == 3 else (16, 13)
    affine = affine_from_geometry((1.2, 0.7, 1.9)[:nd], (4.0, -3.0, 2.0)[:nd], np.diag([-1.0, -1.0, 1.0])[:nd, :nd])
    rng = np.random.default_rng(3)
    smooth = np.stack([smooth_image(shape, seed=s) for s in range(nd)]) * rng.uniform(0.5, 1.5)
    field = Volume(smooth.astype(np.float64), affine, "displacement")
    ours = jacobian_determinant(field).numpy()[0]
    expected = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(reference_sitk_field(field)))
    expected = expected.transpose(tuple(range(nd - 1, -1, -1)))
    assert np.ptp(expected) > 0.1
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_jacobian_rejects_non_displacement():
    with pytest.raises(InputError, match="kind 'displacement'"):
        jacobian_determinant(Volume(np.zeros((3, 4, 4, 4)), np.eye(4)))
