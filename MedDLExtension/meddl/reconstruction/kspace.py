"""Raw k-space as read from a file: the data, its ISMRMRD header and the geometry it implies.

The readers (fastMRI HDF5 in :mod:`.fastmri`, ISMRMRD datasets in :mod:`.ismrmrd_io`, BART
``.cfl`` pairs in :mod:`.bart_io`) return a
:class:`KSpaceData`: Cartesian k-space ``(S, C, H, W)`` complex64 (slices, coils, readout,
phase encoding), the parsed header, an optional 1-D column mask and an optional
reference image. :func:`read_kspace` picks the reader from the file's content.

Geometry: fastMRI and ISMRMRD headers give the field of view and matrix but no patient position,
so images are placed centred on the origin with rows (readout) along P->A reversed (posterior
downwards on screen, as fastMRI shows them), columns along L and slices along S. Pixel spacing
is ``reconSpace fieldOfView_mm / reconSpace matrixSize``; the slice spacing is the recon field of
view along z (the slice thickness: fastMRI's knee headers give 3 mm there and 4.5 mm, slice
oversampling included, in the encoded one), else the encoded one.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..volume import affine_from_geometry
from .masks import MaskInfo, detect_mask

__all__ = ["Header", "KSpaceData", "parse_header", "header_xml", "read_kspace", "is_kspace", "open_hdf5",
           "select_slices",
           "describe"]

_NS = "{http://www.ismrm.org/ISMRMRD}"


@dataclass(frozen=True)
class Header:
    """What reconstruction needs from an ISMRMRD XML header (first encoding)."""

    encoded_matrix: tuple[int, int, int]
    encoded_fov_mm: tuple[float, float, float]
    recon_matrix: tuple[int, int, int]
    recon_fov_mm: tuple[float, float, float]
    step1_limits: tuple[int, int, int] | None = None  # kspace_encoding_step_1 (minimum, maximum, center)
    slices: int | None = None  # encodingLimits/slice maximum + 1
    coils: int | None = None  # acquisitionSystemInformation/receiverChannels

    @property
    def padding(self) -> tuple[int, int]:
        """fastMRI's zero-padded phase-encoding band: ``(padding_left, padding_right)``."""
        enc_y = self.encoded_matrix[1]
        if self.step1_limits is None:
            return 0, enc_y
        _, maximum, center = self.step1_limits
        left = enc_y // 2 - center
        return left, left + maximum + 1

    @property
    def readout_oversampling(self) -> float:
        return self.encoded_matrix[0] / max(self.recon_matrix[0], 1)


def _find(node: ET.Element, path: str) -> ET.Element | None:
    parts = path.split("/")
    for p in parts:
        if node is None:
            return None
        node = node.find(_NS + p) if node.find(_NS + p) is not None else node.find(p)
    return node


def _triple(node: ET.Element, path: str, cast, where: str) -> tuple:
    el = _find(node, path)
    if el is None:
        raise InputError(f"ISMRMRD header: expected {where}/{path.split('/')[-1]}, got none")
    try:
        return tuple(cast(_find(el, a).text) for a in ("x", "y", "z"))
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"ISMRMRD header: expected numbers x, y, z in {path}, got unreadable values") from exc


