"""Fourier domain adaptation (meddl.adaptation.fourier)."""

from __future__ import annotations

import numpy as np
import pytest
from meddl import InputError, Volume
from meddl.adaptation import FourierConfig, adapt_fourier, default_beta, rank_donors


def _blobs(rng: np.random.Generator, shape, channels=1) -> np.ndarray:
    """Smooth positive test images with some texture."""
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.random((channels, *shape)), sigma=(0,) + (2.0,) * len(shape))
    return (x - x.min()) / (x.max() - x.min()) * 100.0 + rng.random((channels, *shape)) * 5.0


def yang_soatto_fda(src: np.ndarray, trg: np.ndarray, beta: float) -> np.ndarray:
    """The original FDA code (Yang & Soatto, ``FDA_source_to_target_np``) on (C, H, W) arrays."""
    fft_src = np.fft.fft2(src, axes=(-2, -1))
    fft_trg = np.fft.fft2(trg, axes=(-2, -1))
    amp_src, pha_src = np.abs(fft_src), np.angle(fft_src)
    amp_trg = np.abs(fft_trg)
    a_src = np.fft.fftshift(amp_src, axes=(-2, -1))
    a_trg = np.fft.fftshift(amp_trg, axes=(-2, -1))
    _, h, w = a_src.shape
    b = int(np.floor(min(h, w) * beta))
    c_h, c_w = h // 2, w // 2
    a_src[:, c_h - b : c_h + b + 1, c_w - b : c_w + b + 1] = a_trg[:, c_h - b : c_h + b + 1, c_w - b : c_w + b + 1]
    amp = np.fft.ifftshift(a_src, axes=(-2, -1))
    return np.real(np.fft.ifft2(amp * np.exp(1j * pha_src), axes=(-2, -1)))


@pytest.mark.parametrize("shape", [(64, 48), (63, 50)])
@pytest.mark.parametrize("beta", [0.02, 0.09, 0.3])
def test_square_window_matches_the_original_fda_code(shape, beta, rng):
    src, trg = _blobs(rng, shape, 2), _blobs(rng, shape, 2) * 1.7 + 10
    out = adapt_fourier(Volume(src), Volume(trg), FourierConfig(beta=beta, window="square", preserve_range=False),
                        device="cpu")
    assert np.allclose(out.numpy(), yang_soatto_fda(src, trg, beta), atol=1e-4)


