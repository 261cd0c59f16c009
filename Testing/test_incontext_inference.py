"""In-context inference on volumes: propagation, multi-volume and 2D modes, bad input, the command."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from meddl import io, models
from meddl.cli import main
from meddl.errors import InputError
from meddl.incontext import SegmentConfig, segment
from meddl.incontext.demo import painted_slices
from meddl.incontext.inference import (
    ALIGN_2D_PIXELS,
    _Best,
    _label_reach,
    _mix_votes,
    align_context,
    augment_context,
    context_warps,
    interpolation_prior,
    mix_prior,
    resolve_align,
)
from meddl.volume import Kind, Volume, affine_from_geometry
from test_incontext_network import trained_threshold
from torch.nn import functional as F

SIZE = 32  # working size of the tiny test network


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than two on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def net():
    return trained_threshold()[0]


def smooth_volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *[3] * len(shape), generator=g)
    x = F.interpolate(x, size=shape, mode="trilinear" if len(shape) == 3 else "bilinear", align_corners=False)[0, 0]
    return ((x - x.min()) / (x.max() - x.min())).numpy().astype(np.float32)


def image(arr: np.ndarray, spacing=None) -> Volume:
    spacing = spacing or [1.0] * arr.ndim
    return Volume(arr[None], affine_from_geometry(spacing, [3.0] * arr.ndim), Kind.INTENSITY)


def labels(arr: np.ndarray, like: Volume) -> Volume:
    return like.with_data(arr[None].astype(np.int16), kind=Kind.LABEL)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def run(target, net, **kw):
    config = kw.pop("config", SegmentConfig())
    return segment(target, config, network=net, size=SIZE, **kw)


def test_propagation_fills_exactly_the_unpainted_slices_and_keeps_the_painted_ones(net):
    arr = smooth_volume((24, 28, 20), seed=3)
    truth = arr > 0.5
    partial = np.zeros_like(truth, dtype=np.int16)
    painted = [3, 10, 16]
    partial[:, :, painted] = truth[:, :, painted]
    target = image(arr, [1.0, 1.0, 2.5])
    out = run(target, net, annotated=labels(partial, target))
    result = out.numpy()[0]
    assert out.kind is Kind.LABEL and result.shape == arr.shape and np.allclose(out.affine, target.affine)
    np.testing.assert_array_equal(result[:, :, painted], partial[:, :, painted])
    unpainted = [k for k in range(20) if k not in painted]
    assert out.meta["axis"] == 2 and out.meta["filled_slices"] == len(unpainted)
    for k in unpainted:  # every unpainted slice was filled, and filled well
        assert result[:, :, k].any()
    assert dice(result[:, :, unpainted] > 0, truth[:, :, unpainted]) > 0.75
    assert set(np.unique(result)) <= {0, 1}


def test_context_chosen_by_appearance_picks_the_most_similar_slices(net):
    from meddl.incontext.inference import Selection, _choose

    g = torch.Generator().manual_seed(0)
    pool = torch.rand(6, 2, 8, 8, generator=g)
    target = pool[4] + 0.01 * torch.rand(2, 8, 8, generator=g)
    where = np.linspace(0, 1, 6)
    picked = _choose(where, np.zeros(6, int), pool, 0.0, target, 1, Selection.SIMILAR)
    assert picked.tolist() == [4]
    assert _choose(where, np.zeros(6, int), pool, 0.0, target, 2, Selection.NEAREST).tolist() == [0, 1]
    # two scans alternate: the nearest of each
    assert _choose(where, np.array([0, 0, 0, 1, 1, 1]), pool, 0.0, None, 2, Selection.NEAREST).tolist() == [0, 3]


def test_propagation_works_per_segment(net):
    arr = smooth_volume((20, 20, 16), seed=5)
    multi = np.where(arr > 0.6, 2, np.where(arr > 0.5, 1, 0)).astype(np.int16)
    partial = np.zeros_like(multi)
    partial[:, :, [4, 11]] = multi[:, :, [4, 11]]
    target = image(arr)
    out = run(target, net, annotated=labels(partial, target), config=SegmentConfig(axis=2))
    assert set(np.unique(out.numpy())) <= {0, 1, 2}
    only2 = run(target, net, annotated=labels(partial, target), config=SegmentConfig(axis=2, labels=(2,)))
    filled = only2.numpy()[0][:, :, [k for k in range(16) if k not in (4, 11)]]
    assert 1 not in np.unique(filled)


def test_a_label_is_only_sought_where_a_neighbouring_painted_slice_holds_it():
    painted = np.zeros(20, bool)
    painted[[4, 10, 16]] = True
    todo = np.nonzero(~painted)[0]
    reach = dict(zip(todo.tolist(), _label_reach(painted, np.array([10]), todo).tolist(), strict=True))
    assert [t for t, r in reach.items() if r] == [5, 6, 7, 8, 9, 11, 12, 13, 14, 15]  # between 4 and 16 only
    reach = dict(zip(todo.tolist(), _label_reach(painted, np.array([4]), todo).tolist(), strict=True))
    assert [t for t, r in reach.items() if r] == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # beyond the outermost one too


def test_labels_kept_one_at_a_time_equal_argmax_over_stacked_maps():
    rng = np.random.default_rng(0)
    values = [3, 7, 12, 40]
    probs = rng.random((len(values), 6, 5, 5)).astype(np.float32)
    rows = [rng.random(6) < 0.6 for _ in values]  # slices each label reaches; elsewhere 0
    for p, r in zip(probs, rows, strict=True):
        p[~r] = 0.0
    probs[2, 0, 0, 0] = probs[1, 0, 0, 0] = 0.9  # a tie goes to the label offered first
    best = _Best((6, 5, 5))
    for v, p, r in zip(values, probs, rows, strict=True):
        best.update(p[r], v, r)
    expected = np.where(probs.max(0) > 0.5, np.asarray(values)[probs.argmax(0)], 0)
    assert np.array_equal(best.labels(0.5), expected)
    assert best.labels(0.5)[0, 0, 0] == 7


def test_propagation_leaves_a_label_out_of_slices_beyond_the_painted_slices_without_it(net):
    arr = smooth_volume((20, 20, 16), seed=5)
    target = image(arr)
    partial = np.zeros(arr.shape, np.int16)
    partial[:, :, 4] = np.where(arr[:, :, 4] > 0.5, 1, 0)  # structure 1 painted on slice 4 only
    partial[:, :, 11] = np.where(arr[:, :, 11] > 0.5, 2, 0)  # structure 2 on slice 11 only
    out = run(target, net, annotated=labels(partial, target), config=SegmentConfig(axis=2)).numpy()[0]
    assert 1 not in np.unique(out[:, :, 12:])  # slice 11 is painted without structure 1
    assert 2 not in np.unique(out[:, :, :4])  # slice 4 is painted without structure 2
    assert np.array_equal(out[:, :, [4, 11]], partial[:, :, [4, 11]])


def test_interpolation_prior_is_linear_between_painted_slices_and_fades_beyond():
    a = np.zeros((4, 4), np.float32)
    a[:2] = 1
    b = np.zeros((4, 4), np.float32)
    b[:, :2] = 1
    prior = interpolation_prior(np.stack([a, b]), np.array([2, 6]), np.array([3, 4, 0, 7, 8, 9]))
    np.testing.assert_allclose(prior[0], 0.75 * a + 0.25 * b)
    np.testing.assert_allclose(prior[1], 0.5 * a + 0.5 * b)
    np.testing.assert_allclose(prior[2], 0.5 * a)  # 2 slices before the first, the gap is 4
    np.testing.assert_allclose(prior[3], 0.75 * b)
    np.testing.assert_allclose(prior[5], 0.25 * b)
    lone = interpolation_prior(a[None], np.array([5]), np.arange(0, 11))  # span 10: gap 1
    assert lone[4].sum() == 0 and lone[6].sum() == 0


def test_the_prior_weight_fades_with_its_support_so_the_network_answers_far_away():
    a = np.zeros((4, 4), np.float32)
    a[:2] = 1
    b = np.zeros((4, 4), np.float32)
    b[:, :2] = 1
    network = np.full((4, 4, 4), 0.8, np.float32)
    p = mix_prior(network, np.stack([a, b]), np.array([2, 6]), np.array([4, 0, 8, 12]), 0.5)
    np.testing.assert_allclose(p[0], 0.5 * 0.8 + 0.5 * (0.5 * a + 0.5 * b))  # between: weight 0.5
    np.testing.assert_allclose(p[1], 0.75 * 0.8 + 0.25 * a)  # 2 before the first, gap 4: weight 0.25
    np.testing.assert_allclose(p[2], 0.75 * 0.8 + 0.25 * b)
    np.testing.assert_allclose(p[3], network[3])  # beyond one gap: the network alone (not vetoed by an empty prior)
    one = network[:1]
    np.testing.assert_allclose(mix_prior(one, np.stack([a, b]), np.array([2, 6]), np.array([4]), 1.0)[0],
                               0.5 * a + 0.5 * b)  # weight 1 between painted slices: shape interpolation
    np.testing.assert_allclose(mix_prior(one, np.stack([a, b]), np.array([2, 6]), np.array([4]), 0.0), one)


def test_bracketing_context_is_the_nearest_painted_slice_on_each_side():
    from meddl.incontext.inference import Selection, _choose

    pos = np.array([0.1, 0.3, 0.5, 0.9])
    src = np.zeros(4, int)
    assert list(_choose(pos, src, None, 0.6, None, 16, Selection.BRACKET)) == [2, 3]
    assert list(_choose(pos, src, None, 0.0, None, 16, Selection.BRACKET)) == [0, 1]  # one side only: 2 nearest
    assert list(_choose(pos, src, None, 0.95, None, 1, Selection.BRACKET)) == [3]
    assert list(_choose(pos, src, None, 0.6, None, 1, Selection.BRACKET)) == [2]  # --context-size 1: the nearer
    assert list(_choose(pos, src, None, 0.8, None, 1, Selection.BRACKET)) == [3]


def test_propagation_with_full_prior_is_shape_interpolation_between_painted_slices(net):
    arr = smooth_volume((16, 16, 12), seed=5)
    truth = (arr > 0.5).astype(np.int16)
    partial = np.zeros_like(truth)
    painted = [2, 6, 10]
    partial[:, :, painted] = truth[:, :, painted]
    target = image(arr)
    out = run(target, net, annotated=labels(partial, target), config=SegmentConfig(axis=2, prior=1.0)).numpy()[0]
    between = [k for k in range(3, 10) if k not in painted]  # beyond slices 2 and 10 the network takes over
    expected = interpolation_prior(np.moveaxis(truth[:, :, painted], 2, 0), np.array(painted), np.array(between)) > 0.5
    np.testing.assert_array_equal(np.moveaxis(out[:, :, between], 2, 0) > 0, expected)
    np.testing.assert_array_equal(out[:, :, painted], truth[:, :, painted])  # painted slices kept


def test_reordering_context_scans_does_not_change_the_result(net):
    target = image(smooth_volume((20, 18, 12), seed=1))
    pairs = []
    for seed, shape in ((7, (16, 16, 10)), (8, (22, 20, 12))):
        a = smooth_volume(shape, seed)
        v = image(a)
        pairs.append((v, labels(a > 0.5, v)))
    for k in (32, 4):
        config = SegmentConfig(context_size=k)
        a = run(target, net, context=pairs, config=config).numpy()
        b = run(target, net, context=pairs[::-1], config=config).numpy()
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("target_shape, context_shape", [
    ((20, 18, 12), (16, 16, 10)),  # 3D from other 3D scans
    ((20, 18, 12), (30, 26)),  # 3D from 2D examples (used for every slice)
    ((37, 29), (24, 24)),  # 2D
])
def test_output_follows_the_target_grid(net, target_shape, context_shape):
    target = image(smooth_volume(target_shape, seed=2), [0.9] * len(target_shape))
    a = smooth_volume(context_shape, seed=4)
    ctx_img = image(a)
    # the context is another random image, not the target's anatomy: no alignment (tested below)
    out = run(target, net, context=[(ctx_img, labels(a > 0.5, ctx_img))], config=SegmentConfig(align="none"))
    assert out.spatial_shape == target_shape and out.channels == 1
    assert out.kind is Kind.LABEL and out.numpy().dtype == np.int16
    np.testing.assert_array_equal(out.affine, target.affine)
    assert dice(out.numpy()[0] > 0, smooth_volume(target_shape, seed=2) > 0.5) > 0.6


def moved_copy(arr: np.ndarray, shift: tuple[int, ...]) -> np.ndarray:
    """``arr`` translated by whole voxels, zeros coming in."""
    out = np.zeros_like(arr)
    src = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, arr.shape, strict=True))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, arr.shape, strict=True))
    out[dst] = arr[src]
    return out


def blobs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A head-like test image: bright blobs of several sizes inside a dark background."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = np.where(sum(g**2 for g in grids) < 0.6, 0.3, 0.0)
    for _ in range(5):
        c, r = rng.uniform(-0.4, 0.4, len(shape)), rng.uniform(0.15, 0.3)
        img = np.where(sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) < r**2, rng.uniform(0.6, 1.0), img)
    return img.astype(np.float32)


@pytest.mark.parametrize("shape, shift", [((36, 32, 20), (5, -4, 0)), ((48, 40), (6, -5))])
def test_context_scans_are_aligned_onto_the_target_grid(shape, shift):
    arr = blobs(shape, seed=3)
    truth = arr > 0.5
    target = image(arr, [2.0] * len(shape))
    ctx = image(moved_copy(arr, shift), [2.0] * len(shape))
    lab = labels(moved_copy(truth, shift), ctx)
    assert dice(lab.numpy()[0] > 0, truth) < 0.75  # as given, the example's label is far off
    img2, lab2, covered = align_context(target, ctx, lab, "affine")
    assert img2.same_grid(target) and lab2.same_grid(target) and lab2.kind is Kind.LABEL
    assert set(np.unique(lab2.numpy())) <= {0, 1}
    assert dice(lab2.numpy()[0] > 0, truth) > 0.9
    assert covered.shape == shape and covered.mean() < 1.0  # the shifted scan leaves a border uncovered
    same = align_context(target, ctx, lab, "none")
    assert same[0] is ctx and same[1] is lab and same[2].all()


def bent_copy(arr: np.ndarray, amplitude: float) -> np.ndarray:
    """``arr`` under a smooth non-affine warp (a sine bend of ``amplitude`` voxels along axis 0)."""
    from scipy import ndimage

    i, j = np.meshgrid(*[np.arange(n, dtype=float) for n in arr.shape], indexing="ij")
    bend = amplitude * np.sin(np.pi * j / (arr.shape[1] - 1))
    order = 0 if arr.dtype == bool else 1
    return ndimage.map_coordinates(arr.astype(np.float32), [i + bend, j], order=order, mode="constant") \
        .astype(arr.dtype)


def test_deformable_alignment_composes_the_affine_and_the_field():
    arr = blobs((48, 40), seed=7)
    truth = arr > 0.5
    target = image(arr, [2.0, 2.0])
    ctx = image(moved_copy(arr, (5, -4)), [2.0, 2.0])  # a pure shift
    lab = labels(moved_copy(truth, (5, -4)), ctx)
    a_img, a_lab, a_cov = align_context(target, ctx, lab, "affine")
    d_img, d_lab, d_cov = align_context(target, ctx, lab, "deformable")
    # mutual information on so small an image stops half a voxel off (Dice 0.905); the field finishes the job
    assert dice(d_lab.numpy()[0] > 0, truth) >= max(dice(a_lab.numpy()[0] > 0, truth), 0.97)
    # image and label went through one composed mapping: the example's image now matches the target
    inside = d_cov & (np.abs(np.arange(48) - 23.5)[:, None] < 18)
    assert np.abs(d_img.numpy()[0] - arr)[inside].mean() < 0.02 < np.abs(a_img.numpy()[0] - arr)[inside].mean()


def test_auto_alignment_is_deformable_in_2d_and_affine_in_3d(monkeypatch):
    assert SegmentConfig().align == "auto"
    assert resolve_align("auto", image(np.zeros((8, 8), np.float32))) == "deformable"
    assert resolve_align("auto", image(np.zeros((8, 8, 8), np.float32))) == "affine"
    assert resolve_align("center", image(np.zeros((8, 8), np.float32))) == "center"
    arr = blobs((64, 64), seed=4)
    target, ctx = image(arr, [2.0, 2.0]), image(bent_copy(arr, 8.0), [2.0, 2.0])
    lab = labels(bent_copy(arr > 0.5, 8.0), ctx)
    auto = align_context(target, ctx, lab, "auto")[1].numpy()
    assert np.array_equal(auto, align_context(target, ctx, lab, "deformable")[1].numpy())


def test_one_slice_volumes_are_segmented_as_the_2d_images_they_are(net):
    """Slicer holds a 2D image as a one-slice 3D volume: a coronal one (slice axis J) failed in the
    3D affine pre-alignment (ITK's smoothing needs 4 voxels along every axis)."""
    arr, other = blobs((40, 36), seed=2), blobs((40, 36), seed=2)[::-1].copy()
    coronal = np.array([[-0.8, 0, 0, 10.0], [0, 0, 2.5, -4.0], [0, 0.8, 0, 7.0], [0, 0, 0, 1.0]])

    def one_slice(a, kind):
        return Volume(a[None, :, None, :].astype(np.int16 if kind is Kind.LABEL else np.float32), coronal, kind)

    plain = run(image(arr, [0.8, 0.8]), net, context=[(image(other, [0.8, 0.8]), labels(other > 0.5, image(other, [0.8, 0.8])))])
    out = run(one_slice(arr, Kind.INTENSITY), net,
              context=[(one_slice(other, Kind.INTENSITY), one_slice(other > 0.5, Kind.LABEL))])
    assert out.spatial_shape == (40, 1, 36) and np.allclose(out.affine, coronal) and out.kind is Kind.LABEL
    assert dice(out.numpy()[0, :, 0] > 0, plain.numpy()[0] > 0) > 0.99  # the 2D path (its grid's origin differs)
    assert dice(out.numpy()[0, :, 0] > 0, arr > 0.5) > 0.8


def test_large_2d_pairs_are_affinely_aligned_on_a_coarser_grid(monkeypatch):
    import meddl.registration.affine as affine_module

    seen = []
    original = affine_module.prealign

    def spy(fixed, moving, *args, working_mm=None, **kwargs):
        seen.append(working_mm)
        return original(fixed, moving, *args, working_mm=working_mm, **kwargs)

    monkeypatch.setattr(affine_module, "prealign", spy)
    small = blobs((64, 64), seed=1)
    align_context(image(small, [0.5, 0.5]), image(small, [0.5, 0.5]), labels(small > 0.5, image(small)), "affine")
    big = np.kron(blobs((64, 80), seed=1), np.ones((8, 8), np.float32))  # 512 x 640 pixels of 0.5 mm
    target, ctx = image(big, [0.5, 0.5]), image(np.roll(big, (24, -16), (0, 1)), [0.5, 0.5])
    _, lab, _ = align_context(target, ctx, labels(np.roll(big, (24, -16), (0, 1)) > 0.5, ctx), "affine")
    assert seen == [None, 640 * 0.5 / ALIGN_2D_PIXELS]  # full resolution up to 256 pixels a side
    assert dice(lab.numpy()[0] > 0, big > 0.5) > 0.97  # a shift of 12 x 8 mm is still found


def test_deformable_alignment_undoes_a_bend_that_the_affine_cannot():
    arr = blobs((64, 64), seed=4)
    truth = arr > 0.5
    target = image(arr, [2.0, 2.0])
    ctx = image(bent_copy(arr, 8.0) ** 1.3, [2.0, 2.0])  # another contrast too
    lab = labels(bent_copy(truth, 8.0), ctx)
    _, affine_lab, affine_covered = align_context(target, ctx, lab, "affine")
    img, warped, covered = align_context(target, ctx, lab, "deformable")
    assert img.same_grid(target) and warped.same_grid(target) and warped.kind is Kind.LABEL
    assert set(np.unique(warped.numpy())) <= {0, 1}  # nearest-neighbour labels
    assert covered.dtype == bool and covered.shape == (64, 64)
    assert (covered == affine_covered).mean() > 0.97  # the bend moves the scan's edge by a few voxels at most
    # an image output (another task) goes through the same composed field, linearly
    soft = ctx.with_data(bent_copy(truth, 8.0)[None].astype(np.float32))
    _, soft_out, _ = align_context(target, ctx, soft, "deformable")
    assert soft_out.kind is Kind.INTENSITY and len(np.unique(soft_out.numpy())) > 2
    assert dice(soft_out.numpy()[0] > 0.5, truth) > 0.98
    before, after = dice(affine_lab.numpy()[0] > 0, truth), dice(warped.numpy()[0] > 0, truth)
    assert after > 0.98 and 1 - after < (1 - before) / 3, (before, after)  # affine: 0.964, deformable: 0.997


def test_slices_a_context_scan_does_not_reach_are_left_out_with_a_notice(net):
    arr = blobs((24, 24, 16), seed=5)
    target = image(arr)
    # the same anatomy, only slices 6-15, its header placing them where they are in the target
    part = Volume(arr[None, :, :, 6:], affine_from_geometry([1.0] * 3, [3.0, 3.0, 9.0]), Kind.INTENSITY)
    out = run(target, net, context=[(part, labels(arr[:, :, 6:] > 0.5, part))], config=SegmentConfig(axis=2))
    notices = " | ".join(out.meta["notices"])
    # slice 6 is the scan's edge: a sub-voxel alignment error decides whether linear interpolation reaches it
    assert re.search(r"context scan 1 covers (10|9) of the target's 16 slices \((6|7)-15\)", notices), notices
    assert re.search(r"(6|7) target slice\(s\) \(0-(5|6)\) lie outside every context scan", notices), notices


def test_aligned_examples_keep_their_labels_and_fill_outside_with_the_image_minimum():
    arr = blobs((40, 36), seed=2) * 1000 - 1000  # CT-like: air at -1000
    target = image(arr)
    lab = np.zeros(arr.shape, np.int16)
    lab[arr > -400] = 3
    lab[arr > -200] = 1
    ctx = image(moved_copy(arr, (4, -3)) + 0.0)
    ctx_lab = ctx.with_data(moved_copy(lab, (4, -3))[None], kind=Kind.INTENSITY)  # integer labels, not marked
    img2, lab2, covered = align_context(target, ctx, ctx_lab, "affine", nearest=True)
    assert set(np.unique(lab2.numpy())) <= {0, 1, 3}  # nearest-neighbour: no in-between label 2
    outside = img2.numpy()[0][~covered]
    assert outside.size and np.all(outside == arr.min() + 0.0)  # ... and not 0 (soft tissue in HU)


def test_atlas_prior_mixes_the_mean_of_the_examples_reaching_each_slice():
    net = np.full((3, 2, 2), 0.2, np.float32)
    a = np.array([[[1, 0], [0, 0]]] * 3)
    b = np.array([[[1, 1], [0, 0]]] * 3)
    keep_a, keep_b = np.array([True, True, False]), np.array([True, False, False])
    out = _mix_votes(net, [(keep_a, a), (keep_b, b)], 1, 0.5)
    np.testing.assert_allclose(out[0], 0.5 * 0.2 + 0.5 * np.array([[1.0, 0.5], [0.0, 0.0]]))  # both examples
    np.testing.assert_allclose(out[1], 0.5 * 0.2 + 0.5 * np.array([[1.0, 0.0], [0.0, 0.0]]))  # only a
    np.testing.assert_allclose(out[2], 0.2)  # no example reaches slice 2: the network alone
    np.testing.assert_allclose(_mix_votes(net, [(keep_a, a)], 1, 0.0), net)


def test_context_warps_are_small_fixed_by_the_seed_and_keep_masks_binary():
    a, b, c = context_warps(5, 32, seed=0), context_warps(5, 32, seed=0), context_warps(5, 32, seed=1)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    identity = F.affine_grid(torch.eye(2, 3)[None], [1, 1, 32, 32], align_corners=False)
    assert 0.005 < float((a - identity).abs().max()) < 0.2  # a few pixels at most, but not nothing
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 2, 32, 32, generator=g)
    masks = (torch.rand(2, 3, 1, 32, 32, generator=g) > 0.5).float()
    ci, co = augment_context(images, masks, a)
    assert ci.shape == (2, 18, 2, 32, 32) and co.shape == (2, 18, 1, 32, 32)
    torch.testing.assert_close(ci[:, :3], images)  # the given pairs come first, unchanged
    assert set(torch.unique(co).tolist()) <= {0.0, 1.0}
    # reordering the given pairs reorders the copies with them: the same set of pairs
    order = torch.tensor([2, 0, 1])
    ci2, _ = augment_context(images[:, order], masks[:, order], a)
    torch.testing.assert_close(ci2.sum((2, 3, 4)).sort(1)[0], ci.sum((2, 3, 4)).sort(1)[0])


