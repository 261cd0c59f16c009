"""Run the ``meddl`` command in a background process and follow it.

The Slicer modules never run torch inside the application: a crash or an out-of-memory in a
network cannot take Slicer down, and Cancel can always stop the work by killing the process
tree. This module is pure Python (no Slicer, no Qt) so the same code runs in tests.

The child is started with ``--progress json`` and prints one JSON object per stdout line::

    {"progress": 0.42, "message": "warping"}     -> on_progress(0.42, "warping")
    {"message": "device: cpu (...)"}             -> on_log("device: cpu (...)")
    {"summary": "registered", "seconds": 3.1}    -> on_log(...), kept in ProcessResult.summary
    anything else                                -> on_log(line)

stderr is collected; its ``error: ...`` line (the command's one-line failure message) is
surfaced in :class:`ProcessResult` and in the :class:`ProcessError` raised from it.

Two ways to drive a run, on the caller's thread (callbacks are never called from another thread):

* blocking: ``result = runner.run(args, on_progress, on_log)``;
* non-blocking: ``runner.start(args, ...)`` then ``runner.poll()`` from a timer (Slicer's
  ``qt.QTimer``) until it returns a :class:`ProcessResult`; ``runner.cancel()`` at any time.

Two daemon threads read the pipes into a queue (portable, including Windows pipes, which
cannot be read without blocking); :meth:`ProcessRunner.poll` drains the queue.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Cancelled, MedDLError

__all__ = [
    "ProcessRunner",
    "ProcessResult",
    "ProcessError",
    "ProgressCallback",
    "LogCallback",
    "python_executable",
    "meddl_command",
    "library_root",
    "parse_output_line",
]

ProgressCallback = Callable[[float, str], None]
LogCallback = Callable[[str], None]

_IS_WINDOWS = os.name == "nt"
#: How long a finished process may keep its pipes open (a leftover grandchild) before we stop waiting.
_PIPE_GRACE_S = 2.0


class ProcessError(MedDLError, RuntimeError):
    """The ``meddl`` process failed; ``str(err)`` is its ``error:`` line (or a summary of stderr)."""

    def __init__(self, message: str, result: ProcessResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class ProcessResult:
    """How one run ended.

    Attributes:
        argv: the full command line that ran.
        returncode: the exit status (negative: killed by that signal on POSIX).
        error: the text of the last stderr line starting with ``error:`` (prefix removed), or "".
        stderr: everything the process wrote on stderr.
        elapsed: wall-clock seconds from start to end.
        cancelled: True when :meth:`ProcessRunner.cancel` (or a timeout) stopped it.
        summary: the last ``{"summary": ...}`` object the process printed, if any.
    """

    argv: tuple[str, ...]
    returncode: int
    error: str = ""
    stderr: str = ""
    elapsed: float = 0.0
    cancelled: bool = False
    summary: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled

    def raise_for_status(self, what: str = "meddl") -> None:
        """Raise :class:`~meddl.errors.Cancelled` or :class:`ProcessError` unless the run succeeded."""
        if self.cancelled and self.error.startswith("timed out"):  # stopped by wait(timeout), not by the user
            raise ProcessError(f"{what}: {self.error}", self)
        if self.cancelled:
            raise Cancelled(f"{what}: cancelled by the user")
        if self.returncode == 0:
            return
        if self.error:
            raise ProcessError(self.error, self)
        tail = " | ".join(line for line in self.stderr.strip().splitlines()[-3:] if line.strip())
        detail = f"; last output on stderr: {tail}" if tail else "; it wrote nothing on stderr"
        raise ProcessError(f"{what}: the process exited with code {self.returncode}{detail}", self)


def library_root() -> Path:
    """The folder that holds the ``meddl`` package (put on the child's PYTHONPATH)."""
    return Path(__file__).resolve().parent.parent


def _inside_slicer() -> bool:
    # The slicer-core wheel also provides a ``slicer`` module; only the application has ``app``.
    return getattr(sys.modules.get("slicer"), "app", None) is not None


def python_executable() -> str:
    """The Python that runs the child: ``$MEDDL_PYTHON``, Slicer's ``PythonSlicer`` inside the
    application (its Python shares Slicer's site-packages), else this interpreter."""
    override = os.environ.get("MEDDL_PYTHON")
    if override:
        return override
    if _inside_slicer():
        found = shutil.which("PythonSlicer")
        if found:
            return found
        # the application's own executable would start a second Slicer: look beside it instead
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            candidate = Path(sys.executable).resolve().parent / name
            if candidate.is_file():
                return str(candidate)
    return sys.executable


def meddl_command(python: str | None = None) -> list[str]:
    """The command prefix that starts the ``meddl`` command line: ``[python, "-m", "meddl"]``."""
    return [python or python_executable(), "-m", "meddl"]


def parse_output_line(line: str) -> tuple[str, Any]:
    """Classify one stdout line: ``("progress", (fraction, message))``, ``("summary", dict)``,
    ``("log", text)``. Fractions are clamped to [0, 1]."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            return "log", text
        if isinstance(obj, dict):
            value = obj.get("progress")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                fraction = min(max(float(value), 0.0), 1.0)
                return "progress", (fraction, str(obj.get("message") or ""))
            if "summary" in obj:
                return "summary", obj
            if set(obj) == {"message"}:
                return "log", str(obj["message"])
    return "log", text


def _error_line(stderr: str) -> str:
    for line in reversed(stderr.splitlines()):
        stripped = line.strip()
        if stripped.lower().startswith("error:"):
            return stripped[len("error:"):].strip()
    return ""


@dataclass
class _Run:
    argv: tuple[str, ...]
    process: subprocess.Popen
    on_progress: ProgressCallback | None
    on_log: LogCallback | None
    started: float
    lines: queue.Queue = field(default_factory=queue.Queue)
    stderr: list[str] = field(default_factory=list)
    open_streams: int = 2
    exited_at: float | None = None
    cancelled: bool = False
    summary: dict[str, Any] | None = None
    error_override: str = ""


class ProcessRunner:
    """Starts the ``meddl`` command (or any command given) in its own process group.

    Args:
        command: the program prefix; ``args`` are appended. Default :func:`meddl_command`.
            Tests pass ``[sys.executable, "fake_meddl.py"]``.
        env: extra environment variables for the child.
        cwd: the child's working folder.
        terminate_timeout: seconds a cancelled process gets to exit after SIGTERM before the
            whole group is killed.

    One run at a time per runner.
    """

    def __init__(
        self,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        terminate_timeout: float = 2.0,
    ) -> None:
        self.command = list(command) if command is not None else meddl_command()
        self.env = dict(env or {})
        self.cwd = cwd
        self.terminate_timeout = terminate_timeout
        self._run: _Run | None = None

    # -- state ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True between :meth:`start` and the :meth:`poll` that returns the result."""
        return self._run is not None

    @property
    def pid(self) -> int | None:
        return self._run.process.pid if self._run is not None else None

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        # Inside Slicer the package sits beside the scripted modules, which PythonSlicer does
        # not have on its path; outside, this is harmless.
        root = str(library_root())
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in parts:
            env["PYTHONPATH"] = os.pathsep.join([root, *parts])
        return env

    # -- non-blocking API --------------------------------------------------------------------
    def start(
        self,
        args: Sequence[str],
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
    ) -> None:
        """Start ``command + args`` and return at once; follow it with :meth:`poll`."""
        if self._run is not None:
            raise MedDLError("meddl process: a run is already in progress; cancel it or wait for it to finish")
        argv = tuple(str(a) for a in (*self.command, *args))
        kwargs: dict[str, Any] = {}
        if _IS_WINDOWS:  # pragma: no cover - exercised on Windows only
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: cancel kills the whole tree
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                env=self._child_env(),
                cwd=self.cwd,
                **kwargs,
            )
        except OSError as exc:
            raise MedDLError(f"meddl process: cannot start '{argv[0]}' ({exc.strerror or exc})") from exc
        run = _Run(argv, process, on_progress, on_log, time.perf_counter())
        for name, stream in (("out", process.stdout), ("err", process.stderr)):
            threading.Thread(target=_pump, args=(stream, name, run.lines), daemon=True,
                             name=f"meddl-{name}-{process.pid}").start()
        self._run = run

    def poll(self) -> ProcessResult | None:
        """Hand the output that arrived to the callbacks; the result once the process has ended."""
        run = self._run
        if run is None:
            return None
        self._drain(run, timeout=0.0)
        return self._finish_if_done(run)

    def cancel(self) -> None:
        """Stop the run: the whole process tree is killed; the next :meth:`poll` returns a
        cancelled result. Blocks at most ``terminate_timeout`` seconds."""
        run = self._run
        if run is None:
            return
        run.cancelled = True
        _kill_tree(run.process, self.terminate_timeout)

    def wait(self, timeout: float | None = None) -> ProcessResult:
        """Block until the run ends (cancelling it after ``timeout`` seconds)."""
        run = self._run
        if run is None:
            raise MedDLError("meddl process: nothing to wait for; call start() first")
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            self._drain(run, timeout=0.05)
            result = self._finish_if_done(run)
            if result is not None:
                return result
            if deadline is not None and time.perf_counter() > deadline and not run.cancelled:
                run.error_override = f"timed out after {timeout:g} s"
                self.cancel()

    # -- blocking API ------------------------------------------------------------------------
    def run(
        self,
        args: Sequence[str],
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
        timeout: float | None = None,
    ) -> ProcessResult:
        """Run ``command + args`` to the end; callbacks are called on this thread as output arrives."""
        self.start(args, on_progress, on_log)
        try:
            return self.wait(timeout)
        except BaseException:
            # KeyboardInterrupt or a failing callback: never leave the child running.
            if self._run is not None:
                self.cancel()
                self._run.process.wait()
                self._run = None
            raise

    # -- internals ---------------------------------------------------------------------------
    def _drain(self, run: _Run, timeout: float) -> None:
        block = timeout > 0
        while True:
            try:
                name, line = run.lines.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return
            block = False  # after the first item, take only what is already there
            if line is None:
                run.open_streams -= 1
            elif name == "err":
                run.stderr.append(line)
            else:
                self._dispatch(run, line)

    @staticmethod
    def _dispatch(run: _Run, line: str) -> None:
        what, value = parse_output_line(line)
        if what == "progress":
            if run.on_progress is not None:
                run.on_progress(*value)
        elif what == "summary":
            run.summary = value
            if run.on_log is not None:
                run.on_log(" ".join(f"{k}={v}" for k, v in value.items()))
        elif run.on_log is not None and value.strip():
            run.on_log(value)

    def _finish_if_done(self, run: _Run) -> ProcessResult | None:
        code = run.process.poll()
        if code is None:
            return None
        now = time.perf_counter()
        if run.exited_at is None:
            run.exited_at = now
        if run.open_streams > 0:
            if now - run.exited_at < _PIPE_GRACE_S:
                return None
            # The process ended but a grandchild still holds its pipes: end that too.
            _kill_group(run.process.pid)
        self._drain(run, timeout=0.0)
        stderr = "".join(run.stderr)
        error = run.error_override or _error_line(stderr)
        result = ProcessResult(run.argv, code, error, stderr, run.exited_at - run.started, run.cancelled, run.summary)
        self._run = None
        return result


def _pump(stream, name: str, lines: queue.Queue) -> None:
    try:
        for line in iter(stream.readline, ""):
            lines.put((name, line))
    except (OSError, ValueError):  # pipe closed under us
        pass
    finally:
        lines.put((name, None))
        try:
            stream.close()
        except OSError:
            pass


def _kill_group(pid: int, sig: int | None = None) -> None:
    if _IS_WINDOWS:  # pragma: no cover
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True)
        return
    try:
        os.killpg(pid, signal.SIGKILL if sig is None else sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tree(process: subprocess.Popen, terminate_timeout: float) -> None:
    """SIGTERM to the process group, a short grace, then SIGKILL to whatever is left of it
    (Windows: ``taskkill /T /F``, which ends the tree at once)."""
    if _IS_WINDOWS:  # pragma: no cover
        _kill_group(process.pid)
        return
    _kill_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=terminate_timeout)
    except subprocess.TimeoutExpired:
        pass
    # Children may outlive the leader (or ignore SIGTERM): kill the rest of the group.
    _kill_group(process.pid, signal.SIGKILL)
