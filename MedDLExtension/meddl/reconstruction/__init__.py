"""Reconstruction from raw k-space: fastMRI / ISMRMRD files -> image volumes.

Entry point :func:`reconstruct` with :class:`ReconstructionConfig`; methods: an end-to-end
variational network (``varnet``, bundled weights), ``zero-filled``, ``cg-sense``,
``l1-wavelet`` and ``tv`` compressed sensing, all in torch (CPU or GPU). Optional SURE
uncertainty map. Readers: :func:`read_kspace` (fastMRI HDF5 or ISMRMRD, by content).
"""

from .kspace import Header, KSpaceData, describe, read_kspace
from .masks import MaskType

_FROM_PIPELINE = ("Method", "ReconstructionConfig", "ReconstructionResult", "reconstruct")


def __getattr__(name: str):
    """The pipeline (and torch with it) is imported on first use: Slicer's own process reads a file's
    header through :func:`describe` and must not load torch for that."""
    if name in _FROM_PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "reconstruct",
    "ReconstructionConfig",
    "ReconstructionResult",
    "Method",
    "MaskType",
    "KSpaceData",
    "Header",
    "read_kspace",
    "describe",
]
