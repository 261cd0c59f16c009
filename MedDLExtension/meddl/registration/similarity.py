"""Image similarity losses for instance optimisation: local NCC, mutual information, MIND, DeepSim.

Each ``loss(warped, fixed)`` takes ``(N, 1, *S)`` tensors (intensities scaled to about [0, 1])
and returns a scalar to *minimise* (the negated similarity), so all of them plug into the same
optimiser (:mod:`meddl.registration.optimise`).
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

__all__ = ["Similarity", "lncc_loss", "LnccLoss", "mi_loss", "mind_ssc", "MindLoss", "DeepSimLoss"]


class Similarity(str, enum.Enum):
    """Which image similarity drives instance optimisation."""

    LNCC = "lncc"  #: local normalised cross-correlation (same contrast)
    MI = "mi"  #: Parzen-window mutual information (across contrasts)
    MIND = "mind"  #: MIND-SSC self-similarity descriptors (across contrasts, local)
    DEEPSIM = "deepsim"  #: cosine similarity of frozen segmentation features (Czolbe et al.)


def _box(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a ``(2r+1)^nd`` window (zero padding, divided by the window size), separably.

    Each axis is a sum of ``2r+1`` shifted views (:func:`_box_sums`): on a CPU about 6x faster than
    ``avg_pool3d`` with a ``(2r+1, 1, 1)`` kernel (which gives the same numbers to rounding). The
    filter is its own adjoint (a symmetric window, zero padding), so the gradient is the same
    filter applied to the incoming gradient (:class:`_BoxFilter`): autograd through the shifted
    views would allocate and zero a tensor per view.
    """
    if radius <= 0:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _BoxFilter.apply(x, radius)
    return _box_sums(x, radius)


class _BoxFilter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, radius: int) -> torch.Tensor:
        ctx.radius = radius
        return _box_sums(x, radius)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _box_sums(grad, ctx.radius), None


def _box_sums(x: torch.Tensor, radius: int) -> torch.Tensor:
    """:func:`_box` for ``radius >= 1``, computed directly.

    Along each axis, a copy of the tensor receives in place the ``2r`` views shifted by 1..r either way,
    each added to the part of the copy it overlaps (zero padding without a padded tensor: about 2x
    faster on a CPU than summing shifted views of a padded copy, which allocates and zeroes it).
    """
    nd = x.dim() - 2
    k = 2 * radius + 1
    for d in range(nd):
        n = x.shape[2 + d]
        acc = x.clone()
        for s in range(1, min(radius, n - 1) + 1):
            acc.narrow(2 + d, s, n - s).add_(x.narrow(2 + d, 0, n - s))
            acc.narrow(2 + d, 0, n - s).add_(x.narrow(2 + d, s, n - s))
        x = acc.div_(k)
    return x


def _lncc_fixed(fixed: torch.Tensor, radius: int, eps: float | None) -> tuple[torch.Tensor, ...]:
    """The fixed image's part of LNCC: local mean, local variance, textured-window mask and ``eps``."""
    both = _box(torch.cat([fixed, fixed * fixed], dim=1), radius)
    mu_f = both[:, :1]
    var_f = (both[:, 1:] - mu_f * mu_f).clamp_min(0)
    mean_var = var_f.mean().detach()
    if eps is None:
        eps = float(1e-6 * mean_var**2) + 1e-20
    textured = (var_f > 1e-2 * mean_var).to(fixed.dtype)
    return mu_f, var_f, textured, eps


def _lncc(warped: torch.Tensor, fixed: torch.Tensor, radius: int, stats: tuple[torch.Tensor, ...]) -> torch.Tensor:
    mu_f, var_f, textured, eps = stats
    # the three window means that depend on the warped image, box-filtered together
    b = _box(torch.cat([warped, warped * warped, warped * fixed], dim=1), radius)
    mu_w = b[:, :1]
    cross = b[:, 2:] - mu_w * mu_f
    var_w = (b[:, 1:2] - mu_w * mu_w).clamp_min(0)
    cc = cross * cross / (var_w * var_f + eps) * textured
    return -cc.mean()


