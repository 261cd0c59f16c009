"""``reconstruct()`` and ``meddl reconstruct``: outputs, geometry, options, uncertainty."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk
from meddl import io
from meddl.cli import main
from meddl.errors import Cancelled, InputError
from meddl.reconstruction import ReconstructionConfig, read_kspace, reconstruct
from meddl.reconstruction.cli import parse_slices
from meddl.reconstruction.fastmri import write_fastmri
from meddl.reconstruction.metrics import ssim
from meddl.reconstruction.pipeline import Method
from meddl.reconstruction.simulate import simulate_kspace
from scipy.ndimage import gaussian_filter


def _phantom(h=48, w=40):
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    img = ((x / 0.75) ** 2 + (y / 0.85) ** 2 < 1) * 0.7 + (((x + 0.2) ** 2 + (y - 0.1) ** 2) < 0.06) * 0.3
    img = img + 0.2 * np.sin(6 * x) * (img > 0)
    return np.clip(img, 0, None).astype(np.float32)


@pytest.fixture
def kfile(tmp_path):
    img = _phantom()
    ks = np.stack([simulate_kspace(img * s, 6, rng=s)[0] for s in (1, 2)])
    return write_fastmri(
        tmp_path / "k.h5",
        ks,
        fov_mm=(240.0, 200.0, 3.0),
        recon_matrix=(40, 40),
        target=np.stack([img[4:44], 2 * img[4:44]]),
    ), img


def test_zero_filled_of_fully_sampled_data_is_the_truth_on_the_header_grid(kfile):
    path, img = kfile
    res = reconstruct(path, ReconstructionConfig(method="zero-filled"))
    out = res.image.numpy()
    assert out.shape == (1, 40, 40, 2)  # recon matrix crop of the (48, 40) encoded matrix, 2 slices
    np.testing.assert_allclose(out[0, :, :, 1], 2 * img[4:44], atol=1e-5)
    np.testing.assert_allclose(res.image.spacing, [5.0, 5.0, 3.0])
    assert res.image.same_grid(res.zero_filled)
    assert res.info["acceleration"] == 1.0
    scored = res.info["reference"]  # the file's reconstruction_rss
    assert scored["ssim"] > 0.999 and scored["nmse"] < 1e-8 and scored["zero_filled_ssim"] > 0.999


def test_the_varnet_on_fully_sampled_data_gives_the_direct_reconstruction_with_a_notice(kfile, capsys):
    """Nothing to fill in: the default method writes the exact inverse-FFT image, not the network's blur."""
    path, img = kfile
    res = reconstruct(path, ReconstructionConfig(method="varnet"))
    np.testing.assert_allclose(res.image.numpy()[0, :, :, 1], 2 * img[4:44], atol=1e-5)
    assert res.info["method"] == "zero-filled" and res.info["requested_method"] == "varnet"
    assert re.search(r"fully sampled: wrote the direct reconstruction .*'varnet'.* --undersample", res.info["notice"])
    # auto, the default, does the same
    assert reconstruct(path, ReconstructionConfig()).info["method"] == "zero-filled"
    # undersampled, the VarNet runs as asked
    under = reconstruct(path, ReconstructionConfig(method="varnet", undersample="equispaced", acceleration=2,
                                                   slices=(0,)))
    assert under.info["method"] == "varnet" and "requested_method" not in under.info
    out = path.parent / "v.nii.gz"
    capsys.readouterr()
    assert main(["reconstruct", str(path), "-o", str(out), "--progress", "none", "--device", "cpu"]) == 0
    text = "".join(capsys.readouterr())
    assert re.search(r"notice: .*fully sampled", text) and "reconstruct: zero-filled" in text
    assert out.exists()


