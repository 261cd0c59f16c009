"""The one image type that flows through MedDLExtension.

A :class:`Volume` is channel-first data plus one 4x4 matrix that maps a voxel index to a
physical position in millimetres, in **RAS** (right, anterior, superior: Slicer's and
TorchIO's convention). Array axes are in index order ``(C, I, J, K)`` for 3D and
``(C, I, J)`` for 2D, so ``affine @ [i, j, k, 1]`` is the RAS position of ``data[:, i, j, k]``.
LPS appears only inside the SimpleITK converter (:mod:`meddl.io`), KJI order only inside the
MRML adapter (:mod:`meddl.mrml`).

Displacement fields are volumes of kind ``displacement`` with 2 or 3 channels holding the
RAS displacement in millimetres, in the *resampling* convention: a point ``p`` of the fixed
image corresponds to ``p + u(p)`` in the moving image (ITK's fixed-to-moving transform, Slicer's
"from parent").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["Kind", "Volume", "affine_from_geometry", "geometry_from_affine", "one_slice_axis", "as_plain_2d",
           "component", "COMPONENTS"]


class Kind(str, enum.Enum):
    """What the values of a volume mean."""

    INTENSITY = "intensity"  #: scalar or multi-component (e.g. RGB) image
    LABEL = "label"  #: integer label map, 0 = background
    COMPLEX = "complex"  #: complex image or k-space
    DISPLACEMENT = "displacement"  #: RAS displacement in mm, resampling convention


#: the coarsest voxel spacing a file may declare (1 km): larger values are header errors
MAX_SPACING_MM = 1e6


def affine_from_geometry(
    spacing: tuple[float, ...] | np.ndarray,
    origin: tuple[float, ...] | np.ndarray,
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Build a 4x4 voxel-to-RAS affine from spacing, origin (RAS mm) and direction cosines.

    ``direction`` has one column per voxel axis (RAS unit vectors), as in ITK and Slicer's
    IJKToRAS. 2D geometries are padded with a unit third axis.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    n = spacing.size
    if n not in (2, 3) or origin.size != n:
        raise InputError(f"geometry: expected 2 or 3 spacing/origin values, got {spacing.size}/{origin.size}")
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise InputError(f"geometry: expected positive finite spacing, got {spacing.tolist()}")
    if np.any(spacing > MAX_SPACING_MM):
        raise InputError(
            f"geometry: expected voxel spacing up to {MAX_SPACING_MM:g} mm, got {spacing.tolist()}; "
            "the file's header is probably wrong"
        )
    d = np.eye(3)
    if direction is not None:
        direction = np.asarray(direction, dtype=np.float64)
        d[:n, :n] = direction.reshape(n, n)
    s = np.ones(3)
    s[:n] = spacing
    o = np.zeros(3)
    o[:n] = origin
    affine = np.eye(4)
    affine[:3, :3] = d * s[None, :]
    affine[:3, 3] = o
    return affine


def geometry_from_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a 4x4 affine into (spacing, origin, direction) with direction columns unit-norm."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing[None, :]
    return spacing, np.asarray(affine, dtype=np.float64)[:3, 3].copy(), direction


@dataclass(frozen=True, eq=False)
class Volume:
    """Channel-first image data with its voxel-to-RAS geometry.

    Attributes:
        data: array of shape ``(C, I, J)`` or ``(C, I, J, K)`` (numpy or torch tensor).
        affine: 4x4 float64, voxel index ``(i, j, k)`` to RAS millimetres.
        kind: what the values mean (:class:`Kind`).
        meta: small JSON-able facts (source path, names, units); never large arrays.
    """

    data: Any
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    kind: Kind = Kind.INTENSITY
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ndim = getattr(self.data, "ndim", None)
        if ndim not in (3, 4):
            shape = tuple(getattr(self.data, "shape", ()))
            raise InputError(
                f"volume data: expected a channel-first array of 3 (C, I, J) or 4 (C, I, J, K) "
                f"dimensions, got shape {shape}"
            )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InputError(f"volume affine: expected a finite 4x4 matrix, got shape {affine.shape}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError("volume affine: the 3x3 part is singular (zero spacing or degenerate directions)")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "kind", Kind(self.kind))
        if self.kind is Kind.DISPLACEMENT and self.data.shape[0] != ndim - 1:
            raise InputError(
                f"displacement volume: expected {ndim - 1} channels for {ndim - 1}D, got {self.data.shape[0]}"
            )

    # -- shape -------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape[1:])

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.data.shape) - 1

    @property
    def spacing(self) -> np.ndarray:
        return geometry_from_affine(self.affine)[0][: self.ndim]

    @property
    def origin(self) -> np.ndarray:
        """RAS position of voxel 0 (always 3 values; a 2D slice may sit at any height)."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        return geometry_from_affine(self.affine)[2]

    @property
    def is_complex(self) -> bool:
        return bool(np.iscomplexobj(self.data)) if isinstance(self.data, np.ndarray) else bool(
            getattr(self.data, "is_complex", lambda: False)()
        )

    # -- geometry ----------------------------------------------------------------------------
    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """RAS mm of voxel indices ``(..., ndim)`` (continuous indices allowed)."""
        idx = np.asarray(index, dtype=np.float64)
        pad = np.zeros(idx.shape[:-1] + (3,))
        pad[..., : idx.shape[-1]] = idx
        return pad @ self.affine[:3, :3].T + self.affine[:3, 3]

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous voxel indices ``(..., 3)`` of RAS points ``(..., 3)``."""
        pts = np.asarray(points, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def same_grid(self, other: Volume, atol: float = 1e-4) -> bool:
        """True when both volumes sample the same physical grid."""
        return self.spatial_shape == other.spatial_shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    # -- copies ------------------------------------------------------------------------------
    def with_data(self, data: Any, kind: Kind | str | None = None, **meta: Any) -> Volume:
        """A new volume on the same grid with other data (and optionally another kind)."""
        return replace(self, data=data, kind=Kind(kind) if kind is not None else self.kind, meta={**self.meta, **meta})

    def numpy(self) -> np.ndarray:
        """The data as a numpy array (copies from a torch tensor if needed)."""
        if isinstance(self.data, np.ndarray):
            return self.data
        return self.data.detach().cpu().numpy()

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.3g}" for s in self.spacing)
        dtype = getattr(self.data, "dtype", "?")
        return (
            f"Volume(kind={self.kind.value}, channels={self.channels}, shape={self.spatial_shape}, "
            f"spacing=({spacing}), orientation={self.orientation}, dtype={dtype})"
        )

    @property
    def orientation(self) -> str:
        """Axis codes like ``'RAS'``: the direction each voxel axis points to (nearest)."""
        codes = (("L", "R"), ("P", "A"), ("I", "S"))
        out = []
        for col in self.direction.T:
            axis = int(np.argmax(np.abs(col)))
            out.append(codes[axis][int(col[axis] > 0)])
        return "".join(out[: self.ndim])


def one_slice_axis(vol: Volume) -> int | None:
    """The axis of a 3D volume that holds a single slice (how Slicer holds a 2D image), else None."""
    if vol.ndim != 3:
        return None
    ones = [a for a, n in enumerate(vol.spatial_shape) if n == 1]
    return ones[0] if len(ones) == 1 else None


def as_plain_2d(vol: Volume) -> Volume:
    """A 2D or one-slice 3D volume as a 2D image on a plain grid: its in-plane spacings, no rotation,
    origin 0. Each image's place in the world is left out (what an alignment finds); a one-slice
    volume of any orientation becomes a 2D image, where a coronal one could not go through
    SimpleITK as 2D."""
    axis = one_slice_axis(vol)
    arr = vol.numpy() if axis is None else np.take(vol.numpy(), 0, axis=axis + 1)
    kept = [a for a in range(vol.ndim) if a != axis]
    spacing = [float(vol.spacing[a]) for a in kept]
    return Volume(np.ascontiguousarray(arr), np.diag([*spacing, 1.0, 1.0]), vol.kind, dict(vol.meta))


#: what :func:`component` can take out of a multi-component image (besides a channel number)
COMPONENTS = ("grey", "magnitude", "phase", "real", "imaginary")


def colour_again(vol: Volume) -> Volume:
    """A grey picture that was stored as RGB (read as one channel, ``meta["stored_as"]``) with its three
    equal channels back, for colour tools; any other volume as it is."""
    if vol.channels == 1 and vol.meta.get("stored_as"):
        return vol.with_data(np.repeat(vol.numpy(), 3, axis=0))
    return vol


def to_uint8(vol: Volume, low: float = 0.5, high: float = 99.5) -> Volume:
    """An 8-bit copy for PNG/JPEG pictures: the ``low``-``high`` percentile window of the finite
    voxels (all channels together) mapped linearly onto 0-255, rounded and clipped; NaN becomes 0.

    Label maps and complex images are refused (take a component first); a constant image gives 0.
    """
    data = vol.numpy()
    if vol.kind in (Kind.LABEL, Kind.DISPLACEMENT):
        raise InputError(f"--to-uint8: expected an intensity image, got a {vol.kind.value} volume (a label map keeps "
                         "its values: write it as .nrrd or .nii.gz)")
    if np.iscomplexobj(data):
        raise InputError("--to-uint8: expected real voxels, got complex ones; add --component magnitude")
    finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.inexact) else data.ravel()
    if finite.size == 0:
        raise InputError("--to-uint8: expected some finite voxel values, got none")
    lo, hi = (float(q) for q in np.percentile(finite, [low, high]))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip(np.rint((np.nan_to_num(data.astype(np.float64), nan=lo) - lo) * scale), 0, 255).astype(np.uint8)
    return vol.with_data(out, display_window=(lo, hi))


def component(vol: Volume, which: str | int) -> Volume:
    """One scalar image out of a multi-component one, same grid.

    ``which``:

    * ``grey``: luminance ``0.299 R + 0.587 G + 0.114 B`` of an RGB(A) image (ITU-R BT.601), in
      the input's type (8-bit stays 8-bit, rounded); a grey (one-channel, real) image as it is;
    * ``magnitude``, ``phase`` (radians), ``real``, ``imaginary``: of a complex image, or of two
      channels holding its real and imaginary parts (how MetaImage and NRRD files store complex
      voxels, so that is how such a file reads);
    * a channel number ``0 .. C-1``.
    """
    data = vol.numpy()
    name = str(which).strip().lower()
    if not name.lstrip("-").isdigit() and vol.kind in (Kind.LABEL, Kind.DISPLACEMENT):
        raise InputError(f"component {name}: expected an intensity, RGB or complex image, got a {vol.kind.value} "
                         "volume (a channel number takes one of its channels)")
    if name.lstrip("-").isdigit():
        index = int(name)
        if vol.meta.get("stored_as") and vol.channels == 1 and 0 <= index < 3:
            return vol  # a grey picture stored as RGB: each of its colour channels is the grey one
        if not 0 <= index < vol.channels:
            raise InputError(f"component {index}: expected a channel number from 0 to {vol.channels - 1}")
        return Volume(np.ascontiguousarray(data[index : index + 1]), vol.affine,
                      Kind.INTENSITY if vol.kind is Kind.DISPLACEMENT else vol.kind, dict(vol.meta))
    if name not in COMPONENTS:
        raise InputError(f"component '{which}': expected one of {', '.join(COMPONENTS)} or a channel number")
    if name == "grey":
        if vol.channels == 1 and not np.iscomplexobj(data):
            return vol  # already grey (e.g. a PNG stored as RGB with R = G = B, which reads as grey)
        if vol.channels not in (3, 4):
            raise InputError(f"component grey: expected an RGB image (3 or 4 channels), got {vol.channels}")
        grey = np.tensordot(np.array([0.299, 0.587, 0.114]), data[:3].astype(np.float64), axes=1)
        if np.issubdtype(data.dtype, np.integer):
            info = np.iinfo(data.dtype)
            grey = np.clip(np.rint(grey), info.min, info.max)
        return Volume(grey.astype(data.dtype if np.issubdtype(data.dtype, np.integer) else np.float32)[None],
                      vol.affine, Kind.INTENSITY, dict(vol.meta))
    if np.iscomplexobj(data):
        if vol.channels != 1:
            raise InputError(f"component {name}: expected one complex channel, got {vol.channels}")
        z = data[0]
    elif vol.channels == 2:
        z = data[0].astype(np.float64) + 1j * data[1].astype(np.float64)
    else:
        raise InputError(f"component {name}: expected a complex image or two channels (real, imaginary), "
                         f"got {vol.channels} real channel(s)")
    part = {"magnitude": np.abs, "phase": np.angle, "real": np.real, "imaginary": np.imag}[name](z)
    return Volume(part.astype(np.float32)[None], vol.affine, Kind.INTENSITY, dict(vol.meta))


def require(
    volume: Volume,
    role: str,
    *,
    ndim: tuple[int, ...] = (2, 3),
    scalar: bool = False,
    rgb: bool = False,
    kinds: tuple[Kind, ...] | None = None,
    finite: bool = True,
    varying: str | None = None,
) -> Volume:
    """Check that a volume is what an operation needs; raise one clear :class:`InputError` if not.

    Args:
        role: how the user knows this input ("fixed image", "--moving-labels").
        ndim: accepted numbers of spatial dimensions.
        scalar: exactly one channel (a grey image, not RGB).
        rgb: 3 (or 4) channels of 8-bit colour.
        kinds: accepted kinds.
        finite: refuse NaN or infinite voxels.
        varying: refuse an image of one value everywhere, saying this (what it cannot give, e.g.
            "nothing to register").
    """
    if volume.ndim not in ndim:
        want = " or ".join(f"{d}D" for d in ndim)
        raise InputError(f"{role}: expected a {want} image, got {volume.ndim}D with shape {volume.spatial_shape}")
    if kinds is not None and volume.kind not in kinds:
        want = " or ".join(k.value for k in kinds)
        raise InputError(f"{role}: expected a {want} volume, got a {volume.kind.value} volume")
    if scalar and volume.channels != 1:
        what = "an RGB" if volume.channels in (3, 4) else f"a {volume.channels}-component"
        how = ("--component grey" if volume.channels in (3, 4) else
               "--component magnitude (a complex image's real and imaginary parts) or a channel number"
               if volume.channels == 2 or np.iscomplexobj(volume.numpy()) else "--component N (a channel number)")
        raise InputError(f"{role}: expected a scalar (single-component) image, got {what} image; take one "
                         f"component first: meddl convert IN -o OUT {how}")
    if scalar and np.iscomplexobj(volume.numpy()):
        raise InputError(f"{role}: expected a real image, got complex voxels; take one component first: "
                         "meddl convert IN -o OUT --component magnitude (or phase, real, imaginary)")
    if rgb and (volume.channels not in (3, 4)):
        grey = " (a grey image stored as RGB with R = G = B)" if volume.meta.get("stored_as") else ""
        raise InputError(f"{role}: expected an RGB colour image (3 components), got {volume.channels} component(s)"
                         f"{grey}")
    if finite:
        arr = volume.numpy()
        if np.issubdtype(arr.dtype, np.inexact):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise InputError(
                    f"{role}: expected finite voxel values, got {bad} NaN/infinite voxel(s); fill or mask them first"
                )
    if varying is not None:
        arr = volume.numpy()
        if arr.size and float(arr.max()) == float(arr.min()):
            raise InputError(f"{role}: the image is constant ({float(arr.min()):g} everywhere); {varying}")
    return volume
