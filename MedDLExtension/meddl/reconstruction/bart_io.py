"""BART's ``.cfl`` / ``.hdr`` pairs: k-space from the BART toolbox, read as :class:`KSpaceData`.

Format (BART ``src/misc/mmio.c``): ``NAME.hdr`` is text, ``# Dimensions`` then one line of up to 16
positive integers; ``NAME.cfl`` holds the complex64 samples (little-endian float32 real, imaginary
pairs) in column-major (Fortran) order of those dimensions. BART names the dimensions (``bart
--help`` of ``transpose``; ``src/misc/mri.h``): 0 READ, 1 PHS1, 2 PHS2, 3 COIL, 4 MAPS, 5 TE,
6 COEFF, 7 COEFF2, 8 ITER, 9 CSHIFT, 10 TIME, 11 TIME2, 12 LEVEL, 13 SLICE, 14 AVG, 15 BATCH.

Here: ``kspace[s, c, h, w] = cfl[h, w, 0, c, ..., s (SLICE)]``, readout along H and the phase
encoding along W, as the other readers. 2D Cartesian data only: a PHS2 (partition) axis longer than
one, or any other dimension used, is refused with the BART command that would make the data 2D.
A ``.cfl`` file carries no geometry: 1 mm pixels and slices, with a notice
(:meth:`KSpaceData.geometry_notice`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .kspace import Header, KSpaceData, select_slices

__all__ = ["read_cfl", "load_cfl", "write_cfl", "write_kspace_cfl", "cfl_pair", "cfl_names", "BART_DIMS"]

BART_DIMS = ("READ", "PHS1", "PHS2", "COIL", "MAPS", "TE", "COEFF", "COEFF2", "ITER", "CSHIFT", "TIME",
             "TIME2", "LEVEL", "SLICE", "AVG", "BATCH")
_USED = {0, 1, 3, 13}  # READ, PHS1, COIL, SLICE


def cfl_pair(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(NAME.hdr, NAME.cfl)`` for ``NAME.cfl``, ``NAME.hdr`` or ``NAME`` when one of them names BART data."""
    path = Path(path)
    if not path.name or path.is_dir():  # ".", "/", a folder: never BART data
        return None
    suffix = path.suffix.lower()
    if suffix in (".cfl", ".hdr"):
        base = path.with_suffix("")
    elif path.with_suffix(path.suffix + ".cfl").is_file() and not path.is_file():
        base = path  # BART's own habit: the name without a suffix
    else:
        return None
    if suffix == ".hdr" and not base.with_name(base.name + ".cfl").exists() and not _is_bart_header(path):
        return None  # an Analyze header, not BART's
    return base.with_name(base.name + ".hdr"), base.with_name(base.name + ".cfl")


