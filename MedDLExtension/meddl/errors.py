"""Error hierarchy.

Every error a user can cause is a :class:`MedDLError`. The command line prints it as one
``error: ...`` line and exits 2; anything else is a bug and keeps its traceback.
Messages follow the shape "what: expected X, got Y. hint".
"""

from __future__ import annotations


class MedDLError(Exception):
    """Root of every error MedDLExtension raises on purpose."""


class InputError(MedDLError, ValueError):
    """The user's input (file, volume, option) is not what the operation needs."""


class ModelError(MedDLError, RuntimeError):
    """A model file or model card is missing, corrupt or does not match."""


class DependencyError(MedDLError, ImportError):
    """An optional package needed for this operation is not installed."""


class NotAvailableError(MedDLError, RuntimeError):
    """The operation exists in the interface but is not part of this build."""


class Cancelled(MedDLError):
    """The user cancelled a running operation."""