def test_sensitivity_weighted_zero_filled_combination(kfile, capsys, tmp_path):
    path, img = kfile
    rss_image = reconstruct(path, ReconstructionConfig(method="zero-filled")).image.numpy()[0, :, :, 0]
    res = reconstruct(path, ReconstructionConfig(method="zero-filled", combine="sense"))
    sense = res.image.numpy()[0, :, :, 0]
    truth = img[4:44]
    inside = truth > 0.1
    # fully sampled data: both give the image (the simulated maps are normalised); ESPIRiT's maps up to a small error
    assert np.abs(sense - truth)[inside].mean() < 0.03 * truth[inside].mean()
    assert not np.allclose(sense, rss_image)
    np.testing.assert_allclose(res.zero_filled.numpy(), res.image.numpy())  # the companion output combines alike
    out = tmp_path / "zf.nii.gz"
    assert main(["reconstruct", str(path), "-o", str(out), "--method", "zero-filled", "--combine", "sense",
                 "--undersample", "equispaced", "--acceleration", "2", "--progress", "none", "--device", "cpu"]) == 0
    assert main(["reconstruct", str(path), "-o", str(out), "--combine", "adaptive", "--progress", "none"]) == 2
    assert "invalid choice: 'adaptive'" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"--combine: expected rss or sense, got 'mean'"):
        ReconstructionConfig(combine="mean")


def test_a_file_with_a_reference_is_scored_against_it(kfile):
    path, _ = kfile
    res = reconstruct(path, ReconstructionConfig(method="tv", undersample="equispaced", acceleration=3))
    scored = res.info["reference"]
    truth = np.asarray(read_kspace(path).target)
    pred = np.moveaxis(res.image.numpy()[0], -1, 0)
    assert scored["ssim"] == pytest.approx(ssim(truth, pred, float(truth.max())), abs=1e-4)
    assert scored["ssim"] > scored["zero_filled_ssim"]
    one = reconstruct(path, ReconstructionConfig(method="zero-filled", slices=(1,)))
    assert one.info["reference"]["ssim"] > 0.999  # the reference's own slice


