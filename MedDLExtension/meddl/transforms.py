"""Displacement-field transforms: ITK transform files, warping and the Jacobian determinant.

A displacement field is a :class:`~meddl.volume.Volume` of kind ``displacement``: 2 or 3
channels of RAS millimetres on the fixed grid, in the *resampling* convention (fixed point
``p`` maps to ``p + u(p)`` in the moving image). That is exactly ITK's fixed-to-moving
``DisplacementFieldTransform`` (after the LPS flip done by :mod:`meddl.io`), Slicer's
"transform from parent", and what ANTs writes as ``*Warp.nii.gz``.

Files:

* ``.h5`` / ``.hdf5`` / ``.tfm`` / ``.txt``: an ITK transform file holding a
  ``DisplacementFieldTransform`` (the field's grid is stored with it).
* ``.nii.gz`` / ``.nii`` / ``.nrrd`` / ``.mha``: the displacement image itself, an LPS vector
  image, as ITK, ANTs and Slicer read it.

Reading also accepts linear / B-spline / composite ITK transforms (``.mat`` too) when a
``reference`` grid is given to sample them on.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import _itk_message, _sitk, _suffix, atomic_path, from_sitk, to_sitk
from .volume import Kind, Volume, geometry_from_affine

__all__ = [
    "Interpolation",
    "TRANSFORM_SUFFIXES",
    "FIELD_IMAGE_SUFFIXES",
    "write_transform",
    "read_transform",
    "displacement_to_sitk_transform",
    "warp",
    "jacobian_determinant",
]

#: ITK transform files (a displacement field is stored with its grid).
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt")
#: Extra ITK transform files that can only be read (linear transforms need a reference grid).
_READ_ONLY_TRANSFORM_SUFFIXES = (".mat",)
#: Displacement images (LPS vector image), single-file formats only so writes stay atomic.
FIELD_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_READ_ONLY_FIELD_SUFFIXES = (".nhdr", ".mhd")

_LPS = np.diag([-1.0, -1.0, 1.0])


class Interpolation(str, enum.Enum):
    """How :func:`warp` samples the moving image."""

    LINEAR = "linear"
    NEAREST = "nearest"


def _check_field(field: Volume, what: str = "displacement field") -> None:
    if not isinstance(field, Volume):
        raise InputError(f"{what}: expected a meddl Volume, got {type(field).__name__}")
    if field.kind is not Kind.DISPLACEMENT:
        raise InputError(
            f"{what}: expected a volume of kind 'displacement', got kind '{field.kind.value}'. "
            "Build it with Volume(data, affine, kind='displacement')"
        )
    if field.channels != field.ndim:
        raise InputError(f"{what}: expected {field.ndim} channels for a {field.ndim}D grid, got {field.channels}")
    if field.is_complex:
        raise InputError(f"{what}: expected real displacements in mm, got complex data")


# -- SimpleITK ----------------------------------------------------------------------------------


def displacement_to_sitk_transform(field: Volume):
    """A ``sitk.DisplacementFieldTransform`` (LPS, fixed-to-moving) equal to ``field``.

    Args:
        field: displacement volume, data ``(2, I, J)`` or ``(3, I, J, K)``, RAS mm.

    Returns:
        ``SimpleITK.DisplacementFieldTransform`` with linear interpolation (ITK's default);
        points outside the field's grid get zero displacement.
    """
    _check_field(field)
    sitk = _sitk()
    image = to_sitk(field)  # float64 vector image, LPS components and geometry
    return sitk.DisplacementFieldTransform(image)


def _unwrap(transform):
    """Peel single-member composite transforms and downcast to the concrete sitk class."""
    sitk = _sitk()
    tx = transform.Downcast() if hasattr(transform, "Downcast") else transform
    while isinstance(tx, sitk.CompositeTransform) and tx.GetNumberOfTransforms() == 1:
        tx = tx.GetNthTransform(0).Downcast()
    return tx


def _sample_transform(transform, reference: Volume) -> Volume:
    """Sample any sitk transform (LPS, fixed-to-moving) as a displacement field on ``reference``."""
    sitk = _sitk()
    nd = reference.ndim
    if transform.GetDimension() != nd:
        raise InputError(
            f"transform: expected a {nd}D transform for the {nd}D reference grid, got {transform.GetDimension()}D"
        )
    spacing, origin, direction = geometry_from_affine(reference.affine)
    origin_lps = _LPS @ origin
    direction_lps = _LPS @ direction
    converter = sitk.TransformToDisplacementFieldFilter()
    converter.SetOutputPixelType(sitk.sitkVectorFloat64)
    converter.SetSize([int(s) for s in reference.spatial_shape])
    converter.SetOutputSpacing([float(s) for s in spacing[:nd]])
    converter.SetOutputOrigin([float(o) for o in origin_lps[:nd]])
    converter.SetOutputDirection([float(v) for v in direction_lps[:nd, :nd].ravel()])
    image = converter.Execute(transform)
    out = from_sitk(image, kind=Kind.DISPLACEMENT)
    # from_sitk rebuilds the affine from the 2D geometry; keep the reference's exact one.
    return Volume(out.data, reference.affine, Kind.DISPLACEMENT, {})


# -- files --------------------------------------------------------------------------------------


def write_transform(field: Volume, path: str | os.PathLike) -> Path:
    """Write a displacement field as an ITK transform file or a displacement image.

    Args:
        field: displacement volume ``(3, I, J, K)`` or ``(2, I, J)``, RAS mm, resampling convention.
        path: ``.h5``/``.hdf5``/``.tfm``/``.txt`` (ITK ``DisplacementFieldTransform``) or
            ``.nii.gz``/``.nii``/``.nrrd``/``.mha`` (LPS vector image, as ANTs and Slicer read it).

    Returns:
        ``path``. The write is atomic: a failure never leaves a partial file under that name.
    """
    _check_field(field)
    path = Path(path)
    suffix = _suffix(path)
    sitk = _sitk()
    if suffix in TRANSFORM_SUFFIXES:
        transform = displacement_to_sitk_transform(field)
        with atomic_path(path) as tmp:
            try:
                sitk.WriteTransform(transform, str(tmp))
            except RuntimeError as exc:
                raise InputError(f"cannot write '{path}': {_itk_message(exc)}") from exc
        return path
    if suffix in FIELD_IMAGE_SUFFIXES:
        image = to_sitk(field)
        with atomic_path(path) as tmp:
            try:
                sitk.WriteImage(image, str(tmp), True)
            except RuntimeError as exc:
                raise InputError(f"cannot write '{path}': {_itk_message(exc)}") from exc
        return path
    raise InputError(
        f"transform output '{path}': unknown format '{suffix}'; expected one of "
        f"{', '.join(TRANSFORM_SUFFIXES + FIELD_IMAGE_SUFFIXES)}"
    )


def read_transform(path: str | os.PathLike, reference: Volume | None = None) -> Volume:
    """Read a transform file as a displacement volume (RAS mm, resampling convention).

    Args:
        path: an ITK transform file (``.h5``, ``.hdf5``, ``.tfm``, ``.txt``, ``.mat``) or a
            displacement image (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``).
        reference: the grid to sample the transform on. Without it, the file must hold a
            displacement field (image, or a ``DisplacementFieldTransform`` possibly wrapped in a
            one-member composite) and its own grid is used. With it, any ITK transform
            (linear, B-spline, composite) is sampled on the reference grid.

    Returns:
        Volume of kind displacement, data ``(3, I, J, K)`` (or ``(2, I, J)`` for 2D).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cannot read transform '{path}': no such file")
    suffix = _suffix(path)
    sitk = _sitk()
    meta = {"source": str(path)}
    if suffix in FIELD_IMAGE_SUFFIXES + _READ_ONLY_FIELD_SUFFIXES:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputError(f"cannot read transform '{path}': {_itk_message(exc)}") from exc
        nd = image.GetDimension()
        if image.GetNumberOfComponentsPerPixel() != nd:
            raise InputError(
                f"displacement image '{path}': expected {nd} vector components per voxel for a {nd}D grid, "
                f"got {image.GetNumberOfComponentsPerPixel()}"
            )
        if reference is not None:
            transform = sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))
            return _with_meta(_sample_transform(transform, reference), meta)
        return from_sitk(image, kind=Kind.DISPLACEMENT, meta=meta)
    if suffix in TRANSFORM_SUFFIXES + _READ_ONLY_TRANSFORM_SUFFIXES:
        try:
            transform = _unwrap(sitk.ReadTransform(str(path)))
        except RuntimeError as exc:
            raise InputError(f"cannot read transform '{path}': {_itk_message(exc)}") from exc
        if reference is not None:
            return _with_meta(_sample_transform(transform, reference), meta)
        if isinstance(transform, sitk.DisplacementFieldTransform):
            image = transform.GetDisplacementField()
            return from_sitk(image, kind=Kind.DISPLACEMENT, meta=meta)
        raise InputError(
            f"transform '{path}': expected a displacement field, got a {transform.GetName()}; "
            "pass reference=<Volume> to sample it on a grid"
        )
    raise InputError(
        f"cannot read transform '{path}': unknown format '{suffix}'; expected one of "
        f"{', '.join(TRANSFORM_SUFFIXES + _READ_ONLY_TRANSFORM_SUFFIXES + FIELD_IMAGE_SUFFIXES)}"
    )


