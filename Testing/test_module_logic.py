"""The modules' Logic without the Slicer application: slicer-core MRML nodes, a real subprocess.

Most tests run the Logic against a fake ``meddl`` program (written below) that checks its input
files are readable volumes, records its command line and writes outputs on known grids; two
run the real ``python -m meddl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs the slicer-core wheel (MRML)")

import slicer  # noqa: E402
import vtk  # noqa: E402
from meddl import mrml  # noqa: E402
from meddl.errors import Cancelled, InputError, MedDLError  # noqa: E402
from meddl.runner import ProcessError, ProcessRunner  # noqa: E402
from meddl.slicer_logic import (  # noqa: E402
    IN_CONTEXT_ALIGN,
    IN_CONTEXT_TASKS,
    AdaptationLogic,
    InContextSegmentationLogic,
    ReconstructionLogic,
    RegistrationLogic,
    RegistrationMethod,
    choices,
)
from meddl.volume import Kind, Volume, affine_from_geometry  # noqa: E402

FAKE_MEDDL = r'''
"""A stand-in for the meddl command: checks inputs, records argv, writes outputs."""
import json, os, sys, time
import numpy as np
from meddl import io, transforms
from meddl.volume import Kind, Volume, affine_from_geometry

argv = sys.argv[1:]
mode = os.environ.get("FAKE_MEDDL_MODE", "ok")
record = {"argv": argv, "inputs": {}}
OUTPUT_FLAGS = {"-o", "--transform", "--jacobian", "--labels-out", "--uncertainty", "--zero-filled", "--phase",
                "--coil-images", "--stains-out", "--inverse"}
VALUE_FLAGS = {"--method", "--similarity", "--affine", "--device", "--progress", "--seed", "--undersample", "--acceleration",
               "--center-fraction", "--beta", "--window", "--domain", "--task", "--moving-labels", "--annotated", "--prior",
               "--align", "--atlas-prior", "--separation", "--match-points"}
outputs, options, positional, context = {}, {}, [], []
i = 1
while i < len(argv):
    a = argv[i]
    if a in OUTPUT_FLAGS:
        outputs[a] = argv[i + 1]; i += 2
    elif a in VALUE_FLAGS:
        options[a] = argv[i + 1]; i += 2
    elif a == "--context":
        i += 1
        while i < len(argv) and not argv[i].startswith("-"):
            context.append(argv[i]); i += 1
    else:
        positional.append(a); i += 1

def check(path, kind=None):
    v = io.read(path, kind=kind)  # proves the Logic wrote a readable volume
    record["inputs"][path] = {"shape": list(v.spatial_shape), "channels": v.channels,
                              "affine": v.affine.tolist(), "dtype": str(v.numpy().dtype)}
    return v

print(json.dumps({"message": "device: cpu (fake)"}), flush=True)
print(json.dumps({"progress": 0.25, "message": "reading"}), flush=True)
command = argv[0]
files = positional[1:] if command == "adapt" else positional  # adapt's first word is its mode
if command != "reconstruct":
    for p in files:
        check(p)
label_task = options.get("--task", "segmentation") == "segmentation"
for p in [options.get("--moving-labels"), options.get("--annotated")] + (context[1::2] if label_task else []):
    if p:
        check(p, "label")
for p in [] if label_task else context[1::2]:
    check(p)
for p in context[0::2]:
    check(p)
record["workdir"] = os.path.dirname(outputs["-o"])
with open(os.environ["FAKE_MEDDL_RECORD"], "w") as f:
    json.dump(record, f)
if mode == "fail":
    print("error: fake failure: expected something else, got this", file=sys.stderr)
    sys.exit(2)
if mode == "silent":  # claims success, writes nothing
    sys.exit(0)
if mode == "hang":
    print(json.dumps({"progress": 0.5, "message": "hanging"}), flush=True)
    time.sleep(600)
print(json.dumps({"progress": 0.75, "message": "writing"}), flush=True)

if command == "register":
    fixed = io.read(positional[0])
    io.write(fixed.with_data(fixed.numpy().astype(np.float32) * 2), outputs["-o"])
    if "--transform" in outputs:
        u = np.zeros((fixed.ndim, *fixed.spatial_shape))
        u[0] = 1.5  # 1.5 mm along R everywhere
        transforms.write_transform(Volume(u, fixed.affine, Kind.DISPLACEMENT), outputs["--transform"])
    if "--jacobian" in outputs:
        io.write(fixed.with_data(np.ones_like(fixed.numpy(), dtype=np.float32)), outputs["--jacobian"])
    if "--labels-out" in outputs:
        io.write(io.read(options["--moving-labels"], kind="label"), outputs["--labels-out"])
elif command == "reconstruct":
    affine = affine_from_geometry([0.5, 0.5, 3.0], [-2.0, 1.0, 4.0])
    io.write(Volume(np.full((1, 6, 5, 1), 7.0, np.float32), affine), outputs["-o"])
    for flag, value in (("--zero-filled", 3.0), ("--uncertainty", 0.1), ("--phase", -1.5)):
        if flag in outputs:
            io.write(Volume(np.full((1, 6, 5, 1), value, np.float32), affine), outputs[flag])
    if "--coil-images" in outputs:
        coils = np.stack([np.full((6, 5, 1), c, np.float32) for c in range(4)])
        io.write(Volume(coils, affine), outputs["--coil-images"])
elif command == "adapt":
    image = io.read(positional[1])
    io.write(image.with_data(255 - image.numpy()), outputs["-o"])
    if "--stains-out" in outputs:  # PREFIX_H.nrrd, PREFIX_E.nrrd (, PREFIX_DAB) as the real command writes them
        hed = options.get("--separation", "hed" if options.get("--method") == "reinhard" else "x") == "hed"
        for stain, value in (("H", 0.25), ("E", 0.75)) + ((("DAB", 0.5),) if hed else ()):
            io.write(image.with_data(np.full((1, *image.spatial_shape), value, np.float32)),
                     outputs["--stains-out"] + f"_{stain}.nrrd")
elif command == "segment":
    target = io.read(positional[0])
    labels = np.zeros((1, *target.spatial_shape), np.uint8)
    labels[:, 1:-1, 1:-1, :] = 1  # a box: everything but the border
    if options.get("--annotated") and 2 in io.read(options["--annotated"], kind="label").numpy():
        labels[:, 0] = 2  # a second painted label: the first row
    io.write(Volume(labels, target.affine, Kind.LABEL), outputs["-o"])
print(json.dumps({"progress": 1.0, "message": "done"}), flush=True)
ran = {"method": {"auto": "tv"}.get(options.get("--method"), options.get("--method"))} if command == "reconstruct" else {}
print(json.dumps({"summary": command, "seconds": 0.01, **ran}), flush=True)
'''


# -- fixtures -----------------------------------------------------------------------------------


def _affine() -> np.ndarray:
    c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return affine_from_geometry([0.9, 1.1, 2.0], [10.0, -20.0, 5.0], rot)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A runner around the fake meddl; ``fake.record()`` is what the last run saw."""
    script = tmp_path / "fake_meddl.py"
    script.write_text(textwrap.dedent(FAKE_MEDDL))
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_MEDDL_RECORD", str(record))
    monkeypatch.setenv("FAKE_MEDDL_MODE", "ok")

    class Fake:
        runner = ProcessRunner([sys.executable, str(script)], terminate_timeout=1.0)

        @staticmethod
        def record() -> dict:
            return json.loads(record.read_text())

        @staticmethod
        def mode(value: str) -> None:
            monkeypatch.setenv("FAKE_MEDDL_MODE", value)

    return Fake