def test_undersampling_is_refused_on_undersampled_data(tmp_path, kfile):
    path, _ = kfile
    data = read_kspace(path)
    mask = np.zeros(40, bool)
    mask[::2] = True
    mask[16:24] = True
    under = write_fastmri(tmp_path / "u.h5", data.kspace * mask, mask=mask)
    with pytest.raises(InputError, match="expected fully sampled k-space"):
        reconstruct(under, ReconstructionConfig(method="zero-filled", undersample="equispaced"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="magic"), "--method: expected one of"),
        (dict(undersample="spiral"), "--undersample: expected one of"),
        (dict(acceleration=4), "expected --undersample"),
        (dict(undersample="random", acceleration=0.5), "--acceleration: expected a number >= 1"),
        (dict(undersample="random", center_fraction=2.0), "--center-fraction: expected a fraction"),
        (dict(probes=0), "--probes: expected a positive number"),
        (dict(regularization=float("inf")), "--regularization: expected a finite number >= 0, got inf"),
        (dict(regularization=float("nan")), "--regularization: expected a finite number >= 0, got nan"),
        (dict(regularization=-1.0), "--regularization: expected a finite number >= 0"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        ReconstructionConfig(**kwargs)


def test_parse_slices():
    assert parse_slices("0,3,5") == (0, 3, 5)  # parsed; the readers then require consecutive slices
    assert parse_slices("2:5,7") == (2, 3, 4, 7)
    with pytest.raises(InputError, match="--slices: expected"):
        parse_slices("a:b")


def test_cg_sense_beats_zero_filled(kfile):
    path, img = kfile
    cfg = ReconstructionConfig(
        method="cg-sense", undersample="equispaced", acceleration=3, center_fraction=0.15, slices=(0,)
    )
    res = reconstruct(path, cfg)
    truth = img[4:44]
    out, zf = res.image.numpy()[0, :, :, 0], res.zero_filled.numpy()[0, :, :, 0]
    assert np.linalg.norm(out - truth) < 0.8 * np.linalg.norm(zf - truth)
    assert res.uncertainty is None


def test_sure_uncertainty_tracks_the_error_on_a_brain_slice(tmp_path):
    from meddl.data import load_sample
    from scipy.ndimage import zoom

    img = zoom(load_sample("dipy_t1_slice").numpy()[0], 0.25, order=1).astype(np.float32)
    img /= img.max()
    path = write_fastmri(tmp_path / "b.h5", simulate_kspace(img, 6, rng=0, noise=0.002)[0][None])
    cfg = ReconstructionConfig(method="cg-sense", undersample="equispaced", acceleration=4, uncertainty=True, probes=3)
    res = reconstruct(path, cfg)
    out, unc = res.image.numpy()[0, :, :, 0], res.uncertainty.numpy()[0, :, :, 0]
    err = np.sqrt(gaussian_filter((out - img) ** 2, 2))
    assert unc.shape == img.shape and np.all(unc >= 0)
    assert np.corrcoef(unc.ravel(), err.ravel())[0, 1] > 0.3
    assert 0.1 < unc.mean() / err.mean() < 10


def test_command_writes_every_output(tmp_path, kfile, capsys):
    path, _ = kfile
    outs = {k: tmp_path / f"{k}.nii.gz" for k in ("recon", "zf", "unc")}
    coils = tmp_path / "coils.nrrd"
    code = main(
        [
            "reconstruct",
            str(path),
            "-o",
            str(outs["recon"]),
            "--method",
            "tv",
            "--undersample",
            "random",
            "--acceleration",
            "2",
            "--zero-filled",
            str(outs["zf"]),
            "--uncertainty",
            str(outs["unc"]),
            "--coils-out",
            str(coils),
            "--slices",
            "1",
            "--iterations",
            "5",
            "--probes",
            "1",
            "--device",
            "cpu",
            "--progress",
            "none",
            "--seed",
            "3",
        ]
    )
    assert code == 0, capsys.readouterr().err
    recon = io.read(outs["recon"])
    assert recon.spatial_shape == (40, 40, 1)
    assert io.read(outs["zf"]).same_grid(recon) and io.read(outs["unc"]).same_grid(recon)
    assert io.read(coils).channels == 6
    assert "reconstruct: tv" in capsys.readouterr().out


def test_command_refuses_output_equal_to_input_and_2d_formats(tmp_path, kfile, capsys):
    path, _ = kfile
    assert main(["reconstruct", str(path), "-o", str(path), "--progress", "none"]) == 2
    assert main(["reconstruct", str(path), "-o", str(tmp_path / "x.png"), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "is also an input" in err and "expected a volume file" in err


@pytest.mark.slow
def test_demo_simulates_and_reconstructs(tmp_path):
    import torch
    from meddl import io as mio
    from meddl.progress import Reporter
    from meddl.reconstruction import demo

    class Ctx:
        reporter = Reporter()
        device = torch.device("cpu")

        def log(self, message: str) -> None:
            pass

    items = demo.run(tmp_path, Ctx())
    assert [i.capability for i in items] == ["reconstruction"] * 3
    vols = [mio.read(i.path) for i in items]
    assert all(v.spatial_shape == (160, 160, 1) for v in vols)
    assert vols[0].same_grid(vols[1])


def test_poisson_retrospective_undersampling(kfile):
    path, img = kfile
    res = reconstruct(
        path,
        ReconstructionConfig(
            method="cg-sense", undersample="poisson", acceleration=3, center_fraction=0.3, slices=(0,)
        ),
    )
    truth = img[4:44]
    out, zf = res.image.numpy()[0, :, :, 0], res.zero_filled.numpy()[0, :, :, 0]
    assert res.info["acceleration"] > 2
    assert np.linalg.norm(out - truth) < np.linalg.norm(zf - truth)


@pytest.mark.parametrize("method", ["zero-filled", "cg-sense"])
def test_phase_output_recovers_the_simulated_phase(tmp_path, method):
    img = _phantom()
    k, maps, x = simulate_kspace(img, 6, rng=4)
    path = write_fastmri(tmp_path / "ph.h5", k[None])
    res = reconstruct(path, ReconstructionConfig(method=method, phase=True))
    phase = res.phase.numpy()[0, :, :, 0]
    inside = img > 0.2
    # ESPIRiT maps carry the first coil's phase as reference: compare up to a smooth offset, via
    # the phase difference between neighbouring pixels
    want = np.angle(x[:, 1:] * np.conj(x[:, :-1]))
    got = np.angle(np.exp(1j * (phase[:, 1:] - phase[:, :-1])))
    both = inside[:, 1:] & inside[:, :-1]
    assert np.abs(np.angle(np.exp(1j * (got - want))))[both].mean() < 0.05
    assert res.phase.same_grid(res.image)



def test_kspace_peak_offset_finds_the_roll_back_to_the_centre():
    from meddl.reconstruction.masks import kspace_peak_offset

    k = simulate_kspace(_phantom(64, 56), 4, rng=1, phase=False)[0]
    assert kspace_peak_offset(k) == (0, 0)
    assert kspace_peak_offset(np.roll(k, (3, -5), axis=(-2, -1))) == (-3, 5)
    # restricted to a column block (an undersampled file's calibration lines): the peak is sought there only
    assert kspace_peak_offset(np.roll(k, (0, -5), axis=(-2, -1)), slice(26, 30)) == (0, 28 - 26)


def test_off_centre_kspace_is_recentred_magnitude_unchanged_and_phase_ramp_kept(tmp_path):
    """An echo off the k-space centre (a linear phase ramp) is rolled back before reconstructing: the
    magnitude is that of the centred data, and the phase output keeps the ramp the file's image has."""
    img = _phantom(64, 56)
    k = simulate_kspace(img, 6, rng=4, phase=False)[0]  # a real image: the peak exactly at the centre
    shifted = np.roll(k, (3, -2), axis=(-2, -1))
    centred_path = write_fastmri(tmp_path / "c.h5", k[None])
    shifted_path = write_fastmri(tmp_path / "s.h5", shifted[None])
    cfg = ReconstructionConfig(method="zero-filled", combine="sense", phase=True)
    a, b = reconstruct(centred_path, cfg), reconstruct(shifted_path, cfg)
    assert "kspace_recentred" not in a.info and b.info["kspace_recentred"] == [-3, 2]
    assert "off the centre" in b.info["notice"]
    np.testing.assert_allclose(b.image.numpy(), a.image.numpy(), rtol=1e-5, atol=1e-6)
    # the file's own image differs from the centred one by the ramp exp(i phi): numpy's centred FFTs
    x = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k[0])))
    xs = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(shifted[0])))
    inside = img > 0.2
    want = np.angle(xs * np.conj(x))[inside]
    got = (b.phase.numpy() - a.phase.numpy())[0, :, :, 0][inside]
    assert np.abs(np.angle(np.exp(1j * (got - want)))).max() < 1e-3
    # undersampled, readout offset only (the column mask is unchanged by it): the VarNet's answer is the same
    cfg = ReconstructionConfig(method="varnet", undersample="equispaced", acceleration=4)
    rows_path = write_fastmri(tmp_path / "r.h5", np.roll(k, 4, axis=-2)[None])
    np.testing.assert_allclose(reconstruct(rows_path, cfg).image.numpy(), reconstruct(centred_path, cfg).image.numpy(),
                               rtol=1e-4, atol=1e-5)

