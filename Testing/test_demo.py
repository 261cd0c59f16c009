"""`meddl demo`: files, a Slicer scene that reloads, an overview picture; the adaptation part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from meddl import demo, io
from meddl.cli import RunContext, main
from meddl.progress import Reporter


def _ctx(log=None):
    ctx = RunContext(Reporter(), "cpu", "test", None, "none")
    if log is not None:
        ctx.log = log.append
    return ctx


def test_demo_with_inputs_only_writes_a_scene_that_reloads(tmp_path, monkeypatch):
    pytest.importorskip("slicer")
    from meddl import mrml

    monkeypatch.setattr(demo, "CAPABILITY_DEMOS", {"nothing": "meddl.not_a_capability.demo"})
    lines: list[str] = []
    summary = demo.run_demo(tmp_path, _ctx(lines))
    assert summary["capabilities_not_in_this_build"] == ["nothing"]
    assert any("nothing is not part of this build" in line for line in lines)
    assert (tmp_path / "overview.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["scene"] == summary["scene"]
    scene = mrml.load_scene(summary["scene"])
    names = {scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())}
    assert {"mni152_t1", "mni152_brain_mask", "ihc_rgb", "dipy_t1_slice"} <= names
    t1 = mrml.node_to_volume(scene.GetFirstNodeByName("mni152_t1"))
    original = io.read(tmp_path / "inputs" / "mni152_t1.nii.gz")
    np.testing.assert_array_equal(t1.data, original.data)
    np.testing.assert_allclose(t1.affine, original.affine, atol=1e-5)


def test_adaptation_demo_normalises_a_restained_slide_back(tmp_path):
    from meddl.adaptation import demo as adaptation_demo
    from meddl.data import load_sample

    items = adaptation_demo.run(tmp_path, _ctx([]))
    paths = {Path(i.path).name for i in items}
    assert {"ihc_restained.nrrd", "ihc_macenko.nrrd", "t1_fda.nii.gz", "t1_histmatch.nii.gz"} <= paths
    original = load_sample("ihc_rgb").numpy().astype(float)
    restained = io.read(tmp_path / "ihc_restained.nrrd").numpy().astype(float)
    normalised = io.read(tmp_path / "ihc_macenko.nrrd").numpy().astype(float)
    assert np.abs(normalised - original).mean() < 0.6 * np.abs(restained - original).mean()


@pytest.mark.slow
def test_make_demo_runs_every_capability(tmp_path):
    assert main(["demo", "-o", str(tmp_path), "--progress", "none"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["capabilities_not_in_this_build"] == []
    assert {o["capability"] for o in summary["outputs"]} >= {"registration", "reconstruction", "adaptation", "incontext"}


def test_overview_shows_the_fullest_slice_of_a_sparse_label_map():
    from meddl.volume import Kind, Volume

    labels = np.zeros((1, 6, 5, 9), dtype=np.uint8)
    labels[0, 1:4, 2:4, 2] = 1  # painted on one slice, away from the middle (4)
    picture = demo._display_slice(Volume(labels, np.eye(4), Kind.LABEL))
    assert picture.shape == (5, 6) and picture.sum() == 6
    image = Volume(labels.astype(np.float32), np.eye(4), Kind.INTENSITY)
    assert demo._display_slice(image).sum() == 0  # images keep the middle slice
