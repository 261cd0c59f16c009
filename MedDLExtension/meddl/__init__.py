"""MedDLExtension core library: deep-learning registration, reconstruction, domain adaptation
and in-context segmentation for 3D Slicer, usable without Slicer.

The library never imports ``slicer``, ``qt``, ``ctk`` or ``vtk`` at module level; MRML code
lives in :mod:`meddl.mrml` only.
"""

from .errors import Cancelled, DependencyError, InputError, MedDLError, ModelError, NotAvailableError
from .volume import Kind, Volume

__version__ = "0.1.0"

#: submodules reachable as ``meddl.NAME`` after ``import meddl``, imported on first use (so that
#: ``import meddl`` stays light: no torch until a capability is used)
_SUBMODULES = frozenset({"adaptation", "batch", "data", "incontext", "io", "models", "mrml", "reconstruction",
                         "registration", "transforms"})


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
