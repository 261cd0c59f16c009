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
        {"operation": "adapt fourier", "id": "log", "input": "case.nii.gz", "references": ["ref.nii.gz"],
         "output": "out/log.nii.gz", "domain": "log", "no-clip": True, "beta": 0.1},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scene = vtkMRMLScene()
    before = _node_ids(scene)

    assert script.main([str(manifest), "--device", "cpu"], scene=scene, runner=ProcessRunner()) == 1
    out = capsys.readouterr().out
    assert "slicer batch: 3 jobs: 2 done, 0 skipped (already complete), 1 failed" in out
    report = json.loads((tmp_path / batch.STATE_DIR / "report.json").read_text())
    ok, each, log = report["jobs"]
    assert ok["status"] == "done" and each["status"] == "failed" and log["status"] == "done", log
    assert "the Slicer module does not take --combine; run this job with 'meddl batch'" in each["error"]
    assert _node_ids(scene) == before  # the job's nodes are removed after saving
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_adapted.nii.gz", "log.nii.gz"]
    written = tmp_path / "out" / "case_adapted.nii.gz"
    assert batch.sha256_of(written) == ok["outputs"][str(written)]

    # the same as the command line (nodes, NRRD files and back cost nothing)
    by_hand = tmp_path / "by_hand.nii.gz"
    assert meddl_main(["adapt", "fourier", str(case), str(ref), "-o", str(by_hand), "--beta", "0.2",
                       "--window", "square", "--progress", "none", "--device", "cpu"]) == 0
    got, want = io.read(written), io.read(by_hand)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-6)
    # options the panel does not show go through the Logic by name (--domain log --no-clip)
    assert meddl_main(["adapt", "fourier", str(case), str(ref), "-o", str(by_hand), "--beta", "0.1", "--domain", "log",
                       "--no-clip", "--progress", "none", "--device", "cpu"]) == 0
    np.testing.assert_allclose(io.read(tmp_path / "out" / "log.nii.gz").numpy(), io.read(by_hand).numpy(),
                               rtol=1e-6, atol=1e-4)

    # a second run skips the finished job without running anything, and meddl batch would too
    assert script.main([str(manifest)], scene=scene, runner=_MustNotRun()) == 1
    report = json.loads((tmp_path / batch.STATE_DIR / "report.json").read_text())
    assert [j["status"] for j in report["jobs"]] == ["skipped", "failed", "skipped"]
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


def test_a_painted_label_map_of_several_labels_segments_every_label(tmp_path, script):
    """As `meddl segment --annotated` does: every painted label, not only the first segment."""
    from meddl.volume import Kind

    y, x, z = np.meshgrid(np.arange(24), np.arange(24), np.arange(12), indexing="ij")
    a = ((y - 8) ** 2 + (x - 12) ** 2 < 16).astype(np.uint8)
    b = ((y - 17) ** 2 + (x - 12) ** 2 < 12).astype(np.uint8) * 2
    truth = (a + b)[None]
    image = (truth * 50.0 + np.random.default_rng(0).normal(0, 2, truth.shape)).astype(np.float32)
    io.write(Volume(image, np.eye(4)), tmp_path / "t.nii.gz")
    painted = np.zeros_like(truth)
    painted[..., ::4] = truth[..., ::4]
    io.write(Volume(painted, np.eye(4), Kind.LABEL), tmp_path / "painted.nii.gz")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"operation": "segment", "target": "t.nii.gz", "annotated": "painted.nii.gz",
                                    "output": "seg.nii.gz"}) + "\n")
    job = batch.read_manifest(manifest).jobs[0]
    scene = vtkMRMLScene()
    script.run_job_in_scene(job, scene, [str(tmp_path / "seg.nii.gz")], device="cpu", runner=ProcessRunner())
    out = io.read(tmp_path / "seg.nii.gz", kind="label").numpy()
    assert set(np.unique(out)) == {0, 1, 2}
    for label in (1, 2):
        got, want = out[..., 1::4] == label, truth[..., 1::4] == label
        assert 2 * (got & want).sum() / (got.sum() + want.sum()) > 0.7


def test_reconstruction_and_registration_jobs_through_the_logic(tmp_path, script):
    from meddl.reconstruction.demo import simulated_file

    simulated_file(tmp_path / "k.h5", size=48, coils=4)
    fixed = _volume(tmp_path / "f.nii.gz", 1)
    _volume(tmp_path / "m.nii.gz", 2)
    rows = [{"operation": "reconstruct", "kspace": "k.h5", "output": "recon.nii.gz", "method": "tv",
             "undersample": "equispaced", "acceleration": 2, "iterations": 5, "zero-filled": "zf.nii.gz"},
            {"operation": "register", "fixed": "f.nii.gz", "moving": "m.nii.gz", "output": "w.nii.gz",
             "method": "optimisation", "affine": "none", "levels": [4], "iterations": 2, "transform": "t.h5"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scene = vtkMRMLScene()
    assert script.main([str(manifest), "--device", "cpu"], scene=scene, runner=ProcessRunner()) == 0
    recon, zf = io.read(tmp_path / "recon.nii.gz"), io.read(tmp_path / "zf.nii.gz")
    assert recon.spatial_shape == zf.spatial_shape and not np.allclose(recon.numpy(), zf.numpy())
    warped = io.read(tmp_path / "w.nii.gz")
    assert warped.same_grid(io.read(fixed)) and (tmp_path / "t.h5").is_file()
