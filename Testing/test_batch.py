"""meddl batch: manifests checked up front, jobs on a real Dask cluster, nothing lost, resumable.

Most tests share one LocalCluster of two worker processes (``--scheduler`` path); one test runs
the command as a real process with its embedded cluster and interrupts it like Ctrl-C.
Jobs are real ``meddl adapt fourier`` runs on tiny volumes when that command is in the build, and
``sleepcopy`` (``test_batch_ops.py``: a test operation that plugs in like a capability) where a
job must take a known time, be killed or fail on purpose.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from meddl import batch, io
from meddl.batch import Job, job_is_complete, read_manifest, run_batch, worker_specs
from meddl.cli import main
from meddl.errors import Cancelled, InputError
from meddl.progress import CancelToken
from meddl.volume import Volume

TESTING = Path(__file__).resolve().parent
HAS_ADAPT = batch._module_available("meddl.adaptation.cli")
needs_adapt = pytest.mark.skipif(not HAS_ADAPT, reason="meddl adapt is not in this build yet")


@pytest.fixture(autouse=True)
def _sleepcopy(monkeypatch):
    monkeypatch.setitem(batch._EXTRA_OPERATIONS, "sleepcopy", "test_batch_ops")


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes (they import the test operation through PYTHONPATH)."""
    distributed = pytest.importorskip("distributed")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTING), *([old] if old else [])])
    try:
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, host="127.0.0.1", silence_logs=50)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    client = distributed.Client(cluster, set_as_default=False)
    client.run(lambda: __import__("torch"))  # warm both workers once for the whole module
    yield cluster
    client.close()
    cluster.close()


def _inputs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"in{i:02d}.txt"
        p.write_text(f"case {i}\n")
        paths.append(p)
    return paths


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _partial_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".meddl-part-" in p.name or ".part" in p.name]


def _runs(log: Path, name: str, what: str) -> int:
    return len(list(log.glob(f"{name}.*.{what}")))


def _verify(report) -> None:
    """Every output named in the report exists and hashes to its recorded checksum."""
    for job in report.jobs:
        if job.status in ("done", "skipped"):
            assert job.outputs
            for path, digest in job.outputs.items():
                assert batch.sha256_of(path) == digest, path


# -- manifests: checked up front --------------------------------------------------------------


def test_csv_and_jsonl_give_the_same_jobs(tmp_path):
    ins = _inputs(tmp_path / "in", 2)
    csv_path = _write_csv(tmp_path / "m.csv", ["operation", "id", "input", "output", "seconds", "fail", "tag"],
                          [["sleepcopy", "a", "in/in00.txt", "out/a.txt", 0.5, "false", "x y"],
                           ["sleepcopy", "", str(ins[1]), "out/b.txt", "", "", "-3"]])
    jsonl_path = _write_jsonl(tmp_path / "m.jsonl", [
        {"operation": "sleepcopy", "id": "a", "input": "in/in00.txt", "output": "out/a.txt", "seconds": 0.5,
         "fail": False, "tag": "x y"},
        {"operation": "sleepcopy", "input": str(ins[1]), "--output": "out/b.txt", "tag": "-3"}])
    from_csv, from_jsonl = read_manifest(csv_path), read_manifest(jsonl_path)
    assert [j.argv for j in from_csv.jobs] == [j.argv for j in from_jsonl.jobs]
    first, second = from_csv.jobs
    assert first.argv == (str(ins[0]), f"--output={tmp_path / 'out' / 'a.txt'}", "--seconds=0.5", "--tag=x y")
    assert first.id == "a" and second.id == "out/b.txt"  # default id: the output, relative to the root
    assert second.outputs == (str(tmp_path / "out" / "b.txt"),) and second.inputs == (str(ins[1]),)
    assert second.argv_with(["/x/y.txt"])[1] == "--output=/x/y.txt"
    assert first.key != second.key


