"""Stain normalisation, separation and augmentation (meddl.adaptation.stain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from meddl import InputError, Volume
from meddl.adaptation import (
    StainConfig,
    StainNormalizer,
    adapt_stain,
    hed_jitter,
    separate_stains,
    tissue_mask,
)
from meddl.adaptation import stain as S

# H&E stain vectors of a typical slide (the reference of the original Macenko code)
H_VEC = np.array([0.5626, 0.7201, 0.4062]) / np.linalg.norm([0.5626, 0.7201, 0.4062])
E_VEC = np.array([0.2159, 0.8012, 0.5581]) / np.linalg.norm([0.2159, 0.8012, 0.5581])
I0 = 240.0


def _volume_from_hwc(rgb: np.ndarray) -> Volume:
    """An (H, W, 3) image as a Volume (3, I, J) = (3, x, y)."""
    return Volume(np.ascontiguousarray(rgb.transpose(2, 1, 0)))


def _hwc(vol: Volume) -> np.ndarray:
    return vol.numpy().transpose(2, 1, 0)


def synthetic_slide(rng: np.random.Generator, size=(96, 128), background=0.2):
    """RGB (H, W, 3) uint8 made from H_VEC/E_VEC: OD = W C, I = I0 exp(-OD) - 1; and C (2, H, W)."""
    h, w = size
    n = h * w
    conc = np.zeros((2, n))
    kind = rng.random(n)
    pure_h = kind < 0.15
    pure_e = (kind >= 0.15) & (kind < 0.3)
    mixed = (kind >= 0.3) & (kind < 1 - background)
    # pure-stain pixels dense enough to pass the tissue threshold (OD >= 0.15 in every channel)
    conc[0, pure_h] = rng.uniform(0.5, 1.5, pure_h.sum())
    conc[1, pure_e] = rng.uniform(0.8, 1.6, pure_e.sum())
    conc[:, mixed] = rng.uniform(0.2, 0.9, (2, mixed.sum()))
    od = np.stack([H_VEC, E_VEC], 1) @ conc
    rgb = np.clip(np.round(I0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
    return rgb.T.reshape(h, w, 3), conc.reshape(2, h, w)  # pixel n is (y, x) = divmod(n, w)


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    from skimage import data

    return data.immunohistochemistry()[:256, :256].copy()


def _cosines(matrix: torch.Tensor, truth: np.ndarray) -> np.ndarray:
    m = matrix.numpy() / np.linalg.norm(matrix.numpy(), axis=0)
    return np.abs(m.T @ truth)


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_known_stain_vectors_are_recovered(method, rng):
    rgb, _ = synthetic_slide(rng)
    fit = StainNormalizer(StainConfig(method=method), "cpu").fit_image(_volume_from_hwc(rgb))
    cos = _cosines(fit.stain_matrix, np.stack([H_VEC, E_VEC], 1))
    # H first (larger red optical density), each estimate parallel to its true vector
    assert cos[0, 0] > 0.995 and cos[1, 1] > 0.995, cos
    assert fit.stain_matrix.shape == (3, 2)


def test_macenko_separation_gives_the_concentrations(rng):
    rgb, conc = synthetic_slide(rng)
    stains = separate_stains(_volume_from_hwc(rgb), "macenko", StainConfig(light_intensity=I0), device="cpu")
    assert set(stains) == {"H", "E"}
    for i, name in enumerate(("H", "E")):
        got = stains[name].numpy()[0].T  # (I, J) = (x, y) -> (H, W)
        assert stains[name].channels == 1 and got.shape == conc[i].shape
        assert np.corrcoef(got.ravel(), conc[i].ravel())[0, 1] > 0.99


def test_hed_separation_inverts_ruifrok_mixing(rng):
    rows = S.RUIFROK_HED / np.linalg.norm(S.RUIFROK_HED, axis=1, keepdims=True)
    conc = rng.uniform(0.0, 0.8, (3, 40 * 50))
    od = rows.T @ conc
    rgb = I0 * np.exp(-od) - 1.0  # exact (float) pixel values in [0, 255]
    vol = Volume(rgb.reshape(3, 40, 50).astype(np.float64))
    stains = separate_stains(vol, "hed", StainConfig(light_intensity=I0), device="cpu")
    assert set(stains) == {"H", "E", "DAB"}
    got = np.stack([stains[k].numpy()[0].ravel() for k in ("H", "E", "DAB")])
    # only the 8-bit rounding of the input stands between us and the truth
    assert np.abs(got - conc).max() < 0.05
    assert stains["H"].meta["stain"] == "H" and stains["H"].kind.value == "intensity"


# Macenko and Vahadane keep only the two-stain part of the optical density (and Vahadane's lasso
# drops faint stain), so the identity is approximate: a grey level or two.
@pytest.mark.parametrize("method,mean_tol,p99_tol", [("macenko", 2.0, 6), ("reinhard", 0.5, 1), ("vahadane", 3.0, 12)])
def test_reference_normalised_to_itself_is_near_identity(method, mean_tol, p99_tol, ihc):
    vol = _volume_from_hwc(ihc)
    out = adapt_stain(vol, vol, StainConfig(method=method), device="cpu")
    diff = np.abs(out.numpy().astype(int) - vol.numpy().astype(int))
    assert out.numpy().dtype == np.uint8 and out.spatial_shape == vol.spatial_shape
    assert diff.mean() < mean_tol and np.percentile(diff, 99) <= p99_tol, (diff.mean(), np.percentile(diff, 99))
    assert np.allclose(out.affine, vol.affine)


def _restain(rgb: np.ndarray) -> np.ndarray:
    """Another lab's staining: rotated stain vectors, scaled concentrations."""
    vol = _volume_from_hwc(rgb)
    norm = StainNormalizer(StainConfig(), "cpu")
    fit = norm.fit_image(vol)
    other = S.StainFit(
        S.StainMethod.MACENKO,
        stain_matrix=torch.nn.functional.normalize(fit.stain_matrix + torch.tensor([[0.08, -0.1], [-0.1, 0.05], [0.1, 0.08]]), dim=0),
        max_concentration=fit.max_concentration * torch.tensor([1.3, 0.7]),
    )
    px = torch.from_numpy(vol.numpy().reshape(3, -1).copy())
    return S.map_stains(px, fit, other, StainConfig()).reshape(vol.numpy().shape).numpy().transpose(2, 1, 0)


