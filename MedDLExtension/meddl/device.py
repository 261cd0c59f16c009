"""Choosing the compute device, and falling back when a GPU runs out of memory.

``auto`` picks CUDA, then Apple MPS, then the CPU. The device actually used is always
reported (``DeviceChoice.reason``), and :func:`run_with_fallback` reruns a step on the CPU
with a warning when CUDA runs out of memory, instead of failing.
"""

from __future__ import annotations

import enum
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import InputError

__all__ = ["DeviceName", "DeviceChoice", "resolve_device", "run_with_fallback", "is_out_of_memory"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class DeviceName(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


@dataclass(frozen=True)
class DeviceChoice:
    """The torch device to run on and why it was chosen."""

    device: object  # torch.device
    reason: str

    @property
    def name(self) -> str:
        return str(self.device)


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | DeviceName = "auto") -> DeviceChoice:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a torch device.

    An explicitly requested device that is missing is an error (the user asked for it);
    ``auto`` never fails.
    """
    import torch

    text = str(spec.value if isinstance(spec, DeviceName) else spec).strip().lower()
    base, colon, index = text.partition(":")
    try:
        DeviceName(base)
    except ValueError:
        raise InputError(f"--device: expected auto, cpu, cuda, cuda:N or mps, got '{spec}'") from None
    if colon and (base != "cuda" or not (index.isascii() and index.isdecimal())):  # only cuda takes an index: cuda:0, cuda:1, ...
        raise InputError(f"--device: expected auto, cpu, cuda, cuda:N (N a GPU number) or mps, got '{spec}'")
    if base == "auto":
        if torch.cuda.is_available():
            return DeviceChoice(torch.device("cuda"), f"auto: CUDA ({torch.cuda.get_device_name(0)})")
        if _mps_available(torch):
            return DeviceChoice(torch.device("mps"), "auto: Apple MPS")
        return DeviceChoice(torch.device("cpu"), "auto: no GPU found, using the CPU")
    if base == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA GPU is available here; use --device auto or cpu")
        try:
            dev = torch.device(text)
        except RuntimeError as exc:
            raise InputError(f"--device: cannot parse '{spec}'") from exc
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
        return DeviceChoice(dev, f"requested: {text}")
    if base == "mps":
        if not _mps_available(torch):
            raise InputError("--device mps: Apple MPS is not available here; use --device auto or cpu")
        return DeviceChoice(torch.device("mps"), "requested: mps")
    return DeviceChoice(torch.device("cpu"), "requested: cpu")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors (torch raises several types for them)."""
    import torch

    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _device_type(device: object) -> str:
    import torch

    try:
        return torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        return str(device)


def run_with_fallback(step: Callable[[object], T], device: object, what: str = "operation") -> tuple[T, object]:
    """Run ``step(device)``; on GPU out-of-memory, warn, free the cache and rerun on the CPU.

    Returns the result and the device that produced it.
    """
    import torch

    try:
        return step(device), device
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM on a GPU
        if not is_out_of_memory(exc) or _device_type(device) == "cpu":
            raise  # (the device may be a name such as "auto": never let it hide the real error)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = f"{what}: {_device_type(device).upper()} ran out of memory; falling back to the CPU"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning(message)
        cpu = torch.device("cpu")
        return step(cpu), cpu