def test_bad_manifest_lists_every_problem_and_runs_nothing(tmp_path, capsys):
    ins = _inputs(tmp_path, 3)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "folder.txt").mkdir()
    manifest = _write_csv(tmp_path / "m.csv", ["operation", "input", "output", "seconds", "mode", "colour"], [
        ["sleepcopy", ins[0].name, "outputs/ok.txt", "", "", ""],  # fine
        ["sleepcopy turbo", ins[0].name, "outputs/r.txt", "", "", ""],  # unknown operation
        ["sleepcopy", "missing.txt", "outputs/a.txt", "soon", "", ""],  # missing input, bad float
        ["sleepcopy", ins[1].name, "outputs/ok.txt", "", "", ""],  # same output as line 2
        ["sleepcopy", ins[1].name, "../escape.txt", "", "", ""],  # outside the root
        ["sleepcopy", ins[2].name, "outputs/c.txt", "", "fastest", "red"],  # bad choice, unknown option
        ["sleepcopy", ins[2].name, ins[2].name, "", "", ""],  # would overwrite its input
        ["sleepcopy", ins[2].name, "outputs/folder.txt", "", "", ""],  # a folder
        ["sleepcopy", ins[2].name, "outputs/d.nhdr", "", "", ""],  # a detached header
        ["sleepcopy", ins[2].name, "m.csv", "", "", ""],  # the manifest itself
    ])
    with pytest.raises(InputError) as err:
        read_manifest(manifest)
    message = str(err.value)
    expected = [
        r"line 3: unknown operation 'sleepcopy turbo'",
        r"line 4: .*argument --seconds: invalid float value: 'soon'",
        r"line 4: input '.*missing\.txt' does not exist",
        r"line 5: output '.*ok\.txt' is also written by line 2",
        r"line 6: output '.*escape\.txt' is outside the output root",
        r"line 7: .*argument --mode: invalid choice: 'fastest'",
        r"line 7: unknown option 'colour' for 'sleepcopy'; expected one of .*mode",
        r"line 8: output '.*in02\.txt' is also an input of this job",
        r"line 9: output '.*folder\.txt' is a folder",
        r"line 10: output '.*d\.nhdr': a detached header names its data file, .* use \.nrrd or \.mha",
        r"line 11: output '.*m\.csv' is the manifest itself",
    ]
    for pattern in expected:
        assert re.search(pattern, message), pattern
    assert message.startswith(f"manifest '{manifest}': {len(expected)} problem(s), nothing was run")
    # the command: one error line, exit 2, nothing created
    assert main(["batch", str(manifest), "--progress", "none"]) == 2
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("error: manifest")
    assert not (tmp_path / batch.STATE_DIR).exists()
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["folder.txt"]


@pytest.mark.parametrize("content, pattern", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"expected a CSV or JSON Lines text file, got binary data"),
    (b"", r"the file is empty"),
    (b"jobs:\n  - adapt: a.nii.gz\n", r"expected CSV with a header row naming the columns .*'operation'"),
    (b"input,output\na.txt,b.txt\n", r"expected CSV with a header row naming the columns .*'operation'"),
    (b'{"operation": "sleepcopy", "input": "a"}\n{"operation": \n', r"line 2: not valid JSON"),
    (b'["sleepcopy", "a", "b"]\n', r"line 1: expected a JSON object, got list"),
    (b"operation,input,output\n", r"no jobs"),
    (b'{"operation": "sleepcopy", "input": "a", "output": "b", "seconds": NaN}\n',
     r"line 1: NaN is not a JSON number; give a finite value"),
    (b'{"operation": "sleepcopy", "input": "a", "output": "b", "seconds": 1e999}\n',
     r"line 1: 1e999 is too large for a number"),
    (b'{"operation": "sleepcopy", "input": "a", "output": "b", "output": "c"}\n',
     r"line 1: the key 'output' is given twice"),
], ids=["binary", "empty", "yaml", "no-operation-column", "broken-jsonl", "jsonl-array", "header-only", "nan",
        "overflow", "duplicate-key"])
def test_not_a_manifest(tmp_path, content, pattern):
    suffix = ".jsonl" if content.startswith((b"{", b"[")) else ".txt"
    path = tmp_path / f"m{suffix}"
    path.write_bytes(content)
    with pytest.raises(InputError, match=pattern):
        read_manifest(path)


def test_missing_manifest_and_bad_flags(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "none.csv"), "--progress", "none"]) == 2
    assert "error: cannot read manifest" in capsys.readouterr().err
    _inputs(tmp_path, 1)
    manifest = _write_csv(tmp_path / "m.csv", ["operation", "input", "output"], [["sleepcopy", "in00.txt", "o.txt"]])
    with pytest.raises(InputError, match=r"--workers: expected 1 or more, got 0"):
        run_batch(manifest, workers=0)
    with pytest.raises(InputError, match=r"--device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"):
        run_batch(manifest, device="tpu")
    with pytest.raises(InputError, match=r"--report .*: it is also an output of a job"):
        run_batch(manifest, report=tmp_path / "o.txt")
    assert not (tmp_path / "o.txt").exists()