def test_coil_images_flag_is_an_alias_of_coils_out():
    from meddl.cli import build_parser

    args = build_parser().parse_args(["reconstruct", "k.h5", "-o", "r.nii.gz", "--coil-images", "c.nrrd"])
    assert args.coils_out == "c.nrrd"


def test_default_method_is_the_same_everywhere():
    """The CLI, the library and the Slicer Logic share one default: auto (the VarNet, or TV where it
    predicts held-out k-space lines better; docs/benchmarks/reconstruction_robustness.md)."""
    import inspect

    from meddl.cli import build_parser
    from meddl.slicer_logic import ReconstructionLogic, ReconstructionMethod

    assert build_parser().parse_args(["reconstruct", "k.h5", "-o", "r.nii.gz"]).method == "auto"
    assert ReconstructionConfig().method.value == "auto"
    assert inspect.signature(ReconstructionLogic.start).parameters["method"].default == "auto"
    assert {m.value for m in ReconstructionMethod} == {m.value for m in Method}


def test_heldout_columns_are_every_third_sampled_column_outside_the_calibration_block():
    from meddl.reconstruction.select import heldout_columns

    cols = np.zeros(40, bool)
    cols[::4] = True
    cols[17:23] = True
    held = heldout_columns(cols, slice(17, 23))
    outer = [c for c in np.flatnonzero(cols) if not 17 <= c < 23]
    assert held.tolist() == outer[::3]
    assert cols[held].all() and not any(17 <= c < 23 for c in held)


