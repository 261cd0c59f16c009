"""Resources/Scripts/batch.py, the headless Slicer batch, without the application.

Its node handling runs against the ``slicer-core`` wheel's ``vtkMRMLScene`` and the modules'
real Logic, which runs the real ``meddl`` command in a background process.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs the slicer-core wheel (MRML)")

from meddl import batch, io  # noqa: E402
from meddl.cli import main as meddl_main  # noqa: E402
from meddl.runner import ProcessRunner  # noqa: E402
from meddl.volume import Volume  # noqa: E402
from slicer import vtkMRMLScene  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "Resources" / "Scripts" / "batch.py"
needs_adapt = pytest.mark.skipif(not batch._module_available("meddl.adaptation.cli"),
                                 reason="meddl adapt is not in this build yet")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("meddl_slicer_batch_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing must not run it
    return module


def _volume(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0 + 20 * seed, 5.0 + seed, size=(1, 14, 12, 5)).astype(np.float32)
    affine = np.array([[0.9, 0.1, 0, -10], [-0.1, 0.9, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    return io.write(Volume(data, affine), path)


class _MustNotRun(ProcessRunner):
    def start(self, args, on_progress=None, on_log=None):
        raise AssertionError(f"the Logic ran although the job was complete: {args}")


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@needs_adapt
def test_jobs_run_through_the_logic_save_outputs_and_resume(tmp_path, script, capsys):
    case, ref = _volume(tmp_path / "case.nii.gz", 1), _volume(tmp_path / "ref.nii.gz", 2)
    rows = [
        {"operation": "adapt fourier", "id": "ok", "input": "case.nii.gz", "references": ["ref.nii.gz"],
         "output": "out/case_adapted.nii.gz", "beta": 0.2, "window": "square"},
        {"operation": "adapt fourier", "id": "each", "input": "case.nii.gz", "references": ["ref.nii.gz"],
         "output": "out/each.nii.gz", "combine": "each"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scene = vtkMRMLScene()
    before = _node_ids(scene)

    assert script.main([str(manifest), "--device", "cpu"], scene=scene, runner=ProcessRunner()) == 1
    out = capsys.readouterr().out
    assert "slicer batch: 2 jobs: 1 done, 0 skipped (already complete), 1 failed" in out
    report = json.loads((tmp_path / batch.STATE_DIR / "report.json").read_text())
    ok, each = report["jobs"]
    assert ok["status"] == "done" and each["status"] == "failed"
    assert "the Slicer module does not take --combine; run this job with 'meddl batch'" in each["error"]
    assert _node_ids(scene) == before  # the job's nodes are removed after saving
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_adapted.nii.gz"]
    written = tmp_path / "out" / "case_adapted.nii.gz"
    assert batch.sha256_of(written) == ok["outputs"][str(written)]

    # the same as the command line (nodes, NRRD files and back cost nothing)
    by_hand = tmp_path / "by_hand.nii.gz"
    assert meddl_main(["adapt", "fourier", str(case), str(ref), "-o", str(by_hand), "--beta", "0.2",
                       "--window", "square", "--progress", "none", "--device", "cpu"]) == 0
    got, want = io.read(written), io.read(by_hand)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-6)

    # a second run skips the finished job without running anything, and meddl batch would too
    assert script.main([str(manifest)], scene=scene, runner=_MustNotRun()) == 1
    report = json.loads((tmp_path / batch.STATE_DIR / "report.json").read_text())
    assert [j["status"] for j in report["jobs"]] == ["skipped", "failed"]
    job = batch.read_manifest(manifest).jobs[0]
    assert batch.job_is_complete(job, tmp_path / batch.STATE_DIR)


def test_bad_manifest_exits_2_with_every_problem_and_runs_nothing(tmp_path, script, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("operation,input,references,output\n"
                        "adapt fourier,missing.nii.gz,ref.nii.gz,out/a.nii.gz\n"
                        "adapt warp,x.nii.gz,ref.nii.gz,../b.nii.gz\n")
    assert script.main([str(manifest)], scene=vtkMRMLScene(), runner=_MustNotRun()) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: manifest '{manifest}':")
    assert "line 2: input" in err[0] and "line 3: unknown operation 'adapt warp'" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / batch.STATE_DIR).exists()


def test_arguments_after_the_double_dash(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["batch.py", "--", "m.csv", "--device", "cpu"])
    assert script._script_arguments() == ["m.csv", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["batch.py", "m.csv"])
    assert script._script_arguments() == ["m.csv"]
    assert script.main(["--no-such-flag"]) == 2
