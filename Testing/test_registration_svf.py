"""Velocity fields: scaling and squaring, torch warping against SimpleITK, Jacobian, similarities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from meddl import transforms
from meddl.optim import Adam
from meddl.registration.optimise import (
    Grid,
    coarser_grid,
    corner_aligned,
    make_grid,
    regrid_field,
    to_grid,
    upsample_field,
)
from meddl.registration.similarity import DeepSimLoss, LnccLoss, MindLoss, _box, lncc_loss, mi_loss, mind_ssc
from meddl.registration.svf import (
    compose,
    folding_barrier,
    identity_grid,
    integrate,
    jacobian_determinant,
    mm_to_voxel,
    voxel_to_mm,
    warp,
)
from meddl.volume import Kind, Volume, affine_from_geometry
from scipy.spatial.transform import Rotation


def smooth_field(shape, amplitude, seed=0, nd=3):
    g = torch.Generator().manual_seed(seed)
    small = torch.randn((1, nd, *[4] * nd), generator=g)
    mode = "trilinear" if nd == 3 else "bilinear"
    u = torch.nn.functional.interpolate(small, size=shape, mode=mode, align_corners=True)
    return u / u.abs().max() * amplitude


def test_integrate_zero_is_identity():
    v = torch.zeros(1, 3, 8, 9, 10)
    assert torch.equal(integrate(v, 7), v)


@pytest.mark.parametrize("nd", [2, 3])
def test_integrate_small_field_matches_first_order(nd):
    shape = (12, 14, 10)[:nd]
    v = smooth_field(shape, 1.0, nd=nd)
    for eps in (1e-2, 1e-3):
        u = integrate(eps * v, 7)
        # exp(eps v) = eps v + O(eps^2)
        err = (u - eps * v).abs().max().item()
        assert err < 5 * eps**2 + 1e-7


def test_exp_of_minus_v_inverts_exp_v():
    v = smooth_field((16, 16, 16), 1.0)
    u, w = integrate(v, 7), integrate(-v, 7)
    residual = compose(u, w)[:, :, 3:-3, 3:-3, 3:-3].abs()
    assert residual.mean().item() < 0.01 and residual.max().item() < 0.15  # voxels, vs |v| up to 1
    assert (jacobian_determinant(u) > 0).all()


def test_warp_with_integer_shift_moves_voxels():
    x = torch.arange(6 * 7 * 8, dtype=torch.float32).reshape(1, 1, 6, 7, 8)
    u = torch.zeros(1, 3, 6, 7, 8)
    u[:, 1] = 2.0  # sample two voxels further along j
    out = warp(x, u)
    assert torch.allclose(out[0, 0, :, :5], x[0, 0, :, 2:])
    assert (out[0, 0, :, 5:] == 0).all()  # outside reads zero


def test_torch_warp_matches_simpleitk_on_oblique_grid():
    rot = Rotation.from_euler("xyz", [17.0, -11.0, 33.0], degrees=True).as_matrix()
    affine = affine_from_geometry([0.7, 1.3, 2.5], [12.5, -30.25, 7.0], rot)
    shape = (14, 12, 10)
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32)
    u_vox = smooth_field(shape, 1.5, seed=3)
    u_mm = voxel_to_mm(u_vox, affine)[0].numpy()
    field = Volume(u_mm.astype(np.float64), affine, Kind.DISPLACEMENT)
    reference = transforms.warp(Volume(img[None], affine), field).numpy()[0]
    ours = warp(torch.from_numpy(img)[None, None], u_vox)[0, 0].numpy()
    # compare where the sample lies well inside the image (borders differ: ITK vs zero padding)
    pos = (identity_grid(shape) + u_vox)[0].numpy()
    inside = np.all([(pos[d] > 0.1) & (pos[d] < shape[d] - 1.1) for d in range(3)], axis=0)
    assert inside.sum() > 500
    np.testing.assert_allclose(ours[inside], reference[inside], atol=1e-4)
    back = mm_to_voxel(voxel_to_mm(u_vox, affine), affine)
    assert torch.allclose(back, u_vox, atol=1e-5)


def test_jacobian_matches_meddl_transforms():
    affine = affine_from_geometry([2.0, 2.0, 2.0], [0.0, 0.0, 0.0])
    u_vox = smooth_field((10, 11, 12), 2.0, seed=5)
    ours = jacobian_determinant(u_vox)[0].numpy()
    field = Volume(voxel_to_mm(u_vox, affine)[0].numpy(), affine, Kind.DISPLACEMENT)
    ref = transforms.jacobian_determinant(field).numpy()[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_folding_barrier_is_zero_on_smooth_fields_and_unfolds_a_folded_one():
    assert float(folding_barrier(torch.zeros((1, 3, 8, 9, 10)))) == 0.0
    assert float(folding_barrier(smooth_field((12, 12, 12), 0.5, seed=1))) == 0.0  # det J near 1
    # a 1D fold along the first axis: u_0 = -a * sin, slope 1 - a cos < 0 around the centre for a > 1
    x = torch.arange(24, dtype=torch.float32)
    u = torch.zeros((1, 3, 24, 6, 6))
    u[0, 0] = (-2.0 * torch.sin(2 * torch.pi * x / 24) * 24 / (2 * torch.pi)).view(24, 1, 1)
    j = jacobian_determinant(u)
    assert float(j.min()) < 0 and float(folding_barrier(u)) > 0
    # minimising the barrier alone removes the fold
    w = u.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=20.0)
    for _ in range(300):
        opt.zero_grad()
        folding_barrier(w).backward()
        opt.step()
    assert float(jacobian_determinant(w.detach()).min()) > 0


@pytest.mark.parametrize("nd", [2, 3])
def test_strided_folding_barrier_is_the_barrier_at_every_other_interior_voxel(nd):
    shape = (13, 12, 11)[:nd]
    u = smooth_field(shape, 3.0, seed=4, nd=nd) + 0.4 * torch.randn((1, nd, *shape), generator=torch.Generator().manual_seed(2))
    det = jacobian_determinant(u)  # central differences, replicated edges
    assert float(det.min()) < 0.1  # some voxels in the barrier's range
    inner = det[(slice(None), *[slice(1, n - 1, 2) for n in shape])]
    expected = torch.relu(0.1 - inner).mean()
    assert torch.allclose(folding_barrier(u, stride=2), expected, atol=1e-6)
    assert torch.allclose(folding_barrier(u, stride=1), folding_barrier(u), atol=0)
    # the gradient flows (the optimiser uses the strided form)
    w = u.clone().requires_grad_(True)
    folding_barrier(w, stride=2).backward()
    assert float(w.grad.abs().sum()) > 0


def test_to_grid_block_averages_a_much_finer_source_first():
    from meddl.registration.optimise import _blur_axes

    # a smooth 0.5 mm image onto a 4 mm grid: the same values as smoothing the full-resolution image
    fine_affine = affine_from_geometry([0.5, 0.5, 0.5], [-16.0, -16.0, -16.0])
    shape = (64, 64, 64)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).astype(np.float32)
    x = torch.from_numpy(np.sin(ijk[0] / 9.0) + np.cos(ijk[1] / 7.0) * ijk[2] / 64.0)[None, None].float()
    fixed = Volume(np.zeros((1, *shape), np.float32), fine_affine)
    coarse = make_grid(fixed, 4.0)
    fast = to_grid(x, fine_affine, coarse)
    sigma = 0.5 * np.sqrt(8.0**2 - 1.0)
    slow = to_grid(_blur_axes(x, [sigma] * 3), fine_affine, coarse, antialias=False)
    raw = to_grid(x, fine_affine, coarse, antialias=False)  # no smoothing: what aliasing looks like
    # a box of 8 voxels then a small Gaussian of the remaining variance is not exactly one Gaussian: close,
    # far closer than no filter
    assert float((fast - slow).abs().max()) < 0.08 and float((fast - slow).abs().mean()) < 0.025
    assert float((fast - slow).abs().mean()) < 0.3 * float((raw - slow).abs().mean())


def test_grids_and_regrid_keep_physical_displacement():
    rot = Rotation.from_euler("z", 20, degrees=True).as_matrix()
    fixed = Volume(np.zeros((1, 30, 25, 20), np.float32), affine_from_geometry([1.0, 1.2, 2.0], [3, 4, 5], rot))
    coarse = make_grid(fixed, 4.0, divisor=8)
    fine = make_grid(fixed, 2.0)
    assert all(n % 8 == 0 for n in coarse.shape)
    np.testing.assert_allclose(coarse.spacing, [4.0, 4.0, 4.0])
    # a constant displacement in mm stays the same constant on any grid
    const = torch.tensor([3.0, -2.0, 1.0]).view(1, 3, 1, 1, 1).expand(1, 3, *coarse.shape)
    v = mm_to_voxel(const.contiguous(), coarse.affine)
    moved = voxel_to_mm(regrid_field(v, coarse, fine), fine.affine)
    np.testing.assert_allclose(moved.numpy().reshape(3, -1).mean(1), [3.0, -2.0, 1.0], atol=1e-4)
    # resampling an image onto its own grid is the identity
    x = torch.rand(1, 1, *fine.shape)
    assert torch.allclose(to_grid(x, fine.affine, Grid(fine.affine, fine.shape), antialias=False), x, atol=1e-5)


def test_similarities_rank_aligned_pairs_best():
    torch.manual_seed(0)
    from meddl.registration.synth import gaussian_blur

    x = gaussian_blur(torch.rand(1, 1, 24, 24, 24), 1.5)
    x = (x - x.min()) / (x.max() - x.min())
    shifted = torch.roll(x, 3, dims=2)
    assert lncc_loss(x, x) < lncc_loss(shifted, x)
    assert float(lncc_loss(x, x)) < -0.9  # squared correlation ~1 (eps keeps flat regions stable)
    assert lncc_loss(0.5 * x + 0.2, x) < lncc_loss(shifted, x)  # intensity-scale invariant
    assert mi_loss(1 - x, x) < mi_loss(shifted, x)  # MI works across inverted contrast
    from meddl.registration.network import SegmentationNet

    deepsim = DeepSimLoss(SegmentationNet(3, 4, (4, 8)))
    assert float(deepsim(x, x)) == pytest.approx(-1.0, abs=1e-4)
    assert float(deepsim(shifted, x)) > -1.0


def test_mind_descriptors_ignore_contrast_but_see_structure():
    torch.manual_seed(1)
    from meddl.registration.synth import gaussian_blur

    x = gaussian_blur(torch.rand(1, 1, 20, 20, 20), 1.5)
    m = mind_ssc(x)
    assert m.shape == (1, 12, 20, 20, 20)  # 12 self-similarity pairs in 3D
    assert float(m.min()) > 0 and float(m.amax(dim=1).min()) == pytest.approx(1.0)
    # affine intensity changes, inverted ones included, leave the descriptor unchanged
    torch.testing.assert_close(mind_ssc(1 - 2 * x), m, atol=1e-5, rtol=0)
    assert mind_ssc(torch.rand(2, 1, 9, 11)).shape == (2, 4, 9, 11)  # 4 pairs in 2D
    loss = MindLoss()
    shifted = torch.roll(x, 2, dims=3)
    assert float(loss(x, x)) == 0.0
    assert float(loss(1 - x, x)) < 1e-8 < float(loss(shifted, x))
    # the gradient of a small shift points back towards alignment
    t = torch.zeros(1, requires_grad=True)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 20)] * 3, indexing="ij")[::-1], -1)[None]
    moved = torch.nn.functional.grid_sample(x, grid + torch.stack([t, t * 0, t * 0]).view(1, 1, 1, 1, 3),
                                            align_corners=True, padding_mode="border")
    loss(moved, x).backward()
    assert abs(float(t.grad)) < 1e-6  # aligned: a stationary point
    t2 = torch.full((1,), 0.15, requires_grad=True)
    moved = torch.nn.functional.grid_sample(x, grid + torch.stack([t2, t2 * 0, t2 * 0]).view(1, 1, 1, 1, 3),
                                            align_corners=True, padding_mode="border")
    loss(moved, x).backward()
    assert float(t2.grad) > 0  # shifted right: descending moves it back


def test_mind_descriptor_path_matches_the_exact_loss_and_is_used_by_the_optimiser():
    from meddl.registration.optimise import optimise_velocity
    from meddl.registration.synth import gaussian_blur

    torch.manual_seed(1)
    x = gaussian_blur(torch.rand(1, 1, 20, 20, 20), 1.5)
    y = torch.roll(x, 2, dims=3)
    loss = MindLoss()
    exact = float(loss(y, x))
    assert float(loss.compare(loss.descriptors(y), loss.descriptors(x))) == pytest.approx(exact, rel=1e-6)

    class Counting(MindLoss):
        calls = {"descriptors": 0, "compare": 0, "forward": 0}

        def descriptors(self, t):
            self.calls["descriptors"] += 1
            return super().descriptors(t)

        def compare(self, a, b):
            self.calls["compare"] += 1
            return MindLoss.compare(a, b)

        def forward(self, warped, fixed):
            self.calls["forward"] += 1
            return super().forward(warped, fixed)

    counting = Counting()
    affine = affine_from_geometry([2.0] * 3, [0.0] * 3)
    grid = make_grid(Volume(x[0].numpy(), affine), 2.0)
    vgrid = make_grid(Volume(x[0].numpy(), affine), 4.0)
    _, _, reports = optimise_velocity(x, affine, y, affine, np.eye(4), [(grid, vgrid)], counting, iterations=5,
                                      lam=0.1)
    # descriptors once per image per level, compared every iteration, never recomputed on warped images
    assert counting.calls == {"descriptors": 2, "compare": reports[0].iterations, "forward": 0}
    assert reports[0].loss_end < reports[0].loss_start


def _box_reference(x, radius):
    nd = x.dim() - 2
    pool = torch.nn.functional.avg_pool3d if nd == 3 else torch.nn.functional.avg_pool2d
    for d in range(nd):  # zero padding made explicit: pooling refuses axes shorter than its window
        size, pad = [1] * nd, [0, 0] * nd
        size[d] = 2 * radius + 1
        pad[2 * (nd - 1 - d)] = pad[2 * (nd - 1 - d) + 1] = radius
        x = pool(torch.nn.functional.pad(x, pad), tuple(size), stride=1)
    return x


@pytest.mark.parametrize("shape", [(1, 2, 9, 8, 7), (2, 1, 11, 6), (1, 1, 3, 1, 2), (1, 3, 1, 5)])
@pytest.mark.parametrize("radius", [1, 2, 3])
def test_box_filter_matches_average_pooling(shape, radius):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(radius), requires_grad=True)
    y = torch.rand(shape)
    ours, ref = _box(x, radius), _box_reference(x, radius)
    assert torch.allclose(ours, ref, atol=1e-6)
    (g_ours,) = torch.autograd.grad((ours * y).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * y).sum(), x)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


def test_cached_lncc_equals_lncc_and_follows_a_changed_fixed_image():
    g = torch.Generator().manual_seed(3)
    fixed = torch.rand((1, 1, 12, 10, 9), generator=g)
    warped = (fixed + 0.3 * torch.rand(fixed.shape, generator=g)).requires_grad_(True)
    loss = LnccLoss(radius=2)
    a, b = loss(warped, fixed), lncc_loss(warped, fixed, radius=2)
    assert torch.allclose(a, b, atol=1e-6)
    (ga,) = torch.autograd.grad(a, warped)
    (gb,) = torch.autograd.grad(lncc_loss(warped, fixed, radius=2), warped)
    assert torch.allclose(ga, gb, atol=1e-6)
    fixed.mul_(0.5).add_(torch.rand(fixed.shape, generator=g))  # same tensor, new values: no stale cache
    assert torch.allclose(loss(warped, fixed), lncc_loss(warped, fixed, radius=2), atol=1e-6)


def test_adam_matches_torch_adam():
    target = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    ours = torch.zeros(6, 5, requires_grad=True)
    ref = torch.zeros(6, 5, requires_grad=True)
    opt_ours, opt_ref = Adam([ours], lr=0.05), torch.optim.Adam([ref], lr=0.05)
    for _ in range(25):
        for x, opt in ((ours, opt_ours), (ref, opt_ref)):
            loss = ((x - target) ** 4).sum() + x.sin().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, torch.zeros_like(ours))


@pytest.mark.parametrize("nd", [2, 3])
def test_coarser_grid_is_corner_aligned_and_upsampling_matches_regridding(nd):
    direction = Rotation.from_euler("xyz", [10, 20, -5], degrees=True).as_matrix() if nd == 3 else None
    affine = affine_from_geometry([1.2, 0.9, 1.5][:nd], [3.0, -4.0, 5.0][:nd], direction)
    vol = Volume(np.zeros((1, *(37, 41, 29)[:nd]), np.float32), affine)
    grid = make_grid(vol, 2.0)
    coarse = coarser_grid(grid, 2.0)
    assert corner_aligned(coarse, grid)
    assert all(c == int(np.ceil((n - 1) / 2)) + 1 for c, n in zip(coarse.shape, grid.shape, strict=True))
    np.testing.assert_allclose(coarse.spacing, 2 * grid.spacing, rtol=0.1)
    u = torch.randn((1, nd, *coarse.shape), generator=torch.Generator().manual_seed(1))
    fast, general = upsample_field(u, coarse, grid), regrid_field(u, coarse, grid)
    assert torch.allclose(fast, general, atol=1e-4)
    shifted = Grid(grid.affine.copy(), grid.shape)
    shifted.affine[0, 3] += 0.5
    assert not corner_aligned(coarse, shifted)
    assert torch.allclose(upsample_field(u, coarse, shifted), regrid_field(u, coarse, shifted))