def test_few_examples_get_deformed_copies_unless_told_not_to(net):
    arr = smooth_volume((40, 36), seed=2)
    target = image(arr)
    ex = image(smooth_volume((40, 36), seed=3))
    pair = [(ex, labels(ex.numpy()[0] > 0.5, ex))]
    out = run(target, net, context=pair, config=SegmentConfig(align="none"))
    assert any("fewer than 16 slices per target slice are completed with deformed copies" in n
               for n in out.meta["notices"])
    plain = run(target, net, context=pair, config=SegmentConfig(align="none", augment=0))
    assert not any("deformed copies" in n for n in plain.meta["notices"])
    assert dice(out.numpy()[0] > 0, arr > 0.5) > 0.6 and dice(plain.numpy()[0] > 0, arr > 0.5) > 0.6


def test_image_task_returns_an_image_in_the_target_scale(net):
    arr = smooth_volume((16, 16, 8), seed=9) * 500
    target = image(arr)
    ctx_img = image(smooth_volume((16, 16, 8), seed=10) * 300)
    out = run(target, net, context=[(ctx_img, ctx_img)], config=SegmentConfig(task="denoise"))
    assert out.kind is Kind.INTENSITY and out.spatial_shape == arr.shape and out.numpy().dtype == np.float32


def test_finetuning_runs_and_keeps_the_shape(net):
    arr = smooth_volume((16, 16, 10), seed=11)
    partial = np.zeros(arr.shape, np.int16)
    partial[:, :, [2, 5, 8]] = (arr > 0.5)[:, :, [2, 5, 8]]
    target = image(arr)
    out = run(target, net, annotated=labels(partial, target), config=SegmentConfig(finetune_steps=3))
    assert out.spatial_shape == arr.shape


