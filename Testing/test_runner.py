"""The background-process runner, driven against small helper scripts (not the real meddl)."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from meddl.errors import Cancelled, MedDLError
from meddl.runner import (
    ProcessError,
    ProcessResult,
    ProcessRunner,
    library_root,
    meddl_command,
    parse_output_line,
    python_executable,
)

posix_only = pytest.mark.skipif(os.name == "nt", reason="process-group checks use POSIX signals and /proc")


def _script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its new parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


PROGRESS = """
    import json, sys
    print("starting " + " ".join(sys.argv[1:]), flush=True)
    for i, msg in enumerate(["load", "compute", "save"]):
        print(json.dumps({"progress": (i + 1) / 4, "message": msg}), flush=True)
    print(json.dumps({"message": "device: cpu (requested: cpu)"}), flush=True)
    print("{not json", flush=True)
    print(json.dumps({"progress": 7, "message": "overshoot"}), flush=True)
    print(json.dumps({"summary": "done", "seconds": 0.1}), flush=True)
    print("a warning on stderr", file=sys.stderr, flush=True)
"""


def test_json_progress_goes_to_callbacks_in_order_and_other_lines_to_log(tmp_path):
    runner = ProcessRunner(_script(tmp_path, "progress.py", PROGRESS))
    progress, log = [], []
    result = runner.run(["a", "b"], lambda f, m: progress.append((f, m)), log.append)
    assert result.ok and result.returncode == 0 and result.error == ""
    assert progress == [(0.25, "load"), (0.5, "compute"), (0.75, "save"), (1.0, "overshoot")]
    assert log[0] == "starting a b"
    assert "device: cpu (requested: cpu)" in log
    assert "{not json" in log
    assert result.summary == {"summary": "done", "seconds": 0.1}
    assert "a warning on stderr" in result.stderr
    assert not any("a warning" in line for line in log)
    assert result.elapsed > 0
    assert not runner.running


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"progress": 0.42, "message": "x"}', ("progress", (0.42, "x"))),
        ('{"progress": -1}', ("progress", (0.0, ""))),
        ('{"progress": true}', ("log", '{"progress": true}')),
        ('{"message": "hello"}', ("log", "hello")),
        ("plain text\n", ("log", "plain text")),
        ("[1, 2]", ("log", "[1, 2]")),
    ],
)
def test_parse_output_line(line, expected):
    assert parse_output_line(line) == expected


def test_error_line_is_surfaced_and_raised(tmp_path):
    cmd = _script(tmp_path, "fail.py", """
        import sys
        print("Traceback-like noise", file=sys.stderr)
        print("error: register: fixed image 'x.nii': expected 3D, got 4D", file=sys.stderr)
        sys.exit(2)
    """)
    result = ProcessRunner(cmd).run([])
    assert result.returncode == 2 and not result.ok
    assert result.error == "register: fixed image 'x.nii': expected 3D, got 4D"
    with pytest.raises(ProcessError, match=r"^register: fixed image 'x.nii': expected 3D, got 4D$") as info:
        result.raise_for_status("meddl register")
    assert isinstance(info.value, MedDLError)
    assert info.value.result is result


def test_failure_without_error_line_reports_code_and_stderr_tail(tmp_path):
    cmd = _script(tmp_path, "crash.py", """
        import sys
        print("Segmentation fault (core dumped)", file=sys.stderr)
        sys.exit(139)
    """)
    result = ProcessRunner(cmd).run([])
    assert result.returncode == 139 and result.error == ""
    with pytest.raises(ProcessError, match=r"exited with code 139; last output on stderr: Segmentation fault"):
        result.raise_for_status()


def test_returncode_zero_raises_nothing():
    ProcessResult(("x",), 0).raise_for_status()


def test_cannot_start_missing_program(tmp_path):
    with pytest.raises(MedDLError, match="cannot start"):
        ProcessRunner([str(tmp_path / "no-such-program")]).run([])


GRANDCHILD = """
    import json, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(json.dumps({"grandchild": child.pid}), flush=True)
    print(json.dumps({"progress": 0.1, "message": "sleeping"}), flush=True)
    time.sleep(600)
