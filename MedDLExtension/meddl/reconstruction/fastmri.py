"""fastMRI HDF5 files: read (with every check a user's file needs) and write (synthetic files).

Layout (SCIENCE.md): ``kspace`` complex64 ``(slices, coils, H, W)`` or single-coil
``(slices, H, W)``; ``ismrmrd_header`` XML; optional ``mask`` (test files: undersampled k-space
and a 1-D column mask); optional ``reconstruction_rss`` ``(slices, h, w)``; file attributes
``acquisition``, ``max``, ``norm``, ``patient_id``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .kspace import Header, KSpaceData, header_xml, open_hdf5, parse_header, select_slices

__all__ = ["read_fastmri", "write_fastmri"]


def read_fastmri(path: str | os.PathLike, slices: tuple[int, ...] | None = None) -> KSpaceData:
    """Read a fastMRI file; ``slices`` picks slice indices (default all).

    Raises :class:`~meddl.errors.InputError` for a missing ``kspace``, real-valued data, a missing
    or unreadable header, k-space that disagrees with the header's encoded matrix, a mask of the
    wrong length, and unreadable (non-HDF5, truncated) files.
    """
    path = Path(path)
    f = open_hdf5(path)
    try:
        if "kspace" not in f:
            found = ", ".join(f.keys()) or "nothing"
            raise InputError(f"'{path}': expected a dataset 'kspace' (fastMRI), got {found}")
        ds = f["kspace"]
        if not hasattr(ds, "dtype") or not hasattr(ds, "shape"):
            raise InputError(f"'{path}': expected 'kspace' to be a dataset (an array), got an HDF5 {type(ds).__name__.lower()}")
        if not np.issubdtype(ds.dtype, np.complexfloating):
            raise InputError(
                f"'{path}' kspace: expected complex k-space, got real {ds.dtype} data; raw k-space is complex "
                "(is this an image or magnitude file?)"
            )
        if ds.ndim not in (3, 4):
            raise InputError(
                f"'{path}' kspace: expected (slices, coils, H, W) or single-coil (slices, H, W), got shape {ds.shape}"
            )
        if "ismrmrd_header" not in f:
            raise InputError(
                f"'{path}': expected an 'ismrmrd_header' dataset (the XML giving matrix and field of view), "
                "got none; the file is incomplete"
            )
        header = parse_header(f["ismrmrd_header"][()])
        single = ds.ndim == 3
        h, w = ds.shape[-2:]
        if (h, w) != header.encoded_matrix[:2]:
            raise InputError(
                f"'{path}': k-space shape (H, W) = ({h}, {w}) disagrees with the header's encoded matrix "
                f"({header.encoded_matrix[0]}, {header.encoded_matrix[1]}); the file is inconsistent"
            )
        index = select_slices(ds.shape[0], slices, path)
        try:
            kspace = np.asarray(ds[index] if slices is not None else ds[()], dtype=np.complex64)
            mask = np.asarray(f["mask"][()]).astype(bool).reshape(-1) if "mask" in f else None
            target = None
            if "reconstruction_rss" in f:
                tds = f["reconstruction_rss"]
                target = np.asarray(tds[index] if slices is not None else tds[()], dtype=np.float32)
        except (OSError, KeyError) as exc:
            raise InputError(
                f"cannot read '{path}': corrupt or truncated HDF5 data ({str(exc).splitlines()[0][:160]}); "
                "copy it again"
            ) from exc
        attrs = {  # scalar attributes (fastMRI's acquisition, max, norm, patient_id); arrays are not kept
            k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v)
            for k, v in f.attrs.items()
            if isinstance(v, (bytes, str)) or np.size(v) == 1
        }
    finally:
        f.close()
    if single:
        kspace = kspace[:, None]
    if mask is not None and mask.size != w:
        raise InputError(f"'{path}' mask: expected {w} entries (one per k-space column), got {mask.size}")
    if not np.all(np.isfinite(kspace.view(np.float32))):
        raise InputError(f"'{path}' kspace: expected finite values, got NaN or infinite samples")
    return KSpaceData(
        kspace,
        header,
        mask,
        target,
        single,
        str(path),
        "fastmri",
        {k: v for k, v in attrs.items() if isinstance(v, (str, int, float))},
    )


def write_fastmri(
    path: str | os.PathLike,
    kspace: np.ndarray,
    fov_mm: tuple[float, float, float] = (220.0, 220.0, 5.0),
    recon_matrix: tuple[int, int] | None = None,
    mask: np.ndarray | None = None,
    target: np.ndarray | None = None,
    acquisition: str = "SIMULATED",
    **attrs,
) -> Path:
    """Write k-space ``(S, C, H, W)`` (or single-coil ``(S, H, W)``) as a fastMRI-style file.

    ``fov_mm`` is the field of view of the full encoded matrix (readout, phase, slice thickness);
    the recon space keeps the same pixel size over ``recon_matrix`` (default the full matrix).
    """
    import h5py

    kspace = np.asarray(kspace, dtype=np.complex64)
    h, w = kspace.shape[-2:]
    rm = recon_matrix or (h, w)
    header = Header(
        (h, w, 1),
        tuple(float(v) for v in fov_mm),
        (rm[0], rm[1], 1),
        (fov_mm[0] * rm[0] / h, fov_mm[1] * rm[1] / w, fov_mm[2]),
        (0, w - 1, w // 2),
        kspace.shape[0],
        kspace.shape[1] if kspace.ndim == 4 else 1,
    )
    from ..io import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("kspace", data=kspace)
        f.create_dataset("ismrmrd_header", data=header_xml(header).encode())
        if mask is not None:
            f.create_dataset("mask", data=np.asarray(mask, dtype=bool).reshape(-1))
        if target is not None:
            f.create_dataset("reconstruction_rss", data=np.asarray(target, dtype=np.float32))
            f.attrs["max"] = float(np.max(target))
        f.attrs["acquisition"] = acquisition
        for k, v in attrs.items():
            f.attrs[k] = v
    return Path(path)