@pytest.mark.parametrize("method", ["macenko", "vahadane", "reinhard"])
def test_restained_image_is_normalised_back(method, ihc):
    from skimage.metrics import structural_similarity

    restained = _restain(ihc)
    before = structural_similarity(ihc, restained, channel_axis=2)
    out = _hwc(adapt_stain(_volume_from_hwc(restained), _volume_from_hwc(ihc), StainConfig(method=method), device="cpu"))
    after = structural_similarity(ihc, out, channel_axis=2)
    assert after > before + 0.02 and after > 0.85, (before, after)


def test_macenko_agrees_with_torchstain(ihc):
    torchstain = pytest.importorskip("torchstain")
    restained = _restain(ihc)
    ref = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ref.fit(torch.from_numpy(ihc).permute(2, 0, 1).contiguous())
    theirs = ref.normalize(torch.from_numpy(restained).permute(2, 0, 1).contiguous(), stains=False)[0].numpy()
    ours = _hwc(adapt_stain(_volume_from_hwc(restained), _volume_from_hwc(ihc), device="cpu"))
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.6  # they truncate, we round


def test_output_keeps_the_volume_axis_order(ihc, tmp_path):
    """(3, I, J) is (3, x, y): the PNG written from the output reads back as the (H, W, 3) image."""
    from meddl import io
    from skimage import io as skio

    rgb = ihc[:100, :160]  # not square: a transposition would show
    vol = _volume_from_hwc(rgb)
    assert vol.spatial_shape == (160, 100)
    out = adapt_stain(vol, _volume_from_hwc(ihc), device="cpu")
    io.write(out, tmp_path / "out.png")
    back = skio.imread(tmp_path / "out.png")
    assert back.shape == (100, 160, 3)
    assert np.array_equal(back, _hwc(out))
    # pixel-wise method: the transposed image gives the transposed result
    out_t = adapt_stain(Volume(np.ascontiguousarray(vol.numpy().transpose(0, 2, 1))), _volume_from_hwc(ihc), device="cpu")
    assert np.abs(out_t.numpy().transpose(0, 2, 1).astype(int) - out.numpy().astype(int)).max() <= 1