def test_operation_not_in_this_build_is_an_invalid_row(tmp_path, monkeypatch):
    _inputs(tmp_path, 1)
    monkeypatch.setitem(batch._EXTRA_OPERATIONS, "warp", "meddl.no_such_capability.cli")
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"operation": "warp", "input": "in00.txt", "output": "o.nii.gz"}])
    with pytest.raises(InputError, match=r"line 1: operation 'warp' is not available in this build"):
        read_manifest(manifest)


def test_unreachable_scheduler_fails_within_seconds(tmp_path):
    _inputs(tmp_path, 1)
    manifest = _write_csv(tmp_path / "m.csv", ["operation", "input", "output"], [["sleepcopy", "in00.txt", "o.txt"]])
    started = time.perf_counter()
    with pytest.raises(InputError, match=r"--scheduler tcp://127\.0\.0\.1:9: cannot reach a Dask scheduler"):
        run_batch(manifest, scheduler="tcp://127.0.0.1:9", connect_timeout=2.0)
    assert time.perf_counter() - started < 10
    with pytest.raises(InputError, match=r"--scheduler: expected an address like tcp://host:8786"):
        run_batch(manifest, scheduler="nowhere")
    assert not (tmp_path / "o.txt").exists()


# -- running on the cluster -------------------------------------------------------------------


def _tiny_volumes(folder: Path, n: int, rng: np.random.Generator) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        data = rng.normal(100.0 + 10 * i, 5.0 + i, size=(1, 12, 10, 6)).astype(np.float32)
        paths.append(io.write(Volume(data, np.diag([1.0, 1.2, 2.0, 1.0])), folder / f"case{i:02d}.nii.gz"))
    return paths


@needs_adapt
def test_twenty_adapt_jobs_on_an_embedded_cluster_of_two_workers(tmp_path):
    rng = np.random.default_rng(7)
    cases = _tiny_volumes(tmp_path / "scans", 20, rng)
    reference = _tiny_volumes(tmp_path / "ref", 1, rng)[0]
    rows = [{"operation": "adapt fourier", "input": str(c), "references": [str(reference)],
             "output": f"adapted/{c.name}", "beta": 0.2} for c in cases]
    manifest = _write_jsonl(tmp_path / "cohort.jsonl", rows)
    seen = []
    report = run_batch(manifest, workers=2, progress=lambda f, m: seen.append(f))
    assert report.workers == 2 and report.scheduler == "local"
    assert report.summary() == {"jobs": 20, "done": 20, "skipped": 0, "failed": 0, "cancelled": 0}
    assert len({j.worker for j in report.jobs}) == 2
    assert seen[-1] == 1.0 and seen == sorted(seen)
    _verify(report)
    # the same result as the command run by hand on one case
    by_hand = tmp_path / "by_hand.nii.gz"
    assert main(["adapt", "fourier", str(cases[3]), str(reference), "-o", str(by_hand), "--beta", "0.2",
                 "--progress", "none"]) == 0
    np.testing.assert_allclose(io.read(tmp_path / "adapted" / cases[3].name).numpy(), io.read(by_hand).numpy())
    assert not _partial_files(tmp_path)
    saved = json.loads(Path(report.report_path).read_text())
    assert saved["summary"]["done"] == 20 and all(j["outputs"] for j in saved["jobs"])


