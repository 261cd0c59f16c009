"""In-context network and training: permutation invariance, shapes, a trivial task learned quickly."""

from __future__ import annotations

import functools

import pytest
import torch
from meddl.incontext.network import InContextNet, PairwiseBlock, conv3x3_of_upsampled, pad_channels
from meddl.incontext.tasks import Batch
from meddl.incontext.train import evaluate_dice, fit, soft_dice_loss, task_loss
from torch.nn import functional as F


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than two on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _smooth(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 1, 4, 4, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return ((x - x.amin()) / (x.amax() - x.amin())).clamp(0, 1)


def threshold_batch(batch: int, context: int, size: int, g: torch.Generator) -> Batch:
    """Identity-of-meaning pairs of a trivial task: the mask of voxels brighter than 0.5."""
    x = _smooth(batch * (context + 1), size, g).view(batch, context + 1, 1, size, size)
    y = (x > 0.5).float()
    x = pad_channels(x, 2, 2)
    return Batch(x[:, 0], x[:, 1:], y[:, 1:], y[:, 0], torch.ones(batch, dtype=torch.bool), ["threshold"] * batch)


def test_permuting_the_context_does_not_change_the_output():
    torch.manual_seed(0)
    net = InContextNet(features=(8, 8, 8)).eval()
    t = torch.rand(2, 2, 16, 16)
    ci, co = torch.rand(2, 5, 2, 16, 16), torch.rand(2, 5, 1, 16, 16)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        a = net(t, ci, co)
        b = net(t, ci[:, perm], co[:, perm])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pairwise_block_is_the_published_update():
    """r_x <- r_x + mean_i mix_x(concat(r_x, r_i)), r_i <- r_i + mix_c(concat(r_x, r_i)), after the 3x3 convs."""
    torch.manual_seed(0)
    block = PairwiseBlock(3, 4, 6)
    t, c = torch.randn(2, 3, 8, 10), torch.randn(2, 5, 4, 8, 10)
    rt, rc = block(t, c)
    xt = F.gelu(block.conv_target(t))
    xc = F.gelu(block.conv_context(c.flatten(0, 1))).view(2, 5, 6, 8, 10)
    want_t, want_c = xt.clone(), xc.clone()
    for b in range(2):
        pairs = torch.cat([xt[b].expand(5, 6, 8, 10), xc[b]], dim=1)  # (pairs, 2F, H, W)
        want_t[b] += F.gelu(block.mix_target(pairs)).mean(0)
        want_c[b] += F.gelu(block.mix_context(pairs))
    assert rt.shape == (2, 6, 8, 10) and rc.shape == (2, 5, 6, 8, 10)
    torch.testing.assert_close(rt, want_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rc, want_c, rtol=1e-5, atol=1e-5)


def test_conv_of_upsampled_is_conv_after_nearest_upsampling():
    """The 4 phase 2x2 kernels give the 3x3 convolution of the 2x nearest upsampling, borders included."""
    torch.manual_seed(2)
    x, weight = torch.randn(3, 5, 7, 6), torch.randn(4, 5, 3, 3)
    want = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
    got = conv3x3_of_upsampled(x, weight)
    assert got.shape == (3, 4, 14, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decoder_block_folds_upsampling_and_skip_concatenation():
    """forward_up(t, st, c, sc) == forward(cat(up2(t), st), cat(up2(c), sc)), with gradients."""
    torch.manual_seed(3)
    block = PairwiseBlock(6 + 2, 6 + 2, 5)
    t, st = torch.randn(2, 6, 4, 5, requires_grad=True), torch.randn(2, 2, 8, 10)
    c, sc = torch.randn(2, 3, 6, 4, 5, requires_grad=True), torch.randn(2, 3, 2, 8, 10)
    up_c = F.interpolate(c.flatten(0, 1), scale_factor=2, mode="nearest").view(2, 3, 6, 8, 10)
    want_t, want_c = block(torch.cat([F.interpolate(t, scale_factor=2, mode="nearest"), st], 1),
                           torch.cat([up_c, sc], 2))
    got_t, got_c = block.forward_up(t, st, c, sc)
    torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-5)
    g_want = torch.autograd.grad((want_t.sum() + want_c.square().sum()), (t, c))
    g_got = torch.autograd.grad((got_t.sum() + got_c.square().sum()), (t, c))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("context", [1, 3, 32])
def test_output_shape_follows_target_for_any_context_size(context):
    net = InContextNet(features=(4, 8)).eval()
    with torch.no_grad():
        out = net(torch.rand(3, 2, 24, 40), torch.rand(3, context, 2, 24, 40), torch.rand(3, context, 1, 24, 40))
    assert out.shape == (3, 1, 24, 40)


def test_context_changes_the_output():
    """The context is read: another label set gives another prediction."""
    torch.manual_seed(1)
    net = InContextNet(features=(8, 8)).eval()
    t, ci = torch.rand(1, 2, 16, 16), torch.rand(1, 2, 2, 16, 16)
    with torch.no_grad():
        a = net(t, ci, torch.zeros(1, 2, 1, 16, 16))
        b = net(t, ci, torch.ones(1, 2, 1, 16, 16))
    assert (a - b).abs().max() > 1e-4


def test_size_not_divisible_is_refused():
    net = InContextNet(features=(4, 8, 8))
    with pytest.raises(ValueError, match=r"divisible by 4"):
        net(torch.rand(1, 2, 18, 16), torch.rand(1, 1, 2, 18, 16), torch.rand(1, 1, 1, 18, 16))


def test_losses_have_their_analytic_values():
    truth = torch.zeros(2, 1, 4, 4)
    truth[:, :, :2] = 1
    perfect = (truth * 2 - 1) * 50  # logits saturating to the truth
    assert soft_dice_loss(perfect, truth).max() < 1e-3
    assert soft_dice_loss(-perfect, truth).min() > 0.99
    image = torch.full((1, 1, 4, 4), 0.5)
    # MSE / (2 * 0.05): an error of 0.1 everywhere costs 0.01 / 0.1 = 0.1
    assert task_loss(image + 0.1, image, torch.tensor([False])).item() == pytest.approx(0.1, rel=1e-4)


def test_a_trivial_task_is_learned_in_a_short_training(trained_threshold_net):
    net, _ = trained_threshold_net
    g = torch.Generator().manual_seed(99)
    val = [threshold_batch(1, 3, 32, g) for _ in range(16)]
    assert evaluate_dice(net, val) > 0.85


def test_fit_stops_when_asked():
    net = InContextNet(features=(4, 4))
    g = torch.Generator().manual_seed(0)
    calls = []
    step, loss = fit(net, lambda s: threshold_batch(1, 1, 8, g), 100, stop=lambda: len(calls) >= 3,
                     log=lambda s, running: calls.append(s))
    assert step == 3 and loss == loss  # not NaN


@functools.lru_cache(maxsize=1)
def trained_threshold() -> tuple[InContextNet, float]:
    """A tiny network trained a few seconds on the thresholding task (shared by the inference tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = InContextNet(features=(8, 16))
    g = torch.Generator().manual_seed(0)
    _, loss = fit(net, lambda s: threshold_batch(4, 3, 32, g), 150, lr=3e-3)
    torch.set_num_threads(before)
    return net, loss


@pytest.fixture
def trained_threshold_net():
    return trained_threshold()


def test_training_resumes_with_the_new_learning_rate(tmp_path):
    import json

    from meddl.incontext.train import main

    common = ["--out", str(tmp_path), "--size", "32", "--features", "4,8", "--batch", "2", "--max-context", "2",
              "--bank", str(tmp_path / "bank.npz"), "--state", str(tmp_path / "optim.pt"), "--save-minutes", "100"]
    assert main([*common, "--steps", "3", "--lr", "1e-3"]) == 0
    assert main([*common, "--steps", "2", "--lr", "2e-4", "--resume", "--copies", "1", "--copies-to", "3"]) == 0
    card = json.loads((tmp_path / "incontext_brain2d.json").read_text())
    assert card["training"]["steps"] == 5
    assert [r["lr"] for r in card["training"]["runs"]] == [1e-3, 2e-4]
    assert "--resume" in card["command"] and "--lr 0.0002 --copies 1 --copies-to 3" in card["command"]
    assert "val_dice_heldout_scans_context1_copies16" in card["metrics"]
    saved = torch.load(tmp_path / "optim.pt", weights_only=True)
    assert saved["step"] == 5 and all(g["lr"] == 2e-4 for g in saved["optimizer"]["param_groups"])


def test_other_scan_pairs_each_get_their_own_warp_and_intensities():
    from meddl.incontext.tasks import _as_other_scans

    g = torch.Generator().manual_seed(0)
    base = _smooth(1, 48, g)
    inp = base.expand(6, 1, 48, 48).clone()  # six copies of one slice, as a task of one position
    mask = (inp > 0.5).float()
    img, out = _as_other_scans(inp, mask, g)
    assert img.shape == inp.shape and out.shape == mask.shape
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0} and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    diffs = [float((out[i] != out[j]).float().mean()) for i in range(6) for j in range(i + 1, 6)]
    assert min(diffs) > 0.002  # every pair moved differently
    assert max(diffs) < 0.3  # but stays the same structure
    # the mask follows its image: the warped image is still bright where the warped mask is set
    assert float(img[out > 0].mean()) > float(img[out == 0].mean()) + 0.1


def test_copies_complete_a_small_context_as_inference_does():
    from meddl.incontext.inference import augment_context, context_warps
    from meddl.incontext.tasks import with_copies

    g = torch.Generator().manual_seed(3)
    imgs = _smooth(4, 32, g)
    inp = torch.cat([imgs, torch.zeros_like(imgs)], 1).reshape(2, 2, 2, 32, 32)
    out = torch.cat([(imgs[:2] > 0.5).float(), imgs[2:]]).reshape(2, 2, 1, 32, 32)  # a mask task, an image task
    batch = Batch(inp[:, 0], inp[:, 1:], out[:, 1:], out[:, 0], torch.tensor([True, False]), ["m", "i"])
    seed_gen = torch.Generator().manual_seed(5)
    done = with_copies(batch, 6, seed_gen)
    assert done.context_in.shape == (2, 6, 2, 32, 32) and done.context_out.shape == (2, 6, 1, 32, 32)
    assert torch.equal(done.context_in[:, :1], batch.context_in) and torch.equal(done.target, batch.target)
    assert set(torch.unique(done.context_out[0]).tolist()) <= {0.0, 1.0}  # mask copies stay binary
    assert len(torch.unique(done.context_out[1])) > 10  # image copies are warped, not thresholded
    # the mask item's copies are exactly inference's augment_context under the same warps
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(5)))
    ci, co = augment_context(batch.context_in[:1], batch.context_out[:1], context_warps(5, 32, seed))
    assert torch.allclose(done.context_in[:1], ci) and torch.equal(done.context_out[:1], co)
    assert with_copies(done, 6, seed_gen) is done  # a context already that large is left alone