def _is_bart_header(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(12) == b"# Dimensions"
    except OSError:
        return False


def _dims(hdr: Path) -> list[int]:
    try:
        text = hdr.read_text(encoding="ascii", errors="strict")
    except FileNotFoundError:
        raise InputError(f"cannot read '{hdr}': BART data needs its .hdr beside the .cfl, and there is none") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise InputError(f"cannot read '{hdr}': not a BART header ({type(exc).__name__})") from None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("# Dimensions") and i + 1 < len(lines):
            try:
                dims = [int(v) for v in lines[i + 1].split()]
            except ValueError:
                break
            if 1 <= len(dims) <= len(BART_DIMS) and all(d >= 1 for d in dims):
                return dims + [1] * (len(BART_DIMS) - len(dims))
            break
    raise InputError(f"cannot read '{hdr}': expected a BART header ('# Dimensions' and a line of 1 to 16 positive "
                     "integers), got something else")


def load_cfl(path: str | os.PathLike) -> np.ndarray:
    """The raw array of BART data (``NAME.cfl``, ``NAME.hdr`` or ``NAME``): complex64, BART's 16
    dimensions in their order (a read-only memory map of the .cfl file)."""
    pair = cfl_pair(path)
    if pair is None:
        raise InputError(f"cannot read '{path}': expected a BART .cfl/.hdr pair")
    hdr, cfl = pair
    dims = _dims(hdr)
    if not cfl.is_file():
        raise InputError(f"cannot read '{cfl}': no such file (BART data is a .hdr and a .cfl side by side)")
    expected = math.prod(dims) * 8  # Python integers: no silent int64 wrap-around for absurd headers
    size = cfl.stat().st_size
    if size != expected:
        raise InputError(f"cannot read '{cfl}': expected {expected} bytes for dimensions {dims[:max(_last(dims), 4)]}, "
                         f"got {size}: a truncated or mismatched file; copy it again")
    return np.memmap(cfl, dtype="<c8", mode="r", shape=tuple(dims), order="F")


def read_cfl(path: str | os.PathLike, slices: tuple[int, ...] | None = None) -> KSpaceData:
    """Read BART k-space (``NAME.cfl``, ``NAME.hdr`` or ``NAME``) as ``(S, C, H, W)`` :class:`KSpaceData`."""
    data = load_cfl(path)
    cfl = path  # as the user named it, in messages
    dims = list(data.shape)
    if dims[2] > 1:
        raise InputError(
            f"'{cfl}': 3D k-space ({dims[2]} partitions along PHS2); meddl reconstructs 2D slices: make them "
            "first, e.g. bart fft -i -u 4 IN HYBRID; bart transpose 2 13 HYBRID SLICES (valid when PHS2 is "
            "fully sampled)")
    extra = [f"{BART_DIMS[d]} = {n}" for d, n in enumerate(dims) if n > 1 and d not in _USED]
    if extra:
        raise InputError(f"'{cfl}': expected 2D multi-coil k-space (READ, PHS1, COIL, SLICE), got also "
                         f"{', '.join(extra)}; pick one with bart slice or average with bart avg first")
    n_slices = dims[13]
    chosen = select_slices(n_slices, slices, cfl)
    index = [0] * len(BART_DIMS)
    stack = []
    for s in chosen:
        index[13] = s
        sel = tuple(slice(None) if d in (0, 1, 3) else index[d] for d in range(len(BART_DIMS)))
        stack.append(np.transpose(np.asarray(data[sel]), (2, 0, 1)))  # (READ, PHS1, COIL) -> (C, H, W)
    kspace = np.ascontiguousarray(np.stack(stack), dtype=np.complex64)
    if not np.all(np.isfinite(kspace.view(np.float32))):
        raise InputError(f"'{cfl}': expected finite k-space samples, got NaN or infinite values")
    h, w = dims[0], dims[1]
    header = Header(encoded_matrix=(h, w, 1), encoded_fov_mm=(0.0, 0.0, 0.0), recon_matrix=(h, w, 1),
                    recon_fov_mm=(0.0, 0.0, 0.0), slices=n_slices, coils=dims[3])
    return KSpaceData(kspace=kspace, header=header, single_coil=dims[3] == 1, source=str(cfl), format="bart")


def _last(dims: list[int]) -> int:
    used = [d for d, n in enumerate(dims) if n > 1]
    return (used[-1] + 1) if used else 1


def write_cfl(base: str | os.PathLike, array: np.ndarray) -> tuple[Path, Path]:
    """Write ``array`` (any complex/real, up to 16 axes, BART's dimension order) as ``base.hdr`` + ``base.cfl``."""
    array = np.asarray(array)
    if array.ndim > len(BART_DIMS):
        raise InputError(f"BART data: expected at most 16 dimensions, got {array.ndim}")
    from ..io import atomic_path

    hdr, cfl = cfl_names(base)
    dims = list(array.shape) + [1] * max(0, 5 - array.ndim)
    with atomic_path(cfl) as tmp:  # the data first, the header (which makes it readable) last
        array.astype("<c8").ravel(order="F").tofile(tmp)
    with atomic_path(hdr) as tmp:
        tmp.write_text("# Dimensions\n" + " ".join(str(d) for d in dims) + "\n")
    return hdr, cfl


def cfl_names(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(NAME.hdr, NAME.cfl)`` that :func:`write_cfl` writes for ``NAME``, ``NAME.cfl`` or ``NAME.hdr``."""
    base = Path(path)
    if base.suffix.lower() in (".cfl", ".hdr"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".hdr"), base.with_name(base.name + ".cfl")


def write_kspace_cfl(base: str | os.PathLike, kspace: np.ndarray) -> tuple[Path, Path]:
    """Write k-space ``(S, C, H, W)`` (or single-coil ``(S, H, W)``) in BART's layout, as :func:`read_cfl`
    reads it back: ``cfl[h, w, 0, c, ..., s (SLICE)] = kspace[s, c, h, w]``."""
    k = np.asarray(kspace)
    if k.ndim == 3:
        k = k[:, None]
    if k.ndim != 4:
        raise InputError(f"BART k-space: expected (slices, coils, H, W), got shape {k.shape}")
    s, c, h, w = k.shape
    array = np.transpose(k, (2, 3, 1, 0)).reshape(h, w, 1, c, *[1] * 9, s)
    return write_cfl(base, array)