def lncc_loss(warped: torch.Tensor, fixed: torch.Tensor, radius: int = 2, eps: float | None = None) -> torch.Tensor:
    """``-mean(cc)`` with the squared local correlation ``cc`` in a ``(2r+1)`` window (VoxelMorph's NCC).

    Windows where the fixed image is nearly flat (local variance below 1 % of its mean) count as
    0: a fixed ``eps`` in the denominator (VoxelMorph's ``1e-5``) would instead reward pulling
    texture into them and bias an identical pair away from the identity. ``eps`` (default
    ``1e-6 * mean variance^2``) only guards the division. :class:`LnccLoss` is the same loss with
    the fixed image's statistics computed once (what the optimiser uses).
    """
    return _lncc(warped, fixed, radius, _lncc_fixed(fixed, radius, eps))


class _FixedCache:
    """What a loss derives from the fixed image, recomputed only when that image changes.

    The key is the tensor's storage, shape, in-place version and sum: a new tensor that happens to
    reuse a freed one's memory, or an in-place edit, is not mistaken for the cached image.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value = None

    def get(self, fixed: torch.Tensor, compute):
        fixed = fixed.detach()
        key = (fixed.data_ptr(), tuple(fixed.shape), fixed._version, float(fixed.sum()))
        if key != self._key:
            with torch.no_grad():
                self._value = compute(fixed)
            self._key = key
        return self._value


class LnccLoss(torch.nn.Module):
    """:func:`lncc_loss` with the fixed image's window statistics cached (no gradient through them).

    An optimiser compares many warped images with one fixed image: its local mean, variance and
    textured-window mask are computed once per fixed image instead of every step.
    """

    def __init__(self, radius: int = 2, eps: float | None = None) -> None:
        super().__init__()
        self.radius, self.eps = radius, eps
        self._fixed = _FixedCache()

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        stats = self._fixed.get(fixed, lambda f: _lncc_fixed(f, self.radius, self.eps))
        return _lncc(warped, fixed.detach(), self.radius, stats)


def mi_loss(warped: torch.Tensor, fixed: torch.Tensor, bins: int = 32, mask: torch.Tensor | None = None,
            max_samples: int = 100_000) -> torch.Tensor:
    """``-MI`` from a joint histogram with linear (first-order B-spline) Parzen windows, values in [0, 1].

    Each voxel adds bilinear weights to the 4 histogram cells around its (warped, fixed) value pair,
    so the histogram is differentiable in the warped intensities at O(voxels) cost (a Gaussian
    window costs O(voxels x bins)). Voxels are subsampled on a regular stride to at most
    ``max_samples``.
    """
    w = warped.reshape(-1)
    f = fixed.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1) > 0
        w, f = w[keep], f[keep]
    stride = max(1, w.numel() // max_samples)
    w, f = w[::stride], f[::stride]
    pos_w = w.clamp(0, 1) * (bins - 1)
    pos_f = f.detach().clamp(0, 1) * (bins - 1)
    i_w = pos_w.detach().floor().clamp(max=bins - 2)
    i_f = pos_f.floor().clamp(max=bins - 2)
    a_w = pos_w - i_w  # weight of the upper bin (differentiable)
    a_f = pos_f - i_f
    i_w, i_f = i_w.long(), i_f.long()
    joint = w.new_zeros(bins * bins)
    for dw, ww in ((0, 1 - a_w), (1, a_w)):
        for df, wf in ((0, 1 - a_f), (1, a_f)):
            joint = joint.index_add(0, (i_w + dw) * bins + (i_f + df), ww * wf)
    joint = joint.view(bins, bins) / w.numel()
    marg_w = joint.sum(1, keepdim=True)
    marg_f = joint.sum(0, keepdim=True)
    mi = (joint * (torch.log(joint + 1e-10) - torch.log(marg_w @ marg_f + 1e-10))).sum()
    return -mi


def _shift(x: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
    """``y(p) = x(p + offset)`` with edge replication (``offset`` in voxels, one per spatial axis)."""
    nd = len(offset)
    r = max(abs(o) for o in offset)
    if r == 0:
        return x
    pad = [r] * (2 * nd)
    xp = F.pad(x, pad, mode="replicate")
    index = [slice(None), slice(None)]
    for d, o in enumerate(offset):
        index.append(slice(r + o, r + o + x.shape[2 + d]))
    return xp[tuple(index)]


def mind_ssc(x: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al. 2013, "self-similarity context") of ``(N, 1, *S)`` images.

    The six (3D) or four (2D) axis neighbours at distance ``dilation`` form pairs that are
    ``sqrt(2) * dilation`` apart (12 pairs in 3D, 4 in 2D). For each pair, the patch distance
    ``D`` is the box-filtered (radius ``radius``) squared difference of the two shifted images;
    the descriptor is ``exp(-D / V)`` with ``V`` the mean of ``D`` over the pairs (clamped to
    [0.001, 1000] times its global mean), divided by its maximum over the pairs. The result is
    ``(N, P, *S)`` in (0, 1], invariant to monotone intensity changes that keep local structure,
    so it compares images of different contrasts voxel by voxel.
    """
    nd = x.dim() - 2
    axes = []
    for d in range(nd):
        for sign in (-1, 1):
            o = [0] * nd
            o[d] = sign * dilation
            axes.append(tuple(o))
    pairs = [(a, b) for i, a in enumerate(axes) for b in axes[i + 1:]
             if sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) == 2 * dilation**2]
    dist = torch.cat([_box((_shift(x, a) - _shift(x, b)) ** 2, radius) for a, b in pairs], dim=1)
    var = dist.mean(dim=1, keepdim=True)
    mean = var.mean().detach()
    var = var.clamp(min=float(mean) * 1e-3 + 1e-12, max=float(mean) * 1e3 + 1e-12)
    mind = torch.exp(-dist / var)
    return mind / mind.amax(dim=1, keepdim=True)