def parse_header(xml: str | bytes) -> Header:
    """Parse the ``ismrmrd_header`` XML (namespace http://www.ismrm.org/ISMRMRD)."""
    if isinstance(xml, (bytes, np.bytes_)):
        xml = bytes(xml).decode("utf-8", errors="replace")
    try:
        root = ET.fromstring(str(xml).strip())
    except ET.ParseError as exc:
        raise InputError(f"ISMRMRD header: expected XML, got unparsable text ({exc})") from exc
    enc = _find(root, "encoding")
    if enc is None:
        raise InputError("ISMRMRD header: expected an <encoding> element, got none")
    em = _triple(enc, "encodedSpace/matrixSize", int, "encodedSpace")
    ef = _triple(enc, "encodedSpace/fieldOfView_mm", float, "encodedSpace")
    rm = _triple(enc, "reconSpace/matrixSize", int, "reconSpace")
    rf = _triple(enc, "reconSpace/fieldOfView_mm", float, "reconSpace")
    limits = None
    e1 = _find(enc, "encodingLimits/kspace_encoding_step_1")
    if e1 is not None:
        try:
            limits = tuple(int(_find(e1, a).text) for a in ("minimum", "maximum", "center"))
        except (AttributeError, TypeError, ValueError):
            limits = None
    slices = None
    sl = _find(enc, "encodingLimits/slice/maximum")
    if sl is not None and sl.text:
        slices = int(sl.text) + 1
    coils = None
    rc = _find(root, "acquisitionSystemInformation/receiverChannels")
    if rc is not None and rc.text:
        coils = int(rc.text)
    return Header(em, ef, rm, rf, limits, slices, coils)


def header_xml(header: Header) -> str:
    """An ISMRMRD XML header for ``header`` (what the synthetic files in tests and demos carry)."""

    def xyz(tag: str, v) -> str:
        return f"<{tag}><x>{v[0]}</x><y>{v[1]}</y><z>{v[2]}</z></{tag}>"

    limits = ""
    if header.step1_limits is not None:
        mn, mx, c = header.step1_limits
        limits = (
            f"<kspace_encoding_step_1><minimum>{mn}</minimum><maximum>{mx}</maximum>"
            f"<center>{c}</center></kspace_encoding_step_1>"
        )
    if header.slices:
        limits += f"<slice><minimum>0</minimum><maximum>{header.slices - 1}</maximum><center>0</center></slice>"
    system = (
        (
            f"<acquisitionSystemInformation><receiverChannels>{header.coils}</receiverChannels>"
            "</acquisitionSystemInformation>"
        )
        if header.coils
        else ""
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
        f"{system}<encoding><trajectory>cartesian</trajectory>"
        f"<encodedSpace>{xyz('matrixSize', header.encoded_matrix)}{xyz('fieldOfView_mm', header.encoded_fov_mm)}"
        f"</encodedSpace><reconSpace>{xyz('matrixSize', header.recon_matrix)}"
        f"{xyz('fieldOfView_mm', header.recon_fov_mm)}</reconSpace>"
        f"<encodingLimits>{limits}</encodingLimits></encoding></ismrmrdHeader>"
    )