@pytest.mark.parametrize("window", ["square", "circle"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_beta_zero_returns_the_input(window, ndim, rng):
    shape = (20, 24) if ndim == 2 else (12, 14, 10)
    src = _blobs(rng, shape)
    vol = Volume(src.astype(np.float32))
    out = adapt_fourier(vol, Volume(_blobs(rng, shape) * 3), FourierConfig(beta=0.0, window=window), device="cpu")
    assert np.array_equal(out.numpy(), vol.numpy())
    assert np.allclose(out.affine, vol.affine)


@pytest.mark.parametrize("window", ["square", "circle"])
@pytest.mark.parametrize("mode,shape", [("2d", (40, 36)), ("3d", (20, 18, 16))])
def test_phase_is_the_inputs_and_amplitude_is_swapped_inside_the_window_only(window, mode, shape, rng):
    src, ref = _blobs(rng, shape), _blobs(rng, shape) * 2 + 5
    beta = 0.15
    out = adapt_fourier(Volume(src), Volume(ref), FourierConfig(beta=beta, window=window, mode=mode,
                                                                preserve_range=False), device="cpu").numpy()[0]
    f_in, f_ref, f_out = (np.fft.fftn(a) for a in (src[0], ref[0], out))
    # the window, written independently: integer frequencies, |k| per axis
    k = np.meshgrid(*[np.abs(np.fft.fftfreq(n) * n) for n in shape], indexing="ij")
    if window == "square":
        inside = np.max(k, axis=0) <= np.floor(min(shape) * beta)
    else:
        inside = np.sum(np.square(k), axis=0) <= (min(shape) * beta) ** 2
    assert 1 < inside.sum() < inside.size
    assert np.allclose(np.abs(f_out)[inside], np.abs(f_ref)[inside], rtol=1e-6, atol=1e-6)
    assert np.allclose(np.abs(f_out)[~inside], np.abs(f_in)[~inside], rtol=1e-6, atol=1e-6)
    nonzero = np.abs(f_in) > 1e-6 * np.abs(f_in).max()
    dphase = np.angle(f_out[nonzero] * np.conj(f_in[nonzero]))
    assert np.abs(dphase).max() < 1e-6


@pytest.mark.parametrize("window", ["square", "circle"])
def test_3d_equals_slice_wise_for_volumes_constant_along_the_slice_axis(window, rng):
    # constant along K: the 3D spectrum lives on the k_K = 0 plane, where the 3D window is the 2D
    # one (K is the longest axis, so min(shape) and the window size are the same)
    plane_src, plane_ref = _blobs(rng, (24, 20)), _blobs(rng, (24, 20)) * 1.5
    src = np.repeat(plane_src[..., None], 30, axis=-1)
    ref = np.repeat(plane_ref[..., None], 30, axis=-1)
    cfg = dict(beta=0.1, window=window, preserve_range=False)
    vol3 = adapt_fourier(Volume(src), Volume(ref), FourierConfig(mode="3d", **cfg), device="cpu").numpy()
    vol2 = adapt_fourier(Volume(src), Volume(ref), FourierConfig(mode="2d", **cfg), device="cpu").numpy()
    single = adapt_fourier(Volume(plane_src), Volume(plane_ref), FourierConfig(**cfg), device="cpu").numpy()
    assert np.allclose(vol3, vol2, atol=1e-4)
    assert np.allclose(vol2[..., 7], single, atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_axis_picks_the_slices(axis, rng):
    src, ref = _blobs(rng, (10, 12, 14)), _blobs(rng, (10, 12, 14)) + 20
    out = adapt_fourier(Volume(src), Volume(ref), FourierConfig(beta=0.2, window="square", mode="2d", slice_axis=axis,
                                                                preserve_range=False), device="cpu").numpy()
    s_src, s_ref, s_out = (np.moveaxis(a[0], axis, 0) for a in (src, ref, out))
    expected = yang_soatto_fda(s_src, s_ref, 0.2)
    assert np.allclose(s_out, expected, atol=1e-4)


def test_mean_of_references_equals_the_mean_of_single_outputs(rng):
    src = _blobs(rng, (32, 30))
    refs = [Volume(_blobs(rng, (32, 30)) * s) for s in (1.0, 2.0, 3.0)]
    cfg = dict(beta=0.1, preserve_range=False)
    mean = adapt_fourier(Volume(src), refs, FourierConfig(combine="mean", **cfg), device="cpu").numpy()
    each = adapt_fourier(Volume(src), refs, FourierConfig(combine="each", **cfg), device="cpu")
    assert isinstance(each, list) and len(each) == 3
    assert np.allclose(mean, np.mean([e.numpy() for e in each], axis=0), atol=1e-4)


def test_range_dtype_and_geometry_are_kept(rng, oblique):
    src = np.round(_blobs(rng, (16, 18, 12))).astype(np.int16)
    vol = Volume(src, oblique(3))
    out = adapt_fourier(vol, Volume(_blobs(rng, (16, 18, 12)) * 4 - 50), FourierConfig(beta=0.2), device="cpu")
    assert out.numpy().dtype == np.int16
    assert out.numpy().min() >= src.min() and out.numpy().max() <= src.max()
    assert np.allclose(out.affine, vol.affine) and out.meta["fda_window"] == "circle"


def test_reference_of_another_shape_is_resampled(rng):
    src = _blobs(rng, (30, 26))
    out = adapt_fourier(Volume(src), Volume(_blobs(rng, (45, 50))), FourierConfig(beta=0.05), device="cpu")
    assert out.spatial_shape == (30, 26)


def test_rgb_uses_one_reference_channel_for_all(rng):
    src = _blobs(rng, (20, 20), channels=3)
    out = adapt_fourier(Volume(src), Volume(_blobs(rng, (20, 20))), FourierConfig(beta=0.1), device="cpu")
    assert out.channels == 3


def test_donor_ranking_puts_the_most_similar_first(rng):
    src = _blobs(rng, (40, 40))
    near = src + rng.normal(0, 1.0, src.shape)
    far = _blobs(rng, (40, 40))
    order = rank_donors(Volume(src), [Volume(far), Volume(near), Volume(src * 2 + 7)])
    assert [i for i, _ in order][:2] in ([2, 1], [1, 2]) and order[-1][0] == 0
    assert order[0][1] == pytest.approx(1.0, abs=1e-3)
    out = adapt_fourier(Volume(src), [Volume(far), Volume(src * 2 + 7)], FourierConfig(beta=0.1, donors=1,
                                                                                        preserve_range=False))
    only_best = adapt_fourier(Volume(src), [Volume(src * 2 + 7)], FourierConfig(beta=0.1, preserve_range=False))
    assert np.allclose(out.numpy(), only_best.numpy())


def test_default_beta_rule():
    assert default_beta("square", (256, 256)) == pytest.approx(0.01)
    assert default_beta("circle", (256, 256, 180)) == pytest.approx(0.03)
    assert default_beta("square", (50, 64)) == pytest.approx(1 / 50)  # at least one frequency step


def test_progress_is_monotone_and_cancel_stops(rng):
    from meddl import Cancelled
    from meddl.progress import CancelToken

    seen = []
    adapt_fourier(Volume(_blobs(rng, (16, 16))), [Volume(_blobs(rng, (16, 16)))] * 2,
                  FourierConfig(beta=0.1, combine="each"), progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        adapt_fourier(Volume(_blobs(rng, (16, 16))), [Volume(_blobs(rng, (16, 16)))], cancel=token)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [-0.1, 0.51, float("nan")])
def test_beta_outside_0_to_half_is_refused(beta):
    with pytest.raises(InputError, match=r"Fourier beta: expected a number in \[0, 0.5\]"):
        FourierConfig(beta=beta)


def test_reference_of_other_dimensionality_is_refused(rng):
    with pytest.raises(InputError, match=r"reference 1: expected a 3D volume like the input, got 2D"):
        adapt_fourier(Volume(_blobs(rng, (8, 8, 8))), [Volume(_blobs(rng, (8, 8)))], FourierConfig(beta=0.1))


def test_nans_are_refused(rng):
    bad = _blobs(rng, (8, 8))
    bad[0, 2, 2] = np.nan
    with pytest.raises(InputError, match=r"input: expected finite voxel values, got 1 NaN"):
        adapt_fourier(Volume(bad), [Volume(_blobs(rng, (8, 8)))])
    with pytest.raises(InputError, match=r"reference 2: expected finite voxel values"):
        adapt_fourier(Volume(_blobs(rng, (8, 8))), [Volume(_blobs(rng, (8, 8))), Volume(bad)])


def test_other_bad_inputs_are_refused(rng):
    img = Volume(_blobs(rng, (8, 8)))
    with pytest.raises(InputError, match=r"expected at least one reference"):
        adapt_fourier(img, [])
    with pytest.raises(InputError, match=r"expected a intensity volume, got a label volume"):
        adapt_fourier(img, [Volume(np.ones((1, 8, 8), np.int32), kind="label")])
    with pytest.raises(InputError, match=r"expected 1 channel\(s\) like the input \(or 1\), got 3"):
        adapt_fourier(img, [Volume(_blobs(rng, (8, 8), channels=3))])
    with pytest.raises(InputError, match=r"Fourier window: expected one of square, circle, got 'hexagon'"):
        FourierConfig(window="hexagon")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small images: one thread is faster, and far faster on a busy machine (no OpenMP barriers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode,shape", [("3d", (16, 18, 12)), ("2d", (16, 18, 12)), ("2d", (30, 26))])
def test_log_domain_undoes_a_gain_exactly(rng, mode, shape):
    """``g x ref`` in the log domain differs from ``ref`` only in the mean: any window gives ``ref`` back."""
    ref = _blobs(rng, shape)
    for beta in (0.05, 0.3):
        out = adapt_fourier(Volume(ref * 2.7), Volume(ref), device="cpu",
                            config=FourierConfig(beta=beta, mode=mode, domain="log", preserve_range=False))
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-9)
    # the intensity domain cannot: the gain scales the high frequencies too
    plain = adapt_fourier(Volume(ref * 2.7), Volume(ref), FourierConfig(beta=0.05, mode=mode, preserve_range=False))
    assert np.abs(plain.numpy() - ref).max() > 1.0


@pytest.mark.parametrize("gain", [0.5, 3.0, 30.0])
def test_log_domain_undoes_a_gain_whatever_the_sign_of_the_log_mean(rng, gain):
    """A reference scaled to [0, 1] has a negative log-mean, a raw input (gain 30) a positive one."""
    ref = _blobs(rng, (24, 20)) / 105.0
    for combine in ("mean", "each"):
        out = adapt_fourier(Volume(ref * gain), [Volume(ref)], device="cpu",
                            config=FourierConfig(beta=0.1, domain="log", combine=combine, preserve_range=False))
        out = out[0] if combine == "each" else out
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-9)


def test_the_mean_becomes_the_references_even_for_a_negative_mean_input(rng):
    """CT-like input (negative mean) against a positive reference: the output's mean is the reference's."""
    src = _blobs(rng, (30, 26)) * 10 - 1000.0
    ref = _blobs(rng, (30, 26))
    out = adapt_fourier(Volume(src), Volume(ref), FourierConfig(beta=0.1, preserve_range=False), device="cpu")
    assert out.numpy().mean() == pytest.approx(ref.mean(), rel=1e-9)
    assert out.meta["fda_domain"] == "intensity"


def test_log_domain_beta_zero_returns_the_input(rng):
    src = _blobs(rng, (16, 18))
    out = adapt_fourier(Volume(src), Volume(_blobs(rng, (16, 18))), FourierConfig(beta=0.0, domain="log"))
    np.testing.assert_array_equal(out.numpy(), src)


def test_log_domain_refuses_negative_intensities(rng):
    with pytest.raises(InputError, match=r"input: the log domain needs non-negative intensities .* minimum of -"):
        adapt_fourier(Volume(_blobs(rng, (8, 8)) - 50), [Volume(_blobs(rng, (8, 8)))], FourierConfig(domain="log"))
    with pytest.raises(InputError, match=r"reference 1: the log domain needs non-negative intensities"):
        adapt_fourier(Volume(_blobs(rng, (8, 8))), [Volume(_blobs(rng, (8, 8)) - 50)], FourierConfig(domain="log"))
    # numbered as given, also when donors are chosen among them
    with pytest.raises(InputError, match=r"reference 3: the log domain needs non-negative intensities"):
        refs = [Volume(_blobs(rng, (8, 8))), Volume(_blobs(rng, (8, 8))), Volume(_blobs(rng, (8, 8)) - 50)]
        adapt_fourier(Volume(_blobs(rng, (8, 8))), refs, FourierConfig(domain="log", donors=1))


@pytest.mark.parametrize("offset", [0, -0.1, 1.5, float("nan")])
def test_log_offset_is_checked(offset):
    with pytest.raises(InputError, match=r"Fourier log offset: expected a number in \(0, 1\]"):
        FourierConfig(domain="log", log_offset=offset)
    with pytest.raises(InputError, match=r"Fourier domain: expected one of intensity, log, got 'sqrt'"):
        FourierConfig(domain="sqrt")


def test_fda_accepts_a_reference_amplitude_of_another_precision():
    import torch
    from meddl.adaptation.fourier import fda

    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 16, 18, generator=g)  # float32
    amplitude = torch.fft.fftn(torch.rand(16, 18, generator=g, dtype=torch.float64)).abs()
    out = fda(image, amplitude, 0.1)
    ref = fda(image.double(), amplitude, 0.1)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_a_volume_of_one_slice_is_adapted_as_the_2d_image_it_is(rng, mode):
    src, ref = _blobs(rng, (32, 40)), _blobs(rng, (32, 40)) * 3
    flat = adapt_fourier(Volume(src), Volume(ref), FourierConfig(beta=0.1, preserve_range=False))
    for axis in (0, 2):  # Slicer's (I, J, 1), and a single slice along the first axis
        thin = lambda a, axis=axis: Volume(np.expand_dims(a, 1 + axis))  # noqa: E731
        out = adapt_fourier(thin(src), thin(ref), FourierConfig(beta=0.1, mode=mode, slice_axis=axis,
                                                                preserve_range=False))
        np.testing.assert_allclose(np.squeeze(out.numpy(), 1 + axis), flat.numpy(), rtol=1e-10, atol=1e-9)
    assert np.std(flat.numpy() - src) > 1.0  # more than the mean moved


def test_donors_are_ranked_for_volumes_thinner_than_the_ssim_window(rng):
    src = _blobs(rng, (24, 20, 5))
    refs = [Volume(_blobs(rng, (24, 20, 5))), Volume(src + rng.normal(0, 1.0, src.shape))]
    assert [i for i, _ in rank_donors(Volume(src), refs)] == [1, 0]
    assert [i for i, _ in rank_donors(Volume(src[..., :1]), [Volume(r.numpy()[..., :1]) for r in refs])] == [1, 0]


def test_the_default_square_window_holds_one_frequency_step_on_a_49_voxel_axis():
    from meddl.adaptation.fourier import low_frequency_window

    assert int(low_frequency_window((49, 64), default_beta("square", (49, 64)), "square").sum()) == 9