def _with_meta(volume: Volume, meta: dict) -> Volume:
    return Volume(volume.data, volume.affine, volume.kind, {**volume.meta, **meta})


# -- warping ------------------------------------------------------------------------------------


def warp(
    moving: Volume,
    field: Volume,
    interpolation: Interpolation | str | None = None,
    default_value: float = 0.0,
) -> Volume:
    """Resample ``moving`` onto the field's grid: ``out(p) = moving(p + u(p))``.

    The reference implementation: SimpleITK ``Resample`` with a ``DisplacementFieldTransform``.

    Args:
        moving: any volume ``(C, I, J[, K])`` of the same dimension as the field (labels,
            multi-channel and complex data allowed).
        field: displacement volume ``(ndim, I, J[, K])`` on the fixed grid, RAS mm.
        interpolation: ``"linear"`` or ``"nearest"``; by default nearest for label volumes and
            linear otherwise.
        default_value: value of output voxels that map outside ``moving``.

    Returns:
        Volume ``(C, *field.spatial_shape)`` on the field's grid, with ``moving``'s kind and dtype.
    """
    _check_field(field)
    if not isinstance(moving, Volume):
        raise InputError(f"moving image: expected a meddl Volume, got {type(moving).__name__}")
    if moving.ndim != field.ndim:
        raise InputError(f"moving image: expected {field.ndim}D like the displacement field, got {moving.ndim}D")
    if interpolation is None:
        interpolation = Interpolation.NEAREST if moving.kind is Kind.LABEL else Interpolation.LINEAR
    try:
        interpolation = Interpolation(interpolation)
    except ValueError:
        raise InputError(
            f"interpolation: expected one of {', '.join(i.value for i in Interpolation)}, got {interpolation!r}"
        ) from None
    sitk = _sitk()
    data = moving.numpy()
    if np.iscomplexobj(data):
        real = warp(moving.with_data(data.real.copy(), kind=Kind.INTENSITY), field, interpolation, default_value)
        imag = warp(moving.with_data(data.imag.copy(), kind=Kind.INTENSITY), field, interpolation, 0.0)
        out = real.numpy() + 1j * imag.numpy()
        return Volume(out.astype(data.dtype), field.affine, moving.kind, dict(moving.meta))
    transform = displacement_to_sitk_transform(field)
    nd = field.ndim
    spacing, origin, direction = geometry_from_affine(field.affine)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in field.spatial_shape])
    resampler.SetOutputSpacing([float(s) for s in spacing[:nd]])
    resampler.SetOutputOrigin([float(o) for o in (_LPS @ origin)[:nd]])
    resampler.SetOutputDirection([float(v) for v in (_LPS @ direction)[:nd, :nd].ravel()])
    resampler.SetTransform(transform)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if interpolation is Interpolation.NEAREST else sitk.sitkLinear)
    resampler.SetDefaultPixelValue(float(default_value))
    # Intensity displacement-volume channels would be flipped by to_sitk; warp them as plain data.
    plain = moving if moving.kind is not Kind.DISPLACEMENT else moving.with_data(data, kind=Kind.INTENSITY)
    # integer data interpolated linearly: resampled as float and rounded (SimpleITK would truncate
    # towards zero in the integer type, a bias of up to one grey level)
    rounded = interpolation is Interpolation.LINEAR and np.issubdtype(data.dtype, np.integer)
    if rounded:
        plain = plain.with_data(data.astype(np.float32))
    image = to_sitk(plain)
    try:
        result = resampler.Execute(image)
    except RuntimeError as exc:
        raise InputError(f"warp: SimpleITK could not resample the moving image ({_itk_message(exc)})") from exc
    out = from_sitk(result).numpy()
    if rounded:
        info = np.iinfo(data.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    if out.dtype != data.dtype and data.dtype != np.bool_:
        out = out.astype(data.dtype)
    return Volume(out, field.affine, moving.kind, dict(moving.meta))


# -- Jacobian -----------------------------------------------------------------------------------


def _central_difference(a: np.ndarray, axis: int) -> np.ndarray:
    """Central difference along ``axis`` with replicated edges (ITK ZeroFluxNeumann), in voxels."""
    n = a.shape[axis]
    out = np.zeros_like(a)
    if n < 2:
        return out

    def sl(start, stop):
        index = [slice(None)] * a.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    out[sl(1, n - 1)] = (a[sl(2, n)] - a[sl(0, n - 2)]) * 0.5
    out[sl(0, 1)] = (a[sl(1, 2)] - a[sl(0, 1)]) * 0.5
    out[sl(n - 1, n)] = (a[sl(n - 1, n)] - a[sl(n - 2, n - 1)]) * 0.5
    return out


def _det(m: list[list[np.ndarray]]) -> np.ndarray:
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


def jacobian_determinant(field: Volume, chunk_voxels: int = 1 << 21) -> Volume:
    """Determinant of the Jacobian of ``x -> x + u(x)``, per voxel, in physical space.

    ``det(I + du/dx)`` with ``du/dx = (du/d index) @ inv(direction * spacing)``; derivatives are
    central differences with replicated edges (so a boundary voxel uses half the one-sided
    difference), which is what ``sitk.DisplacementFieldJacobianDeterminant`` computes. Unlike
    that filter, oblique grid directions are taken into account (the two agree when the
    LPS direction is the identity). Values <= 0 mark folding.

    Args:
        field: displacement volume ``(3, I, J, K)`` or ``(2, I, J)``, RAS mm.
        chunk_voxels: voxels processed at once along the first axis (bounds memory use).

    Returns:
        Intensity volume ``(1, I, J[, K])``, float32, on the field's grid.
    """
    _check_field(field)
    u = np.asarray(field.numpy(), dtype=np.float64)
    nd = field.ndim
    a = field.affine[:nd, :nd]
    inv = np.linalg.inv(a)  # inv[i, m] = d index_i / d x_m
    n0 = u.shape[1]
    per_slice = int(np.prod(u.shape[2:]))
    step = max(1, chunk_voxels // max(per_slice, 1))
    out = np.empty(u.shape[1:], dtype=np.float32)
    for start in range(0, n0, step):
        stop = min(start + step, n0)
        idx = np.arange(start, stop)
        nxt = np.minimum(idx + 1, n0 - 1)
        prv = np.maximum(idx - 1, 0)
        block = u[:, start:stop]
        # grads[i][c]: d u_c / d index_i on this block
        grads = [(u[:, nxt] - u[:, prv]) * 0.5 if n0 > 1 else np.zeros_like(block)]
        for axis in range(2, nd + 1):
            grads.append(_central_difference(block, axis))
        m = [[None] * nd for _ in range(nd)]
        for c in range(nd):
            for col in range(nd):
                g = grads[0][c] * inv[0, col]
                for i in range(1, nd):
                    g = g + grads[i][c] * inv[i, col]
                m[c][col] = g + (1.0 if c == col else 0.0)
        out[start:stop] = _det(m)
    return Volume(out[None], field.affine, Kind.INTENSITY, {"description": "jacobian determinant"})