def _volume_node(scene, data: np.ndarray, name: str, affine=None, kind=Kind.INTENSITY):
    return mrml.volume_to_node(Volume(data, _affine() if affine is None else affine, kind), scene, name=name)


def _images(scene, rng):
    fixed = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "fixed")
    moving = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "moving")
    return fixed, moving


def _segmentation(scene, shape=(8, 7, 5), name="painted"):
    labels = np.zeros((1, *shape), np.uint8)
    labels[0, 2:4, 2:4, 1:3] = 1
    labels[0, 5:7, 4:6, 2:4] = 2
    segments = [mrml.SegmentInfo(1, "liver", (0.8, 0.2, 0.2)), mrml.SegmentInfo(2, "spleen", (0.2, 0.2, 0.8))]
    return mrml.labels_to_segmentation_node(Volume(labels, _affine(), Kind.LABEL), scene, segments, name=name)


def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _segment_voxels(node, segment_id, reference) -> int:
    labels, _ = mrml.segmentation_node_to_labels(node, reference=reference, segment_ids=[segment_id])
    return int((labels.numpy() > 0).sum())


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# -- registration -------------------------------------------------------------------------------


def test_registration_puts_outputs_in_the_scene_with_the_fixed_geometry(scene, fake, rng):
    fixed, moving = _images(scene, rng)
    painted = _segmentation(scene)
    fixed_before = mrml.node_to_volume(fixed).numpy().copy()
    progress, log = [], []
    result = RegistrationLogic(runner=fake.runner).run(
        fixed, moving, painted, similarity="mi", device="cpu", seed=7, jacobian=True,
        progress=lambda f, m: progress.append((f, m)), log=log.append)

    argv = fake.record()["argv"]
    assert argv[0] == "register"
    assert _flag(argv, "--method") == "network+optimisation" and _flag(argv, "--similarity") == "mi"
    assert _flag(argv, "--affine") == "affine"
    assert _flag(argv, "--device") == "cpu" and _flag(argv, "--progress") == "json" and _flag(argv, "--seed") == "7"
    assert {"--transform", "--jacobian", "--moving-labels", "--labels-out"} <= set(argv)
    inputs = fake.record()["inputs"]
    np.testing.assert_allclose(inputs[argv[1]]["affine"], _affine(), atol=1e-6)  # geometry reached the process

    warped = result.warped
    assert warped.IsA("vtkMRMLScalarVolumeNode") and scene.GetNodeByID(warped.GetID()) is warped
    assert warped.GetName() == "moving warped"
    np.testing.assert_allclose(_ijk_to_ras(warped), _ijk_to_ras(fixed), atol=1e-6)
    np.testing.assert_allclose(mrml.node_to_volume(warped).numpy(), fixed_before * 2, rtol=1e-6)

    assert result.transform.IsA("vtkMRMLGridTransformNode")
    field = mrml.transform_node_to_displacement(result.transform)
    np.testing.assert_allclose(field.numpy()[0], 1.5, atol=1e-6)
    np.testing.assert_allclose(field.numpy()[1:], 0.0, atol=1e-6)
    np.testing.assert_allclose(mrml.node_to_volume(result.jacobian).numpy(), 1.0)

    seg = result.warped_segmentation
    assert seg is not painted and seg.IsA("vtkMRMLSegmentationNode")
    names = sorted(seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(2))
    assert names == ["liver", "spleen"]

    assert [f for f, _ in progress] == sorted(f for f, _ in progress)
    assert progress[0] == (0.25, "reading") and progress[-1] == (1.0, "loading results into the scene")
    assert "device: cpu (fake)" in log
    assert result.process.ok and result.process.summary["summary"] == "register"
    # inputs untouched, temporary folder gone
    np.testing.assert_array_equal(mrml.node_to_volume(fixed).numpy(), fixed_before)
    assert painted.GetSegmentation().GetNumberOfSegments() == 2
    assert not Path(fake.record()["workdir"]).exists()


def test_registration_fills_a_given_output_node_and_skips_unwanted_outputs(scene, fake, rng):
    fixed, moving = _images(scene, rng)
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my result")
    result = RegistrationLogic(runner=fake.runner).run(fixed, moving, warped=target, transform=False)
    argv = fake.record()["argv"]
    assert "--transform" not in argv and "--jacobian" not in argv and "--moving-labels" not in argv
    assert result.warped is target and target.GetName() == "my result"
    assert result.transform is None and result.jacobian is None and result.warped_segmentation is None
    np.testing.assert_allclose(_ijk_to_ras(target), _ijk_to_ras(fixed), atol=1e-6)


