"""``meddl adapt stain|fourier|histogram|classwise`` through ``meddl.cli.main``."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from meddl import Volume, io
from meddl.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("adapt")
    ihc = data.immunohistochemistry()
    io.write(Volume(np.ascontiguousarray(ihc[:96, :128].transpose(2, 1, 0))), folder / "slide.png")
    io.write(Volume(np.ascontiguousarray(ihc[200:328, 200:328].transpose(2, 1, 0))), folder / "ref.png")
    io.write(Volume(np.ascontiguousarray(ihc[:96, :128, :1].transpose(2, 1, 0))), folder / "grey.png")
    tifffile.imwrite(folder / "slide.tif", ihc[:96, :128], tile=(32, 32), photometric="rgb")
    rng = np.random.default_rng(0)
    for name, scale in (("mr.nii.gz", 1.0), ("mr_ref1.nii.gz", 2.0), ("mr_ref2.nii.gz", 3.0)):
        io.write(Volume((rng.random((1, 16, 18, 12)) * 100 * scale).astype(np.float32)), folder / name)
    io.write(Volume(rng.random((1, 16, 18)).astype(np.float32)), folder / "slice.nii.gz")
    labels = (rng.random((1, 16, 18, 12)) > 0.5).astype(np.int16)
    io.write(Volume(labels, kind="label"), folder / "labels.nii.gz")
    io.write(Volume(labels, np.diag([2.0, 2.0, 2.0, 1.0]), kind="label"), folder / "labels_2mm.nii.gz")
    io.write(Volume(np.zeros((1, 16, 18, 12), np.float32)), folder / "blank.nii.gz")
    return folder


def test_stain_writes_the_image_and_the_stains(images, capsys):
    out, prefix = images / "out.png", images / "stains.nrrd"
    assert main(["adapt", "stain", str(images / "slide.png"), str(images / "ref.png"), "-o", str(out),
                 "--stains-out", str(prefix), "--device", "cpu"]) == 0
    vol = io.read(out)
    assert vol.channels == 3 and vol.spatial_shape == (128, 96) and vol.numpy().dtype == np.uint8
    for name in ("H", "E"):
        stain = io.read(images / f"stains_{name}.nrrd")
        assert stain.channels == 1 and stain.spatial_shape == (128, 96)
    assert "stain normalisation (macenko)" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["reinhard", "vahadane"])
def test_stain_methods(method, images):
    out = images / f"out_{method}.png"
    assert main(["adapt", "stain", str(images / "slide.png"), str(images / "ref.png"), "-o", str(out),
                 "--method", method, "--device", "cpu"]) == 0
    assert io.read(out).channels == 3


def test_stain_tiled_streams_a_tiff(images):
    out = images / "out.tif"
    assert main(["adapt", "stain", str(images / "slide.tif"), str(images / "ref.png"), "-o", str(out),
                 "--tiled", "--device", "cpu"]) == 0
    assert tifffile.imread(out).shape == (96, 128, 3)


def test_fourier_each_reference_and_histogram_baseline(images):
    out = images / "fda.nii.gz"
    refs = [str(images / "mr_ref1.nii.gz"), str(images / "mr_ref2.nii.gz")]
    assert main(["adapt", "fourier", str(images / "mr.nii.gz"), *refs, "-o", str(out), "--combine", "each",
                 "--beta", "0.1", "--window", "square", "--mode", "2d", "--device", "cpu"]) == 0
    for i in (1, 2):
        assert io.read(images / f"fda_{i}.nii.gz").spatial_shape == (16, 18, 12)
    log = images / "fda_log.nii.gz"
    assert main(["adapt", "fourier", str(images / "mr.nii.gz"), refs[0], "-o", str(log), "--domain", "log",
                 "--beta", "0.1", "--device", "cpu"]) == 0
    assert io.read(log).spatial_shape == (16, 18, 12)
    hist = images / "hist.nii.gz"
    assert main(["adapt", "fourier", str(images / "mr.nii.gz"), *refs, "-o", str(hist), "--histogram-match"]) == 0
    assert io.read(hist).spatial_shape == (16, 18, 12)
    assert main(["adapt", "histogram", str(images / "mr.nii.gz"), refs[0], "-o", str(images / "h2.nii.gz")]) == 0
    assert main(["adapt", "classwise", str(images / "mr.nii.gz"), str(images / "labels.nii.gz"), refs[0],
                 str(images / "labels.nii.gz"), "-o", str(images / "cw.nii.gz")]) == 0


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["fourier", "{d}/mr.nii.gz", "{d}/mr_ref1.nii.gz", "-o", "{d}/x.nii.gz", "--beta", "-0.1"],
         r"error: Fourier beta: expected a number in \[0, 0.5\], got -0.1"),
        (["fourier", "{d}/mr.nii.gz", "{d}/mr_ref1.nii.gz", "-o", "{d}/x.nii.gz", "--beta", "0.7"],
         r"error: Fourier beta: expected a number in \[0, 0.5\], got 0.7"),
        (["fourier", "{d}/mr.nii.gz", "{d}/slice.nii.gz", "-o", "{d}/x.nii.gz"],
         r"error: reference 1: expected a 3D volume like the input, got 2D"),
        (["fourier", "{d}/mr.nii.gz", "{d}/mr_ref1.nii.gz", "-o", "{d}/x.nii.gz", "--log-offset", "0"],
         r"error: Fourier log offset: expected a number in \(0, 1\], got 0"),
        (["stain", "{d}/grey.png", "{d}/ref.png", "-o", "{d}/x.png"],
         r"error: input '.*grey.png': expected an RGB colour image \(3 components\), got 1"),
        (["stain", "{d}/slide.png", "{d}/ref.png", "-o", "{d}/slide.png"], r"error: output .* is also an input"),
        (["stain", "{d}/slide.png", "{d}/ref.png", "-o", "{d}/x.png", "--method", "fancy"], r"error: .*invalid choice"),
        ([], r"error: meddl adapt: expected a method"),
        (["fourier", "{d}/mr.nii.gz", "{d}/blank.nii.gz", "-o", "{d}/x.nii.gz"],
         r"error: reference 1: the image is constant \(0 everywhere\); there is no style to match"),
        (["fourier", "{d}/blank.nii.gz", "{d}/mr_ref1.nii.gz", "-o", "{d}/x.nii.gz"],
         r"error: input: the image is constant"),
        (["histogram", "{d}/mr.nii.gz", "{d}/blank.nii.gz", "-o", "{d}/x.nii.gz"],
         r"error: reference: the image is constant"),
        (["histogram", "{d}/mr.nii.gz", "{d}/mr_ref1.nii.gz", "-o", "{d}/x.nii.gz", "--levels", "5000000000"],
         r"error: histogram matching: expected 2 <= levels <= 65536 .* got 5000000000 levels"),
        (["histogram", "{d}/mr.nii.gz", "{d}/mr_ref1.nii.gz", "-o", "{d}/x.nii.gz", "--match-points", "300"],
         r"error: histogram matching: .*1 <= match points <= levels, got 256 levels and 300 match points"),
        (["classwise", "{d}/mr.nii.gz", "{d}/labels_2mm.nii.gz", "{d}/mr_ref1.nii.gz", "{d}/labels.nii.gz",
          "-o", "{d}/x.nii.gz"],
         r"error: labels: expected the grid of its image \(spacing 1 x 1 x 1 mm, origin 0 x 0 x 0 mm\), got "
         r"spacing 2 x 2 x 2 mm"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(argv, pattern, images, capsys):
    code = main(["adapt", *[a.format(d=images) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error:")
    import re

    assert re.search(pattern, err), err


def test_nan_input_is_refused(images, capsys):
    bad = np.ones((1, 8, 8, 8), np.float32)
    bad[0, 1, 1, 1] = np.nan
    io.write(Volume(bad), images / "nan.nii.gz")
    assert main(["adapt", "fourier", str(images / "nan.nii.gz"), str(images / "mr_ref1.nii.gz"), "-o",
                 str(images / "y.nii.gz")]) == 2
    assert "NaN" in capsys.readouterr().err


def test_background_only_slide_is_refused(images, capsys):
    io.write(Volume(np.full((3, 40, 40), 250, np.uint8)), images / "blank.png")
    assert main(["adapt", "stain", str(images / "blank.png"), str(images / "ref.png"), "-o",
                 str(images / "z.png")]) == 2
    assert "background only" in capsys.readouterr().err


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small images: one thread is faster, and far faster on a busy machine (no OpenMP barriers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_histogram_baseline_takes_the_most_similar_donors_and_refuses_beta(images, capsys):
    from meddl.adaptation import rank_donors
    from meddl.adaptation.baselines import histogram_match

    refs = [images / "mr_ref2.nii.gz", images / "mr.nii.gz", images / "mr_ref1.nii.gz"]
    out = images / "hist_best.nii.gz"
    assert main(["adapt", "fourier", str(images / "mr.nii.gz"), *map(str, refs), "-o", str(out), "--histogram-match",
                 "--donors", "1"]) == 0
    image = io.read(images / "mr.nii.gz")
    best = rank_donors(image, [io.read(r) for r in refs])[0][0]
    np.testing.assert_allclose(io.read(out).numpy(), histogram_match(image, io.read(refs[best])).numpy(), rtol=1e-6)
    capsys.readouterr()
    assert main(["adapt", "fourier", str(images / "mr.nii.gz"), str(refs[0]), "-o", str(images / "h2.nii.gz"),
                 "--histogram-match", "--beta", "0.05"]) == 2
    assert "error: --beta: applies to Fourier adaptation, not to --histogram-match" in capsys.readouterr().err


def test_stains_out_in_an_integer_format_is_refused_before_any_output(images, capsys):
    out = images / "never.png"
    assert main(["adapt", "stain", str(images / "slide.png"), str(images / "ref.png"), "-o", str(out),
                 "--stains-out", str(images / "stains.png"), "--device", "cpu"]) == 2
    assert "error: --stains-out: stain concentrations are floating point" in capsys.readouterr().err
    assert not out.exists()


def test_a_grey_picture_stored_as_rgb_still_pairs_with_a_colour_one(tmp_path, capsys):
    """A PNG with R = G = B reads as grey; beside a colour reference it gets its three channels back."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 24)).astype(np.uint8)
    Image.fromarray(grey, "L").convert("RGB").save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8), "RGB").save(tmp_path / "colour.png")
    for cmd in (["histogram", str(tmp_path / "grey.png"), str(tmp_path / "colour.png")],
                ["fourier", str(tmp_path / "grey.png"), str(tmp_path / "colour.png")]):
        out = tmp_path / f"{cmd[0]}.nrrd"
        assert main(["adapt", *cmd, "-o", str(out), "--progress", "none"]) == 0, capsys.readouterr().err
        assert io.read(out).channels == 3


def test_a_two_channel_input_is_adapted_channel_by_channel_with_a_notice(tmp_path, capsys):
    """A complex MetaImage reads as two channels (real, imaginary): the command says how to adapt its magnitude."""
    import SimpleITK as sitk

    rng = np.random.default_rng(1)
    mag = rng.random((20, 24)).astype(np.float32) + 1
    sitk.WriteImage(sitk.GetImageFromArray((mag * np.exp(1j * rng.random((20, 24)))).astype(np.complex64)),
                    str(tmp_path / "c.mha"))
    io.write(Volume(mag.T[None]), tmp_path / "ref.nii.gz")
    capsys.readouterr()
    assert main(["adapt", "fourier", str(tmp_path / "c.mha"), str(tmp_path / "ref.nii.gz"), "-o",
                 str(tmp_path / "out.nrrd"), "--device", "cpu", "--progress", "none"]) == 0
    text = "".join(capsys.readouterr())
    assert "notice: " in text and "adapted one by one" in text and "--component magnitude" in text
    assert io.read(tmp_path / "out.nrrd").channels == 2