@dataclass(frozen=True)
class KSpaceData:
    """Cartesian multi-coil k-space of a stack of 2-D slices.

    Attributes:
        kspace: ``(S, C, H, W)`` complex64 (readout along H, phase encoding along W).
        header: the parsed ISMRMRD header.
        mask: the file's 1-D column mask ``(W,)`` (fastMRI test files), or None.
        target: a reference magnitude ``(S, h, w)`` from the file (``reconstruction_rss``), or None.
        single_coil: the file held single-coil ``(S, H, W)`` data (C is then 1).
        source: the path read.
        format: ``"fastmri"``, ``"ismrmrd"`` or ``"bart"``.
        attrs: small facts from the file (acquisition, patient id, ...).
    """

    kspace: np.ndarray
    header: Header
    mask: np.ndarray | None = None
    target: np.ndarray | None = None
    single_coil: bool = False
    source: str = ""
    format: str = "fastmri"
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def slices(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def coils(self) -> int:
        return int(self.kspace.shape[1])

    @property
    def matrix(self) -> tuple[int, int]:
        return int(self.kspace.shape[2]), int(self.kspace.shape[3])

    @property
    def image_shape(self) -> tuple[int, int]:
        """The reconstructed image size: the recon matrix (centre crop), at most the k-space size."""
        h, w = self.matrix
        return min(h, self.header.recon_matrix[0]), min(w, self.header.recon_matrix[1])

    def sampling(self) -> MaskInfo:
        """Mask, acceleration and centre fraction found in the data (or the file's mask)."""
        return detect_mask(self.kspace, self.mask, self.header.padding)

    def geometry_notice(self) -> str | None:
        """What :meth:`affine` had to assume because the header gives no field of view, or None."""
        rm, rf = self.header.recon_matrix, self.header.recon_fov_mm
        missing = []
        if not (rm[0] and rf[0] > 0 and rm[1] and rf[1] > 0):
            where = "BART data carry no geometry" if self.format == "bart" else "reconSpace fieldOfView_mm"
            missing.append(f"no in-plane field of view ({where}): 1 mm pixels assumed")
        if not self._slice_mm() > 0 and self.slices > 1:
            where = "BART data carry no geometry" if self.format == "bart" else \
                "reconSpace or encodedSpace fieldOfView_mm z"
            missing.append(f"no slice thickness ({where}): 1 mm slice spacing "
                           "assumed")
        return "; ".join(missing) or None

    def _slice_mm(self) -> float:
        """Slice thickness from the header: the recon field of view along z, else the encoded one (0: none)."""
        for fov in (self.header.recon_fov_mm[2], self.header.encoded_fov_mm[2]):
            if fov > 0:
                return float(fov)
        return 0.0

    def affine(self) -> np.ndarray:
        """4x4 voxel-to-RAS affine of the ``(image_shape..., S)`` output volume (see module doc).

        A field of view missing from the header (0) gives 1 mm spacing (:meth:`geometry_notice`)."""
        rm, rf = self.header.recon_matrix, self.header.recon_fov_mm
        dy = rf[0] / rm[0] if rm[0] and rf[0] > 0 else 1.0
        dx = rf[1] / rm[1] if rm[1] and rf[1] > 0 else 1.0
        dz = self._slice_mm() or 1.0
        spacing = np.array([dy, dx, dz])
        direction = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # columns: i->P, j->L, k->S
        shape = np.array([*self.image_shape, self.slices], dtype=np.float64)
        centre = direction @ (spacing * (shape - 1) / 2)
        return affine_from_geometry(spacing, -centre, direction)

    def info(self) -> dict[str, Any]:
        """What a user wants to see before reconstructing (the Slicer panel's header box)."""
        s = self.sampling()
        return {
            "format": self.format,
            "slices": self.slices,
            "coils": self.coils,
            "single_coil": self.single_coil,
            "kspace_matrix": list(self.matrix),
            "image_matrix": list(self.image_shape),
            "fov_mm": [round(v, 3) for v in self.header.recon_fov_mm],
            "acceleration": round(s.acceleration, 3),
            "center_fraction": round(s.center_fraction, 4),
            "calibration_lines": s.calibration.stop - s.calibration.start,
            "has_reference": self.target is not None,
        } | {k: v for k, v in self.attrs.items() if isinstance(v, (str, int, float))}


def select_slices(n: int, slices: tuple[int, ...] | None, path: str | os.PathLike) -> list[int]:
    """The slice indices ``--slices`` picks from a file of ``n`` slices (default all), in order.

    One output volume holds evenly spaced slices, and its geometry assumes neighbours, so the
    choice must be one consecutive run (repeats are merged); gaps and negative indices are refused.
    """
    if slices is None:
        return list(range(n))
    name = Path(path).name
    if not slices:
        raise InputError(f"--slices: expected at least one slice index for '{name}', got none")
    bad = [s for s in slices if not 0 <= s < n]
    if bad:
        raise InputError(f"--slices: expected indices in 0..{n - 1} for '{name}', got {bad}")
    chosen = sorted(set(slices))
    if chosen[-1] - chosen[0] + 1 != len(chosen):
        raise InputError(
            f"--slices: expected consecutive slices for one volume (its slice spacing is the file's), got "
            f"{', '.join(str(s) for s in chosen)} for '{name}'; give a range such as {chosen[0]}:{chosen[-1] + 1}, "
            "or reconstruct the slices one at a time"
        )
    return chosen


def open_hdf5(path: str | os.PathLike):
    """Open an HDF5 file read-only, turning every way it can be unreadable into an InputError."""
    import h5py

    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise InputError(f"cannot read '{path}': {what}")
    if path.stat().st_size == 0:
        raise InputError(f"cannot read '{path}': the file is empty")
    try:
        is_h5 = h5py.is_hdf5(str(path))
    except OSError:
        is_h5 = False
    if not is_h5:
        name = path.name.lower()
        image = name.endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff",
                               ".jpg", ".jpeg", ".dcm"))
        hint = ("an image, not k-space: simulate its k-space first with meddl simulate-kspace IMAGE -o kspace.h5"
                if image else "no HDF5 signature; is it a text file or a different format?")
        raise InputError(
            f"cannot read '{path}': expected an HDF5 file (fastMRI or ISMRMRD) or BART .cfl/.hdr data, got "
            f"something else ({hint})"
        )
    try:
        return h5py.File(str(path), "r")
    except OSError as exc:
        raise InputError(
            f"cannot read '{path}': corrupt or truncated HDF5 file ({str(exc).splitlines()[0][:160]}); copy it again"
        ) from exc


