"""The meddl command as a real subprocess: one `error:` line and exit 2 for bad input, never a traceback."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from meddl import __version__, io
from meddl.cli import main
from meddl.errors import InputError
from meddl.volume import Kind, Volume


def _assert_clean_error(result, pattern: str) -> None:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def scalar3d(tmp_path, volume_factory):
    return str(io.write(volume_factory("float", 3), tmp_path / "scalar.nii.gz"))


def test_version(cli):
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"meddl {__version__}"


def test_missing_file(cli, tmp_path, scalar3d):
    result = cli("register", scalar3d, str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "w.nii.gz"), "--progress", "none")
    _assert_clean_error(result, r"cannot read '.*nope\.nii\.gz': no such file")


def test_empty_file(cli, tmp_path, scalar3d):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    result = cli("register", scalar3d, str(tmp_path / "empty.nii.gz"), "-o", str(tmp_path / "w.nii.gz"))
    _assert_clean_error(result, r"the file is empty")


def test_truncated_nifti(cli, tmp_path, scalar3d, volume_factory):
    raw = io.write(volume_factory("float", 3), tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) - 200])
    result = cli("register", scalar3d, str(tmp_path / "cut.nii"), "-o", str(tmp_path / "w.nii.gz"))
    _assert_clean_error(result, r"truncated NIfTI; expected \d+ bytes, got \d+")


def test_nan_volume(cli, tmp_path, scalar3d, volume_factory):
    vol = volume_factory("float", 3)
    data = vol.numpy().copy()
    data[0, 0, 0, 0] = np.nan
    path = io.write(vol.with_data(data), tmp_path / "nan.nii.gz")
    result = cli("register", scalar3d, str(path), "-o", str(tmp_path / "w.nii.gz"))
    _assert_clean_error(result, r"moving image .*expected finite voxel values, got 1 NaN/infinite voxel")


def test_4d_where_3d_needed(cli, tmp_path, scalar3d):
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkFloat32), str(tmp_path / "four.nii.gz"))
    result = cli("register", str(tmp_path / "four.nii.gz"), scalar3d, "-o", str(tmp_path / "w.nii.gz"))
    _assert_clean_error(result, r"expected 2D or 3D, got 4D")


def test_rgb_where_scalar_needed(cli, tmp_path, scalar3d, volume_factory):
    path = io.write(volume_factory("rgb", 3), tmp_path / "rgb.nrrd")
    result = cli("register", scalar3d, str(path), "-o", str(tmp_path / "w.nii.gz"))
    _assert_clean_error(result, r"expected a scalar \(single-component\) image, got an RGB image")


def test_output_that_is_an_input_is_refused(cli, scalar3d):
    result = cli("register", scalar3d, scalar3d, "-o", scalar3d)
    _assert_clean_error(result, r"is also an input")


def test_output_over_a_file_of_an_input_is_refused(cli, tmp_path, scalar3d):
    # a .mhd input whose data file has the name a .mhd output would write
    folder = tmp_path / "mhd"
    folder.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 5, 4), np.float32)), str(folder / "adapted.mhd"), True)
    (folder / "adapted.mhd").rename(folder / "img.mhd")
    assert "ElementDataFile = adapted.zraw" in (folder / "img.mhd").read_text()
    data = (folder / "adapted.zraw").read_bytes()
    result = cli("convert", str(folder / "img.mhd"), "-o", str(folder / "adapted.mhd"))
    _assert_clean_error(result, r"output '.*adapted\.mhd' would overwrite '.*adapted\.zraw', a file of input "
                                r"'.*img\.mhd'")
    assert (folder / "adapted.zraw").read_bytes() == data and not (folder / "adapted.mhd").exists()
    assert cli("convert", str(folder / "img.mhd"), "-o", str(folder / "other.mhd")).returncode == 0


def test_usage_errors_are_one_line(cli):
    _assert_clean_error(cli("register"), r"the following arguments are required")
    _assert_clean_error(cli("frobnicate"), r"invalid choice: 'frobnicate'")
    _assert_clean_error(cli("info", "x", "--bogus"), r"unrecognized arguments: --bogus")


def test_unavailable_device_is_one_line(cli, tmp_path, scalar3d):
    result = cli("register", scalar3d, scalar3d, "-o", str(tmp_path / "w.nii.gz"), "--device", "quantum")
    _assert_clean_error(result, r"--device: expected auto, cpu, cuda, cuda:N or mps, got 'quantum'")


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli("info", str(tmp_path / "absent.nii.gz"), "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot read")


@pytest.mark.parametrize("command", [
    ["reconstruct", "{file}", "-o", "{out}"],
    ["segment", "{file}", "-o", "{out}", "--annotated", "{file}"],
    ["batch", "{file}"],
])
def test_capabilities_not_in_this_build_say_so(cli, tmp_path, scalar3d, command):
    from meddl import cli as cli_module

    name = command[0]
    if cli_module.capability_module(name) is not None:
        pytest.skip(f"{name} is part of this build")
    args = [a.format(file=scalar3d, out=str(tmp_path / "o.nii.gz")) for a in command]
    _assert_clean_error(cli(*args), rf"meddl {name}: .* not available in this build")


def test_info_json_describes_geometry(cli, tmp_path, oblique):
    vol = Volume(np.arange(60, dtype=np.int16).reshape(1, 3, 4, 5), oblique(3))
    path = io.write(vol, tmp_path / "v.nrrd")
    result = cli("info", str(path), "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["shape"] == [3, 4, 5] and facts["dtype"] == "int16" and facts["max"] == 59.0
    np.testing.assert_allclose(facts["spacing_mm"], [0.7, 1.3, 2.5])
    np.testing.assert_allclose(facts["origin_ras_mm"], [12.5, -30.25, 7.0])


def test_info_counts_the_values_of_an_integer_image_and_names_the_label_option(tmp_path, capsys):
    labels = np.zeros((1, 6, 5, 4), np.int16)
    labels[0, 1:3], labels[0, 4:] = 7, 12
    path = io.write(Volume(labels, np.eye(4), Kind.LABEL), tmp_path / "atlas.nii.gz")
    assert main(["info", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["distinct_values"] == 3 and facts["kind"] == "intensity"
    assert main(["info", str(path)]) == 0
    assert re.search(r"kind: intensity \(as read: --kind label reads it as a label map\)", capsys.readouterr().out)
    assert main(["info", str(path), "--kind", "label"]) == 0
    assert "kind: label\n" in capsys.readouterr().out
    # a Slicer segmentation file is a label map without being told
    seg = io.write(Volume(labels, np.eye(4), Kind.LABEL), tmp_path / "organs.seg.nrrd")
    assert main(["info", str(seg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "label"
    floats = io.write(Volume(labels.astype(np.float32), np.eye(4)), tmp_path / "f.nii.gz")
    assert main(["info", str(floats), "--json"]) == 0
    assert "distinct_values" not in json.loads(capsys.readouterr().out)


def test_convert_keeps_values_and_geometry(tmp_path, volume_factory, capsys):
    vol = volume_factory("int16", 3)
    src = io.write(vol, tmp_path / "a.nrrd")
    assert main(["convert", str(src), "-o", str(tmp_path / "b.nii.gz")]) == 0
    back = io.read(tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)


def test_convert_takes_one_component_of_complex_and_rgb_images(tmp_path, capsys):
    rng = np.random.default_rng(3)
    z = (rng.normal(size=(20, 24)) + 1j * rng.normal(size=(20, 24))).astype(np.complex64)
    image = sitk.GetImageFromArray(z)  # MetaImage keeps complex voxels as (real, imaginary) channel pairs
    image.SetSpacing((0.8, 1.1))
    src = tmp_path / "complex.mha"
    sitk.WriteImage(image, str(src))
    assert main(["info", str(src)]) == 0
    assert "channels: 2 (a complex image's real and imaginary parts?" in capsys.readouterr().out
    expected = {"magnitude": np.abs(z), "phase": np.angle(z), "real": z.real, "imaginary": z.imag, "1": z.imag}
    for which, want in expected.items():
        out = tmp_path / f"{which}.nii.gz"
        assert main(["convert", str(src), "-o", str(out), "--component", which]) == 0
        back = io.read(out)
        assert back.channels == 1 and back.spacing.tolist()[:2] == pytest.approx([0.8, 1.1])
        np.testing.assert_allclose(back.numpy()[0], want.T, atol=1e-5)  # SimpleITK's (y, x) -> our (i, j)
    rgb = io.write(Volume(rng.integers(0, 256, (3, 16, 12)).astype(np.uint8), np.eye(4)), tmp_path / "rgb.png")
    assert main(["convert", str(rgb), "-o", str(tmp_path / "grey.png"), "--component", "grey"]) == 0
    grey = io.read(tmp_path / "grey.png").numpy()[0]
    colour = io.read(rgb).numpy().astype(np.float64)
    assert grey.dtype == np.uint8
    np.testing.assert_allclose(grey, np.rint(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]), atol=0)
    # the grey of a grey image is itself
    assert main(["convert", str(tmp_path / "grey.png"), "-o", str(tmp_path / "grey2.png"), "--component", "grey"]) == 0
    np.testing.assert_array_equal(io.read(tmp_path / "grey2.png").numpy()[0], grey)
    capsys.readouterr()
    for path, which, message in ((rgb, "phase", r"phase: expected a complex image or two channels"),
                                 (src, "grey", r"grey: expected an RGB image \(3 or 4 channels\), got 2"),
                                 (src, "2", r"component 2: expected a channel number from 0 to 1"),
                                 (src, "hue", r"component 'hue': expected one of grey, magnitude")):
        assert main(["convert", str(path), "-o", str(tmp_path / "x.nii.gz"), "--component", which]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and re.search(message, err), err
    labels = io.write(Volume(rng.integers(0, 4, (1, 8, 8, 8)).astype(np.int16), np.eye(4), Kind.LABEL),
                      tmp_path / "labels.nii.gz")
    assert main(["convert", str(labels), "-o", str(tmp_path / "x.nii.gz"), "--kind", "label",
                 "--component", "magnitude"]) == 2
    assert re.search(r"component magnitude: expected an intensity, RGB or complex image, got a label volume",
                     capsys.readouterr().err)
    assert not (tmp_path / "x.nii.gz").exists()
    # a complex NIfTI reads as one complex channel: commands that need real voxels say how to get them
    cplx = io.write(Volume(z[None], np.eye(4), Kind.COMPLEX), tmp_path / "complex.nii.gz")
    assert main(["register", str(cplx), str(cplx), "-o", str(tmp_path / "w.nii.gz")]) == 2
    assert re.search(r"got complex voxels; take one component first: meddl convert IN -o OUT --component magnitude",
                     capsys.readouterr().err)
    # what a command that needs a scalar image says about the two-channel file
    assert main(["register", str(src), str(src), "-o", str(tmp_path / "w.nii.gz")]) == 2
    assert "meddl convert IN -o OUT --component magnitude" in capsys.readouterr().err


def test_convert_to_uint8_writes_a_picture_of_a_float_image(tmp_path, capsys):
    from meddl.volume import to_uint8

    rng = np.random.default_rng(5)
    data = rng.normal(100.0, 20.0, (1, 30, 20)).astype(np.float32)
    data[0, 0, 0] = np.nan
    src = io.write(Volume(data, np.eye(4)), tmp_path / "f.nii.gz")
    assert main(["convert", str(src), "-o", str(tmp_path / "f.png")]) == 2
    assert "--to-uint8" in capsys.readouterr().err
    assert main(["convert", str(src), "-o", str(tmp_path / "f.png"), "--to-uint8"]) == 0
    back = io.read(tmp_path / "f.png").numpy()[0]
    finite = data[np.isfinite(data)]
    lo, hi = np.percentile(finite, [0.5, 99.5])
    want = np.clip(np.rint((np.nan_to_num(data[0], nan=lo) - lo) * 255.0 / (hi - lo)), 0, 255)
    np.testing.assert_array_equal(back, want)
    assert back[0, 0] == 0 and back.max() == 255
    assert to_uint8(Volume(np.full((1, 4, 4), 7.0, np.float32), np.eye(4))).numpy().max() == 0  # constant
    with pytest.raises(InputError, match=r"--to-uint8: expected real voxels, got complex ones; add --component"):
        to_uint8(Volume(np.ones((1, 4, 4), np.complex64), np.eye(4), Kind.COMPLEX))


def test_main_returns_exit_codes_without_exiting(capsys):
    assert main(["--version"]) == 0
    assert main(["info"]) == 2
    assert capsys.readouterr().err.strip().startswith("error:")


def test_samples_lists_every_sample(capsys):
    assert main(["samples"]) == 0
    out = capsys.readouterr().out
    assert "mni152_t1" in out and "ihc_rgb" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_batch_on_an_existing_cluster_leaves_the_device_to_its_workers(cli, tmp_path, scalar3d):
    """A CPU-only machine may drive a GPU cluster: --device cuda is not checked here, the scheduler is."""
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"operation,input,references,output\nadapt fourier,{scalar3d},{scalar3d},{tmp_path / 'o.nii.gz'}\n")
    result = cli("batch", str(manifest), "--scheduler", "tcp://127.0.0.1:9", "--device", "cuda", "--progress", "none")
    _assert_clean_error(result, r"scheduler|connect")
    assert "CUDA" not in result.stderr


def test_capabilities_are_reachable_from_import_meddl_without_loading_torch_first():
    import subprocess
    import sys

    code = ("import sys, meddl; light = 'torch' not in sys.modules; "
            "print(light, callable(meddl.adaptation.adapt_fourier), callable(meddl.incontext.segment), "
            "meddl.io.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "meddl.io"]
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        import meddl

        meddl.nothing  # noqa: B018


def test_help_shows_defaults_and_plain_text(capsys):
    for argv in (["--help"], ["register", "--help"], ["segment", "--help"], ["adapt", "fourier", "--help"]):
        assert main(argv) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "``" not in text, argv
        if argv[0] == "segment":
            assert "(default: 0.25)" in text and "(default: 16)" in text
            assert "(default: None)" not in text and "(default: False)" not in text
        if argv[0] == "adapt":
            assert "(default: circle)" in text and "(default: mean)" in text


def test_regularisation_takes_both_spellings():
    from meddl.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["register", "f", "m", "-o", "o.nii.gz", "--regularization", "0.5"]).regularisation == 0.5
    assert parser.parse_args(["reconstruct", "k.h5", "-o", "o.nii.gz", "--regularisation", "0.01"]).regularization \
        == 0.01
