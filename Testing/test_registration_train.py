"""Training script (resumable), synthetic pairs and the networks, on tiny settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from meddl.models import load_model
from meddl.registration import synth
from meddl.registration.network import SegmentationNet, VelocityNet
from meddl.registration.train import main, soft_dice


def test_velocity_net_starts_near_identity_and_keeps_shape():
    net = VelocityNet(3, (4, 8, 8))
    x = torch.rand(1, 1, 16, 16, 16)
    v, u = net.displacement(x, x)
    assert v.shape == u.shape == (1, 3, 16, 16, 16)
    assert u.abs().max() < 1e-2
    with pytest.raises(ValueError, match="divisible"):
        net(torch.rand(1, 1, 15, 16, 16), torch.rand(1, 1, 15, 16, 16))
    feats = SegmentationNet(3, 4, (4, 8)).encode(x)
    assert [f.shape[1] for f in feats] == [4, 8]


def test_synthetic_pairs_are_images_with_matching_one_hot_labels():
    pairs = synth.SynthPairs([], (16, 16, 16), groups=5)
    gen = torch.Generator().manual_seed(0)
    pair = pairs(gen)
    assert pair["fixed"].shape == pair["moving"].shape == (1, 1, 16, 16, 16)
    assert 0 <= float(pair["fixed"].min()) and float(pair["fixed"].max()) <= 1
    for key in ("fixed_labels", "moving_labels"):
        onehot = pair[key]
        assert onehot.shape[1] <= 5
        torch.testing.assert_close(onehot.sum(1), torch.ones(1, 16, 16, 16))
    assert float(soft_dice(pair["fixed_labels"], pair["fixed_labels"])) == pytest.approx(1.0)
    # the same seed gives the same pair
    again = pairs(torch.Generator().manual_seed(0))
    assert torch.equal(again["fixed"], pair["fixed"])


def test_training_writes_card_and_resumes(tmp_path):
    common = ["--model", "registration", "--procedural-only", "--shape", "16", "16", "16", "--features", "4", "8",
              "--out-dir", str(tmp_path / "models"), "--state-dir", str(tmp_path / "state"), "--spacing", "6"]
    assert main([*common, "--max-steps", "2"]) == 0
    card = json.loads((tmp_path / "models" / "registration_synthmorph.json").read_text())
    assert card["metrics"]["step"] == 2 and card["spacing_mm"] == 6.0
    assert "--resume" in card["command"]
    assert main([*common, "--max-steps", "3", "--resume"]) == 0
    card = json.loads((tmp_path / "models" / "registration_synthmorph.json").read_text())
    assert card["metrics"]["step"] == 3  # continued, not restarted
    net, _ = load_model("registration_synthmorph", tmp_path / "models" / "registration_synthmorph.pt")
    assert isinstance(net, VelocityNet) and net.features == (4, 8)


def _bundled_network_on_mni_pair():
    from meddl import data
    from meddl.registration import RegistrationConfig, register
    from meddl.registration.demo import synthetic_pair

    fixed = data.load_sample("mni152_t1")
    gm = data.load_sample("mni152_gm_mask")
    moving, moving_gm, _ = synthetic_pair(fixed, gm, seed=11, max_mm=6.0, contrast="inverted")
    result = register(fixed, moving, RegistrationConfig(method="network", affine="none"), moving_labels=moving_gm)
    a, b = result.warped_labels.numpy() > 0, gm.numpy() > 0
    before = 2 * (moving_gm.numpy() > 0)[b].sum() / ((moving_gm.numpy() > 0).sum() + b.sum())
    after = 2 * (a & b).sum() / (a.sum() + b.sum())
    return before, after, result


@pytest.mark.slow
def test_bundled_models_load_and_register_mni_pair():
    net, card = load_model("registration_synthmorph")
    assert card.metrics["step"] > 0
    load_model("registration_deepsim_seg")
    _, _, result = _bundled_network_on_mni_pair()
    assert result.summary["folding_percent"] < 0.1
    assert np.isfinite(result.summary["sdlogj"])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the bundled network (2,790 CPU training steps) is still worse than the "
                   "identity on real images (docs/benchmarks/registration.md); remove this mark once it is not")
def test_bundled_network_does_not_make_the_mni_pair_worse():
    before, after, _ = _bundled_network_on_mni_pair()
    assert after >= before - 0.01