# -- bad input ----------------------------------------------------------------------------------


def test_context_image_and_label_of_different_sizes_are_refused(net):
    target = image(smooth_volume((16, 16, 8), 1))
    img = image(smooth_volume((16, 16, 8), 2))
    lab = labels(np.ones((16, 14, 8)), image(np.zeros((16, 14, 8), np.float32)))
    with pytest.raises(InputError, match=r"context pair 1: expected the label to have the image's size \(16, 16, 8\)"):
        run(target, net, context=[(img, lab)])


def test_empty_context_label_is_refused(net):
    target = image(smooth_volume((16, 16, 8), 1))
    img = image(smooth_volume((16, 16, 8), 2))
    with pytest.raises(InputError, match=r"context label 1: expected .* at least one labelled voxel"):
        run(target, net, context=[(img, labels(np.zeros((16, 16, 8)), img))])


def test_blank_target_is_refused(net):
    blank = image(np.zeros((16, 16, 8), np.float32))
    img = image(smooth_volume((16, 16, 8), 2))
    with pytest.raises(InputError, match=r"target image: the image is constant \(0 everywhere\); there is nothing"):
        run(blank, net, context=[(img, labels(np.ones((16, 16, 8)), img))])


def test_annotation_without_painted_slice_is_refused(net):
    target = image(smooth_volume((16, 16, 8), 1))
    with pytest.raises(InputError, match=r"annotated: expected at least one painted slice"):
        run(target, net, annotated=labels(np.zeros((16, 16, 8)), target))


