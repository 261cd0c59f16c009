"""Affine pre-alignment with SimpleITK: centre of mass, a coarse search of the rotation, a rigid stage from
the best starts, then an affine by Mattes mutual information.

Slicer volumes arrive unaligned, so the deformable stages start from this. The result is a 4x4
matrix ``M`` in RAS millimetres in the resampling convention: fixed point ``p`` corresponds to
``M @ p`` in the moving image (SimpleITK's fixed-to-moving transform, flipped from LPS).
"""

from __future__ import annotations

import enum
import re

import numpy as np

from ..errors import InputError
from ..io import _sitk, to_sitk
from ..volume import Volume

__all__ = ["AffineMode", "prealign", "overlap_fraction", "sitk_to_ras_matrix", "apply_matrix"]

_FLIP = np.diag([-1.0, -1.0, 1.0])


class AffineMode(str, enum.Enum):
    """How the moving image is first brought near the fixed one."""

    NONE = "none"  #: trust the headers (scanner coordinates)
    CENTER = "center"  #: translate the centres of mass together
    AFFINE = "affine"  #: centre of mass, then rigid, then a 12-parameter affine (MI)


def sitk_to_ras_matrix(transform, ndim: int) -> np.ndarray:
    """A SimpleITK linear transform (LPS, fixed-to-moving) as a 4x4 RAS matrix."""
    a = np.array(transform.GetMatrix(), dtype=np.float64).reshape(ndim, ndim)
    c = np.array(transform.GetCenter(), dtype=np.float64)
    t = np.array(transform.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:ndim, :ndim] = a
    lps[:ndim, 3] = c + t - a @ c
    flip = np.eye(4)
    flip[:3, :3] = _FLIP
    return flip @ lps @ flip


def _box(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in vol.spatial_shape], indexing="ij")).reshape(vol.ndim, -1).T
    pts = vol.index_to_physical(corners)
    return pts.min(0), pts.max(0)


def overlap_fraction(fixed: Volume, moving: Volume, matrix: np.ndarray | None = None) -> float:
    """Fraction of the fixed box's volume whose (mapped) points fall in the moving box (bounding boxes)."""
    lo_f, hi_f = _box(fixed)
    if matrix is not None:
        corners = np.array(np.meshgrid(*zip(lo_f, hi_f, strict=False), indexing="ij")).reshape(3, -1).T
        mapped = corners @ matrix[:3, :3].T + matrix[:3, 3]
        lo_f, hi_f = mapped.min(0), mapped.max(0)
    lo_m, hi_m = _box(moving)
    nd = fixed.ndim
    inter = np.clip(np.minimum(hi_f, hi_m) - np.maximum(lo_f, lo_m), 0, None)[:nd]
    return float(np.prod(inter) / max(np.prod((hi_f - lo_f)[:nd]), 1e-12))