def _ellipses(n=96):
    y, x = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    img = np.where((x / 0.7) ** 2 + (y / 0.85) ** 2 < 1, 1.0, 0.0)
    img = np.where((x / 0.64) ** 2 + (y / 0.79) ** 2 < 1, 0.25, img)
    for cx, cy, a, b, v in ((-0.25, 0.1, 0.12, 0.3, 0.5), (0.25, 0.1, 0.1, 0.25, 0.5), (0.0, -0.4, 0.2, 0.1, 0.8)):
        img = np.where(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 < 1, v, img)
    return img.astype(np.float32)


def test_auto_chooses_tv_on_a_piecewise_constant_phantom_and_says_why(tmp_path):
    """A Shepp-Logan-like phantom is TV's image model and nothing like the VarNet's brains: at 4x auto
    must take TV (its held-out k-space error is far lower) and give exactly TV's image."""
    img = _ellipses()
    k = simulate_kspace(img, 8, rng=3, noise=0.002)[0]
    path = write_fastmri(tmp_path / "e.h5", k[None])
    cfg = dict(undersample="equispaced", acceleration=4, center_fraction=0.12)
    auto = reconstruct(path, ReconstructionConfig(method="auto", **cfg))
    tv = reconstruct(path, ReconstructionConfig(method="tv", **cfg))
    assert auto.info["method"] == "tv" and auto.info["requested_method"] == "auto"
    errors = auto.info["auto"]["heldout_error"]
    assert errors["tv"] < 0.5 * errors["varnet"]
    assert re.search(r"auto: tv \(relative error on \d+ held-out k-space lines: VarNet [\d.]+, TV [\d.]+\)",
                     auto.info["notice"])
    np.testing.assert_allclose(auto.image.numpy(), tv.image.numpy(), rtol=1e-5, atol=1e-6)
    assert ssim(img[None], tv.image.numpy()[0, :, :, 0][None], 1.0) > ssim(
        img[None], reconstruct(path, ReconstructionConfig(method="varnet", **cfg)).image.numpy()[0, :, :, 0][None], 1.0)


def test_auto_reports_its_check_and_cancel_stops_it(tmp_path, monkeypatch):
    from meddl.progress import CancelToken
    from meddl.reconstruction import select

    k = simulate_kspace(_ellipses(), 8, rng=3, noise=0.002)[0]
    path = write_fastmri(tmp_path / "e.h5", np.stack([k, k, k, k]))
    cfg = ReconstructionConfig(method="auto", undersample="equispaced", acceleration=4, center_fraction=0.12,
                               slices=(1, 2, 3))
    seen = []
    res = reconstruct(path, cfg, progress=lambda f, m: seen.append(m))
    assert any(m.startswith("auto: comparing") for m in seen)
    assert res.info["auto"]["checked_slices"] == [1, 2, 3] and res.info["auto"]["seconds"] > 0  # the file's numbers
    token, calls = CancelToken(), []

    def cancel_inside_the_check(fraction, message):
        calls.append(message)
        if message.startswith("auto: comparing"):
            token.cancel()

    finished = []
    errors = select._errors
    monkeypatch.setattr(select, "_errors", lambda *a, **k: finished.append(errors(*a, **k)) or finished[-1])
    with pytest.raises(Cancelled):
        reconstruct(path, cfg, progress=cancel_inside_the_check, cancel=token)
    assert finished == []  # stopped inside the first slice's check, not after the three
    assert not any(m.startswith("slice ") for m in calls)
    # a retrospective 6x mask on 117 columns realises less than 6: the nominal 6 decides, the VarNet without a check
    odd = write_fastmri(tmp_path / "o.h5", simulate_kspace(_ellipses(117), 8, rng=3, noise=0.002)[0][None])
    six = reconstruct(odd, ReconstructionConfig(method="auto", undersample="equispaced", acceleration=6))
    assert six.info["acceleration"] < 6 and six.info["method"] == "varnet"
    assert six.info["auto"]["rule"].startswith("acceleration 6.0 >= 6")