def test_registration_refuses_to_overwrite_an_input(scene, fake, rng):
    fixed, moving = _images(scene, rng)
    with pytest.raises(InputError, match="warped volume: .*input node 'moving'; inputs are never overwritten"):
        RegistrationLogic(runner=fake.runner).start(fixed, moving, warped=moving)


@pytest.mark.parametrize("option, value, message", [
    ("method", "gradient-descent", "registration method: expected one of network\\+optimisation, network, optimisation"),
    ("similarity", "ssd", "similarity: expected one of lncc, mi, mind, deepsim, got 'ssd'"),
    ("prealignment", "rigid", "pre-alignment: expected one of affine, center, none, got 'rigid'"),
    ("device", "tpu", "device: expected one of auto, cpu, cuda, mps, got 'tpu'"),
])
def test_registration_refuses_unknown_options(scene, fake, rng, option, value, message):
    fixed, moving = _images(scene, rng)
    with pytest.raises(InputError, match=message):
        RegistrationLogic(runner=fake.runner).start(fixed, moving, **{option: value})


def test_process_error_line_becomes_a_meddl_error_and_nothing_is_added(scene, fake, rng):
    fixed, moving = _images(scene, rng)
    fake.mode("fail")
    count = scene.GetNumberOfNodes()
    with pytest.raises(ProcessError, match="^fake failure: expected something else, got this$"):
        RegistrationLogic(runner=fake.runner).run(fixed, moving)
    assert scene.GetNumberOfNodes() == count
    assert not Path(fake.record()["workdir"]).exists()


def test_missing_output_after_a_successful_exit_is_an_error_not_a_crash(scene, fake, rng):
    fixed, moving = _images(scene, rng)
    fake.mode("silent")
    count = scene.GetNumberOfNodes()
    job = RegistrationLogic(runner=fake.runner).start(fixed, moving)
    deadline = time.time() + 60
    while not job.poll() and time.time() < deadline:  # poll() never raises: the error waits in result()
        time.sleep(0.02)
    with pytest.raises(InputError, match="warped.nrrd': no such file"):
        job.result()
    assert scene.GetNumberOfNodes() == count and not job.workdir.exists()


def test_cancel_ends_the_job_with_cancelled_and_cleans_up(scene, fake, rng):
    fixed, moving = _images(scene, rng)
    fake.mode("hang")
    seen = []
    job = RegistrationLogic(runner=fake.runner).start(fixed, moving, progress=lambda f, m: seen.append(m))
    deadline = time.time() + 60
    while "hanging" not in seen and time.time() < deadline:
        assert job.poll() is False
        time.sleep(0.02)
    count = scene.GetNumberOfNodes()
    job.cancel()
    while not job.poll() and time.time() < deadline:
        time.sleep(0.02)
    assert job.done and isinstance(job.error, Cancelled)
    with pytest.raises(Cancelled, match="meddl register: cancelled"):
        job.result()
    assert scene.GetNumberOfNodes() == count
    assert not job.workdir.exists()


def test_choices_list_what_the_command_line_accepts():
    from meddl.cli import build_parser
    from meddl.slicer_logic import (
        AdaptMode,
        FourierDomain,
        FourierWindow,
        Prealignment,
        ReconstructionMethod,
        Similarity,
        StainMethod,
        Undersampling,
    )

    assert choices(RegistrationMethod) == ["network+optimisation", "network", "optimisation"]
    parser = build_parser()
    register = next(a for a in parser._actions if a.dest == "command").choices["register"]
    flags = {a.option_strings[0]: a.choices for a in register._actions if a.option_strings}
    assert choices(RegistrationMethod) == list(flags["--method"])
    assert choices(Similarity) == list(flags["--similarity"])
    assert choices(Prealignment) == list(flags["--affine"])

    def flags_of(parser):
        return {a.option_strings[0]: a.choices for a in parser._actions if a.option_strings}

    commands = next(a for a in parser._actions if a.dest == "command").choices
    recon = flags_of(commands["reconstruct"])
    assert set(choices(ReconstructionMethod)) == set(recon["--method"])  # (each list has its default first)
    assert choices(Undersampling) == list(recon["--undersample"])
    adapt = next(a for a in commands["adapt"]._actions if a.dest and a.choices and "stain" in a.choices).choices
    assert {m.value for m in AdaptMode} <= set(adapt)
    assert set(choices(StainMethod)) == set(flags_of(adapt["stain"])["--method"])
    fourier = flags_of(adapt["fourier"])
    assert set(choices(FourierWindow)) == set(fourier["--window"])
    assert set(choices(FourierDomain)) == set(fourier["--domain"])


# -- the real meddl command ---------------------------------------------------------------------


def test_real_meddl_error_line_is_raised_for_an_rgb_fixed_image(scene, rng):
    rgb = _volume_node(scene, rng.integers(0, 255, size=(3, 8, 7, 5)).astype(np.uint8), "rgb")
    _, moving = _images(scene, rng)
    with pytest.raises(ProcessError, match="(?i)rgb|scalar|component|channel") as err:
        RegistrationLogic(runner=ProcessRunner()).run(rgb, moving, device="cpu", transform=False)
    result = err.value.result
    assert result.returncode == 2 and str(err.value) == result.error  # the command's own one-line message
    assert f"error: {result.error}" in result.stderr