def test_chunked_and_single_pass_agree(ihc):
    vol, ref = _volume_from_hwc(ihc), _volume_from_hwc(ihc[::-1])
    one = adapt_stain(vol, ref, StainConfig(max_samples=5000), device="cpu")
    chunked = adapt_stain(vol, ref, StainConfig(max_samples=5000, chunk_pixels=4096), device="cpu")
    assert np.array_equal(one.numpy(), chunked.numpy())


def test_rgba_keeps_alpha(ihc):
    alpha = np.full(ihc.shape[:2] + (1,), 200, np.uint8)
    vol = _volume_from_hwc(np.concatenate((ihc, alpha), axis=2))
    out = adapt_stain(vol, _volume_from_hwc(ihc), device="cpu")
    assert out.channels == 4 and np.all(out.numpy()[3] == 200)


def test_transparent_pixels_are_not_sampled_as_tissue(ihc):
    ref = _volume_from_hwc(ihc)
    opaque = np.concatenate((ihc, np.full(ihc.shape[:2] + (1,), 255, np.uint8)), axis=2)
    framed = np.zeros((320, 320, 4), np.uint8)  # a transparent black margin (black is dense "tissue" by OD)
    framed[32:288, 32:288] = opaque
    a = adapt_stain(_volume_from_hwc(opaque), ref, device="cpu").numpy()
    b = adapt_stain(_volume_from_hwc(framed), ref, device="cpu").numpy()[:, 32:288, 32:288]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_float_rgba_keeps_its_alpha_in_the_colour_scale_and_jitter_keeps_the_dtype(ihc):
    rgb = _volume_from_hwc(ihc).numpy().astype(np.float32) / 255.0
    img = Volume(np.concatenate((rgb, np.full((1, *rgb.shape[1:]), 0.6, np.float32))))
    out = adapt_stain(img, _volume_from_hwc(ihc), device="cpu").numpy()
    assert out.dtype == np.uint8 and np.all(out[3] == 153)  # 0.6 of opaque, as the colour is scaled
    same = hed_jitter(img, sigma=0.0).numpy()
    assert same.dtype == np.float32 and np.abs(same - img.numpy()).max() <= 1 / 255 + 1e-6


def test_16_bit_rgb_gets_the_convert_to_8_bit_message(ihc):
    deep = Volume(_volume_from_hwc(ihc).numpy().astype(np.uint16) * 257)
    with pytest.raises(InputError, match=r"expected colour values in 0-255, got the range \[0, \d+\]; convert to 8-bit"):
        adapt_stain(deep, _volume_from_hwc(ihc), device="cpu")


def test_tissue_mask_tells_tissue_from_background(rng):
    rgb, conc = synthetic_slide(rng, background=0.5)
    mask = tissue_mask(_volume_from_hwc(rgb))
    assert mask.kind.value == "label" and mask.spatial_shape == (rgb.shape[1], rgb.shape[0])
    truth = (conc.sum(0) == 0).T
    assert mask.numpy()[0][truth].max() == 0  # background is never tissue
    lum = tissue_mask(_volume_from_hwc(rgb), StainConfig(tissue="luminosity"))
    assert lum.numpy()[0][truth].max() == 0 and lum.numpy().sum() > 0


def test_nonnegative_lasso_matches_scipy_nnls_and_the_lasso_optimum():
    from scipy.optimize import minimize, nnls

    g = torch.Generator().manual_seed(0)
    for k in (2, 3):
        w = torch.rand(3, k, generator=g, dtype=torch.float64) + 0.05
        x = torch.rand(3, 200, generator=g, dtype=torch.float64) * 2 - 0.4
        got = S.nonnegative_lasso(w.T @ w, w.T @ x).numpy()
        ref = np.stack([nnls(w.numpy(), x[:, i].numpy())[0] for i in range(200)], 1)
        assert np.abs(got - ref).max() < 1e-8
        lam = 0.1
        got = S.nonnegative_lasso(w.T @ w, w.T @ x, lam).numpy()
        wn = w.numpy()
        for i in range(0, 200, 20):
            xi = x[:, i].numpy()

            def f(c, xi=xi, wn=wn, lam=lam):
                return 0.5 * np.sum((xi - wn @ c) ** 2) + lam * c.sum()

            best = minimize(f, np.full(k, 0.3), bounds=[(0, None)] * k, method="L-BFGS-B").fun
            assert f(got[:, i]) <= best + 1e-9