"""


@posix_only
def test_cancel_kills_the_whole_process_tree(tmp_path):
    runner = ProcessRunner(_script(tmp_path, "tree.py", GRANDCHILD), terminate_timeout=1.0)
    log, progress = [], []
    runner.start([], lambda f, m: progress.append(f), log.append)
    deadline = time.time() + 30
    while not progress and time.time() < deadline:
        assert runner.poll() is None
        time.sleep(0.02)
    grandchild = int(log[0].split(":")[1].strip(" }"))
    leader = runner.pid
    assert _alive(grandchild) and _alive(leader)
    runner.cancel()
    result = None
    while result is None and time.time() < deadline:
        result = runner.poll()
        time.sleep(0.02)
    assert result is not None and result.cancelled and not result.ok
    assert result.returncode != 0
    gone_by = time.time() + 5
    while _alive(grandchild) and time.time() < gone_by:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild survived the cancel"
    assert not _alive(leader)
    with pytest.raises(Cancelled, match="cancelled"):
        result.raise_for_status()


@posix_only
def test_cancel_escalates_to_kill_when_sigterm_is_ignored(tmp_path):
    cmd = _script(tmp_path, "stubborn.py", """
        import json, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"progress": 0.5}), flush=True)
        time.sleep(600)
    """)
    runner = ProcessRunner(cmd, terminate_timeout=0.3)
    seen = []
    runner.start([], lambda f, m: seen.append(f))
    deadline = time.time() + 30
    while not seen and time.time() < deadline:
        runner.poll()
        time.sleep(0.02)
    t0 = time.time()
    runner.cancel()
    result = runner.wait(timeout=10)
    assert result.cancelled and result.returncode == -9
    assert time.time() - t0 < 5


def test_non_blocking_poll_returns_none_until_done_then_the_result(tmp_path):
    cmd = _script(tmp_path, "slow.py", """
        import json, time
        for i in range(3):
            time.sleep(0.2)
            print(json.dumps({"progress": (i + 1) / 3, "message": str(i)}), flush=True)
    """)
    runner = ProcessRunner(cmd)
    seen = []
    runner.start([], lambda f, m: seen.append(m))
    assert runner.running
    with pytest.raises(MedDLError, match="already in progress"):
        runner.start([])
    polls_before_end = 0
    result = None
    deadline = time.time() + 30
    while result is None and time.time() < deadline:
        result = runner.poll()
        if result is None:
            polls_before_end += 1
        time.sleep(0.02)
    assert polls_before_end > 3
    assert result is not None and result.ok
    assert seen == ["0", "1", "2"]
    assert not runner.running and runner.poll() is None


def test_timeout_cancels_and_says_so(tmp_path):
    cmd = _script(tmp_path, "sleep.py", "import time\ntime.sleep(600)\n")
    result = ProcessRunner(cmd, terminate_timeout=0.5).run([], timeout=0.5)
    assert result.cancelled and result.error == "timed out after 0.5 s"
    with pytest.raises(ProcessError, match=r"^meddl: timed out after 0.5 s$"):  # not "cancelled by the user"
        result.raise_for_status()


def test_failing_callback_does_not_leave_the_child_running(tmp_path):
    runner = ProcessRunner(_script(tmp_path, "progress.py", PROGRESS))

    def boom(fraction, message):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        runner.run([], boom)
    assert not runner.running


def test_child_environment_finds_the_library(tmp_path):
    cmd = _script(tmp_path, "env.py", """
        import meddl, os, sys
        print(os.environ["PYTHONUNBUFFERED"], os.path.dirname(os.path.dirname(meddl.__file__)))
    """)
    log = []
    result = ProcessRunner(cmd, env={"PYTHONPATH": ""}, cwd=tmp_path).run([], on_log=log.append)
    assert result.ok
    unbuffered, root = log[0].split(" ", 1)
    assert unbuffered == "1" and Path(root).resolve() == library_root()


def test_default_command_is_this_python_running_meddl(monkeypatch):
    monkeypatch.delenv("MEDDL_PYTHON", raising=False)
    assert python_executable() == sys.executable
    assert meddl_command() == [sys.executable, "-m", "meddl"]
    monkeypatch.setenv("MEDDL_PYTHON", "/opt/slicer/bin/PythonSlicer")
    assert meddl_command()[0] == "/opt/slicer/bin/PythonSlicer"


def test_inside_slicer_the_child_is_pythonslicer(monkeypatch, tmp_path):
    import types

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    launcher = fake_bin / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.delenv("MEDDL_PYTHON", raising=False)
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=object()))
    monkeypatch.setenv("PATH", str(fake_bin))
    assert python_executable() == str(launcher)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(fake_bin / "SlicerApp-real"))
    assert python_executable() == str(launcher.resolve())  # found beside the application