def test_real_meddl_registration_transform_node_moves_points_like_the_shift(scene):
    """End to end: two blob volumes 4 mm apart along R -> meddl register -> a grid transform node
    whose "from parent" (fixed -> moving, the resampling convention) moves the blob's centre by the
    shift, and a warped volume that matches the fixed one."""
    spacing = 2.0
    affine = affine_from_geometry([spacing] * 3, [-20.0, -16.0, -12.0])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in (20, 16, 12)], indexing="ij"), -1).astype(float)
    ras = idx * spacing + np.array([-20.0, -16.0, -12.0])
    shift = np.array([4.0, 0.0, 0.0])

    def blob(centre):
        r2 = (((ras - centre) / np.array([7.0, 5.0, 4.0])) ** 2).sum(-1)
        return np.exp(-r2)[None].astype(np.float32)

    centre = np.array([-1.0, -1.0, -1.0])
    fixed = _volume_node(scene, blob(centre), "fixed", affine=affine)
    moving = _volume_node(scene, blob(centre + shift), "moving", affine=affine)
    result = RegistrationLogic(runner=ProcessRunner()).run(
        fixed, moving, method="optimisation", similarity="lncc", prealignment="none", device="cpu", seed=0,
        inverse_transform=True, timeout=300)
    p = result.transform.GetTransformFromParent().TransformPoint(list(centre))
    np.testing.assert_allclose(np.array(p) - centre, shift, atol=1.0)
    back = result.inverse_transform.GetTransformFromParent().TransformPoint(list(centre + shift))
    np.testing.assert_allclose(back, centre, atol=1.0)  # the other way: moving's blob to fixed's
    assert result.inverse_transform.GetName() == "fixed to moving"
    field = mrml.transform_node_to_displacement(result.transform)
    i, j, k = np.round((centre - ras[0, 0, 0]) / spacing).astype(int)
    np.testing.assert_allclose(field.numpy()[:, i, j, k], shift, atol=1.0)
    warped = mrml.node_to_volume(result.warped).numpy()
    before = np.abs(mrml.node_to_volume(moving).numpy() - blob(centre)).mean()
    assert np.abs(warped - blob(centre)).mean() < 0.3 * before


@pytest.mark.slow
def test_real_meddl_fourier_adaptation_round_trip(scene, rng):
    """End to end with the real command: nodes -> files -> meddl adapt fourier -> a node on the input grid."""
    image = _volume_node(scene, rng.normal(100, 10, size=(1, 16, 12, 6)).astype(np.float32), "image")
    reference = _volume_node(scene, rng.normal(300, 50, size=(1, 16, 12, 6)).astype(np.float32), "reference")
    result = AdaptationLogic(runner=ProcessRunner()).run(image, [reference], mode="fourier", beta=0.1,
                                                         device="cpu", timeout=300)
    out = mrml.node_to_volume(result.output)
    np.testing.assert_allclose(out.affine, _affine(), atol=1e-6)
    assert out.spatial_shape == (16, 12, 6) and result.process.ok
    before = mrml.node_to_volume(image).numpy()
    assert not np.allclose(out.numpy(), before)  # adapted (the command clips to the input's range)
    assert out.numpy().max() <= before.max() + 1e-3


def _pending_capabilities() -> list[str]:
    from meddl.cli import capability_module

    return [name for name in ("register", "segment") if capability_module(name) is None]


@pytest.mark.skipif(not _pending_capabilities(), reason="every capability is built")
def test_real_meddl_not_available_capability_surfaces_its_error_line(scene, rng):
    fixed, moving = _images(scene, rng)
    name = _pending_capabilities()[0]
    if name == "register":
        job = RegistrationLogic(runner=ProcessRunner()).start(fixed, moving, device="cpu")
    else:
        painted = _segmentation(scene)
        job = InContextSegmentationLogic(runner=ProcessRunner()).start(
            fixed, segmentation=painted, segment_id=painted.GetSegmentation().GetNthSegmentID(0), device="cpu")
    with pytest.raises(MedDLError, match=f"meddl {name}: .* is not available"):
        job.wait(timeout=120)
    assert not job.workdir.exists()


# -- reconstruction -----------------------------------------------------------------------------


@pytest.fixture
def kspace_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "file1000001.h5"
    with h5py.File(path, "w") as f:
        f.attrs["acquisition"] = "CORPD_FBK"
        f.create_dataset("kspace", data=np.zeros((2, 4, 16, 12), np.complex64))
        f.create_dataset("ismrmrd_header", data=b"<ismrmrdHeader>\n  <encoding>cartesian</encoding>\n</ismrmrdHeader>")
    return path


def test_reconstruction_outputs_and_coil_sequence(scene, fake, kspace_file):
    result = ReconstructionLogic(runner=fake.runner).run(
        kspace_file, scene=scene, method="cg-sense", undersampling="equispaced", acceleration=4,
        center_fraction=0.08, zero_filled=True, uncertainty=True, phase=True, coil_images=True, device="cpu")
    argv = fake.record()["argv"]
    assert argv[:2] == ["reconstruct", str(kspace_file)]
    assert _flag(argv, "--method") == "cg-sense" and _flag(argv, "--undersample") == "equispaced"
    assert _flag(argv, "--acceleration") == "4" and _flag(argv, "--center-fraction") == "0.08"
    ReconstructionLogic(runner=fake.runner).run(kspace_file, scene=scene, undersampling="equispaced", acceleration=8)
    assert "--center-fraction" not in fake.record()["argv"]  # the command's own 0.32 / R (0.04 at 8x)
    assert {"--uncertainty", "--zero-filled", "--phase", "--coil-images"} <= set(argv)
    assert result.reconstruction.GetName() == "file1000001 cg-sense"
    np.testing.assert_allclose(mrml.node_to_volume(result.reconstruction).numpy(), 7.0)
    np.testing.assert_allclose(mrml.node_to_volume(result.zero_filled).numpy(), 3.0)
    np.testing.assert_allclose(mrml.node_to_volume(result.uncertainty).numpy(), 0.1, rtol=1e-6)
    np.testing.assert_allclose(mrml.node_to_volume(result.phase).numpy(), -1.5)
    assert result.phase.GetName() == "file1000001 phase"
    coils = mrml.sequence_node_to_volumes(result.coil_images)
    assert [float(v.numpy().mean()) for v in coils] == [0.0, 1.0, 2.0, 3.0]
    assert result.coil_images.GetIndexName() == "coil"
    np.testing.assert_allclose(coils[0].spacing, [0.5, 0.5, 3.0])


def test_reconstruction_without_undersampling_sends_no_undersampling_flags(scene, fake, kspace_file):
    result = ReconstructionLogic(runner=fake.runner).run(kspace_file, scene=scene)
    argv = fake.record()["argv"]
    assert _flag(argv, "--method") == "auto"  # the default: the VarNet or TV, by held-out k-space lines
    assert result.reconstruction.GetName() == "file1000001 tv"  # named by what auto chose (the summary)
    assert not {"--undersample", "--acceleration", "--center-fraction", "--zero-filled", "--phase",
                "--coil-images", "--repetition"} & set(argv)
    ReconstructionLogic(runner=fake.runner).run(kspace_file, scene=scene, repetition=2)
    assert _flag(fake.record()["argv"], "--repetition") == "2"