def test_lab_conversion_matches_scikit_image(rng):
    from skimage.color import lab2rgb, rgb2lab

    rgb = rng.random((20, 30, 3))
    ours = S.rgb_to_lab(torch.from_numpy(rgb.transpose(2, 0, 1).copy())).numpy().transpose(1, 2, 0)
    assert np.abs(ours - rgb2lab(rgb)).max() < 1e-3
    back = S.lab_to_rgb(torch.from_numpy(ours.transpose(2, 0, 1).copy())).numpy().transpose(1, 2, 0)
    assert np.abs(back - lab2rgb(rgb2lab(rgb))).max() < 1e-3


def test_progress_is_monotone_and_cancel_stops(ihc):
    from meddl import Cancelled
    from meddl.progress import CancelToken

    seen = []
    vol = _volume_from_hwc(ihc)
    adapt_stain(vol, vol, StainConfig(chunk_pixels=10000), progress=lambda f, m: seen.append(f), device="cpu")
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) > 5
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        adapt_stain(vol, vol, cancel=token, device="cpu")


# -- HED jitter ---------------------------------------------------------------------------------


def test_hed_jitter_zero_is_identity_and_matches_scikit_image(ihc):
    from skimage.color import hed_from_rgb, rgb_from_hed

    x = torch.from_numpy(ihc).permute(2, 0, 1).contiguous()
    same = hed_jitter(x, sigma=0.0, bias=0.0)
    assert same.dtype == torch.uint8 and int((same.int() - x.int()).abs().max()) <= 1
    g = torch.Generator().manual_seed(3)
    out = hed_jitter(x.float() / 255, sigma=0.2, bias=0.1, generator=g)
    g = torch.Generator().manual_seed(3)
    a = 1 + (torch.rand((3, 1, 1), generator=g) * 2 - 1) * 0.2
    b = (torch.rand((3, 1, 1), generator=g) * 2 - 1) * 0.1
    # scikit-image's formulas, written out in numpy
    rgb = np.maximum(ihc / 255.0, 1e-6)
    hed = (np.log(rgb) / np.log(1e-6)) @ hed_from_rgb
    hed = hed * a.numpy().reshape(1, 1, 3) + b.numpy().reshape(1, 1, 3)
    expected = np.clip(np.exp(-(hed * -np.log(1e-6)) @ rgb_from_hed), 0, 1)
    assert np.abs(out.numpy().transpose(1, 2, 0) - expected).max() < 1e-4


def test_hed_jitter_draws_per_image_and_is_reproducible(ihc):
    x = torch.from_numpy(ihc).permute(2, 0, 1).unsqueeze(0).repeat(4, 1, 1, 1)
    one = hed_jitter(x, 0.05, generator=torch.Generator().manual_seed(1))
    two = hed_jitter(x, 0.05, generator=torch.Generator().manual_seed(1))
    assert one.shape == x.shape and torch.equal(one, two)
    assert not torch.equal(one[0], one[1])
    vol = hed_jitter(_volume_from_hwc(ihc), 0.05, generator=torch.Generator().manual_seed(1))
    assert isinstance(vol, Volume) and vol.numpy().dtype == np.uint8 and vol.spatial_shape == (256, 256)


# -- bad input -----------------------------------------------------------------------------------


def test_grey_image_is_refused(ihc):
    grey = Volume(ihc.mean(2).astype(np.uint8).T[None].copy())
    with pytest.raises(InputError, match=r"expected an RGB colour image \(3 components\), got 1"):
        adapt_stain(grey, _volume_from_hwc(ihc), device="cpu")
    grey_rgb = Volume(np.repeat(grey.numpy(), 3, axis=0))
    with pytest.raises(InputError, match=r"got a grey image \(R = G = B\)"):
        adapt_stain(grey_rgb, _volume_from_hwc(ihc), device="cpu")
    with pytest.raises(InputError, match=r"reference: .*grey image"):
        adapt_stain(_volume_from_hwc(ihc), grey_rgb, device="cpu")