def test_twenty_jobs_on_two_workers_one_failing(tmp_path, cluster):
    ins = _inputs(tmp_path / "in", 20)
    rows = [["sleepcopy", f"in/{p.name}", f"out/{p.stem}.txt", 0.05, f"#{i}",
             "true" if i == 13 else ""] for i, p in enumerate(ins)]
    manifest = _write_csv(tmp_path / "m.csv", ["operation", "input", "output", "seconds", "tag", "fail"], rows)
    results = []
    report = run_batch(manifest, scheduler=cluster.scheduler_address, on_result=results.append,
                       report=tmp_path / "report.json")
    assert report.summary() == {"jobs": 20, "done": 19, "skipped": 0, "failed": 1, "cancelled": 0}
    assert not report.ok and len(results) == 20
    failed = [j for j in report.jobs if j.status == "failed"]
    assert failed[0].id == "out/in13.txt" and "expected no --fail" in failed[0].error
    assert not (tmp_path / "out" / "in13.txt").exists()
    for i, p in enumerate(ins):
        if i != 13:
            assert (tmp_path / "out" / f"{p.stem}.txt").read_text() == f"case {i}\n#{i}"
    assert len({j.worker for j in report.jobs}) == 2
    _verify(report)
    assert not _partial_files(tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["summary"]["failed"] == 1 and saved["jobs"][13]["status"] == "failed"
    assert saved["jobs"][0]["command"].startswith("meddl sleepcopy ")
    # a re-run redoes only the failed job (still failing), the rest is verified and skipped
    again = run_batch(manifest, scheduler=cluster.scheduler_address)
    assert again.summary() == {"jobs": 20, "done": 0, "skipped": 19, "failed": 1, "cancelled": 0}


def test_worker_killed_mid_job_is_retried(tmp_path, cluster):
    ins = _inputs(tmp_path / "in", 4)
    log = tmp_path / "log"
    log.mkdir()
    rows = [{"operation": "sleepcopy", "input": str(p), "output": f"out/{p.stem}.txt", "seconds": 2.0,
             "log": str(log)} for p in ins]
    manifest = _write_jsonl(tmp_path / "m.jsonl", rows)
    killed = {}

    def kill_first_started() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            starts = sorted(log.glob("*.start"))
            if starts:
                time.sleep(0.3)  # well inside the job
                killed["name"] = starts[0].name.split(".")[0]
                pid, address = starts[0].read_text().split(maxsplit=1)
                killed["pid"], killed["address"] = int(pid), address
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_started)
    killer.start()
    report = run_batch(manifest, scheduler=cluster.scheduler_address)
    killer.join()
    assert killed, "no job started"
    assert report.summary()["done"] == 4, [(j.id, j.status, j.error) for j in report.jobs]
    _verify(report)
    name = killed["name"] + ".txt"
    assert _runs(log, name, "start") == 2 and _runs(log, name, "end") == 1  # killed once, rerun once
    # every job names the worker that finished it, never the killed one (an address, not a PID: the
    # PID's digits may well appear in another worker's port number)
    assert all(j.worker and j.worker != killed["address"] for j in report.jobs)
    for p in ins:
        assert (tmp_path / "out" / f"{p.stem}.txt").read_text() == p.read_text()
    assert not _partial_files(tmp_path)


def test_interrupted_run_resumes_without_redoing_jobs(tmp_path, cluster):
    ins = _inputs(tmp_path / "in", 8)
    log = tmp_path / "log"
    log.mkdir()
    rows = [{"operation": "sleepcopy", "input": str(p), "output": f"out/{p.stem}.txt", "seconds": 0.6,
             "log": str(log)} for p in ins]
    manifest = _write_jsonl(tmp_path / "m.jsonl", rows)
    token = CancelToken()
    arrived = []

    def on_result(result) -> None:
        arrived.append(result)
        if len(arrived) == 3:
            token.cancel()

    with pytest.raises(Cancelled, match=r"interrupted; \d of 8 jobs complete .* run the same command again"):
        run_batch(manifest, scheduler=cluster.scheduler_address, cancel=token, on_result=on_result)
    first = json.loads((tmp_path / batch.STATE_DIR / "report.json").read_text())
    assert first["interrupted"] is True
    done_first = {j["id"] for j in first["jobs"] if j["status"] == "done"}
    assert 3 <= len(done_first) < 8
    assert {j["status"] for j in first["jobs"]} <= {"done", "cancelled"}
    for j in first["jobs"]:
        out = Path(next(iter(j["outputs"]))) if j["outputs"] else None
        if j["status"] == "done":
            assert batch.sha256_of(out) == next(iter(j["outputs"].values()))
    assert not _partial_files(tmp_path / "out")
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {Path(i).name for i in done_first}  # no output of an unfinished job

    second = run_batch(manifest, scheduler=cluster.scheduler_address)
    assert {j.id for j in second.jobs if j.status == "skipped"} == done_first
    assert second.count("done") == 8 - len(done_first) and second.ok
    _verify(second)
    for p in ins:
        assert _runs(log, p.name, "end") == 1, p.name  # no job done twice
        assert (tmp_path / "out" / f"{p.stem}.txt").read_text() == p.read_text()
    assert not _partial_files(tmp_path / "out")