def is_kspace(path: str | os.PathLike) -> bool:
    """Whether ``path`` names k-space :func:`read_kspace` takes (a fastMRI or ISMRMRD HDF5 file, BART
    data), judged cheaply (suffix, HDF5 signature, top-level names); never raises."""
    from .bart_io import cfl_pair

    p = Path(path)
    if cfl_pair(p) is not None:
        return True
    if not (p.is_file() and p.suffix.lower() in (".h5", ".hdf5")):
        return False
    try:
        import h5py

        if not h5py.is_hdf5(str(p)):
            return False
        with h5py.File(str(p), "r") as f:
            return "kspace" in f or "dataset" in f  # not another HDF5 file (an ITK transform, ...)
    except (ImportError, OSError):
        return False


def read_kspace(path: str | os.PathLike, slices: tuple[int, ...] | None = None,
                repetition: int | None = None) -> KSpaceData:
    """Read a fastMRI HDF5 file, an ISMRMRD dataset (chosen by what the file holds) or BART ``.cfl`` data.

    ``repetition``: ISMRMRD datasets only, keep the acquisitions of that repetition (default: all).
    """
    from .bart_io import cfl_pair, read_cfl

    def no_repetitions(fmt: str) -> None:
        if repetition is not None:
            raise InputError(f"--repetition: '{path}' is {fmt} data, which has no repetition counter (ISMRMRD "
                             "files do)")

    if cfl_pair(path) is not None:
        no_repetitions("BART")
        return read_cfl(path, slices=slices)
    f = open_hdf5(path)
    try:
        names = list(f.keys())
    finally:
        f.close()
    if "kspace" in names:
        from .fastmri import read_fastmri

        no_repetitions("fastMRI")
        return read_fastmri(path, slices=slices)
    if "dataset" in names:
        from .ismrmrd_io import read_ismrmrd

        return read_ismrmrd(path, slices=slices, repetition=repetition)
    found = ", ".join(names) if names else "nothing"
    raise InputError(f"'{path}': expected a dataset 'kspace' (fastMRI) or a group 'dataset' (ISMRMRD), got {found}")


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What a panel shows before reconstructing (coils, matrix, acceleration found, ...), cheaply.

    Reads only the first slice of a fastMRI file (an ISMRMRD dataset is read whole); raises the
    same :class:`~meddl.errors.InputError` as :func:`read_kspace` for a bad file.
    """
    data = read_kspace(path, slices=(0,))
    info = data.info()
    if data.format == "fastmri":
        f = open_hdf5(path)
        try:
            info["slices"] = int(f["kspace"].shape[0])
        finally:
            f.close()
    return info