def test_auto_keeps_the_varnet_on_a_brain_slice_and_from_6x_on(tmp_path):
    from meddl.data import load_sample

    brain = load_sample("dipy_t1_slice").numpy()[0]
    brain = (brain / brain.max()).astype(np.float32)
    k = simulate_kspace(brain, 8, rng=5, noise=0.005)[0]
    path = write_fastmri(tmp_path / "b.h5", k[None])
    at4 = reconstruct(path, ReconstructionConfig(method="auto", undersample="equispaced", acceleration=4))
    assert at4.info["method"] == "varnet"
    assert at4.info["auto"]["heldout_error"]["varnet"] < at4.info["auto"]["heldout_error"]["tv"]
    at8 = reconstruct(tmp_path / "b.h5", ReconstructionConfig(method="auto", undersample="equispaced", acceleration=8,
                                                             slices=(0,)))
    assert at8.info["method"] == "varnet" and "heldout_error" not in at8.info["auto"]
    assert re.match(r"acceleration 8\.\d >= 6: the VarNet", at8.info["auto"]["rule"])


# -- meddl simulate-kspace -------------------------------------------------------------------------


def _blob_volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.random(shape), 2.0) * 10 + 1.0


@pytest.mark.parametrize("axis", [0, 2])
def test_simulated_file_reconstructs_to_the_magnitude_in_the_same_layout(tmp_path, axis):
    from meddl import Volume
    from meddl.reconstruction.simulate import simulate_file

    data = _blob_volume((24, 20, 16))
    vol = Volume(data[None].astype(np.float32), np.diag([0.9, 1.1, 2.5, 1.0]))
    path, facts = simulate_file(vol, tmp_path / "k.h5", coils=4, noise=0.0, axis=axis)
    assert facts["slices"] == data.shape[axis] and facts["coils"] == 4 and not facts["complex"]
    result = reconstruct(path, ReconstructionConfig(method="zero-filled"))
    expected = np.moveaxis(data, axis, -1)  # slices last, in-plane axes in their order
    np.testing.assert_allclose(result.image.numpy()[0], expected, rtol=1e-4, atol=1e-4)
    plane = [a for a in range(3) if a != axis]
    np.testing.assert_allclose(result.image.spacing, [(0.9, 1.1, 2.5)[a] for a in (*plane, axis)], rtol=1e-6)


def test_a_complex_image_keeps_its_phase_up_to_a_constant(tmp_path):
    from meddl import Volume
    from meddl.reconstruction.simulate import simulate_file

    mag = _blob_volume((40, 36))
    yy, xx = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 36), indexing="ij")
    phase = 1.3 * xx - 0.8 * yy
    two = np.stack([mag * np.cos(phase), mag * np.sin(phase)]).astype(np.float32)  # a complex MetaImage reads so
    path, facts = simulate_file(Volume(two), tmp_path / "c.h5", coils=1, noise=0.0)
    assert facts["complex"]
    result = reconstruct(path, ReconstructionConfig(method="zero-filled", phase=True))
    np.testing.assert_allclose(result.image.numpy()[0, ..., 0], mag, rtol=1e-4)
    z = np.exp(1j * (result.phase.numpy()[0, ..., 0] - phase))
    assert abs(z.mean()) > 0.999  # the same phase map but for one constant