def test_changed_or_corrupted_output_is_redone(tmp_path, cluster):
    ins = _inputs(tmp_path / "in", 3)
    manifest = _write_csv(tmp_path / "m.csv", ["operation", "input", "output", "tag"],
                          [["sleepcopy", f"in/{p.name}", f"out/{p.stem}.txt", "a"] for p in ins])
    run_batch(manifest, scheduler=cluster.scheduler_address)
    (tmp_path / "out" / "in01.txt").write_text("corrupt")
    (tmp_path / "out" / "in02.txt").unlink()
    stale = tmp_path / "out" / ".in00.meddl-part-0123456789ab.txt"  # left by a killed run
    stale.write_text("half")
    report = run_batch(manifest, scheduler=cluster.scheduler_address)
    assert [j.status for j in report.jobs] == ["skipped", "done", "done"]
    assert not stale.exists()
    _verify(report)
    # another option is another job: the record of the old one does not count
    changed = read_manifest(_write_csv(tmp_path / "m2.csv", ["operation", "input", "output", "tag"],
                                       [["sleepcopy", f"in/{p.name}", f"out/{p.stem}.txt", "b"] for p in ins]))
    assert all(job_is_complete(j, changed.state_dir) is None for j in changed.jobs)


def test_an_interrupted_report_counts_jobs_that_committed_unseen(tmp_path):
    from meddl.batch import JobResult, _settled, commit_outputs, output_parts

    ins = _inputs(tmp_path / "in", 2)
    manifest = read_manifest(_write_csv(tmp_path / "m.csv", ["operation", "input", "output"],
                                        [["sleepcopy", f"in/{p.name}", f"out/{p.stem}.txt"] for p in ins]))
    first, second = manifest.jobs
    (tmp_path / "out").mkdir()
    parts = output_parts(first)
    parts[0].write_text("case 0\n")
    sums = commit_outputs(first, parts, manifest.state_dir)  # what a worker does after the client stopped listening
    settled = _settled(first, None, manifest.state_dir)
    assert settled.status == "done" and settled.outputs == sums
    cancelled = JobResult(first.id, first.line, first.operation, "cancelled", error="cancelled")
    assert _settled(first, cancelled, manifest.state_dir).status == "done"
    assert _settled(second, None, manifest.state_dir) is None  # never committed: stays "not run"
    failed = JobResult(second.id, second.line, second.operation, "failed", error="boom")
    assert _settled(second, failed, manifest.state_dir) is failed


# -- the command, with its embedded cluster, interrupted like Ctrl-C -----------------------------


