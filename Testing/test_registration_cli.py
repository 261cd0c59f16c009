"""``meddl register`` end to end (in process through ``main``), and its bad-input answers."""

from __future__ import annotations

import re

import numpy as np
import pytest
from meddl import io
from meddl.cli import main
from meddl.volume import Kind, Volume
from test_registration_pipeline import phantom, shifted


@pytest.fixture
def pair(tmp_path):
    img = phantom()
    moving, _ = shifted(img, [2.0, -2.0, 1.0])
    labels = Volume((moving.numpy() > 0.5).astype(np.int16), moving.affine, Kind.LABEL)
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("fixed", "moving", "labels")}
    io.write(img, paths["fixed"])
    io.write(moving, paths["moving"])
    io.write(labels, paths["labels"])
    return paths


def test_register_writes_every_output(pair, tmp_path, capsys):
    out = {k: tmp_path / v for k, v in dict(warped="w.nii.gz", transform="t.h5", jacobian="j.nii.gz",
                                            inverse="i.nrrd", labels="l.nii.gz").items()}
    code = main(["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out["warped"]),
                 "--transform", str(out["transform"]), "--jacobian", str(out["jacobian"]), "--inverse", str(out["inverse"]),
                 "--moving-labels", str(pair["labels"]), "--labels-out", str(out["labels"]),
                 "--method", "optimisation", "--affine", "none", "--iterations", "10", "6", "--levels", "6", "4",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert all(p.is_file() for p in out.values())
    assert "folding=0.00%" in captured.out and "device=cpu" in captured.out
    labels = io.read(out["labels"], kind="label")
    assert set(np.unique(labels.numpy())) <= {0, 1}
    from meddl.transforms import read_transform

    field = read_transform(out["transform"])
    assert field.same_grid(io.read(pair["fixed"]))


@pytest.mark.parametrize("extra, message", [
    (["--moving-labels", "LABELS"], "go together"),
    (["--transform", "t.xyz"], "unknown transform format"),
    (["--iterations", "-3"], "iterations"),
    (["--iterations", "5", "5", "5", "--levels", "6", "4"], r"one per level \(2: 6 4 mm\), got 3"),
    (["--similarity", "ssd"], "invalid choice"),
    (["--levels", "2", "5"], "expected spacings from coarse to fine, got 2.0 5.0"),
    (["--levels", "4", "-1"], "levels_mm: expected positive spacings"),
    (["--fold-penalty", "-5"], "fold_penalty: expected a finite number >= 0, got -5.0"),
    (["--crop-margin", "wide"], "--crop-margin: expected a margin in mm or 'none', got 'wide'"),
    (["--crop-margin", "-3"], "crop_margin_mm: expected a finite number >= 0 or None, got -3.0"),
])
def test_register_usage_errors_exit_2(pair, tmp_path, capsys, extra, message):
    extra = [str(pair["labels"]) if e == "LABELS" else (str(tmp_path / e) if e.startswith("t.") else e) for e in extra]
    code = main(["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(tmp_path / "w.nii.gz"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and (message in err or re.search(message, err))


def test_register_refuses_rgb_and_mixed_dimensions(pair, tmp_path, capsys):
    img = io.read(pair["fixed"])
    rgb = Volume(np.repeat((img.numpy() * 255).astype(np.uint8), 3, axis=0), img.affine)
    io.write(rgb, tmp_path / "rgb.nrrd")
    code = main(["register", str(pair["fixed"]), str(tmp_path / "rgb.nrrd"), "-o", str(tmp_path / "w.nii.gz")])
    assert code == 2 and "scalar" in capsys.readouterr().err
    flat = Volume(img.numpy()[:, :, :, 10], np.eye(4))  # an in-plane 2D image (one placed in 3D is written 3D)
    io.write(flat, tmp_path / "slice.nii.gz")
    code = main(["register", str(pair["fixed"]), str(tmp_path / "slice.nii.gz"), "-o", str(tmp_path / "w.nii.gz")])
    assert code == 2 and "expected 3D like the fixed image" in capsys.readouterr().err
    code = main(["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(pair["moving"])])
    assert code == 2 and "also an input" in capsys.readouterr().err
    # DeepSim's extractor is 3D: a 2D pair is refused in one line, not a pooling error
    io.write(Volume(img.numpy()[:, :, :, 10], np.eye(4)), tmp_path / "a.nii.gz")
    code = main(["register", str(tmp_path / "slice.nii.gz"), str(tmp_path / "a.nii.gz"), "-o",
                 str(tmp_path / "w.nii.gz"), "--similarity", "deepsim"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"^error: --similarity deepsim: its feature extractor is a 3D network .* got a 2D",
                                   err) and err.count("\n") == 1


@pytest.mark.parametrize("flag, name", [("-o", "w.xyz"), ("--jacobian", "j.png"), ("--labels-out", "l.jpg")])
def test_an_output_format_that_cannot_hold_the_result_is_refused_before_registering(pair, tmp_path, capsys, flag,
                                                                                     name):
    outputs = {"-o": "w.nii.gz", "--transform": "t.h5", "--jacobian": "j.nii.gz", "--labels-out": "l.nii.gz", flag: name}
    argv = ["register", str(pair["fixed"]), str(pair["moving"]), "--moving-labels", str(pair["labels"])]
    for f, n in outputs.items():
        argv += [f, str(tmp_path / n)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"error: {flag} '" in err and "expected a volume file" in err
    assert not any((tmp_path / n).exists() for n in outputs.values())  # nothing written, no work done


def test_crop_margin_reaches_the_registration(pair, tmp_path, capsys, monkeypatch):
    import meddl.registration as registration

    seen = []
    original = registration.register

    def spy(fixed, moving, config, **kwargs):
        seen.append(config.crop_margin_mm)
        return original(fixed, moving, config, **kwargs)

    monkeypatch.setattr(registration, "register", spy)
    common = ["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(tmp_path / "w.nii.gz"),
              "--method", "optimisation", "--affine", "none", "--iterations", "2", "--levels", "6"]
    assert main([*common, "--crop-margin", "none"]) == 0
    assert main([*common, "--crop-margin", "25"]) == 0
    assert main(common) == 0
    assert seen == [None, 25.0, 10.0]
