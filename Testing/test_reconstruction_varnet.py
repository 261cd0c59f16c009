"""E2E-VarNet: shapes, data consistency, scale equivariance, the bundled weights; training batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from meddl import models
from meddl.reconstruction.masks import make_mask
from meddl.reconstruction.simulate import simulate_kspace
from meddl.reconstruction.varnet import VarNet, _Cascade, acs_mask

TINY = {"num_cascades": 2, "chans": 4, "pools": 2, "sens_chans": 2, "sens_pools": 2}


def _data(h=32, w=28, coils=4, acc=4, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.float32)
    img[6:26, 5:22] = 1.0
    img[10:16, 8:14] = 0.4
    k, maps, x = simulate_kspace(img, coils, rng)
    mask = np.broadcast_to(make_mask("equispaced", (h, w), acc, 0.2, seed=seed), (h, w)).copy()
    return torch.from_numpy(k * mask)[None], torch.from_numpy(mask), img


def test_varnet_output_shape_and_finite():
    torch.manual_seed(0)
    k, mask, img = _data()
    out = VarNet(**TINY)(k, mask)
    assert out.shape == (1, *img.shape)
    assert torch.isfinite(out).all()


class _Zero(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_soft_data_consistency_leaves_sampled_kspace_equal_to_measurement():
    k, mask, _ = _data()
    cascade = _Cascade(4, 2)
    cascade.model = _Zero()  # no refinement: the update is pure data consistency
    current = k + (torch.randn_like(k.real) + 1j * torch.randn_like(k.real)).to(k.dtype)
    m = mask[None, None]
    out = cascade(current, k, m, torch.ones_like(k))
    torch.testing.assert_close(out[m.expand_as(out)], k[m.expand_as(k)])
    torch.testing.assert_close(out[~m.expand_as(out)], current[~m.expand_as(current)])


def test_varnet_is_equivariant_to_data_scale():
    torch.manual_seed(1)
    net = VarNet(**TINY).eval()
    k, mask, _ = _data()
    with torch.no_grad():
        a = net(k, mask)
        b = net(k * 1000.0, mask)
    torch.testing.assert_close(b / 1000.0, a, rtol=1e-3, atol=1e-5)


def test_acs_mask_is_the_centre_block_of_a_column_mask():
    mask = torch.zeros(16, 20, dtype=torch.bool)
    mask[:, 8:13] = True
    mask[:, ::4] = True
    acs = acs_mask(mask[None, None], (16, 20))[0, 0]
    assert acs[:, 8:13].all() and acs.sum() == 16 * 5


def test_acs_mask_finds_a_centre_block_one_column_left_of_the_middle_as_the_pipeline_does():
    from meddl.reconstruction.coils import calibration_block

    mask = torch.zeros(32, dtype=torch.bool)
    mask[9:16] = True  # the block ends at W // 2 - 1, which the pipeline accepts as calibration
    mask[[0, 5, 20, 25, 30]] = True
    assert calibration_block(mask.numpy()) == slice(9, 16)
    acs = acs_mask(mask.view(1, 1, 1, 32), (8, 32))[0, 0]
    assert acs[:, 9:16].all() and acs.sum() == 8 * 7


def test_training_batches_are_consistent():
    from meddl.reconstruction.train import make_batch

    pool = [np.random.default_rng(0).uniform(size=(150, 140)).astype(np.float32)]
    k, m, t = make_batch(pool, np.random.default_rng(1), batch=2, crop=64)
    assert k.shape[0] == 2 and k.shape[2:] == (64, 64) and t.shape == (2, 64, 64)
    # masked k-space is zero wherever the mask is off
    assert (k.abs() * (~m)).max() == 0
    for i in range(2):
        frac = m[i, 0].float().mean().item()
        assert 1 / 8 - 0.05 < frac < 1 / 4 + 0.06



def test_scanner_phases_move_the_kspace_peak_and_keep_the_magnitude_target():
    """A linear phase ramp of a cycles shifts k-space by a samples: with scanner-like phases the energy's
    centroid leaves the centre; the target stays the (real, non-negative) magnitude."""
    from meddl.reconstruction.simulate import scanner_phase
    from meddl.reconstruction.train import make_batch

    y, x = np.mgrid[-1:1:96j, -1:1:96j]
    pool = [np.exp(-(x**2 + y**2) * 4).astype(np.float32)]

    def offsets(p: float) -> np.ndarray:
        rng = np.random.default_rng(5)
        out = []
        for _ in range(6):
            k, m, t = make_batch(pool, rng, batch=1, crop=64, accelerations=(1.0,), transpose_p=0.0,
                                 scanner_phases=p)
            assert t.dtype == torch.float32 and float(t.min()) >= 0
            e = (k[0].abs() ** 2).sum(0).numpy()
            centroid = [(e.sum(1 - a) * np.arange(64)).sum() / e.sum() for a in (0, 1)]
            out.append(np.abs(np.array(centroid) - 32).max())
        return np.array(out)

    assert offsets(0.0).max() < 1.0
    assert np.median(offsets(1.0)) > 1.0
    phase = scanner_phase((64, 80), np.random.default_rng(0), max_cycles=3.0, max_phase=np.pi)
    assert phase.shape == (64, 80) and np.isfinite(phase).all()


def test_diversified_training_images_change_size_contrast_and_noise():
    from meddl.reconstruction.train import _diversify, make_batch

    yy, xx = np.mgrid[-1:1:120j, -1:1:100j]
    head = np.where(xx**2 + yy**2 < 0.8, 0.5, 0.0) + np.where(xx**2 + yy**2 < 0.3, 0.5, 0.0)
    img = head.astype(np.float32)
    same = _diversify(img, np.random.default_rng(0), 0.0)
    np.testing.assert_array_equal(same, img)
    seen_shapes, inverted, noisy = set(), 0, 0
    for seed in range(40):
        out = _diversify(img, np.random.default_rng(seed), 1.0)
        assert out.dtype == np.float32 and np.isfinite(out).all() and out.min() >= 0
        seen_shapes.add(out.shape)
        h, w = out.shape
        core, ring = out[h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2].mean(), out[h // 2, int(w * 0.12)]
        inverted += core < ring  # the bright core became the darker tissue: another contrast
        noisy += out[:3, :3].mean() > 0.002  # the background got the noise of a single scan
    assert len(seen_shapes) > 10 and 5 < inverted < 35 and noisy == 40
    # a batch still holds its target: masked k-space of a simulated image of the crop's size
    k, m, t = make_batch([img], np.random.default_rng(3), batch=2, crop=64, diverse=1.0)
    assert k.shape[2:] == (64, 64) and t.shape == (2, 64, 64) and (k.abs() * (~m)).max() == 0


def test_bundled_weights_load_and_card_names_held_out_data():
    try:
        net, card = models.load_model("reconstruction_varnet")
    except models.ModelError:
        pytest.skip("no bundled VarNet weights in this checkout")
    assert isinstance(net, VarNet)
    assert "held_out" in card.training_data
    k, mask, img = _data(64, 64, 6)
    with torch.no_grad():
        out = net(k, mask)
    assert out.shape == (1, 64, 64) and torch.isfinite(out).all()


def test_output_is_the_sense_combination_bounded_by_the_rss_output():
    torch.manual_seed(2)
    net = VarNet(**TINY).eval()
    k, mask, _ = _data()
    with torch.no_grad():
        mag = net(k, mask)
        z = net.complex_image(k, mask)
        net.output = "rss"
        rss_mag = net(k, mask)
    assert z.shape == mag.shape and z.is_complex()
    assert torch.allclose(mag, z.abs(), atol=1e-6)
    # Cauchy-Schwarz with unit-RSS maps: |sum_c conj(S_c) x_c| <= RSS(x)
    assert (mag <= rss_mag * (1 + 1e-4) + 1e-6).all()
    assert float((rss_mag - mag).mean()) > 0
    with pytest.raises(ValueError, match="output"):
        VarNet(**TINY, output="mean")


def _bundled_copy(tmp_path):
    """The bundled VarNet weights and card copied to ``tmp_path/models``; ``(source dir, step, train args)``."""
    import json
    import shutil

    from meddl.reconstruction.train import MODEL_NAME

    src = models.models_dir()
    if not (src / f"{MODEL_NAME}.json").is_file():
        pytest.skip("no bundled VarNet weights")
    (tmp_path / "models").mkdir()
    for ext in (".pt", ".json"):
        shutil.copy(src / f"{MODEL_NAME}{ext}", tmp_path / "models" / f"{MODEL_NAME}{ext}")
    step = json.loads((src / f"{MODEL_NAME}.json").read_text())["step"]
    args = ["--crop", "32", "--batch", "1", "--work-dir", str(tmp_path / "work"), "--models-dir", str(tmp_path / "models")]
    return src, step, args


def test_training_without_a_saved_state_continues_from_the_bundled_weights(tmp_path):
    import json

    from meddl.reconstruction.train import MODEL_NAME, main

    src, step, args = _bundled_copy(tmp_path)
    assert main([*args, "--steps", str(step + 1)]) == 0
    card = json.loads((tmp_path / "models" / f"{MODEL_NAME}.json").read_text())
    assert card["step"] == step + 1
    assert card["phases"][-1].startswith(f"from step {step}:")
    assert (src / f"{MODEL_NAME}.json").read_text() != (tmp_path / "models" / f"{MODEL_NAME}.json").read_text()


def test_training_slices_travel_as_a_pool_file_and_workers_simulate_batches(tmp_path, monkeypatch):
    import argparse

    from meddl.reconstruction import train

    rng = np.random.default_rng(3)
    slices = [rng.uniform(size=(150, 140)).astype(np.float32), rng.uniform(size=(120, 160)).astype(np.float32)]
    monkeypatch.setattr(train, "training_slices", lambda mni_mm: slices)
    path = tmp_path / "pool"  # numpy writes pool.npz: the next run must find it under the name given
    built = train._pool(str(path), 1)
    assert (tmp_path / "pool.npz").is_file() and built is slices
    monkeypatch.setattr(train, "training_slices", lambda mni_mm: pytest.fail("the pool file was not used"))
    read = train._pool(str(path), 1)
    assert len(read) == 2 and all(np.array_equal(a, b) for a, b in zip(slices, read, strict=True))
    args = argparse.Namespace(batch=2, crop=64, seed=0, workers=1, device="cpu", diverse=0.0, phantoms=0.0,
                              scanner_phases=0.0)
    batches = train._parallel_batches(read, args, step=7)
    k, m, t = next(batches)
    del batches  # the worker is persistent: the iterator stops it when it goes
    __import__("gc").collect()
    assert k.shape[0] == 2 and k.shape[2:] == (64, 64) and m.shape == (2, 1, 64, 64) and t.shape == (2, 64, 64)
    assert (k.abs() * (~m)).max() == 0


def test_appended_gated_cascades_start_as_the_identity():
    torch.manual_seed(0)
    base = VarNet(**TINY).eval()
    extended = VarNet(**TINY, extra_cascades=2).eval()
    missing, unexpected = extended.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing
    assert all(k.split(".")[:2] in (["cascades", "2"], ["cascades", "3"]) for k in missing)
    k, m, _ = _data()
    with torch.no_grad():
        torch.testing.assert_close(extended(k, m), base(k, m))
        extended.cascades[3].gate.data.fill_(1.0)
        assert not torch.allclose(extended(k, m), base(k, m))


def test_phantoms_paint_tissue_and_head_layers():
    from meddl.reconstruction.train import make_batch, phantom

    yy, xx = np.mgrid[:80, :80]
    r = np.hypot(yy - 40, xx - 40)
    wm = (r < 12).astype(np.float32)
    gm = ((r >= 12) & (r < 20)).astype(np.float32)
    csf = ((r >= 20) & (r < 22)).astype(np.float32)
    dist = np.clip(r - 22, 0, None)  # mm outside the brain
    maps = [np.stack([csf, gm, wm, dist]).astype(np.float16)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        img = phantom(maps, rng)
        assert img.shape == (80, 80) and np.isfinite(img).all() and 0 <= img.min() and img.max() <= 1.2
        assert img[r > 44].max() == 0  # beyond the thickest head (3 + 8 + 7 + 3 mm): background
        assert img[r < 20].min() > 0  # the brain is never black
    # half the draws take hard labels: the white-matter disk is then one value plus a fine texture
    values = {len(np.unique(np.round(phantom(maps, rng)[r < 12], 1))) for _ in range(10)}
    assert min(values) <= 3
    k, m, t = make_batch([np.zeros((60, 60), np.float32)], rng, batch=2, crop=64, phantoms=1.0, maps=maps)
    assert t.abs().amax(dim=(1, 2)).min() > 0  # phantoms, not the (empty) pool slice


def test_extending_training_trains_only_the_appended_cascades(tmp_path):
    import json
    import shutil

    from meddl.reconstruction.train import MODEL_NAME, main

    src, step, args = _bundled_copy(tmp_path)
    before = torch.load(src / f"{MODEL_NAME}.pt", weights_only=True)
    had = json.loads((src / f"{MODEL_NAME}.json").read_text())["arguments"].get("extra_cascades") or 0
    plain = list(args)
    args += ["--extend", "1", "--lr", "0.01"]
    assert main([*args, "--steps", str(step + 2)]) == 0
    card = json.loads((tmp_path / "models" / f"{MODEL_NAME}.json").read_text())
    assert card["arguments"]["extra_cascades"] == had + 1 and "--extend 1" in card["phases"][-1]
    after = torch.load(tmp_path / "models" / f"{MODEL_NAME}.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bundled network is frozen
    n = card["arguments"]["num_cascades"] + had  # the new cascade's index
    assert float(after[f"cascades.{n}.gate"]) != 0.0
    net, _ = models.load_model(MODEL_NAME, tmp_path / "models" / f"{MODEL_NAME}.pt")
    assert len(net.cascades) == n + 1
    # resuming keeps the extension (the saved state holds the architecture and which cascades learn)
    assert main([*args, "--steps", str(step + 3)]) == 0
    resumed = torch.load(tmp_path / "models" / f"{MODEL_NAME}.pt", weights_only=True)
    assert all(torch.equal(before[k], resumed[k]) for k in before)
    # a new machine (no saved state) with the extended weights bundled: training goes on with every weight
    shutil.rmtree(tmp_path / "work")
    assert main([*plain, "--lr", "0.01", "--steps", str(step + 4)]) == 0
    card = json.loads((tmp_path / "models" / f"{MODEL_NAME}.json").read_text())
    assert card["arguments"]["extra_cascades"] == had + 1 and card["step"] == step + 4
    last = torch.load(tmp_path / "models" / f"{MODEL_NAME}.pt", weights_only=True)
    assert any(not torch.equal(resumed[k], last[k]) for k in before)  # the first cascades learn again