def _shrunk(vol: Volume, target_mm: float | None):
    """A float32 SimpleITK image, block-averaged towards ``target_mm`` voxels (speed; None: as is)."""
    sitk = _sitk()
    image = sitk.Cast(to_sitk(vol.with_data(vol.numpy().astype(np.float32))), sitk.sitkFloat32)
    if target_mm is None:
        return image
    # never below 16 voxels along an axis (ITK's smoothing needs at least 4 at the coarse level)
    factors = [max(1, min(int(round(target_mm / s)), n // 16)) for s, n in zip(image.GetSpacing(), image.GetSize(),
                                                                               strict=True)]
    if max(factors) > 1:
        image = sitk.BinShrink(image, factors)
    return image


def prealign(fixed: Volume, moving: Volume, mode: AffineMode | str = AffineMode.AFFINE, seed: int = 0,
             iterations: int = 100, reporter=None, working_mm: float | None = 3.0,
             option: str = "--affine") -> np.ndarray:
    """The 4x4 RAS matrix mapping fixed points to moving points.

    Args:
        fixed, moving: scalar intensity volumes ``(1, I, J[, K])`` (any grids, same dimension).
        mode: ``none``, ``center`` (centre of mass) or ``affine`` (centre of mass, rigid, affine).
        seed: seed of the metric's random voxel sampling (reproducible results: the same seed gives
            the same matrix).
        iterations: optimiser iterations per resolution level.
        working_mm: the images are block-averaged towards this spacing first (None: full resolution).
        option: the command-line option named in the error messages' advice.
    """
    mode = AffineMode(mode)
    nd = fixed.ndim
    if mode is AffineMode.NONE:
        return np.eye(4)
    sitk = _sitk()
    if nd == 2:
        # ITK's threads add a 2D image's mutual information up in a varying order, and the optimiser's path
        # moves by up to 0.2 mm from run to run; one thread gives one answer per seed (a slice costs little)
        threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            return _prealign(fixed, moving, mode, seed, iterations, reporter, working_mm, option)
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return _prealign(fixed, moving, mode, seed, iterations, reporter, working_mm, option)


def _prealign(fixed: Volume, moving: Volume, mode: AffineMode, seed: int, iterations: int, reporter,
              working_mm: float | None, option: str) -> np.ndarray:
    nd = fixed.ndim
    sitk = _sitk()
    f_img = _shrunk(fixed, working_mm)
    m_img = _shrunk(moving, working_mm)
    f_img = sitk.Cast(f_img - float(np.min(sitk.GetArrayViewFromImage(f_img))), sitk.sitkFloat32)
    m_img = sitk.Cast(m_img - float(np.min(sitk.GetArrayViewFromImage(m_img))), sitk.sitkFloat32)
    try:
        init = sitk.CenteredTransformInitializer(
            f_img, m_img, sitk.Euler3DTransform() if nd == 3 else sitk.Euler2DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS)
    except RuntimeError as exc:
        raise InputError(f"affine pre-alignment: cannot find the centres of mass ({exc}); are the images empty?") from exc
    if mode is AffineMode.CENTER:
        return sitk_to_ras_matrix(_as_affine(init, nd), nd)

    def run(transform, scales_shift: float, its: int):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(32)
        if f_img.GetNumberOfPixels() > 200_000:
            reg.SetMetricSamplingStrategy(reg.RANDOM)
            # SimpleITK's seed 0 is sitkWallClock (a new sample every run): shift ours so every seed is fixed
            reg.SetMetricSamplingPercentage(0.25, int(seed) % (2**32 - 1) + 1)
        else:  # a small image: every voxel (a quarter of a few thousand is too few for a stable histogram)
            reg.SetMetricSamplingStrategy(reg.NONE)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=its,
                                                     relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        if min(f_img.GetSize()) >= 16 and min(m_img.GetSize()) >= 16:
            reg.SetShrinkFactorsPerLevel([2, 1])
            reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
        else:  # a few voxels along an axis: one level, no smoothing (ITK's filters need 4 voxels per level)
            reg.SetShrinkFactorsPerLevel([1])
            reg.SetSmoothingSigmasPerLevel([0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetInitialTransform(transform, inPlace=False)
        stopped: list[BaseException] = []  # Cancel / Ctrl-C: stop ITK's optimiser, raise it afterwards

        def check() -> None:
            try:
                reporter.check()
            except BaseException as exc:  # raised inside SimpleITK's callback it would become a RuntimeError
                stopped.append(exc)
                reg.StopRegistration()

        if reporter is not None:
            reg.AddCommand(sitk.sitkIterationEvent, check)
        try:
            result = reg.Execute(f_img, m_img)
        except RuntimeError as exc:
            if stopped:
                raise stopped[0] from None
            detail = re.sub(r"\(0x[0-9a-f]+\)", "", str(exc).strip().splitlines()[-1])
            if len(detail) > 200:  # at a word boundary, not mid-word
                detail = detail[:200].rsplit(" ", 1)[0] + " ..."
            raise InputError(
                f"affine pre-alignment failed: {detail}; the images may not overlap "
                f"or be nearly constant. Try {option} center or none"
            ) from exc
        if stopped:
            raise stopped[0]
        return result

    rigid = _unwrap(run(init, 1.0, iterations))
    turned = []
    for start in _rotation_starts(f_img, m_img, init, nd, seed):
        try:
            turned.append(_unwrap(run(start, 1.0, iterations)))
        except InputError:  # a turned start that loses the overlap: the plain one stands
            continue
    if turned:  # a turned result replaces the plain one only when it matches decisively better
        plain = _mutual_information(f_img, m_img, rigid, seed)
        scores = [_mutual_information(f_img, m_img, r, seed) for r in turned]
        best = int(np.argmin(scores))
        if _decisively_better(scores[best], plain, DECISIVE):
            rigid = turned[best]
    affine = _as_affine(rigid, nd)
    final = _unwrap(run(affine, 1.0, iterations))
    matrix = sitk_to_ras_matrix(_as_affine(final, nd), nd)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:nd, :nd])) < 0.2:
        raise InputError(f"affine pre-alignment diverged (degenerate matrix); try {option} center or none")
    return matrix