class MindLoss(torch.nn.Module):
    """Mean squared difference of MIND-SSC descriptors; the fixed image's are computed once and cached.

    Called on a warped image it recomputes the moving descriptors every time (exact). The optimiser
    instead warps the moving image's descriptors, computed once per level (``warps_descriptors``,
    :meth:`descriptors`, :meth:`compare`; as in Heinrich's deeds / ConvexAdam): an approximation
    for smooth deformations that made the benchmark's cross-contrast pair 1.9x faster (Dice 0.905 ->
    0.923, ``docs/benchmarks/registration.md``).
    """

    warps_descriptors = True

    def __init__(self, radius: int = 1, dilation: int = 2) -> None:
        super().__init__()
        self.radius, self.dilation = radius, dilation
        self._fixed = _FixedCache()

    def descriptors(self, x: torch.Tensor) -> torch.Tensor:
        """MIND-SSC descriptors of ``x`` (no gradient)."""
        with torch.no_grad():
            return mind_ssc(x, self.radius, self.dilation)

    @staticmethod
    def compare(warped_descriptors: torch.Tensor, fixed_descriptors: torch.Tensor) -> torch.Tensor:
        """The loss between (warped) moving descriptors and the fixed image's."""
        return (warped_descriptors - fixed_descriptors).pow(2).mean()

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        target = self._fixed.get(fixed, lambda f: mind_ssc(f, self.radius, self.dilation))
        return (mind_ssc(warped, self.radius, self.dilation) - target).pow(2).mean()


class DeepSimLoss(torch.nn.Module):
    """DeepSim (Czolbe et al. 2021): ``-(1/L) sum_l mean_voxels cos(F_l(warped), F_l(fixed))``.

    ``F_l`` are the encoder levels of a frozen segmentation network (no mean-centring of the
    feature vectors), so the similarity compares semantic features, not raw intensities.
    The fixed image's features are computed once per resolution and cached.
    """

    def __init__(self, extractor: torch.nn.Module) -> None:
        super().__init__()
        self.extractor = extractor.eval()
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        self._fixed = _FixedCache()

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        d = getattr(self.extractor, "divisor", 1)
        nd = x.dim() - 2
        pad = []
        for n in reversed(x.shape[2:]):
            extra = (-n) % d
            pad += [0, extra]
        return F.pad(x, pad[: 2 * nd], mode="replicate") if any(pad) else x

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor.encode(self._pad(x))

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        feats_f = self._fixed.get(fixed, lambda f: [x.detach() for x in self.features(f)])
        feats_w = self.features(warped)
        total = warped.new_zeros(())
        for a, b in zip(feats_w, feats_f, strict=False):
            total = total + F.cosine_similarity(a, b, dim=1, eps=1e-6).mean()
        return -total / len(feats_f)