@pytest.mark.slow
def test_command_embedded_cluster_ctrl_c_then_resume(tmp_path, cluster):
    ins = _inputs(tmp_path / "in", 6)
    log = tmp_path / "log"
    log.mkdir()
    manifest = _write_csv(tmp_path / "m.csv", ["operation", "input", "output", "seconds", "log"],
                          [["sleepcopy", f"in/{p.name}", f"out/{p.stem}.txt", 1.0, str(log)] for p in ins])
    env = dict(os.environ, MEDDL_BATCH_OPERATIONS="sleepcopy=test_batch_ops",
               PYTHONPATH=os.pathsep.join([str(TESTING), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "meddl", "batch", str(manifest), "--workers", "2", "--progress", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not list(log.glob("*.end")):
            time.sleep(0.1)
        assert list(log.glob("*.end")), "no job finished"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: meddl batch: interrupted;"), err
    assert "Traceback" not in err
    report = json.loads((tmp_path / batch.STATE_DIR / "report.json").read_text())
    done = {j["id"] for j in report["jobs"] if j["status"] == "done"}
    assert done and len(done) < 6
    assert {p.name for p in (tmp_path / "out").iterdir()} == {Path(d).name for d in done}
    assert not _partial_files(tmp_path / "out")

    # the same manifest again (on the shared cluster, to save starting another): only the rest runs
    rerun = run_batch(manifest, scheduler=cluster.scheduler_address)
    assert rerun.ok and {j.id for j in rerun.jobs if j.status == "skipped"} == done
    for p in ins:
        assert _runs(log, p.name, "end") == 1
        assert (tmp_path / "out" / f"{p.stem}.txt").read_text() == p.read_text()


# -- per-worker set-up ------------------------------------------------------------------------


def test_gpu_workers_are_pinned_one_per_device():
    specs = worker_specs(3, 2, ["4", "7"])
    envs = [s["options"]["env"] for s in specs.values()]
    assert envs == [{"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "7"}, {"CUDA_VISIBLE_DEVICES": "4"}]
    assert all(s["options"]["nthreads"] == 2 and s["options"]["preload"] == ["meddl.batch"] for s in specs.values())
    assert [s["options"]["env"] for s in worker_specs(2, 1, []).values()] == [{}, {}]


def test_model_loaded_once_per_worker_and_not_shared(tmp_path, monkeypatch):
    import torch
    from meddl import models
    from meddl.nets import UNet

    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "features": [4, 8]}
    models.save_model(UNet(**args), tmp_path, "tiny", args, "synthetic", "test", {})
    monkeypatch.setattr(models, "load_state_dict", models.load_state_dict)  # restored after the test
    monkeypatch.setitem(batch._WORKER_STATE, "model_loads", 0)
    calls = []
    original = models.load_state_dict
    monkeypatch.setattr(models, "load_state_dict", lambda *a, **k: calls.append(a) or original(*a, **k))
    batch._install_model_cache()
    batch._install_model_cache()  # idempotent
    first, _ = models.load_model("tiny", tmp_path / "tiny.pt")
    with torch.no_grad():
        next(first.parameters()).add_(1.0)  # a job changing its network...
    second, _ = models.load_model("tiny", tmp_path / "tiny.pt")
    assert len(calls) == 1 and batch._WORKER_STATE["model_loads"] == 1
    reference = UNet(**args)
    reference.load_state_dict(torch.load(tmp_path / "tiny.pt", weights_only=True))
    for a, b in zip(second.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # ...does not change the next job's


def test_job_is_picklable_for_the_workers(tmp_path):
    import pickle

    _inputs(tmp_path, 1)
    job = read_manifest(_write_csv(tmp_path / "m.csv", ["operation", "input", "output"],
                                   [["sleepcopy", "in00.txt", "o.txt"]])).jobs[0]
    assert isinstance(job, Job) and pickle.loads(pickle.dumps(job)) == job


def test_a_rows_own_device_wins_over_the_batch_device(tmp_path):
    _inputs(tmp_path, 2)
    manifest = read_manifest(_write_jsonl(tmp_path / "m.jsonl", [
        {"operation": "sleepcopy", "input": "in00.txt", "output": "a.txt", "device": "cpu"},
        {"operation": "sleepcopy", "input": "in01.txt", "output": "b.txt"}]))
    own, default = manifest.jobs
    assert batch.parse_job(own, device="cuda:1").device == "cpu"
    assert batch.parse_job(default, device="cuda:1").device == "cuda:1"
    assert batch.parse_job(default, ["/x/b.txt"]).output == "/x/b.txt"


def test_embedded_workers_share_the_cores_and_keep_glibc_memory_defaults():
    env = batch.cluster_environment(3)
    assert env["distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS"] == "3"
    assert env["distributed.nanny.pre-spawn-environ.MKL_NUM_THREADS"] == "3"
    assert env["distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"] is None
    assert batch.compute_threads(64, 64) == 1


def test_embedded_workers_keep_the_users_thread_limit(monkeypatch):
    monkeypatch.setattr(batch.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert batch.compute_threads(2, 1) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a busy machine: the user asked for one thread per command
    assert batch.compute_threads(2, 1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "32")  # never more than the worker's share of the cores
    assert batch.compute_threads(2, 1) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert batch.compute_threads(2, 1) == 8


def test_every_capability_in_the_build_takes_manifest_rows(tmp_path):
    """Rows for each operation become that command's arguments: inputs and outputs told apart."""
    for name in ("fixed.nii.gz", "moving.nii.gz", "labels.nii.gz", "k.h5", "ctx.nii.gz", "ctx_lab.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    rows = {
        "register": {"fixed": "fixed.nii.gz", "moving": "moving.nii.gz", "output": "w.nii.gz",
                     "transform": "t.h5", "inverse": "i.h5", "moving-labels": "labels.nii.gz",
                     "labels_out": "wl.nii.gz", "similarity": "mi", "iterations": 5},
        "reconstruct": {"kspace": "k.h5", "output": "r.nii.gz", "method": "zero-filled", "undersample": "equispaced",
                        "acceleration": 4, "zero-filled": "zf.nii.gz"},
        "segment": {"target": "fixed.nii.gz", "output": "s.nii.gz", "context": ["ctx.nii.gz", "ctx_lab.nii.gz"]},
    }
    expected = {
        "register": ({"fixed.nii.gz", "moving.nii.gz", "labels.nii.gz"}, {"w.nii.gz", "t.h5", "i.h5", "wl.nii.gz"}),
        "reconstruct": ({"k.h5"}, {"r.nii.gz", "zf.nii.gz"}),
        "segment": ({"fixed.nii.gz", "ctx.nii.gz", "ctx_lab.nii.gz"}, {"s.nii.gz"}),
    }
    available = [op for op in rows if batch._module_available(batch.operations()[op])]
    if not available:
        pytest.skip("no registration, reconstruction or segmentation command in this build yet")
    manifest = read_manifest(_write_jsonl(tmp_path / "m.jsonl", [{"operation": op, **rows[op]} for op in available]))
    for job in manifest.jobs:
        inputs, outputs = expected[job.operation]
        assert {Path(p).name for p in job.inputs} == inputs, job.operation
        assert {Path(p).name for p in job.outputs} == outputs, job.operation
        args = batch.parse_job(job, [f"/tmp/part{i}" for i in range(len(job.outputs))])
        assert args.output == "/tmp/part0"


@pytest.mark.slow
def test_each_worker_loads_the_segmentation_model_once(tmp_path, cluster):
    if not batch._module_available("meddl.incontext.cli"):
        pytest.skip("meddl segment is not in this build")
    import distributed

    rng = np.random.default_rng(3)
    rows = []
    for i in range(4):
        img = rng.normal(size=(1, 24, 24, 6)).astype(np.float32)
        io.write(Volume(img, np.eye(4)), tmp_path / f"img{i}.nii.gz")
        io.write(Volume((img > 0.5).astype(np.uint8), np.eye(4), "label"), tmp_path / f"lab{i}.nii.gz")
    for i in range(4):
        j = (i + 1) % 4
        # noise images share their grid: no alignment (mutual information has nothing to align in noise)
        rows.append({"operation": "segment", "target": f"img{i}.nii.gz", "output": f"seg/{i}.nii.gz",
                     "context": [f"img{j}.nii.gz", f"lab{j}.nii.gz"], "align": "none"})
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        before = client.run(lambda: batch._WORKER_STATE["model_loads"])
        report = run_batch(_write_jsonl(tmp_path / "m.jsonl", rows), scheduler=cluster.scheduler_address,
                           device="cpu")
        after = client.run(lambda: batch._WORKER_STATE["model_loads"])
    assert report.ok, [(j.id, j.error) for j in report.jobs]
    used = {j.worker for j in report.jobs}
    for worker in used:  # a worker that ran one job or several loaded the model once
        assert after[worker] - before.get(worker, 0) <= 1 and after[worker] >= 1


def test_a_batch_job_reruns_on_the_cpu_after_a_gpu_out_of_memory(tmp_path, monkeypatch):
    """Like ``meddl`` itself (cli._run_on_device): the job is done, on the CPU, with a warning."""
    import torch

    ins = _inputs(tmp_path / "in", 1)
    job = read_manifest(_write_csv(tmp_path / "m.csv", ["operation", "input", "output"],
                                   [["sleepcopy", str(ins[0]), "out/a.txt"]])).jobs[0]
    devices = []
    parse, context = batch.parse_job, batch._context

    def parse_job(*a, **k):
        args = parse(*a, **k)
        real = args._run

        def run(args, ctx):
            devices.append(str(ctx.device))
            if ctx.device.type == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
            return real(args, ctx)

        args._run = run
        return args

    def on_a_gpu(args):
        ctx = context(args)
        ctx.device = torch.device("cuda")
        return ctx

    monkeypatch.setattr(batch, "parse_job", parse_job)
    monkeypatch.setattr(batch, "_context", on_a_gpu)
    with pytest.warns(RuntimeWarning, match=r"ran out of memory; falling back to the CPU"):
        result = batch.execute_job(job, {"run_id": "t", "state_dir": str(tmp_path / "state")})
    assert result["status"] == "done", result
    assert devices == ["cuda", "cpu"] and result["device"] == "cpu"
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"case 0\n"


def test_bart_data_named_without_a_suffix_is_an_input(tmp_path):
    """bart names its data NAME (NAME.cfl + NAME.hdr); meddl reconstruct takes NAME, so the manifest does."""
    (tmp_path / "scan.cfl").write_bytes(bytes(8))
    (tmp_path / "scan.hdr").write_text("# Dimensions\n1 1 1 1\n")
    assert batch._check_input(tmp_path / "scan") is None
    assert "does not exist" in batch._check_input(tmp_path / "other")


def test_a_row_without_an_output_is_listed_not_a_crash(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"operation": "register", "fixed": "in.txt", "moving": "in.txt"}) + "\n")
    with pytest.raises(InputError, match=r"line 1: .*required: -o/--output"):
        read_manifest(manifest)


@needs_adapt
def test_files_named_after_an_output_are_checked_and_committed_like_outputs(tmp_path, capsys):
    rng = np.random.default_rng(3)
    scan, ref1, ref2 = _tiny_volumes(tmp_path, 3, rng)
    # "--combine each" writes OUT_1, OUT_2: one of them an input of this job, or of another line
    own = tmp_path / "case01_1.nii.gz"
    io.write(io.read(ref1), own)
    manifest = _write_csv(tmp_path / "m.csv", ["operation", "input", "references", "output", "combine"], [
        ["adapt fourier", scan.name, f"{own.name};{ref2.name}", "case01.nii.gz", "each"],
        ["adapt fourier", scan.name, f"{ref1.name};{ref2.name}", "out/m.nii.gz", "each"],
        ["adapt fourier", "out/m_2.nii.gz", ref1.name, "out/n.nii.gz", ""],
        ["adapt fourier", "pair.img", ref1.name, "pair.hdr", ""],  # the header of its input's pair
        ["adapt fourier", scan.name, ref1.name, "other.img", ""],  # writes other.hdr, which line 7 reads
        ["adapt fourier", "other.hdr", ref1.name, "out/o.nii.gz", ""],
    ])
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(scan)), str(tmp_path / "pair.hdr"))
    sitk.WriteImage(sitk.ReadImage(str(scan)), str(tmp_path / "other.hdr"))
    with pytest.raises(InputError) as err:
        read_manifest(manifest)
    message = str(err.value)
    assert re.search(r"line 2: output '.*case01_1\.nii\.gz' is also an input of this job", message)
    assert re.search(r"line 4: input '.*out/m_2\.nii\.gz' is written by line 3", message)
    assert re.search(r"line 5: output '.*pair\.hdr' is a file of an input of this job \(the other half", message)
    assert re.search(r"line 7: input '.*other\.hdr' is written by line 6", message)  # as the .img's header
    # run alone, the numbered outputs and a prefix's stain files land under their own names
    rgb = tmp_path / "he.png"
    import imageio.v3 as iio

    iio.imwrite(rgb, (rng.uniform(0.3, 0.9, (24, 24, 3)) * 255).astype(np.uint8))
    good = _write_csv(tmp_path / "good.csv", ["operation", "input", "references", "reference", "output", "combine",
                                              "stains_out", "separation"], [
        ["adapt fourier", scan.name, f"{ref1.name};{ref2.name}", "", "out/each.nii.gz", "each", "", ""],
        ["adapt stain", rgb.name, "", rgb.name, "out/he_norm.png", "", "out/p", "hed"],
    ])
    report = run_batch(good, workers=1)
    assert report.summary()["done"] == 2, [j.error for j in report.jobs]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["each_1.nii.gz", "each_2.nii.gz", "he_norm.png", "p_DAB.nrrd", "p_E.nrrd", "p_H.nrrd"]
    assert not _partial_files(tmp_path)


def test_report_never_overwrites_an_input_or_the_manifest(tmp_path):
    ins = _inputs(tmp_path, 1)
    manifest = _write_csv(tmp_path / "m.csv", ["operation", "input", "output"], [["sleepcopy", ins[0].name, "o.txt"]])
    before = manifest.read_bytes(), ins[0].read_bytes()
    for report, pattern in ((ins[0], r"it is an input of a job"), (manifest, r"it is the manifest"),
                            (tmp_path, r"it is a folder")):
        with pytest.raises(InputError, match=f"--report '.*': {pattern}"):
            run_batch(manifest, workers=1, report=report)
    assert (manifest.read_bytes(), ins[0].read_bytes()) == before
    assert not (tmp_path / "o.txt").exists()


def test_two_local_clusters_at_once_do_not_compete_for_a_port():
    """A batch beside another one (or beside any Dask cluster) starts its scheduler's HTTP endpoint
    on a free port: no "Port 8787 is already in use" warning, no dashboard."""
    pytest.importorskip("distributed")
    from meddl.batch import _start_cluster

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _start_cluster(1, 1, [])
        try:
            second = _start_cluster(1, 1, [])
            second.close()
        finally:
            first.close()
    in_use = [str(w.message) for w in caught if "already in use" in str(w.message)]
    assert not in_use, in_use