def test_any_other_command_option_goes_through_by_its_long_name(scene, fake, kspace_file):
    ReconstructionLogic(runner=fake.runner).run(kspace_file, scene=scene, method="tv", iterations=20,
                                                regularization=0.01, slices="0:1", probes=None, coil_images=False)
    argv = fake.record()["argv"]
    assert _flag(argv, "--iterations") == "20" and _flag(argv, "--regularization") == "0.01"
    assert _flag(argv, "--slices") == "0:1" and "--probes" not in argv
    assert RegistrationLogic()._options({"levels": [5, 3], "quick": True, "fold_penalty": 0}) == [
        "--levels", "5", "3", "--quick", "--fold-penalty", "0"]
    with pytest.raises(InputError, match=r"meddl reconstruct: option 'coils_out' is set by the Logic itself"):
        ReconstructionLogic(runner=fake.runner).start(kspace_file, scene=scene, coils_out="/tmp/x.nrrd")


@pytest.mark.parametrize("kwargs, message", [
    ({"undersampling": "radial"}, "undersampling: expected one of equispaced, random"),
    ({"undersampling": "random", "center_fraction": 1.5}, "centre fraction: expected a value between 0 and 1"),
    ({"method": "grappa"}, "reconstruction method: expected one of auto, varnet, zero-filled, cg-sense, l1-wavelet, tv"),
])
def test_reconstruction_refuses_bad_options(scene, fake, kspace_file, kwargs, message):
    with pytest.raises(InputError, match=message):
        ReconstructionLogic(runner=fake.runner).start(kspace_file, scene=scene, **kwargs)


def test_reconstruction_needs_an_existing_file(scene, fake, tmp_path):
    with pytest.raises(InputError, match="expected an existing k-space file"):
        ReconstructionLogic(runner=fake.runner).start(tmp_path / "missing.h5", scene=scene)


def test_kspace_header_text_lists_datasets_and_ismrmrd_header(kspace_file, tmp_path):
    text = ReconstructionLogic.header_text(kspace_file)
    assert "@acquisition = CORPD_FBK" in text
    assert "kspace: shape (2, 4, 16, 12), complex64" in text
    assert "<encoding>cartesian</encoding>" in text
    assert "(not readable as k-space" in text  # all-zero k-space: no sampling pattern to find


def test_kspace_header_text_before_a_file_is_chosen(tmp_path):
    assert ReconstructionLogic.header_text(".") == "(choose a k-space file: fastMRI or ISMRMRD .h5, or BART .cfl)"
    assert ReconstructionLogic.header_text(tmp_path / "absent.h5").startswith("(no such file:")


def test_kspace_header_text_starts_with_what_the_reconstruction_sees(tmp_path):
    pytest.importorskip("h5py")
    from meddl.reconstruction.demo import simulated_file

    text = ReconstructionLogic.header_text(simulated_file(tmp_path / "sim.h5", size=32, coils=4))
    summary = text.split("\n--\n")[0]
    assert "format: fastmri" in summary and "coils: 4" in summary and "kspace_matrix: [32, 32]" in summary
    assert "acceleration: 1.0" in summary and "has_reference: True" in summary
    assert "kspace: shape (1, 4, 32, 32), complex64" in text
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    assert ReconstructionLogic.header_text(bad).startswith("(not a readable HDF5 file")


def test_kspace_header_text_of_bart_data_shows_its_text_header(tmp_path, rng):
    from meddl.reconstruction.bart_io import write_cfl

    k = (rng.normal(size=(16, 12, 1, 3)) + 1j * rng.normal(size=(16, 12, 1, 3))).astype(np.complex64)
    _, cfl = write_cfl(tmp_path / "scan", k)
    text = ReconstructionLogic.header_text(cfl)
    summary, raw = text.split("\n--\n")
    assert "format: bart" in summary and "coils: 3" in summary and "kspace_matrix: [16, 12]" in summary
    assert raw.splitlines()[:3] == ["BART header:", "# Dimensions", "16 12 1 3 1"]


# -- domain adaptation --------------------------------------------------------------------------


def _rgb_node(scene, rng, name):
    return _volume_node(scene, rng.integers(0, 255, size=(3, 9, 8, 1)).astype(np.uint8), name)


def test_stain_adaptation_of_an_rgb_volume_with_h_and_e_outputs(scene, fake, rng):
    slide, reference = _rgb_node(scene, rng, "slide"), _rgb_node(scene, rng, "reference")
    before = mrml.node_to_volume(slide).numpy().copy()
    result = AdaptationLogic(runner=fake.runner).run(
        slide, [reference], mode="stain", method="vahadane", hematoxylin=True, eosin=True, device="cpu")
    argv = fake.record()["argv"]
    assert argv[:2] == ["adapt", "stain"] and _flag(argv, "--method") == "vahadane" and "--stains-out" in argv
    assert fake.record()["inputs"][argv[2]]["channels"] == 3
    assert result.output.IsA("vtkMRMLVectorVolumeNode") and result.output.GetName() == "slide adapted"
    np.testing.assert_array_equal(mrml.node_to_volume(result.output).numpy(), 255 - before)
    np.testing.assert_allclose(mrml.node_to_volume(result.hematoxylin).numpy(), 0.25)
    np.testing.assert_allclose(mrml.node_to_volume(result.eosin).numpy(), 0.75)
    np.testing.assert_array_equal(mrml.node_to_volume(slide).numpy(), before)