def test_background_only_is_refused(ihc):
    blank = Volume(np.full((3, 64, 64), 245, np.uint8))
    with pytest.raises(InputError, match=r"expected stained tissue, got 0 tissue pixel\(s\).*background only"):
        adapt_stain(blank, _volume_from_hwc(ihc), device="cpu")
    with pytest.raises(InputError, match=r"background only"):
        adapt_stain(_volume_from_hwc(ihc), blank, StainConfig(method="vahadane"), device="cpu")


def test_nan_and_out_of_range_values_are_refused(ihc):
    bad = _volume_from_hwc(ihc).numpy().astype(np.float32)
    bad[0, 3, 4] = np.nan
    with pytest.raises(InputError, match=r"NaN"):
        adapt_stain(Volume(bad), _volume_from_hwc(ihc), device="cpu")
    with pytest.raises(InputError, match=r"expected colour values in 0-255, got the range"):
        adapt_stain(Volume(np.full((3, 8, 8), 300.0)), _volume_from_hwc(ihc), device="cpu")
    with pytest.raises(InputError, match=r"expected a intensity volume, got a label volume"):
        adapt_stain(Volume(np.zeros((3, 8, 8), np.uint8), kind="label"), _volume_from_hwc(ihc), device="cpu")


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"method": "staintools"}, r"stain method: expected one of macenko, reinhard, vahadane, got 'staintools'"),
        ({"alpha": 60}, r"StainConfig.alpha: expected a number in \[0, 49\]"),
        ({"max_samples": 0}, r"StainConfig.max_samples: expected a positive integer"),
        ({"tissue": "otsu"}, r"tissue detector: expected one of od, luminosity"),
    ],
)
def test_bad_config_is_refused(kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        StainConfig(**kwargs)


def test_float_input_in_unit_range_is_accepted(ihc):
    vol = _volume_from_hwc(ihc)
    as_float = Volume(vol.numpy().astype(np.float32) / 255.0)
    a = adapt_stain(vol, vol, device="cpu").numpy()
    b = adapt_stain(as_float, vol, device="cpu").numpy()
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small images: one thread is faster, and far faster on a busy machine (no OpenMP barriers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("size", [1000, 100_000])
def test_nearest_rank_percentile_paths_match_a_sorted_reference(size):
    from meddl.adaptation._common import _kth_bracket, _kth_numpy, percentile_nearest

    g = torch.Generator().manual_seed(size)
    values = torch.randn(size, generator=g)
    keep = torch.rand(size, generator=g) < 0.6
    masked = torch.where(keep, values, torch.full_like(values, float("inf")))  # how the stain code masks
    count = int(keep.sum())
    ordered = np.sort(values[keep].numpy())
    for q in (0.0, 1.0, 50.0, 99.0, 100.0):
        k = min(max(1 + int(round(0.01 * q * (count - 1))), 1), count)
        assert float(percentile_nearest(masked, q, count)) == ordered[k - 1]
        assert float(_kth_numpy(masked, k)) == ordered[k - 1]
        assert float(_kth_bracket(masked, k)) == ordered[k - 1]


@pytest.mark.parametrize("pixels,max_samples,line,expected", [
    (512 * 512, 100_000, 512, 3), (2048 * 2048, 1 << 17, 2048, 33), (2048 * 2048, 100_000, 2048, 42),
    (510 * 400, 100_000, 510, 4), (300 * 210, 5000, 210, 13), (200 * 210, 7000, 200, 6), (200 * 210, 7000, 210, 8)])
def test_the_sample_stride_spreads_over_the_columns(pixels, max_samples, line, expected):
    from math import gcd

    from meddl.adaptation.stain import sample_step

    step = sample_step(pixels, max_samples, line)
    assert step == expected
    taken = np.arange(0, pixels, step)
    assert len(taken) <= max_samples
    assert gcd(step, line) <= 2
    # a stride sharing a larger factor with the line length would keep returning to a few columns
    assert len(np.unique(taken % line)) >= line // 2