def test_simulate_kspace_command_and_its_errors(tmp_path, capsys):
    from meddl import Volume

    io.write(Volume(_blob_volume((20, 18, 4))[None].astype(np.float32)), tmp_path / "vol.nii.gz")
    io.write(Volume(np.ones((3, 20, 18), np.float32)), tmp_path / "three.nrrd")
    io.write(Volume(np.full((1, 20, 18), -1000.0, np.float32)), tmp_path / "ct.nii.gz")
    assert main(["simulate-kspace", str(tmp_path / "vol.nii.gz"), "-o", str(tmp_path / "k.h5"), "--coils", "2"]) == 0
    assert read_kspace(tmp_path / "k.h5").coils == 2
    for argv, pattern in (
        (["vol.nii.gz", "-o", "k.nii.gz"], r"expected a fastMRI k-space file name ending in \.h5, or BART data"),
        (["vol.nii.gz", "-o", "vol.nii.gz"], r"is also an input"),
        (["vol.nii.gz", "-o", "x.h5", "--coils", "0"], r"--coils: expected 1 to 64 receive coils, got 0"),
        (["vol.nii.gz", "-o", "x.h5", "--noise", "-1"], r"--noise: expected a fraction of the image maximum"),
        (["three.nrrd", "-o", "x.h5"], r"expected one channel \(magnitude\) or two \(real, imaginary\), got 3"),
        (["vol.nii.gz", "-o", "x.h5", "--complex", "yes"], r"expected two channels \(real, imaginary\), got 1"),
        (["ct.nii.gz", "-o", "x.h5"], r"expected a magnitude image \(values >= 0\), got a minimum of -1000"),
        (["vol.nii.gz", "-o", "vol.nii.gz/k.h5"], r"cannot write '.*vol\.nii\.gz/k\.h5': '.*vol\.nii\.gz' is a file, not a folder"),
        (["vol.nii.gz", "-o", "vol.nii.gz/k.cfl"], r"cannot write '.*vol\.nii\.gz/k\.cfl': '.*vol\.nii\.gz' is a file, not a folder"),
    ):
        capsys.readouterr()
        args = [str(tmp_path / a) if a.endswith((".gz", ".h5", ".nrrd", ".cfl")) else a for a in argv]
        assert main(["simulate-kspace", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
        assert re.search(pattern, err), err


def test_simulate_kspace_writes_bart_data_that_reads_back_as_the_fastmri_file(tmp_path, capsys):
    """NAME.cfl + NAME.hdr hold the same samples as the .h5 (same seed); no geometry, and the notice says so."""
    from meddl import Volume

    vol = Volume(_blob_volume((20, 18, 3))[None].astype(np.float32), np.diag([0.9, 1.1, 2.5, 1.0]))
    io.write(vol, tmp_path / "vol.nii.gz")
    base = ["simulate-kspace", str(tmp_path / "vol.nii.gz"), "--coils", "3", "--progress", "none"]
    assert main([*base, "-o", str(tmp_path / "k.h5")]) == 0
    capsys.readouterr()
    assert main([*base, "-o", str(tmp_path / "k.cfl")]) == 0
    assert "notice: BART data carry no geometry" in capsys.readouterr().out
    assert (tmp_path / "k.hdr").exists() and (tmp_path / "k.cfl").exists()
    h5, cfl = read_kspace(tmp_path / "k.h5"), read_kspace(tmp_path / "k")
    assert cfl.format == "bart" and cfl.kspace.shape == h5.kspace.shape == (3, 3, 20, 18)
    np.testing.assert_array_equal(cfl.kspace, h5.kspace)
    a = reconstruct(tmp_path / "k.cfl", ReconstructionConfig(method="zero-filled")).image
    b = reconstruct(tmp_path / "k.h5", ReconstructionConfig(method="zero-filled")).image
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(a.spacing, 1.0) and np.allclose(b.spacing, (0.9, 1.1, 2.5))
    # the .hdr half of the pair is checked too: an (Analyze) header given as input is never overwritten
    (tmp_path / "scan.hdr").write_bytes(b"not to be overwritten")
    capsys.readouterr()
    assert main(["simulate-kspace", str(tmp_path / "scan.hdr"), "-o", str(tmp_path / "scan.cfl")]) == 2
    assert re.search(r"^error: output '.*scan\.hdr' is also an input", capsys.readouterr().err)
    assert (tmp_path / "scan.hdr").read_bytes() == b"not to be overwritten"
    # nor is the header of a NIfTI pair read through its .img
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 18, 20), np.float32)), str(tmp_path / "pair.hdr"))
    header = (tmp_path / "pair.hdr").read_bytes()
    assert main(["simulate-kspace", str(tmp_path / "pair.img"), "-o", str(tmp_path / "pair.cfl")]) == 2
    assert re.search(r"^error: output '.*pair\.(cfl|hdr)' (would overwrite '.*pair\.hdr', )?(is )?a file of input "
                     r"'.*pair\.img'",
                     capsys.readouterr().err)
    assert (tmp_path / "pair.hdr").read_bytes() == header and not (tmp_path / "pair.cfl").exists()