def test_stain_adaptation_gives_the_dab_map_with_the_hed_separation(scene, fake, rng):
    slide, reference = _rgb_node(scene, rng, "slide"), _rgb_node(scene, rng, "reference")
    result = AdaptationLogic(runner=fake.runner).run(
        slide, [reference], mode="stain", method="macenko", separation="hed", dab=True, device="cpu")
    argv = fake.record()["argv"]
    assert _flag(argv, "--separation") == "hed" and "--stains-out" in argv
    assert result.dab.GetName() == "slide DAB" and result.hematoxylin is None
    np.testing.assert_allclose(mrml.node_to_volume(result.dab).numpy(), 0.5)
    result = AdaptationLogic(runner=fake.runner).run(slide, [reference], mode="stain", method="reinhard", dab=True)
    assert "--separation" not in fake.record()["argv"] and result.dab is not None  # Reinhard's maps are HED's
    with pytest.raises(InputError, match=r"DAB volume: expected the hed separation .*got 'macenko'"):
        AdaptationLogic(runner=fake.runner).start(slide, [reference], mode="stain", method="macenko", dab=True)
    with pytest.raises(InputError, match=r"stain separation"):
        AdaptationLogic(runner=fake.runner).start(slide, [reference], mode="stain", separation="pca", dab=True)


def test_an_output_node_of_another_kind_is_left_alone_and_a_new_node_made(scene, fake, rng):
    slide, reference = _rgb_node(scene, rng, "slide"), _rgb_node(scene, rng, "reference")
    grey = _volume_node(scene, np.zeros((1, 9, 8, 1), np.float32), "grey")  # e.g. left by a Fourier run
    result = AdaptationLogic(runner=fake.runner).run(slide, [reference], mode="stain", output=grey, device="cpu")
    assert result.output is not grey and result.output.IsA("vtkMRMLVectorVolumeNode")
    np.testing.assert_array_equal(mrml.node_to_volume(grey).numpy(), 0.0)


def test_one_node_for_two_outputs_is_refused(scene, fake, rng):
    slide, reference = _rgb_node(scene, rng, "slide"), _rgb_node(scene, rng, "reference")
    shared = _volume_node(scene, np.zeros((1, 9, 8, 1), np.float32), "shared")
    with pytest.raises(InputError, match=r"eosin volume: expected another node than the hematoxylin volume, "
                                         r"got 'shared' for both"):
        AdaptationLogic(runner=fake.runner).start(slide, [reference], mode="stain", hematoxylin=shared, eosin=shared)


def test_fourier_adaptation_sends_every_reference_beta_and_window(scene, fake, rng):
    image = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "image")
    refs = [_volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), f"ref{i}") for i in range(2)]
    AdaptationLogic(runner=fake.runner).run(image, refs, mode="fourier", beta=0.05, window="circle")
    argv = fake.record()["argv"]
    assert argv[:2] == ["adapt", "fourier"]
    assert len(argv[2:argv.index("-o")]) == 3  # the input and both references
    assert _flag(argv, "--beta") == "0.05" and _flag(argv, "--window") == "circle"
    assert "--method" not in argv and "--stains-out" not in argv
    AdaptationLogic(runner=fake.runner).run(image, refs[:1], mode="fourier", window="square")
    argv = fake.record()["argv"]
    assert _flag(argv, "--window") == "square" and "--beta" not in argv  # the command picks beta for the window
    assert _flag(argv, "--domain") == "intensity"
    AdaptationLogic(runner=fake.runner).run(image, refs[:1], mode="fourier", domain="log")
    assert _flag(fake.record()["argv"], "--domain") == "log"


def test_histogram_matching_baseline_from_the_logic(scene, fake, rng):
    image = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "image")
    ref = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "ref")
    result = AdaptationLogic(runner=fake.runner).run(image, [ref], mode="histogram", match_points=9)
    argv = fake.record()["argv"]
    assert argv[:2] == ["adapt", "histogram"] and len(argv[2:argv.index("-o")]) == 2
    assert _flag(argv, "--match-points") == "9" and not {"--window", "--beta", "--method"} & set(argv)
    assert result.output.GetName() == "image adapted"


def test_classwise_baseline_matches_the_two_segmentations_by_segment_name(scene, fake, rng, tmp_path):
    from meddl import io

    image = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "image")
    ref = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "ref")
    mine = _segmentation(scene, name="mine")  # liver 1, spleen 2
    labels = np.zeros((1, 8, 7, 5), np.uint8)
    labels[0, 2:4, 2:4, 1:3] = 1
    labels[0, 5:7, 4:6, 2:4] = 2
    theirs = mrml.labels_to_segmentation_node(  # the same places, the names' order swapped
        Volume(labels, _affine(), Kind.LABEL), scene,
        [mrml.SegmentInfo(1, "spleen", (0.2, 0.2, 0.8)), mrml.SegmentInfo(2, "liver", (0.8, 0.2, 0.2))], name="theirs")
    result = AdaptationLogic(runner=fake.runner, keep_files=True, temp_root=tmp_path).run(
        image, [ref], mode="classwise", labels=mine, reference_labels=theirs)
    argv = fake.record()["argv"]
    assert argv[:2] == ["adapt", "classwise"] and len(argv[2:argv.index("-o")]) == 4
    a = io.read(argv[3], kind="label").numpy()[0]
    b = io.read(argv[5], kind="label").numpy()[0]
    assert int(a[2, 2, 1]) == int(b[5, 4, 2]) and int(a[5, 4, 2]) == int(b[2, 2, 1])  # liver is liver
    assert result.output.GetName() == "image adapted"
    with pytest.raises(InputError, match=r"meddl adapt classwise: expected the labels of the input and of the "
                                         r"reference, got only one"):
        AdaptationLogic(runner=fake.runner).start(image, [ref], mode="classwise", labels=mine)
    with pytest.raises(InputError, match=r"labels: expected classwise mode, got fourier"):
        AdaptationLogic(runner=fake.runner).start(image, [ref], mode="fourier", labels=mine, reference_labels=theirs)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "stain", "references": 2}, "expected exactly one reference volume, got 2"),
    ({"mode": "fourier", "beta": 0.7}, "beta: expected a value in \\[0, 0.5\\], got 0.7"),
    ({"mode": "cyclegan"}, "adaptation mode: expected one of stain, fourier, histogram"),
    ({"mode": "histogram", "references": 2}, "meddl adapt histogram: expected exactly one reference volume, got 2"),
    ({"mode": "fourier", "hematoxylin": True}, "hematoxylin/eosin/DAB outputs: expected stain mode, got fourier"),
    ({"mode": "fourier", "domain": "sqrt"}, "Fourier domain: expected one of intensity, log"),
])
def test_adaptation_refuses_bad_requests(scene, fake, rng, kwargs, message):
    slide = _rgb_node(scene, rng, "slide")
    refs = [_rgb_node(scene, rng, f"r{i}") for i in range(kwargs.pop("references", 1))]
    with pytest.raises(InputError, match=message):
        AdaptationLogic(runner=fake.runner).start(slide, refs, **kwargs)


