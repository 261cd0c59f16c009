"""Reconstruction from raw k-space: fastMRI / ISMRMRD files -> image volumes.

Entry point :func:`reconstruct` with :class:`ReconstructionConfig`; methods: an end-to-end
variational network (``varnet``, bundled weights), ``zero-filled``, ``cg-sense``,
``l1-wavelet`` and ``tv`` compressed sensing, all in torch (CPU or GPU). Optional SURE
uncertainty map. Readers: :func:`read_kspace` (fastMRI HDF5 or ISMRMRD, by content).
"""

from .kspace import Header, KSpaceData, describe, read_kspace
from .masks import MaskType
from .pipeline import Method, ReconstructionConfig, ReconstructionResult, reconstruct

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