def test_non_integer_labels_are_refused(net):
    target = image(smooth_volume((16, 16, 8), 1))
    soft = target.with_data(smooth_volume((16, 16, 8), 3)[None], kind=Kind.LABEL)
    with pytest.raises(InputError, match=r"expected integer labels"):
        run(target, net, annotated=soft)


def test_propagation_of_a_2d_image_is_refused(net):
    target = image(smooth_volume((16, 16), 1))
    with pytest.raises(InputError, match=r"expected a 3D target"):
        run(target, net, annotated=labels(np.ones((16, 16)), target))


@pytest.mark.parametrize("kwargs, message", [
    ({"context_size": 40}, r"context size: expected 1 to 32, got 40"),
    ({"task": "colourise"}, r"task: expected one of segmentation"),
    ({"axis": 3}, r"axis: expected 0, 1 or 2"),
    ({"labels": (0,)}, r"labels: expected positive"),
    ({"prior": 1.5}, r"prior: expected a weight between 0 and 1, got 1.5"),
    ({"selection": "random"}, r"selection: expected one of auto, nearest, bracket, similar, got 'random'"),
    ({"align": "rigid"}, r"align: expected one of auto, affine, center, deformable, none, got 'rigid'"),
    ({"augment": 40}, r"augment: expected 0 to 32 context slices, got 40"),
    ({"atlas_prior": -0.1}, r"atlas prior: expected a weight between 0 and 1, got -0.1"),
    ({"finetune_steps": 100000000}, r"fine-tuning steps: expected 0 to 10000, got 100000000"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        SegmentConfig(**kwargs)


def test_more_context_than_memory_allows_is_subsampled_with_a_notice(net):
    arr = smooth_volume((16, 16, 20), 1)
    partial = np.zeros(arr.shape, np.int16)
    partial[:, :, ::2] = (arr > 0.5)[:, :, ::2]
    target = image(arr)
    out = run(target, net, annotated=labels(partial, target),
              config=SegmentConfig(context_size=10, selection="nearest", memory_mb=0.5, batch=1))
    assert any("subsampled from 10" in n for n in out.meta["notices"])


# -- the command --------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, net):
    models.save_model(net, tmp_path, "incontext_brain2d", {"in_channels": 2, "out_channels": 1, "features": [8, 16]},
                      "threshold test task", "pytest", {}, input_size=SIZE)
    arr = smooth_volume((20, 18, 12), seed=1)
    target = image(arr)
    partial = np.zeros(arr.shape, np.int16)
    partial[:, :, [3, 8]] = (arr > 0.5)[:, :, [3, 8]]
    io.write(target, tmp_path / "t.nii.gz")
    io.write(labels(partial, target), tmp_path / "painted.nii.gz")
    io.write(labels(arr > 0.5, target), tmp_path / "full.nii.gz")
    return tmp_path


def test_command_propagates_and_writes_the_output(files, capsys):
    code = main(["segment", str(files / "t.nii.gz"), "-o", str(files / "out.nii.gz"), "--annotated",
                 str(files / "painted.nii.gz"), "--weights", str(files / "incontext_brain2d.pt"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    out = io.read(files / "out.nii.gz", kind="label")
    assert out.spatial_shape == (20, 18, 12)
    assert "segment (segmentation)" in capsys.readouterr().out


def test_command_aligns_context_scans_unless_told_not_to(files, capsys):
    for align in ("affine", "deformable", "none"):
        code = main(["segment", str(files / "t.nii.gz"), "-o", str(files / f"ctx-{align}.nii.gz"), "--context",
                     str(files / "t.nii.gz"), str(files / "full.nii.gz"), "--align", align,
                     "--weights", str(files / "incontext_brain2d.pt"), "--device", "cpu"])
        assert code == 0, capsys.readouterr().err
    aligned, deformed, as_is = (io.read(files / f"ctx-{a}.nii.gz", kind="label").numpy()[0] > 0
                                for a in ("affine", "deformable", "none"))
    assert aligned.shape == deformed.shape == (20, 18, 12)
    # the target as its own example aligns onto itself
    assert dice(aligned, as_is) > 0.95 and dice(deformed, as_is) > 0.95


@pytest.mark.parametrize("extra, message", [
    (["--context", "t.nii.gz"], r"IMAGE LABEL pairs, got an odd number"),
    (["--context", "t.nii.gz", "painted.nii.gz", "--context-size", "0"], r"context size: expected 1 to 32"),
    (["--annotated", "missing.nii.gz"], r"missing.nii.gz"),
    (["--context", "t.nii.gz", "full.nii.gz", "--align", "rigid"], r"--align: invalid choice: 'rigid'"),
])
def test_command_bad_input_is_one_error_line(files, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(files)
    code = main(["segment", "t.nii.gz", "-o", "out.nii.gz", "--weights", "incontext_brain2d.pt", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")
    assert pytest.importorskip("re").search(message, err[0])


def test_command_refuses_an_output_format_that_cannot_hold_the_answer_before_any_work(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    import meddl.incontext

    monkeypatch.setattr(meddl.incontext, "segment", lambda *a, **k: pytest.fail("segmented before checking the output"))
    code = main(["segment", "t.nii.gz", "-o", "out.png", "--weights", "incontext_brain2d.pt",
                 "--context", "t.nii.gz", "full.nii.gz"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.search(r"error: -o 'out.png': expected a volume file .* for a 3D volume, got '.png'", err[0]), err
    assert not (files / "out.png").exists()


def test_demo_paints_evenly_spaced_slices_inside_the_structure():
    lab = np.zeros((4, 4, 30), np.int16)
    lab[1:3, 1:3, 10:21] = 1
    partial, chosen = painted_slices(lab, axis=2, count=3)
    assert chosen == [12, 15, 18] or (len(chosen) == 3 and all(10 < c < 20 for c in chosen))
    np.testing.assert_array_equal(np.nonzero(partial.any(axis=(0, 1)))[0], chosen)


@pytest.mark.slow
def test_bundled_model_propagates_the_demo_structure(tmp_path):
    """Real weights: grey matter painted on five slices of the MNI152 T1 is propagated (seconds on a CPU)."""
    from meddl.cli import RunContext
    from meddl.incontext import demo
    from meddl.progress import Reporter

    ctx = RunContext(Reporter(), torch.device("cpu"), "test", None, "none", stdout=open(tmp_path / "log.txt", "w"))
    items = demo.run(tmp_path, ctx)
    assert [i.role for i in items] == ["segmentation", "segmentation"]
    out = io.read(items[1].path, kind="label")
    assert out.spatial_shape == (99, 117, 95) and out.numpy().any()


def test_an_alignment_failure_names_the_scan_and_the_way_out(net, monkeypatch):
    from meddl.incontext import inference

    def fails(*args, **kwargs):
        raise InputError("fixed image: expected at least 4 voxels along each axis, got (40, 3)")

    monkeypatch.setattr(inference, "align_context", fails)
    arr = blobs((40, 36), seed=1)
    target = image(arr)
    with pytest.raises(InputError, match=r"^context scan 1: fixed image: expected at least 4 voxels .*"
                                         r"\(--align none uses the scans as they are\)$"):
        run(target, net, context=[(target, labels(arr > 0.5, target))], config=SegmentConfig(align="deformable"))


def test_the_painting_axis_is_found_by_count_of_painted_slices_with_gaps(net):
    from meddl.incontext.inference import _pick_axis

    arr = smooth_volume((64, 64, 20), seed=2)
    target = image(arr)
    partial = np.zeros(arr.shape, np.int16)
    partial[20:26, 30:36, [4, 10, 16]] = 1  # a small square on 3 of 20 slices: 6 rows cross it
    out = run(target, net, annotated=labels(partial, target))
    assert out.meta["axis"] == 2 and out.meta["filled_slices"] == 17
    many = np.zeros(arr.shape, np.int16)
    many[20:26, 30:36, ::2] = 1  # 10 painted slices, every other one; still fewer rows, but no gaps there
    assert _pick_axis(target, SegmentConfig(), many) == 2
    one = np.zeros(arr.shape, np.int16)
    one[20:26, 30:36, 7] = 1  # one painted slice: no axis has gaps, the fewest slices wins
    assert _pick_axis(target, SegmentConfig(), one) == 2


def test_a_painted_slice_without_the_label_stops_the_label_between_painted_slices(net):
    arr = smooth_volume((20, 20, 13), seed=4)
    target = image(arr)
    partial = np.zeros(arr.shape, np.int16)
    partial[5:15, 5:15, [2, 10]] = 1  # label 1 painted on slices 2 and 10
    partial[0:3, 0:3, 6] = 2  # slice 6 painted, with label 2 only: label 1 has ended there
    out = run(target, net, annotated=labels(partial, target), config=SegmentConfig(axis=2, prior=1.0, labels=(1,)))
    result = out.numpy()[0]
    # full shape interpolation between 2 (square) and 6 (empty): a quarter of the square at 5, three at 3
    assert (result[:, :, [5, 7]] == 1).sum() == 0
    assert (result[5:15, 5:15, [3, 9]] == 1).all()


def test_labels_on_another_grid_of_the_same_size_are_refused(net):
    arr = smooth_volume((16, 16, 8), 1)
    target = image(arr)
    moved = Volume((arr > 0.5)[None].astype(np.int16), affine_from_geometry([1.0] * 3, [9.0, 3.0, 3.0]), Kind.LABEL)
    with pytest.raises(InputError, match=r"annotated: expected the target's grid, got the same size at another"):
        run(target, net, annotated=moved)
    img = image(smooth_volume((16, 16, 8), 2))
    with pytest.raises(InputError, match=r"context pair 1: expected the label on its image's grid"):
        run(target, net, context=[(img, moved)])


def test_label_values_beyond_int16_come_back_unchanged(net):
    arr = smooth_volume((20, 20, 12), seed=5)
    target = image(arr)
    partial = np.zeros(arr.shape, np.int32)
    partial[:, :, [3, 8]] = np.where(arr[:, :, [3, 8]] > 0.5, 40000, 0)
    out = run(target, net, annotated=target.with_data(partial[None], kind=Kind.LABEL)).numpy()[0]
    assert set(np.unique(out)) == {0, 40000} and np.array_equal(out[:, :, [3, 8]], partial[:, :, [3, 8]])


def test_bracketing_is_refused_for_context_scans_which_share_positions(net):
    target = image(smooth_volume((16, 16, 8), 1))
    img = image(smooth_volume((16, 16, 8), 2))
    lab = labels(img.numpy()[0] > 0.5, img)
    with pytest.raises(InputError, match=r"selection 'bracket': expected painted slices .* use nearest or similar"):
        run(target, net, context=[(img, lab)], config=SegmentConfig(selection="bracket"))


def test_slices_whose_context_lacks_the_label_skip_the_network(net, monkeypatch):
    import meddl.incontext.inference as inference

    # a 3D scan whose bright structure (the thresholding task) lies in slices 6-11 of 24 only
    arr = np.zeros((24, 20, 20), np.float32)
    arr[6:12, 5:15, 5:15] = 1.0
    arr += 0.05 * smooth_volume((24, 20, 20), seed=4)
    target, ctx = image(arr, [2.0] * 3), image(arr.copy(), [2.0] * 3)
    lab = labels(arr > 0.5, ctx)
    calls = []
    original = type(net).forward

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(net), "forward", counting)
    # an aligned scan: each target slice takes the scan's slices at its position and next to it
    config = SegmentConfig(align="affine", axis=0)
    skipped = run(target, net, context=[(ctx, lab)], config=config).numpy()[0]
    with_skip = sum(calls)
    calls.clear()
    monkeypatch.setattr(inference, "SKIP_EMPTY_CONTEXT", False)
    full = run(target, net, context=[(ctx, lab)], config=config).numpy()[0]
    assert sum(calls) == 24 and with_skip < 12  # slices far from the structure never reach the network
    # the network asked about a context of empty masks answers (nearly) empty too: the skip changes almost nothing
    assert (skipped != full).mean() < 0.005 and dice(skipped > 0, full > 0) > 0.98
    assert dice(skipped > 0, arr > 0.5) > 0.9