# -- in-context segmentation --------------------------------------------------------------------


def _segment_id(node, name):
    return node.GetSegmentation().GetSegmentIdBySegmentName(name)


def test_painted_slices_result_added_as_a_new_segment(scene, fake, rng):
    target = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "target")
    painted = _segmentation(scene)
    liver = _segment_id(painted, "liver")
    liver_voxels = _segment_voxels(painted, liver, target)
    result = InContextSegmentationLogic(runner=fake.runner).run(
        target, segmentation=painted, segment_id=liver, device="cpu")
    argv = fake.record()["argv"]
    assert argv[0] == "segment" and _flag(argv, "--task") == "segmentation"
    annotated = fake.record()["inputs"][_flag(argv, "--annotated")]
    assert annotated["shape"] == [8, 7, 5]  # exported on the target's grid
    assert result.segmentation is painted and len(result.segment_ids) == 1
    new = painted.GetSegmentation().GetSegment(result.segment_ids[0])
    assert new.GetName() == "liver (in-context)"
    assert painted.GetSegmentation().GetNumberOfSegments() == 3
    assert _segment_voxels(painted, result.segment_ids[0], target) == 6 * 5 * 5  # the fake's box
    assert _segment_voxels(painted, liver, target) == liver_voxels  # what the user painted is untouched


def test_prior_weight_goes_to_the_command_and_is_checked(scene, fake, rng):
    target = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "target")
    painted = _segmentation(scene)
    liver = _segment_id(painted, "liver")
    InContextSegmentationLogic(runner=fake.runner).run(target, segmentation=painted, segment_id=liver, prior=0.2)
    assert float(_flag(fake.record()["argv"], "--prior")) == 0.2
    with pytest.raises(InputError, match=r"prior: expected a weight between 0 and 1, got 1.5"):
        InContextSegmentationLogic(runner=fake.runner).start(target, segmentation=painted, segment_id=liver, prior=1.5)


def test_replace_segment_keeps_id_name_colour_and_other_segments(scene, fake, rng):
    target = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "target")
    painted = _segmentation(scene)
    liver, spleen = _segment_id(painted, "liver"), _segment_id(painted, "spleen")
    spleen_voxels = _segment_voxels(painted, spleen, target)
    result = InContextSegmentationLogic(runner=fake.runner).run(
        target, segmentation=painted, segment_id=liver, output_mode="replace segment")
    assert result.segment_ids == [liver]
    seg = painted.GetSegmentation()
    assert seg.GetNumberOfSegments() == 2 and seg.GetSegmentIndex(liver) == 0
    assert seg.GetSegment(liver).GetName() == "liver"
    np.testing.assert_allclose(seg.GetSegment(liver).GetColor(), (0.8, 0.2, 0.2))
    assert _segment_voxels(painted, liver, target) == 6 * 5 * 5
    assert _segment_voxels(painted, spleen, target) == spleen_voxels


def test_several_painted_segments_in_one_run(scene, fake, rng):
    target = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "target")
    painted = _segmentation(scene)
    liver, spleen = _segment_id(painted, "liver"), _segment_id(painted, "spleen")
    result = InContextSegmentationLogic(runner=fake.runner).run(target, segmentation=painted,
                                                                segment_id=[liver, spleen])
    annotated = fake.record()["inputs"][_flag(fake.record()["argv"], "--annotated")]
    assert annotated["shape"] == [8, 7, 5] and len(result.segment_ids) == 2
    seg = painted.GetSegmentation()
    assert [seg.GetSegment(i).GetName() for i in result.segment_ids] == ["liver (in-context)", "spleen (in-context)"]
    assert [_segment_voxels(painted, i, target) for i in result.segment_ids] == [6 * 5 * 5, 7 * 5]
    replaced = InContextSegmentationLogic(runner=fake.runner).run(target, segmentation=painted,
                                                                  segment_id=[liver, spleen],
                                                                  output_mode="replace segment")
    assert replaced.segment_ids == [liver, spleen] and seg.GetNumberOfSegments() == 4
    assert [seg.GetSegment(i).GetName() for i in (liver, spleen)] == ["liver", "spleen"]
    assert [seg.GetSegmentIndex(i) for i in (liver, spleen)] == [0, 1]
    np.testing.assert_allclose(seg.GetSegment(spleen).GetColor(), (0.2, 0.2, 0.8))
    assert [_segment_voxels(painted, i, target) for i in (liver, spleen)] == [6 * 5 * 5, 7 * 5]
    with pytest.raises(InputError, match=r"segment: expected a segment of 'painted', got unknown ID 'nope'"):
        InContextSegmentationLogic(runner=fake.runner).start(target, segmentation=painted, segment_id=[liver, "nope"])


def test_context_examples_and_new_label_volume(scene, fake, rng):
    target = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "target")
    pairs = [(_volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), f"ex{i}"),
              _segmentation(scene, name=f"ex{i} seg")) for i in range(2)]
    result = InContextSegmentationLogic(runner=fake.runner).run(target, context=pairs, output_mode="new volume")
    argv = fake.record()["argv"]
    start = argv.index("--context") + 1
    assert len(argv[start:argv.index("--task")]) == 4
    assert result.volume.IsA("vtkMRMLLabelMapVolumeNode")
    assert result.volume.GetName() == "target in-context"
    np.testing.assert_allclose(_ijk_to_ras(result.volume), _ijk_to_ras(target), atol=1e-6)


