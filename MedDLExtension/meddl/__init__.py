"""MedDLExtension core library: deep-learning registration, reconstruction, domain adaptation
and in-context segmentation for 3D Slicer, usable without Slicer.

The library never imports ``slicer``, ``qt``, ``ctk`` or ``vtk`` at module level; MRML code
lives in :mod:`meddl.mrml` only.
"""

from .errors import Cancelled, DependencyError, InputError, MedDLError, ModelError, NotAvailableError
from .volume import Kind, Volume

__version__ = "0.1.0"

__all__ = [
    "Volume",
    "Kind",
    "MedDLError",
    "InputError",
    "ModelError",
    "DependencyError",
    "NotAvailableError",
    "Cancelled",
    "__version__",
]