#: rotations (degrees) tried as starts of the rigid stage, about each axis in turn (3D) or in the plane (2D):
#: the optimiser alone finds about 45 degrees in 3D, but only 10-20 degrees for a 2D slice
SEARCH_DEGREES_2D = tuple(range(15, 360, 15))
SEARCH_DEGREES_3D = (60, 90, 120, 180, 240, 270, 300)
#: at most this many rotated starts are optimised, and only those whose similarity beats the plain start's by
#: :data:`SEARCH_MARGIN` on the coarse images
MAX_ROTATED_STARTS = 2
SEARCH_MARGIN = 1.2
#: a turned rigid result replaces the plain one only when its mutual information is this many times the plain
#: one's. Between two scans of different subjects (or contrasts) a brain slice turned by 30-150 degrees can
#: match a little better than the right pose (up to 1.23 times on skull-stripped MNI152 slices with
#: synthetic subject differences); the far turns this search is for match 2-10 times better.
DECISIVE = 1.5


def _decisively_better(value: float, base: float, factor: float) -> bool:
    """Whether the (negated, ITK-style) mutual information ``value`` is ``factor`` times ``base``'s or more."""
    return bool(np.isfinite(value) and value < base - (factor - 1.0) * abs(base))


def _mutual_information(f_img, m_img, transform, seed: int) -> float:
    """Mattes mutual information (negated, as ITK minimises it) of ``m_img`` mapped by ``transform``."""
    sitk = _sitk()
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    if f_img.GetNumberOfPixels() > 200_000:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, int(seed) % (2**32 - 1) + 1)
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform, inPlace=False)
    try:
        return float(reg.MetricEvaluate(f_img, m_img))
    except RuntimeError:  # too few samples fall inside the moving image: no overlap
        return float("inf")


