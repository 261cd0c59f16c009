"""Progress reporting and cancellation for long operations.

Every long operation takes ``progress: ProgressCallback | None`` (called with a fraction in
[0, 1] and a short message) and ``cancel: CancelToken | None``. Library code calls
:class:`Reporter`, which clamps, sub-divides into stages and checks the token, so the
operation stops at the next step after a cancel with :class:`~meddl.errors.Cancelled`.

The command line turns the callbacks into a tqdm bar or JSON lines
(``{"progress": 0.42, "message": "..."}``) that the Slicer modules read from a background
process.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import IO, Protocol

from .errors import Cancelled

__all__ = ["ProgressCallback", "CancelToken", "Reporter", "json_progress", "bar_progress", "null_progress"]


class ProgressCallback(Protocol):
    def __call__(self, fraction: float, message: str) -> None: ...


class CancelToken:
    """Thread-safe flag; :meth:`check` raises :class:`Cancelled` once :meth:`cancel` was called."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


class Reporter:
    """What library code uses: ``rep(0.3, "warping")`` and ``rep.stage(0.2, 0.8)``.

    A stage maps its own [0, 1] onto a sub-range of the parent, so nested operations report
    one monotone overall fraction. Each report checks the cancel token.
    """

    def __init__(
        self,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        start: float = 0.0,
        end: float = 1.0,
        prefix: str = "",
    ) -> None:
        self._progress = progress
        self._cancel = cancel
        self._start = start
        self._end = end
        self._prefix = prefix

    def __call__(self, fraction: float, message: str = "") -> None:
        if self._cancel is not None:
            self._cancel.check()
        if self._progress is not None:
            f = min(max(float(fraction), 0.0), 1.0)
            self._progress(self._start + f * (self._end - self._start),
                           f"{self._prefix}{message}" if self._prefix and message else message or self._prefix)

    def check(self) -> None:
        """Raise :class:`Cancelled` if the user cancelled (no report)."""
        if self._cancel is not None:
            self._cancel.check()

    def stage(self, start: float, end: float, prefix: str = "") -> Reporter:
        """A reporter for a sub-range of this one; ``prefix`` goes before its messages (e.g. "label 3/20: ")."""
        span = self._end - self._start
        return Reporter(self._progress, self._cancel, self._start + start * span, self._start + end * span,
                        self._prefix + prefix)

    @staticmethod
    def of(progress: ProgressCallback | Reporter | None, cancel: CancelToken | None = None) -> Reporter:
        """Wrap what a caller passed (a callback, a Reporter or None)."""
        if isinstance(progress, Reporter):
            return progress
        return Reporter(progress, cancel)


def null_progress(fraction: float, message: str) -> None:
    """A callback that ignores everything."""


def json_progress(stream: IO[str] | None = None) -> Callable[[float, str], None]:
    """A callback writing one JSON object per line: ``{"progress": 0.42, "message": "..."}``."""
    out = stream if stream is not None else sys.stdout

    def report(fraction: float, message: str) -> None:
        out.write(json.dumps({"progress": round(float(fraction), 4), "message": message}) + "\n")
        out.flush()

    return report


class bar_progress:
    """A tqdm bar on stderr driven by fractions; use as a context manager."""

    def __init__(self, description: str = "") -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=1000, desc=description, unit="‰", leave=False, file=sys.stderr,
                         bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        self._last = 0

    def __call__(self, fraction: float, message: str) -> None:
        n = int(round(min(max(fraction, 0.0), 1.0) * 1000))
        if n > self._last:
            self._bar.update(n - self._last)
            self._last = n
        if message:
            self._bar.set_postfix_str(message, refresh=False)

    def __enter__(self) -> bar_progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
