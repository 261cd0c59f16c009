"""ISMRMRD raw data (``.h5`` with a ``dataset`` group) through the ``ismrmrd`` package.

Acquisitions are placed into Cartesian k-space by their encoding counters: slice
``idx.slice``, phase-encoding column ``idx.kspace_encode_step_1`` shifted so the header's
``kspace_encoding_step_1`` centre lands at ``W // 2`` (fastMRI's padding rule); repeated lines
(averages, repetitions, segments, integrated calibration lines) are averaged; repetitions that
sample different lines are merged that way too, with a notice (``attrs["notice"]``). Noise, navigator and
phase-correction acquisitions are skipped. 3D Cartesian encoding (a second phase-encoding
direction) and several contrasts, cardiac phases or sets in one file are refused, not mixed. Readout oversampling (encoded field of view larger than the recon one along x) is
removed by cropping the centre of the inverse FFT along the readout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DependencyError, InputError
from .kspace import Header, KSpaceData, header_xml, open_hdf5, parse_header, select_slices

__all__ = ["read_ismrmrd", "write_ismrmrd"]


def _package():
    try:
        import ismrmrd
    except ImportError as exc:
        raise DependencyError(
            "ISMRMRD files: the package 'ismrmrd' is needed; install it with pip install ismrmrd"
        ) from exc
    return ismrmrd


#: encoding counters whose non-zero values mean data that must not be averaged into one 2D k-space
_SEPARATE = ("kspace_encode_step_2", "contrast", "phase", "set")


def _remove_oversampling(k: np.ndarray, keep: int) -> np.ndarray:
    """Crop the readout axis (-2) of k-space to ``keep`` samples in the image domain."""
    n = k.shape[-2]
    if keep >= n:
        return k
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, axes=-2), axis=-2, norm="ortho"), axes=-2)
    start = (n - keep) // 2
    img = img[..., start : start + keep, :] * np.sqrt(keep / n)
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-2), axis=-2, norm="ortho"), axes=-2)


def read_ismrmrd(
    path: str | os.PathLike, slices: tuple[int, ...] | None = None, dataset: str = "dataset",
    repetition: int | None = None,
) -> KSpaceData:
    """Read a Cartesian ISMRMRD dataset into ``(S, C, H, W)`` k-space (readout oversampling removed).

    ``repetition``: keep only the acquisitions of this repetition (as acquired, e.g. undersampled);
    default: every repetition, lines measured more than once averaged.
    """
    ismrmrd = _package()
    path = Path(path)
    open_hdf5(path).close()  # the same checks as fastMRI files (missing, text, truncated)
    try:
        dset = ismrmrd.Dataset(str(path), dataset, mode="r")
    except OSError as exc:
        raise InputError(f"cannot read '{path}': corrupt or truncated HDF5 file ({exc})") from exc
    try:
        try:
            xml = dset.read_xml_header()
        except (LookupError, OSError):
            raise InputError(
                f"'{path}': expected an ISMRMRD XML header in '{dataset}/xml', got none; the file is incomplete"
            ) from None
        except (ValueError, TypeError) as exc:  # e.g. a scalar dataset where ISMRMRD writes an array
            raise InputError(f"'{path}': the ISMRMRD XML header in '{dataset}/xml' is not stored as ISMRMRD writes "
                             f"it ({exc})") from None
        header = parse_header(xml)
        try:
            n = dset.number_of_acquisitions()
        except (LookupError, OSError, ValueError, TypeError):
            raise InputError(f"'{path}': expected acquisitions in '{dataset}/data' (raw k-space), got none") from None
        enc_x, enc_y = header.encoded_matrix[:2]
        if header.encoded_matrix[2] > 1:
            raise InputError(
                f"'{path}': a 3D Cartesian acquisition (encoded matrix z = {header.encoded_matrix[2]}); only 2D "
                "(multi-slice) k-space is read, reconstruct 3D data with BART or the ISMRMRD tools"
            )
        offset = enc_y // 2 - header.step1_limits[2] if header.step1_limits else 0
        skip = [
            getattr(ismrmrd, f)
            for f in (
                "ACQ_IS_NOISE_MEASUREMENT",
                "ACQ_IS_NAVIGATION_DATA",
                "ACQ_IS_PHASECORR_DATA",
                "ACQ_IS_DUMMYSCAN_DATA",
            )
        ]
        lines: dict[tuple[int, int], list[np.ndarray]] = {}
        rep_lines: dict[int, set[tuple[int, int]]] = {}
        coils = None
        for a in range(n):
            try:
                acq = dset.read_acquisition(a)
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read '{path}': acquisition {a} is corrupt or truncated ({exc})") from exc
            if any(acq.is_flag_set(f) for f in skip):
                continue
            data = np.asarray(acq.data)
            if data.shape[1] != enc_x:
                raise InputError(
                    f"'{path}': acquisition {a} has {data.shape[1]} readout samples, but the header's encoded "
                    f"matrix x is {enc_x}; the file is inconsistent"
                )
            if coils is None:
                coils = data.shape[0]
            elif data.shape[0] != coils:
                raise InputError(f"'{path}': acquisitions have {coils} and {data.shape[0]} coils; expected one count")
            extra = {name: int(getattr(acq.idx, name)) for name in _SEPARATE}
            if any(extra.values()):
                what = ", ".join(f"{k} {v}" for k, v in extra.items() if v)
                raise InputError(
                    f"'{path}': acquisition {a} has {what}; several partitions, contrasts (echoes), cardiac "
                    "phases or sets are not merged into one image here, split the file by them first"
                )
            rep = int(acq.idx.repetition)
            if repetition is not None and rep != repetition:
                rep_lines.setdefault(rep, set())
                continue
            ky = int(acq.idx.kspace_encode_step_1) + offset
            if not 0 <= ky < enc_y:
                raise InputError(
                    f"'{path}': acquisition {a} phase-encoding line {ky} lies outside the encoded matrix y "
                    f"({enc_y}); the header and data disagree"
                )
            lines.setdefault((int(acq.idx.slice), ky), []).append(data)
            rep_lines.setdefault(rep, set()).add((int(acq.idx.slice), ky))
    finally:
        dset.close()
    if repetition is not None and repetition not in rep_lines:
        found = ", ".join(str(r) for r in sorted(rep_lines)) or "none"
        raise InputError(f"--repetition: expected one of the file's repetitions ({found}), got {repetition}")
    if not lines:
        raise InputError(f"'{path}': expected imaging acquisitions, got only noise/navigator data")
    n_slices = max(s for s, _ in lines) + 1
    kspace = np.zeros((n_slices, coils, enc_x, enc_y), dtype=np.complex64)
    for (s, ky), items in lines.items():
        kspace[s, :, :, ky] = np.mean(items, axis=0)
    if slices is not None:
        kspace = kspace[select_slices(n_slices, slices, path)]
    ef, rf = header.encoded_fov_mm, header.recon_fov_mm
    keep = enc_x
    if ef[0] > 0 and rf[0] > 0 and rf[0] < ef[0]:
        keep = int(round(enc_x * rf[0] / ef[0]))
    kspace = _remove_oversampling(kspace, keep).astype(np.complex64)
    header = Header(
        (keep, enc_y, header.encoded_matrix[2]),
        (ef[0] * keep / enc_x, ef[1], ef[2]),
        header.recon_matrix,
        header.recon_fov_mm,
        header.step1_limits,
        header.slices,
        header.coils,
    )
    attrs: dict = {}
    if len(rep_lines) > 1:
        attrs["repetitions"] = len(rep_lines)
        if repetition is not None:
            attrs["repetition"] = repetition
        elif len({frozenset(v) for v in rep_lines.values()}) > 1:
            # e.g. ismrmrd_generate_cartesian_shepp_logan -a 4: each repetition samples other lines
            attrs["notice"] = (
                f"{len(rep_lines)} repetitions sample different k-space lines; they were merged into one "
                "k-space (lines measured more than once averaged), which is right for a static object only; "
                "--repetition N reconstructs one as it was acquired")
        else:
            attrs["notice"] = (f"{len(rep_lines)} repetitions of the same k-space lines were averaged (less noise; "
                               "a moving object blurs); --repetition N reconstructs one")
    return KSpaceData(kspace, header, None, None, coils == 1, str(path), "ismrmrd", attrs)


def write_ismrmrd(
    path: str | os.PathLike,
    kspace: np.ndarray,
    fov_mm: tuple[float, float, float] = (220.0, 220.0, 5.0),
    oversampling: int = 2,
) -> Path:
    """Write k-space ``(S, C, H, W)`` as an ISMRMRD dataset, one acquisition per line and slice.

    The readout is oversampled ``oversampling`` times (zero-padded in the image domain), as
    scanners store it; :func:`read_ismrmrd` removes it again.
    """
    ismrmrd = _package()
    kspace = np.asarray(kspace, dtype=np.complex64)
    s, c, h, w = kspace.shape
    hx = h * oversampling
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(kspace, axes=-2), axis=-2, norm="ortho"), axes=-2)
    big = np.zeros((s, c, hx, w), dtype=np.complex64)
    big[:, :, (hx - h) // 2 : (hx - h) // 2 + h] = img * np.sqrt(hx / h)
    kbig = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(big, axes=-2), axis=-2, norm="ortho"), axes=-2)
    header = Header(
        (hx, w, 1), (fov_mm[0] * oversampling, fov_mm[1], fov_mm[2]), (h, w, 1), tuple(fov_mm), (0, w - 1, w // 2), s, c
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    try:
        dset.write_xml_header(header_xml(header).encode())
        for sl in range(s):
            for ky in range(w):
                acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(kbig[sl, :, :, ky]), center_sample=hx // 2)
                acq.idx.kspace_encode_step_1 = ky
                acq.idx.slice = sl
                if ky == 0:
                    acq.set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
                if ky == w - 1:
                    acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
                dset.append_acquisition(acq)
    finally:
        dset.close()
    return path
