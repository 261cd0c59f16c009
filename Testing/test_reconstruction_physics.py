"""Reconstruction physics: FFTs, masks, coil combination, ESPIRiT, simulation, classical solvers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from meddl.errors import InputError
from meddl.reconstruction import classical
from meddl.reconstruction.coils import calibration_block, espirit_factor, espirit_maps, rss, sense_combine
from meddl.reconstruction.fft import fft2c, ifft2c
from meddl.reconstruction.masks import (
    MaskType,
    center_block,
    default_center_fraction,
    detect_mask,
    equispaced_mask,
    make_mask,
    random_mask,
)
from meddl.reconstruction.simulate import birdcage_maps, simulate_kspace


def phantom(h: int = 64, w: int = 56) -> np.ndarray:
    """A smooth ellipse phantom with a few inner structures, max 1, zero background."""
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    img = ((x / 0.7) ** 2 + (y / 0.85) ** 2 < 1).astype(np.float64) * 0.6
    img += ((x + 0.25) ** 2 + (y - 0.2) ** 2 < 0.05) * 0.4
    img += ((x - 0.3) ** 2 / 0.02 + (y + 0.3) ** 2 / 0.08 < 1) * 0.3
    return (img / img.max()).astype(np.float32)


# -- FFT --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (7, 10), (3, 16, 9)])
def test_fft_matches_numpy_centred_orthonormal(rng, shape):
    x = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1))), axes=(-2, -1)) / np.sqrt(np.prod(shape[-2:]))
    k_torch = fft2c(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(k_torch, ref, atol=1e-10)
    np.testing.assert_allclose(fft2c(x), ref, atol=1e-10)
    np.testing.assert_allclose(ifft2c(torch.from_numpy(ref)).numpy(), x, atol=1e-10)
    # orthonormal: Parseval
    assert np.isclose(np.linalg.norm(ref), np.linalg.norm(x))


def test_fft_puts_dc_at_centre():
    x = torch.ones(6, 9, dtype=torch.complex128)
    k = fft2c(x)
    assert torch.argmax(k.abs()).item() == 3 * 9 + 4
    assert np.isclose(k[3, 4].real.item(), np.sqrt(54))


# -- masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("acc,width", [(4, 368), (8, 368), (4, 320), (8, 224)])
def test_equispaced_mask_fraction_and_centre(acc, width):
    cf = default_center_fraction(acc)
    mask = equispaced_mask(width, acc, cf, np.random.default_rng(0))
    assert abs(mask.sum() - width / acc) <= 2
    block = center_block(width, int(round(width * cf)))
    assert mask[block].all()
    assert detect_mask(np.ones((1, 4, width)) * mask).center_fraction >= (block.stop - block.start) / width


@pytest.mark.parametrize("width, acc, cf", [(368, 4, 0.25), (100, 2, 0.5)])
def test_a_centre_block_of_exactly_w_over_r_lines_is_the_whole_equispaced_mask(width, acc, cf):
    mask = equispaced_mask(width, acc, cf, np.random.default_rng(0))
    block = center_block(width, int(round(width * cf)))
    assert mask[block].all() and mask.sum() == width // acc


@pytest.mark.parametrize("acc", [4, 8])
def test_random_mask_fraction_and_centre_over_many_draws(acc):
    rng = np.random.default_rng(1)
    width = 368
    counts = [random_mask(width, acc, None, rng).sum() for _ in range(200)]
    assert abs(np.mean(counts) - width / acc) < 1.5
    mask = random_mask(width, acc, None, rng)
    assert mask[center_block(width, int(round(width * 0.32 / acc)))].all()


def test_default_center_fractions_are_fastmri_s():
    assert default_center_fraction(4) == pytest.approx(0.08)
    assert default_center_fraction(8) == pytest.approx(0.04)


def test_poisson_mask_has_calibration_square_and_rate():
    m = make_mask(MaskType.POISSON, (64, 64), 4, 0.2, seed=0)
    assert m.shape == (64, 64)
    assert m[26:38, 26:38].all()
    assert 64 * 64 / m.sum() == pytest.approx(4, rel=0.35)


def test_detect_mask_finds_acceleration_and_centre():
    mask = equispaced_mask(320, 4, 0.08, np.random.default_rng(3))
    k = np.ones((2, 3, 16, 320), np.complex64) * mask
    info = detect_mask(k)
    assert np.array_equal(info.mask, mask)
    assert info.acceleration == pytest.approx(320 / mask.sum())
    assert info.center_fraction >= 0.08
    assert detect_mask(np.ones((1, 1, 4, 32))).acceleration == 1.0


@pytest.mark.parametrize("bad", [dict(acceleration=0.5), dict(center_fraction=1.5), dict(center_fraction=0.5)])
def test_bad_mask_parameters_are_input_errors(bad):
    args = dict(acceleration=4.0, center_fraction=0.08) | bad
    with pytest.raises(InputError, match="expected"):
        equispaced_mask(64, args["acceleration"], args["center_fraction"])


def test_calibration_block_refuses_too_few_lines():
    mask = np.zeros(64, bool)
    mask[::4] = True
    mask[31:33] = True
    with pytest.raises(InputError, match="calibration"):
        calibration_block(mask)


# -- coils and simulation ---------------------------------------------------------------------


def test_birdcage_maps_have_unit_rss():
    maps = birdcage_maps(8, (32, 40))
    np.testing.assert_allclose(np.sqrt((np.abs(maps) ** 2).sum(0)), 1.0, atol=1e-5)


def test_rss_of_fully_sampled_noiseless_data_equals_truth():
    img = phantom()
    k, maps, x = simulate_kspace(img, 8, rng=0)
    np.testing.assert_allclose(np.abs(x), img, atol=1e-6)
    out = rss(ifft2c(torch.from_numpy(k))).numpy()
    np.testing.assert_allclose(out, img, atol=1e-5)
    combined = sense_combine(ifft2c(torch.from_numpy(k)), torch.from_numpy(maps)).numpy()
    np.testing.assert_allclose(combined, x, atol=1e-5)


def test_espirit_recovers_simulated_maps_up_to_phase():
    img = phantom()
    k, maps, _ = simulate_kspace(img, 6, rng=2)
    est = espirit_maps(torch.from_numpy(k), calib_width=20).numpy()
    inside = img > 0.1
    overlap = np.abs((est.conj() * maps).sum(0))
    assert overlap[inside].mean() > 0.99


@pytest.mark.parametrize("shape", [(192, 224), (131, 100)])
def test_coarse_grid_espirit_matches_full_resolution(shape):
    """The eigen-decomposition on a coarser grid, interpolated: the same maps and the same TV image."""
    img = phantom(*shape)
    k, _, _ = simulate_kspace(img, 8, rng=3, noise=0.005)
    k = torch.from_numpy(k)
    factor = espirit_factor(shape)
    assert factor == (4 if shape == (192, 224) else 2)
    full = espirit_maps(k, crop=0.0, factor=1)
    coarse = espirit_maps(k, crop=0.0)
    inside = img > 0.1
    overlap = np.abs((coarse.conj() * full).sum(0).numpy())
    assert overlap[inside].mean() > 0.999 and overlap[inside].min() > 0.99
    np.testing.assert_allclose(np.linalg.norm(coarse.numpy(), axis=0), 1.0, atol=1e-5)
    mask = torch.from_numpy(np.broadcast_to(equispaced_mask(shape[1], 4, 0.08, np.random.default_rng(0)), shape).copy())
    a = classical.tv_cs(k * mask, full, mask, lam=3e-3).abs().numpy()
    b = classical.tv_cs(k * mask, coarse, mask, lam=3e-3).abs().numpy()
    assert np.abs(a - b)[inside].mean() < 0.01 * img[inside].mean()
    # eigenvalue crop: the object is kept, the background (mostly) cut, as at full resolution
    cropped = espirit_maps(k, crop=0.95).abs().sum(0).numpy() > 0
    cropped_full = espirit_maps(k, crop=0.95, factor=1).abs().sum(0).numpy() > 0
    assert (cropped == cropped_full).mean() > 0.98


def test_espirit_matches_sigpy_when_installed():
    mri = pytest.importorskip("sigpy.mri")
    img = phantom(48, 48)
    k, _, _ = simulate_kspace(img, 4, rng=5)
    ours = espirit_maps(torch.from_numpy(k), calib_width=20, crop=0.95).numpy()
    ref = mri.app.EspiritCalib(k, calib_width=20, show_pbar=False).run()
    inside = img > 0.1
    assert np.abs((ours.conj() * ref).sum(0))[inside].mean() > 0.999


# -- data consistency and solvers -------------------------------------------------------------


def test_adjoint_is_the_adjoint(rng):
    maps = torch.from_numpy(birdcage_maps(4, (16, 12)))
    mask = torch.from_numpy(np.broadcast_to(equispaced_mask(12, 2, 0.25, rng), (16, 12)).copy())
    x = torch.from_numpy((rng.normal(size=(16, 12)) + 1j * rng.normal(size=(16, 12))).astype(np.complex64))
    y = torch.from_numpy((rng.normal(size=(4, 16, 12)) + 1j * rng.normal(size=(4, 16, 12))).astype(np.complex64))
    lhs = (classical.forward_op(x, maps, mask).conj() * y).sum()
    rhs = (x.conj() * classical.adjoint_op(y, maps, mask)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_cg_sense_on_noiseless_fully_sampled_data_returns_the_image():
    img = phantom()
    k, maps, x = simulate_kspace(img, 8, rng=0)
    mask = torch.ones(img.shape, dtype=torch.bool)
    out = classical.cg_sense(torch.from_numpy(k), torch.from_numpy(maps), mask, iterations=5)
    np.testing.assert_allclose(out.numpy(), x, atol=1e-4)


def test_wavelet_is_orthonormal_and_matches_pywt():
    w = classical.Wavelet((32, 48), levels=3, dtype=torch.float64)
    mh = w.mats[0][0]
    np.testing.assert_allclose((mh @ mh.T).numpy(), np.eye(32), atol=1e-10)
    x = torch.randn(32, 48, dtype=torch.float64)
    np.testing.assert_allclose(w.inverse(w.forward(x)).numpy(), x.numpy(), atol=1e-10)
    assert np.isclose(torch.linalg.norm(w.forward(x)).item(), torch.linalg.norm(x).item())
    pywt = pytest.importorskip("pywt")
    lo = pywt.Wavelet("db4").dec_lo
    np.testing.assert_allclose(lo, classical._DB4, atol=1e-12)


@pytest.mark.parametrize("solver", ["l1_wavelet", "tv_cs"])
def test_compressed_sensing_beats_zero_filling(solver):
    img = phantom()
    k, maps, _ = simulate_kspace(img, 6, rng=0, noise=0.002)
    mask = torch.from_numpy(np.broadcast_to(make_mask("equispaced", k.shape, 4, seed=1), img.shape).copy())
    ku = torch.from_numpy(k) * mask
    zf = classical.zero_filled(ku).numpy()
    out = getattr(classical, solver)(ku, torch.from_numpy(maps), mask, iterations=40).abs().numpy()
    assert np.linalg.norm(out - img) < 0.7 * np.linalg.norm(zf - img)


def test_espirit_uses_only_the_fully_sampled_square_of_a_poisson_mask_of_odd_height():
    from meddl.reconstruction.coils import espirit_maps
    from meddl.reconstruction.masks import poisson_mask

    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(-1, 1, 65), np.linspace(-1, 1, 48), indexing="ij")
    img = np.exp(-(yy**2 + xx**2) * 2) * (1 + 0.3 * rng.normal(size=(65, 48)))
    coils = np.stack([np.exp(-((yy - a) ** 2 + (xx - b) ** 2)) * np.exp(1j * (a * yy + b * xx))
                      for a, b in ((-1, -1), (-1, 1), (1, -1), (1, 1))])
    k = fft2c(torch.from_numpy((coils * img).astype(np.complex64)))
    mask = torch.from_numpy(poisson_mask((65, 48), 4, calib=16, rng=rng))
    rows, cols = center_block(65, 16), center_block(48, 16)
    assert rows == slice(25, 41) and mask[rows, cols].all()
    mask[24, cols] = False  # outside the square: whatever the sampler drew there
    full = espirit_maps(k, calib_width=16, kernel=4, calib_cols=cols, factor=1)
    masked = espirit_maps(k * mask, calib_width=16, kernel=4, calib_cols=cols, factor=1)
    assert float(full.abs().amax()) > 0.5
    torch.testing.assert_close(masked, full)  # calibration rows 25-40 (the square), not 24-39