def test_context_examples_make_a_new_segmentation_by_default(scene, fake, rng):
    target = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "target")
    pair = (_volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "ex"), _segmentation(scene))
    result = InContextSegmentationLogic(runner=fake.runner).run(target, context=[pair])
    assert result.segmentation is not pair[1]
    names = {result.segmentation.GetSegmentation().GetSegment(i).GetName() for i in result.segment_ids}
    assert "liver (in-context)" in names
    assert "--align" not in fake.record()["argv"]  # the command's default (affine) unless asked
    InContextSegmentationLogic(runner=fake.runner).run(target, context=[pair], align="none")
    assert _flag(fake.record()["argv"], "--align") == "none"
    with pytest.raises(InputError, match=r"align: expected one of auto, affine, center, deformable, none, got 'rigid'"):
        InContextSegmentationLogic(runner=fake.runner).start(target, context=[pair], align="rigid")
    assert "--atlas-prior" not in fake.record()["argv"]
    InContextSegmentationLogic(runner=fake.runner).run(target, context=[pair], align="deformable", atlas_prior=0.6)
    argv = fake.record()["argv"]
    assert _flag(argv, "--align") == "deformable" and float(_flag(argv, "--atlas-prior")) == 0.6
    with pytest.raises(InputError, match=r"atlas prior: expected a weight between 0 and 1, got 1.5"):
        InContextSegmentationLogic(runner=fake.runner).start(target, context=[pair], atlas_prior=1.5)


def test_image_task_takes_volume_pairs_and_gives_a_volume(scene, fake, rng):
    target = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "target")
    pairs = [(_volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "noisy"),
              _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "clean"))]
    result = InContextSegmentationLogic(runner=fake.runner).run(target, context=pairs, task="denoise")
    argv = fake.record()["argv"]
    assert _flag(argv, "--task") == "denoise"
    example_output = argv[argv.index("--context") + 2]
    assert fake.record()["inputs"][example_output]["dtype"] == "float32"  # written as an image, not labels
    assert result.volume.IsA("vtkMRMLScalarVolumeNode") and not result.volume.IsA("vtkMRMLLabelMapVolumeNode")
    assert result.volume.GetName() == "target denoise" and result.segmentation is None


def test_in_context_tasks_are_those_of_the_library():
    inference = pytest.importorskip("meddl.incontext.inference")
    assert list(IN_CONTEXT_TASKS) == [t.value for t in inference.Task]
    assert IN_CONTEXT_ALIGN == inference.ALIGN_MODES


@pytest.mark.parametrize("how, message", [
    ("unknown task", "task: expected one of segmentation, denoise, .*, got 'organ'"),
    ("image task painted", "task 'denoise': expected context examples"),
    ("both", "expected either a segmentation painted on the target or context examples, got both"),
    ("neither", "got neither"),
    ("no segment", "expected the painted segment to be chosen"),
    ("replace with context", "output 'replace segment': expected a painted segment to replace"),
])
def test_in_context_refuses_ambiguous_requests(scene, fake, rng, how, message):
    target = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "target")
    painted = _segmentation(scene)
    pair = (_volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "ex"), painted)
    kwargs = {
        "unknown task": {"context": [pair], "task": "organ"},
        "image task painted": {"segmentation": painted, "segment_id": "x", "task": "denoise"},
        "both": {"segmentation": painted, "segment_id": "x", "context": [pair]},
        "neither": {},
        "no segment": {"segmentation": painted},
        "replace with context": {"context": [pair], "output_mode": "replace segment"},
    }[how]
    with pytest.raises(InputError, match=message):
        InContextSegmentationLogic(runner=fake.runner).start(target, **kwargs)


def test_logic_module_imports_no_gui():
    code = ("import sys, meddl.slicer_logic, meddl.runner; "
            "bad = [m for m in ('qt', 'ctk', 'slicer', 'vtk') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       env={**os.environ, "PYTHONPATH": str(Path(mrml.__file__).parent.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_context_examples_are_matched_by_segment_name_not_order(scene, fake, rng, tmp_path):
    from meddl import io

    target = _volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), "target")
    first = _segmentation(scene, name="ex0 seg")  # liver 1, spleen 2
    labels = np.zeros((1, 8, 7, 5), np.uint8)
    labels[0, 2:4, 2:4, 1:3] = 1  # this example numbers spleen 1, liver 2, and adds a kidney
    labels[0, 5:7, 4:6, 2:4] = 2
    labels[0, 0:2, 0:2, 0:2] = 3
    second = mrml.labels_to_segmentation_node(
        Volume(labels, _affine(), Kind.LABEL), scene,
        [mrml.SegmentInfo(1, "spleen", (0.2, 0.2, 0.8)), mrml.SegmentInfo(2, "liver", (0.8, 0.2, 0.2)),
         mrml.SegmentInfo(3, "kidney", (0.2, 0.8, 0.2))], name="ex1 seg")
    pairs = [(_volume_node(scene, rng.normal(size=(1, 8, 7, 5)).astype(np.float32), f"ex{i}"), seg)
             for i, seg in enumerate((first, second))]
    logic = InContextSegmentationLogic(runner=fake.runner, keep_files=True, temp_root=tmp_path)  # kept: in tmp_path
    result = logic.run(target, context=pairs)
    argv = fake.record()["argv"]
    start = argv.index("--context") + 1
    a = io.read(argv[start + 1], kind="label").numpy()[0]
    b = io.read(argv[start + 3], kind="label").numpy()[0]
    liver, spleen = int(a[2, 2, 1]), int(a[5, 4, 2])
    assert (liver, spleen) == (1, 2)
    assert int(b[2, 2, 1]) == spleen and int(b[5, 4, 2]) == liver  # the second example renumbered by name
    assert int(b[0, 0, 0]) == 3  # a name the first example lacks takes a free value
    names = {result.segmentation.GetSegmentation().GetSegment(i).GetName() for i in result.segment_ids}
    assert {"liver (in-context)", "spleen (in-context)"} <= names


def test_reading_a_kspace_header_does_not_load_torch_into_slicer(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("h5py")
    from meddl.reconstruction.demo import simulated_file

    path = simulated_file(tmp_path / "sim.h5", size=32, coils=4)
    code = ("import sys; from meddl.slicer_logic import ReconstructionLogic; "
            f"text = ReconstructionLogic.header_text({str(path)!r}); "
            "print('coils: 4' in text, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]