def _rotation_starts(f_img, m_img, init, nd: int, seed: int) -> list:
    """Rotated copies of the centre-of-mass start, about the fixed image's centre of mass, that match
    better than it by :data:`SEARCH_MARGIN` on images smoothed and halved once more (the best
    :data:`MAX_ROTATED_STARTS`; none for an image under 16 voxels along an axis).

    A brain slice turned by 30 degrees, or a volume turned by 90 (a header that names its axes
    wrongly), is outside the reach of the optimiser from the plain start; a coarse search of the
    rotation is cheap next to it.
    """
    sitk = _sitk()
    if min(f_img.GetSize()) < 16 or min(m_img.GetSize()) < 16:  # a few voxels along an axis: nothing to search
        return []
    factors = [2 if n >= 32 else 1 for n in f_img.GetSize()]
    f_s = sitk.BinShrink(sitk.SmoothingRecursiveGaussian(f_img, float(min(f_img.GetSpacing()))), factors)
    factors = [2 if n >= 32 else 1 for n in m_img.GetSize()]
    m_s = sitk.BinShrink(sitk.SmoothingRecursiveGaussian(m_img, float(min(m_img.GetSpacing()))), factors)
    base = _mutual_information(f_s, m_s, init, seed)
    scored = []
    rotations = ([(0, d) for d in SEARCH_DEGREES_2D] if nd == 2
                 else [(axis, d) for axis in range(3) for d in SEARCH_DEGREES_3D])
    for axis, degrees in rotations:
        start = sitk.Euler2DTransform(init) if nd == 2 else sitk.Euler3DTransform(init)
        angle = np.radians(degrees)
        if nd == 2:
            start.SetAngle(angle)
        else:
            angles = [0.0, 0.0, 0.0]
            angles[axis] = angle
            start.SetRotation(*angles)
        scored.append((_mutual_information(f_s, m_s, start, seed), len(scored), start))
    scored.sort(key=lambda x: (x[0], x[1]))
    return [start for value, _, start in scored[:MAX_ROTATED_STARTS] if _decisively_better(value, base, SEARCH_MARGIN)]


def _unwrap(tx):
    sitk = _sitk()
    tx = tx.Downcast() if hasattr(tx, "Downcast") else tx
    while isinstance(tx, sitk.CompositeTransform) and tx.GetNumberOfTransforms() == 1:
        tx = tx.GetNthTransform(0).Downcast()
    return tx


def _as_affine(tx, nd: int):
    sitk = _sitk()
    out = sitk.AffineTransform(nd)
    out.SetMatrix(tx.GetMatrix())
    out.SetCenter(tx.GetCenter())
    out.SetTranslation(tx.GetTranslation())
    return out


def apply_matrix(moving: Volume, reference: Volume, matrix: np.ndarray, nearest: bool = False,
                 default_value: float = 0.0) -> Volume:
    """``moving`` resampled onto ``reference``'s grid through ``matrix`` (from :func:`prealign`):
    ``out(p) = moving(matrix @ p)``, linear (or nearest-neighbour) interpolation; every channel.

    Same dimension required; the output keeps ``moving``'s kind, dtype (integers rounded) and meta.
    ``default_value`` fills points outside ``moving`` (NaN is allowed for a float output).
    """
    if moving.ndim != reference.ndim:
        raise InputError(f"resample: expected a {reference.ndim}D image like the reference, got {moving.ndim}D")
    data = moving.numpy()
    if np.iscomplexobj(data):
        raise InputError("resample: expected a real image, got complex data; resample its real and imaginary "
                         "parts separately")
    sitk = _sitk()
    nd = reference.ndim
    flip = np.eye(4)
    flip[:3, :3] = _FLIP
    lps = flip @ np.asarray(matrix, dtype=np.float64) @ flip
    transform = sitk.AffineTransform(nd)
    transform.SetMatrix([float(v) for v in lps[:nd, :nd].ravel()])
    transform.SetTranslation([float(v) for v in lps[:nd, 3]])
    grid = to_sitk(reference.with_data(np.zeros((1, *reference.spatial_shape), np.float32), kind="intensity"))
    out = np.empty((data.shape[0], *reference.spatial_shape), dtype=data.dtype)
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    for c in range(data.shape[0]):
        image = to_sitk(moving.with_data(data[c : c + 1].astype(np.float32), kind="intensity"))
        res = sitk.GetArrayFromImage(sitk.Resample(image, grid, transform, interp, float(default_value)))
        res = res.transpose(tuple(range(nd))[::-1])
        out[c] = np.rint(res) if np.issubdtype(data.dtype, np.integer) and not nearest else res
    return Volume(out, reference.affine, moving.kind, dict(moving.meta))
