"""File I/O and the SimpleITK converter: the only place where LPS appears.

ITK and the files it writes (NIfTI, NRRD, MHA, DICOM) describe geometry in LPS; a
:class:`~meddl.volume.Volume` is RAS. The flip ``diag(-1, -1, 1)`` is applied to directions,
origins and displacement vectors here and nowhere else.

SimpleITK's array view is ``(K, J, I[, C])``; a Volume is ``(C, I, J, K)``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .volume import Kind, Volume, affine_from_geometry, geometry_from_affine

__all__ = [
    "to_sitk",
    "from_sitk",
    "read",
    "write",
    "write_dicom_series",
    "atomic_path",
    "VOLUME_SUFFIXES",
]

_LPS = np.diag([-1.0, -1.0, 1.0])
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".jpg", ".jpeg")
_RGB_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")  # 2D images only
#: formats that store 8/16-bit integers only (TIFF holds floats too)
INTEGER_ONLY_SUFFIXES = (".png", ".jpg", ".jpeg")


def _sitk():
    import SimpleITK as sitk  # imported lazily: keeps `import meddl` light

    return sitk


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    for s in (".nii.gz", ".seg.nrrd"):
        if name.endswith(s):
            return s if s != ".seg.nrrd" else ".nrrd"
    return Path(name).suffix


# -- SimpleITK <-> Volume ------------------------------------------------------------------------


def to_sitk(volume: Volume):
    """Convert a Volume to a ``SimpleITK.Image`` (LPS geometry, same voxel values and dtype).

    Multi-channel volumes become vector images; displacement volumes become float64 vector
    images in LPS components, usable by ``sitk.DisplacementFieldTransform``.
    """
    sitk = _sitk()
    data = volume.numpy()
    nd = volume.ndim
    if np.iscomplexobj(data) and volume.channels > 1:
        raise InputError(
            f"complex volume: SimpleITK stores one complex channel, got {volume.channels}; "
            "write each channel separately or a sequence"
        )
    displacement = volume.kind is Kind.DISPLACEMENT
    dtype = np.float64 if displacement else (np.uint8 if data.dtype == np.bool_ else data.dtype)
    arr = _reverse_layout(data, channels_first=True, dtype=dtype, negate=(0, 1) if displacement else ())
    is_vector = volume.channels > 1 or displacement
    if not is_vector:
        arr = arr[..., 0]
    img = sitk.GetImageFromArray(arr, isVector=is_vector)
    spacing, origin, direction = geometry_from_affine(volume.affine)
    direction_lps = _LPS @ direction
    origin_lps = _LPS @ origin
    if nd == 2 and abs(np.linalg.det(direction_lps[:2, :2])) < 1e-6:
        raise InputError("2D image: its rows and columns do not span the x-y plane (a coronal or sagittal slice); "
                         "give it as a one-slice 3D volume")
    img.SetSpacing([float(s) for s in spacing[:nd]])
    img.SetOrigin([float(o) for o in origin_lps[:nd]])
    img.SetDirection([float(v) for v in direction_lps[:nd, :nd].ravel()])
    return img


def _reverse_layout(src: np.ndarray, channels_first: bool, dtype, negate: tuple[int, ...] = ()) -> np.ndarray:
    """A new C-contiguous array with the spatial axes reversed and the channel axis moved to the other end:
    ``(C, I, J[, K]) -> (K, J, I, C)`` (``channels_first``) or back. Channels in ``negate`` change sign
    (RAS <-> LPS displacement components); values are cast to ``dtype``.

    The same as ``np.ascontiguousarray`` of a transposed view, 5-15x faster on large volumes: whole-array
    transposes walk memory with a large stride, this copies one 2D plane at a time (the I-K plane fits in cache).
    """
    if channels_first:
        channels, spatial = src.shape[0], src.shape[1:]
        out = np.empty((*spatial[::-1], channels), dtype=dtype)
    else:
        channels, spatial = src.shape[-1], src.shape[:-1][::-1]
        out = np.empty((channels, *spatial), dtype=dtype)
    planes = [(j,) for j in range(spatial[1])] if len(spatial) == 3 else [()]
    for c in range(channels):
        for index in planes:  # out[...] = +-src[...].T, one I-K plane (the whole image in 2D) at a time
            if channels_first:
                target, source = out[(slice(None), *index, slice(None), c)], src[(c, slice(None), *index)]
            else:
                target, source = out[(c, slice(None), *index)], src[(slice(None), *index, slice(None), c)]
            if c in negate:
                np.negative(source.T, out=target, casting="unsafe")
            else:
                np.copyto(target, source.T, casting="unsafe")
    return out


def _out_of_plane(volume: Volume) -> bool:
    """Whether a 2D volume's affine places it off the z = 0 plane or tilted out of it (geometry a 2D
    ITK image cannot hold)."""
    a = volume.affine
    return volume.ndim == 2 and not (np.allclose(a[2, :2], 0.0, atol=1e-6) and np.allclose(a[:2, 2], 0.0, atol=1e-6)
                                     and abs(a[2, 3]) < 1e-6)


def from_sitk(image, kind: Kind | str | None = None, meta: dict | None = None) -> Volume:
    """Convert a ``SimpleITK.Image`` (2D or 3D, scalar, vector or complex) to a Volume."""
    sitk = _sitk()
    nd = image.GetDimension()
    if nd not in (2, 3):
        raise InputError(f"image: expected 2D or 3D, got {nd}D (size {list(image.GetSize())}); split 4-D series first")
    arr = sitk.GetArrayViewFromImage(image)  # (K, J, I[, C]), a view: the copy below is the only one
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp == 1:
        arr = arr[..., None]
    if kind is None:
        kind = Kind.COMPLEX if np.iscomplexobj(arr) else Kind.INTENSITY
    kind = Kind(kind)
    displacement = kind is Kind.DISPLACEMENT
    if displacement and ncomp != nd:
        raise InputError(f"displacement field: expected {nd} components, got {ncomp}")
    data = _reverse_layout(arr, channels_first=False, dtype=np.float64 if displacement else arr.dtype,
                           negate=(0, 1) if displacement else ())
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(nd, nd)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    d3 = np.eye(3)
    d3[:nd, :nd] = direction
    o3 = np.zeros(3)
    o3[:nd] = origin
    s3 = np.ones(3)
    s3[:nd] = spacing
    affine = affine_from_geometry(s3, _LPS @ o3, _LPS @ d3)
    return Volume(data, affine, kind, dict(meta or {}))


# -- reading ------------------------------------------------------------------------------------


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"cannot read '{path}': no such file or folder")
    if path.is_file():
        if path.stat().st_size == 0:
            raise InputError(f"cannot read '{path}': the file is empty")
        if not os.access(path, os.R_OK):
            raise InputError(f"cannot read '{path}': permission denied")


def read(path: str | os.PathLike, kind: Kind | str | None = None, series: str | None = None) -> Volume:
    """Read a volume: NIfTI, NRRD, MHA/MHD, PNG/TIFF/JPEG (RGB histology), or a DICOM folder.

    Args:
        path: file, or folder holding one DICOM series.
        kind: force the kind (e.g. ``"label"``); by default intensity, or complex for complex data.
        series: the SeriesInstanceUID to read when a DICOM folder holds several.
    """
    path = Path(path)
    _check_readable(path)
    sitk = _sitk()
    meta = {"source": str(path)}
    try:
        if path.is_dir():
            image, uid = _read_dicom_series(path, series)
            meta["series_uid"] = uid
        else:
            nonfinite = _check_nifti(path) if path.name.lower().endswith((".nii", ".nii.gz")) else None
            image = sitk.ReadImage(str(path))
            if nonfinite is not None:
                image = _restore_nonfinite(image, nonfinite, path)
    except InputError:
        raise
    except RuntimeError as exc:
        first = _itk_message(exc)
        raise InputError(f"cannot read '{path}': not a readable image ({first})") from exc
    if kind is not None and Kind(kind) is Kind.COMPLEX and image.GetNumberOfComponentsPerPixel() == 2:
        # MetaImage stores complex voxels as two float channels (real, imaginary)
        image = sitk.RealAndImaginaryToComplex(
            sitk.VectorIndexSelectionCast(image, 0), sitk.VectorIndexSelectionCast(image, 1)
        )
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() == 3 and image.GetSize()[2] == 1 and _suffix(path) in _RGB_SUFFIXES:
        image = image[:, :, 0]
    try:
        vol = from_sitk(image, kind=kind, meta=meta)
    except InputError as exc:
        if str(exc).startswith("volume affine"):  # say which file, and what its header holds
            raise InputError(f"cannot read '{path}': its geometry is unusable (spacing "
                             f"{' x '.join(f'{v:g}' for v in image.GetSpacing())} mm): {exc}") from None
        raise
    if not path.is_dir() and path.name.lower().endswith((".nii", ".nii.gz")):
        notice = _nifti_geometry_notice(path, vol.affine, vol.ndim)
        if notice:
            vol.meta["geometry_notice"] = notice
    if _suffix(path) in _RGB_SUFFIXES and vol.channels == 4:
        alpha = vol.data[3]
        if np.all(alpha == np.iinfo(alpha.dtype).max if np.issubdtype(alpha.dtype, np.integer) else alpha == 1):
            vol = vol.with_data(np.ascontiguousarray(vol.data[:3]))  # ITK reads tiled TIFFs as RGBA, alpha opaque
    if (_suffix(path) in _RGB_SUFFIXES and vol.channels == 3 and np.issubdtype(vol.data.dtype, np.integer)
            and _equal_channels(vol.data)):
        # a grey picture saved in colour (palette or RGB PNGs with R = G = B, e.g. ITK's example brain
        # slices): read as the grey image it is, so grey tools take it without a conversion step
        vol = vol.with_data(np.ascontiguousarray(vol.data[:1]), stored_as="RGB with R = G = B, read as grey")
    if Kind(vol.kind) is Kind.LABEL and np.issubdtype(vol.data.dtype, np.floating):
        if not np.all(np.isfinite(vol.data)) or np.any(vol.data != np.round(vol.data)):
            raise InputError(f"label map '{path}': expected integer labels, got non-integer values")
        vol = vol.with_data(vol.data.astype(np.int32))
    return vol


def _equal_channels(data: np.ndarray) -> bool:
    """True when every channel of ``(C, ...)`` equals the first (checked in bands: bounded memory)."""
    flat = data.reshape(data.shape[0], -1)
    step = 1 << 22
    return all(np.array_equal(flat[1:, i:i + step], np.broadcast_to(flat[:1, i:i + step], flat[1:, i:i + step].shape))
               for i in range(0, flat.shape[1], step))


def _nifti_forms(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The qform and sform (4x4, voxel -> RAS) of a NIfTI-1 file when both are set, else None."""
    import gzip
    import struct

    try:
        with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as f:
            head = f.read(348)
    except OSError:
        return None
    if len(head) < 348:
        return None
    for order in ("<", ">"):
        if struct.unpack(order + "i", head[:4])[0] == 348:
            break
    else:
        return None  # NIfTI-2 or not NIfTI
    qcode, scode = struct.unpack(order + "2h", head[252:256])
    if qcode <= 0 or scode <= 0:
        return None
    pixdim = struct.unpack(order + "8f", head[76:108])
    b, c, d, qx, qy, qz = struct.unpack(order + "6f", head[256:280])
    a = float(np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d))))
    rot = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                    [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                    [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    qform = np.eye(4)
    qform[:3, :3] = rot * np.array([pixdim[1], pixdim[2], pixdim[3] * qfac])
    qform[:3, 3] = (qx, qy, qz)
    sform = np.eye(4)
    sform[:3] = np.array(struct.unpack(order + "12f", head[280:328]), dtype=np.float64).reshape(3, 4)
    return qform, sform


def _nifti_geometry_notice(path: Path, affine: np.ndarray, ndim: int) -> str | None:
    """A one-line notice when a NIfTI file's qform and sform place it differently (None otherwise).

    ITK (so SimpleITK and 3D Slicer) may read such a file with its qform where FSL and nibabel use the
    sform: e.g. mricron's Harvard-Oxford atlas has a qform without the y and z origin.
    """
    forms = _nifti_forms(path)
    if forms is None:
        return None
    qform, sform = forms
    n = min(ndim, 3)
    shift = float(np.linalg.norm(qform[:n, 3] - sform[:n, 3]))
    axes = float(np.abs(qform[:n, :n] - sform[:n, :n]).max())
    if shift <= 0.5 and axes <= 1e-3:
        return None
    if np.allclose(affine[:n, : n], sform[:n, :n], atol=1e-3) and np.allclose(affine[:n, 3], sform[:n, 3], atol=0.5):
        return None  # read as FSL and nibabel read it: nothing to say
    used = "qform" if np.allclose(affine[:n], qform[:n], atol=1e-3) else "ITK's choice"
    what = f"origins {shift:.1f} mm apart" + (", axes differ" if axes > 1e-3 else "")
    return (f"the file's qform and sform disagree ({what}); read with the {used} as ITK and 3D Slicer do "
            "(FSL and nibabel use the sform): check the position against the other images")


def _check_nifti(path: Path) -> np.ndarray | None:
    """Refuse a truncated NIfTI, and find non-finite float voxels that ITK would hide.

    ITK fills a cut NIfTI with zeros and reads NaN voxels as 0, both without a word; this
    reads the header (NIfTI-1 or -2, either byte order) and the raw voxels to catch both.
    Returns a boolean mask of non-finite voxels in ITK's array order ``(K, J, I[, C])``, or
    None when there are none.
    """
    import gzip
    import struct
    import zlib

    compressed = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"cannot read '{path}': corrupt or truncated gzip stream ({exc})") from exc
    head = raw[:540]
    if len(head) < 348:
        raise InputError(f"cannot read '{path}': truncated NIfTI header ({len(head)} of 348 bytes)")
    for order in ("<", ">"):
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348:
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            dims = struct.unpack(order + "8h", head[40:56])
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if size == 540 and len(head) >= 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            offset = int(struct.unpack(order + "q", head[168:176])[0])
            break
    else:
        return None  # not NIfTI-1/2: let ITK decide
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        return None
    shape = [max(int(d), 1) for d in dims[1 : ndim + 1]]
    voxels = int(np.prod(shape))
    offset = max(offset, 348)
    expected = offset + voxels * max(bitpix, 8) // 8
    if len(raw) < expected:
        raise InputError(
            f"cannot read '{path}': truncated NIfTI; expected {expected} bytes, got {len(raw)}. "
            "The file was cut short (interrupted copy or download?)"
        )
    float_types = {16: "f4", 64: "f8"}
    if datatype not in float_types:
        return None
    values = np.frombuffer(raw, dtype=order + float_types[datatype], count=voxels, offset=offset)
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    # NIfTI order: i fastest, then j, k, t, components; ITK's array: (K, J, I[, C])
    spatial = shape[:3] + [1] * (3 - min(len(shape), 3))
    rest = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    mask = bad.reshape(rest, spatial[2], spatial[1], spatial[0])
    return np.moveaxis(mask, 0, -1) if rest > 1 else mask[0]


def _restore_nonfinite(image, mask: np.ndarray, path: Path):
    """Put NaN back where the file has non-finite voxels (ITK read them as 0)."""
    sitk = _sitk()
    arr = sitk.GetArrayFromImage(image)
    if arr.size != mask.size:
        raise InputError(f"'{path}': expected finite voxel values, got {int(mask.sum())} NaN/infinite voxel(s)")
    arr = arr.reshape(mask.shape).astype(arr.dtype, copy=True)
    arr[mask] = np.nan
    out = sitk.GetImageFromArray(arr.reshape(sitk.GetArrayViewFromImage(image).shape),
                                 isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(image)
    return out


def _itk_message(exc: Exception) -> str:
    """The useful last part of an ITK exception, on one line."""
    text = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
    for marker in ("sitk::ERROR:", "Description:", "ERROR:"):
        if marker in text:
            text = text.rsplit(marker, 1)[-1].strip()
            break
    return text[:200] or type(exc).__name__


def _read_dicom_series(folder: Path, series: str | None):
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found": said below, in one line
    try:
        uids = list(reader.GetGDCMSeriesIDs(str(folder)) or [])
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not uids:
        raise InputError(f"cannot read '{folder}': the folder holds no DICOM series")
    if series is None:
        if len(uids) > 1:
            raise InputError(
                f"DICOM folder '{folder}': expected one series, found {len(uids)} ({', '.join(uids)}); "
                "choose one with series=UID"
            )
        series = uids[0]
    elif series not in uids:
        raise InputError(f"DICOM folder '{folder}': series {series} not found; found {', '.join(uids)}")
    files = reader.GetGDCMSeriesFileNames(str(folder), series)
    _check_slice_positions(folder, series, files)
    reader.SetFileNames(files)
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "missing slices" warning: checked above
    try:
        return reader.Execute(), series
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _check_slice_positions(folder: Path, series: str, files) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal: a missing, repeated or
    unreadable slice would otherwise shift every slice after it (ITK only warns)."""
    if len(files) < 3:
        return
    sitk = _sitk()
    positions, normal, decimals = [], None, 0
    for name in files:
        r = sitk.ImageFileReader()
        r.SetFileName(str(name))
        try:
            r.ReadImageInformation()
            parts = r.GetMetaData("0020|0032").split("\\")
            pos = [float(v) for v in parts]
            for v in parts:  # how finely the positions are written (rounding moves a gap by one unit)
                v = v.strip().lower()
                decimals = max(decimals, 6 if "e" in v else len(v.partition(".")[2]))
            if normal is None:
                o = [float(v) for v in r.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(o[:3], o[3:6])
        except (RuntimeError, ValueError, IndexError):
            return  # no positions to check (ITK orders such series by other means)
        positions.append(float(np.dot(pos, normal)))
    gaps = np.diff(np.sort(positions))
    step = float(np.median(gaps))
    # positions are often rounded to a few decimals: a missing or repeated slice is off by a whole step
    tolerance = min(max(0.2 * step, 1.01 * 10.0 ** -decimals, 1e-3), 0.75 * step)
    shared = int(np.sum(gaps <= tolerance)) if step > 0 else len(gaps)
    if step <= 1e-3 or shared > len(gaps) // 2:
        raise InputError(
            f"DICOM series in '{folder}': several of its {len(files)} images share a slice position (echoes, "
            "cardiac phases or time points in one series?); one volume holds one image per position: "
            "export one echo/phase as its own series"
        )
    odd = sorted({round(float(g), 3) for g in gaps if abs(g - step) > tolerance})
    if odd:
        raise InputError(
            f"DICOM series in '{folder}': its {len(files)} slices are not evenly spaced (usual step {step:g} mm, "
            f"also {', '.join(f'{g:g}' for g in odd[:4])} mm): a slice is missing, repeated or unreadable, and "
            "the slices after it would be misplaced; complete the series, or convert it with a tool that "
            "resamples irregular series"
        )


# -- writing ------------------------------------------------------------------------------------


def _check_parent(path: Path, parent: Path) -> None:
    """A file where the output's folder (or one above it) should be: say so, not "File exists"."""
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise InputError(f"cannot write '{path}': '{folder}' is a file, not a folder")
            return


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it onto ``path`` on success.

    A crash or cancel mid-write leaves no partial file under the final name.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    _check_parent(path, parent)
    try:  # a folder that cannot be made or written to (a file on the way, no permission, disk full)
        if not parent.exists():
            parent.mkdir(parents=True, exist_ok=True)
        # lower case: ITK picks its writer from the suffix and refuses ".NII.GZ"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{suffix.lower()}", dir=parent)
        os.close(fd)
    except OSError as exc:
        raise InputError(f"cannot write '{path}': {exc.strerror or exc}") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, _default_mode())  # mkstemp makes 0600; a new file should follow the umask
        try:
            os.replace(tmp_path, path)
        except OSError as exc:
            raise InputError(f"cannot write '{path}': {exc.strerror or exc}") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _default_mode() -> int:
    """The permission bits a newly created file gets under the current umask (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: formats whose header names a separate data file (ITK writes ``name.raw`` / ``name.zraw`` / ``name.raw.gz``)
DETACHED_SUFFIXES = (".nhdr", ".mhd")


def files_of(path: str | os.PathLike, written: bool = False) -> list[Path]:
    """Every file an image at ``path`` occupies: itself and its companions (an Analyze/NIfTI pair's
    ``.hdr`` / ``.img``, BART's ``.cfl`` / ``.hdr``, the data file a ``.mhd`` / ``.nhdr`` header names).

    ``written``: the files writing ``path`` may create (a detached header's ``.raw``, ``.zraw``,
    ``.raw.gz``), rather than those an existing header names. Used to keep outputs off inputs.
    """
    path = Path(path)
    name = path.name
    lower = name.lower()
    out = [path]
    def other(suffix: str) -> Path:  # in the case of the name's own suffix (X.IMG -> X.HDR)
        return path.with_name(name[:-4] + (suffix.upper() if name[-3:].isupper() else suffix))

    if lower.endswith(".img") or lower.endswith(".cfl"):
        out.append(other(".hdr"))
    elif lower.endswith(".hdr"):
        out += [other(".img"), other(".cfl")]
    elif lower.endswith(DETACHED_SUFFIXES):
        stem = name[: -len(Path(name).suffix)]
        if written:
            out += [path.with_name(stem + s) for s in (".raw", ".zraw", ".raw.gz")]
        else:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                head = path.read_bytes()[:65536].decode("latin-1")
                for line in head.splitlines():
                    key, sep, value = line.partition("=" if lower.endswith(".mhd") else ":")
                    if sep and key.strip().lower().replace(" ", "") in ("elementdatafile", "datafile"):
                        value = value.strip()
                        if value and value.upper() not in ("LOCAL", "LIST") and "%" not in value:
                            out.append(path.parent / value)
    return out


def _write_detached(image: Any, path: Path, compress: bool) -> None:
    """Write a detached-header image under its final names: into a private folder beside ``path``, then
    move the data file(s) and last the header, so the header names the final data file and appears
    only once its data is in place (a temporary name would be written into the header)."""
    sitk = _sitk()
    parent = path.parent if str(path.parent) else Path(".")
    _check_parent(path, parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".part", dir=parent))
    except OSError as exc:
        raise InputError(f"cannot write '{path}': {exc.strerror or exc}") from None
    try:
        target = work / path.name
        try:
            sitk.WriteImage(image, str(target), compress)
        except RuntimeError as exc:
            raise InputError(f"cannot write '{path}': {_itk_message(exc)}") from exc
        for item in sorted(work.iterdir(), key=lambda f: f.name == path.name):  # header last
            os.replace(item, parent / item.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a volume (format from the suffix); atomically, so no partial file is ever left."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in VOLUME_SUFFIXES:
        raise InputError(
            f"output '{path}': unknown format '{suffix}'; expected one of {', '.join(VOLUME_SUFFIXES)}"
        )
    if suffix in (".jpg", ".jpeg") and volume.channels not in (1, 3):
        raise InputError(
            f"output '{path}': JPEG holds grey or RGB images, got {volume.channels} channels (one would be lost); "
            "use .png, .tif or .nrrd"
        )
    if suffix in _RGB_SUFFIXES:
        if volume.ndim != 2 and not (volume.ndim == 3 and volume.spatial_shape[2] == 1):
            raise InputError(f"output '{path}': {suffix} holds 2D images, got a {volume.ndim}D volume; use .nii.gz or .nrrd")
        if volume.numpy().dtype not in (np.uint8, np.uint16) and suffix in INTEGER_ONLY_SUFFIXES:
            raise InputError(
                f"output '{path}': {suffix} stores 8/16-bit integers, got {volume.numpy().dtype}; "
                "write a picture with meddl convert IN -o OUT.png --to-uint8, or use .nrrd / .tif"
            )
    sitk = _sitk()
    if suffix not in _RGB_SUFFIXES and _out_of_plane(volume):  # a slice placed in 3D: kept as one-slice 3D
        volume = Volume(volume.numpy()[..., None], volume.affine, volume.kind, dict(volume.meta))
    image = to_sitk(volume)
    if suffix in DETACHED_SUFFIXES:
        _write_detached(image, path, compress)
        return path
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress and suffix not in _RGB_SUFFIXES)
        except RuntimeError as exc:
            raise InputError(f"cannot write '{path}': {_itk_message(exc)}") from exc
    return path


def write_dicom_series(volume: Volume, folder: str | os.PathLike, series_uid: str | None = None) -> list[Path]:
    """Write a scalar 3D volume as a DICOM series (one file per slice, int16 or uint16).

    Geometry goes into ImagePositionPatient / ImageOrientationPatient / PixelSpacing, so
    :func:`read` of the folder gives back the same image in space (a volume whose slice axis points
    against the slice order DICOM readers sort by comes back with that axis reversed, affine to match).
    """
    sitk = _sitk()
    if volume.ndim != 3 or volume.channels != 1:
        raise InputError(f"DICOM series: expected a scalar 3D volume, got {volume!r}")
    data = volume.numpy()
    if data.dtype not in (np.int16, np.uint16):
        raise InputError(f"DICOM series: expected int16 or uint16 voxels, got {data.dtype}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = to_sitk(volume)
    uid = series_uid or "1.2.826.0.1.3680043.2.1125." + str(abs(hash(str(folder))) % 10**12)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    out = []
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0020|000e": uid,
            "0020|000d": uid + ".1",
            "0008|0060": "MR",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{p:.10g}" for p in pos),
            "0020|0013": str(k + 1),
            "0028|0030": f"{image.GetSpacing()[1]:.10g}\\{image.GetSpacing()[0]:.10g}",
            "0018|0050": f"{image.GetSpacing()[2]:.10g}",
            "0008|0018": f"{uid}.{k + 1}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        target = folder / f"slice{k:04d}.dcm"
        writer.SetFileName(str(target))
        writer.Execute(sl)
        out.append(target)
    return out
