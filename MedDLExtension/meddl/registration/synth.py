"""SynthMorph-style training pairs synthesised from label maps (Hoffmann et al. 2022).

A label map is drawn (an atlas over a procedurally generated background, or a purely random
one), deformed twice by random smooth diffeomorphisms plus small affines, and each copy becomes
an image by giving every label a random intensity (Gaussian mixture), then blur, a bias field,
noise and a gamma change. The network never sees a real contrast, so it works on any.

Label sources (allowlisted samples only, :mod:`meddl.data`): MNI152 tissue masks (with the
head outside the brain split into intensity bands of the template), AAL and JHU white matter
over the MNI tissue map, Harvard-Oxford cortical and NatBrainLab over random backgrounds, and
purely random label maps. Colin27 is never used: it is the benchmark's image.

Everything here is in voxels of a 3 mm training grid; tensors are ``(N, C, I, J, K)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .svf import identity_grid, integrate, sample

__all__ = ["LabelSource", "label_sources", "procedural_labels", "random_velocity", "synth_image", "SynthPairs",
           "gaussian_blur", "TISSUE_CLASSES"]

#: tissue classes of the segmentation (DeepSim) task
TISSUE_CLASSES = ("outside brain", "csf", "grey matter", "white matter")

TRAIN_SPACING_MM = 3.0
# MNI box covered by the training grid (192 x 240 x 192 mm: 64 x 80 x 64 voxels of 3 mm)
_GRID_ORIGIN = np.array([-96.0, -132.0, -78.0])
_GRID_EXTENT_MM = np.array([192.0, 240.0, 192.0])


@dataclass(frozen=True)
class LabelSource:
    """One label map on the 3 mm training grid; ``tissue`` maps it to :data:`TISSUE_CLASSES` (or None)."""

    name: str
    labels: np.ndarray  # (I, J, K) int16, 0 = background
    tissue: np.ndarray | None  # (I, J, K) uint8 tissue class, when known


def _grid_affine(spacing: float = TRAIN_SPACING_MM) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] *= spacing
    a[:3, 3] = _GRID_ORIGIN
    return a


def _resample_nearest(vol, affine: np.ndarray, shape: tuple[int, ...], order: int = 0) -> np.ndarray:
    """Sample a Volume's first channel on a grid (physical positions), nearest or linear."""
    from scipy.ndimage import map_coordinates

    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    pts = idx @ affine[:3, :3].T + affine[:3, 3]
    src = vol.physical_to_index(pts).T
    arr = vol.numpy()[0]
    out = map_coordinates(arr.astype(np.float32), src, order=order, mode="constant", cval=0.0)
    return out.reshape(shape)


def _voxel_grid_resample(arr: np.ndarray, spacing_in: float, spacing_out: float) -> np.ndarray:
    """Nearest-neighbour resampling of an array in its own voxel frame (atlases without a usable affine)."""
    from scipy.ndimage import zoom

    return zoom(arr, spacing_in / spacing_out, order=0)


def label_sources(spacing: float = TRAIN_SPACING_MM, cache: str | Path | None = None) -> list[LabelSource]:
    """Build (once, then cached as ``.npz``) the label maps training draws from, on a ``spacing`` mm grid."""
    from .. import data

    path = Path(cache) if cache is not None else data.cache_dir() / f"registration_label_sources_v1_{spacing:g}mm.npz"
    if path.is_file():
        z = np.load(path)
        out = []
        for name in [str(n) for n in z["names"]]:
            tissue = z[f"{name}__tissue"] if f"{name}__tissue" in z else None
            out.append(LabelSource(name, z[f"{name}__labels"], tissue))
        return out

    affine = _grid_affine(spacing)
    shape = tuple(int(round(e / spacing)) for e in _GRID_EXTENT_MM)
    brain = _resample_nearest(data.load_sample("mni152_brain_mask"), affine, shape) > 0
    gm = _resample_nearest(data.load_sample("mni152_gm_mask"), affine, shape) > 0
    wm = _resample_nearest(data.load_sample("mni152_wm_mask"), affine, shape) > 0
    t1 = _resample_nearest(data.load_sample("mni152_t1"), affine, shape, order=1)
    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = 1
    tissue[gm] = 2
    tissue[wm & ~gm] = 3
    head = np.zeros(shape, np.int16)
    head[:] = tissue
    # the head outside the brain: three intensity bands of the template (scalp, skull, fluid)
    outside = ~brain & (t1 > 0.05)
    bands = np.digitize(t1, [0.05, 0.3, 0.6])  # 1..3 above background
    head[outside] = 3 + bands[outside]
    sources = [LabelSource("mni152_tissue", head, tissue)]
    for name in ("aal", "jhu_white_matter"):
        atlas = _resample_nearest(data.load_sample(name), affine, shape).astype(np.int16)
        merged = head.copy()
        merged[atlas > 0] = 10 + atlas[atlas > 0]
        sources.append(LabelSource(f"mni152_tissue+{name}", merged, tissue))
    for name in ("harvard_oxford_cortical", "natbrainlab"):
        vol = data.load_sample(name)
        arr = _voxel_grid_resample(vol.numpy()[0], float(vol.spacing.min()), spacing).astype(np.int16)
        sources.append(LabelSource(name, arr, None))
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"names": np.array([s.name for s in sources])}
    for s in sources:
        arrays[f"{s.name}__labels"] = s.labels
        if s.tissue is not None:
            arrays[f"{s.name}__tissue"] = s.tissue
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return sources


# -- random fields ------------------------------------------------------------------------------


def _rand(gen: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=gen))


def _smooth_noise(channels: int, shape: tuple[int, ...], coarse: int, gen: torch.Generator) -> torch.Tensor:
    """``(1, channels, *shape)`` smooth noise: N(0, 1) on a ``coarse``-voxel lattice, upsampled."""
    small = tuple(max(2, math.ceil(n / coarse)) for n in shape)
    noise = torch.randn((1, channels, *small), generator=gen)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(noise, size=shape, mode=mode, align_corners=True)


def procedural_labels(shape: tuple[int, ...], gen: torch.Generator, count: int | None = None) -> torch.Tensor:
    """A random label map ``(*shape)`` int64: argmax of ``count`` smooth noise fields, then warped."""
    count = count or int(torch.randint(6, 20, (), generator=gen))
    coarse = int(torch.randint(4, 12, (), generator=gen))
    noise = _smooth_noise(count, shape, coarse, gen)
    v = random_velocity(shape, gen, max_std=3.0)
    noise = sample(noise, identity_grid(shape) + integrate(v, 5), padding_mode="border")
    return noise[0].argmax(0)


def random_velocity(shape: tuple[int, ...], gen: torch.Generator, max_std: float = 3.0,
                    coarse: int | None = None) -> torch.Tensor:
    """Smooth random velocity ``(1, ndim, *shape)`` in voxels (std drawn up to ``max_std``)."""
    coarse = coarse or int(torch.randint(6, 12, (), generator=gen))
    std = _rand(gen, 0.0, max_std)
    return _smooth_noise(len(shape), shape, coarse, gen) * std


def _random_affine(nd: int, gen: torch.Generator, rot_deg: float, scale: float,
                   shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random affine ``(M (nd, nd), t (nd,))`` acting about the grid centre: ``y = M (x - c) + c + t``."""
    angles = [math.radians(_rand(gen, -rot_deg, rot_deg)) for _ in range(3 if nd == 3 else 1)]
    if nd == 3:
        rx, ry, rz = angles
        cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
        r = (torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float32)
             @ torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float32)
             @ torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float32))
    else:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        r = torch.tensor([[c, -s], [s, c]], dtype=torch.float32)
    m = r @ torch.diag(torch.tensor([1.0 + _rand(gen, -scale, scale) for _ in range(nd)]))
    t = torch.tensor([_rand(gen, -shift, shift) for _ in range(nd)])
    return m, t


def _apply_affine(shape: tuple[int, ...], x: torch.Tensor, m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``M (x - c) + c + t`` for points ``x`` ``(N, nd, *S)`` (voxel indices)."""
    nd = len(shape)
    view = (1, nd, *([1] * nd))
    centre = torch.tensor([(n - 1) / 2.0 for n in shape]).view(view)
    return torch.einsum("cd,nd...->nc...", m, x - centre) + centre + t.view(view)


def _random_affine_coords(shape: tuple[int, ...], u: torch.Tensor, gen: torch.Generator,
                          rot_deg: float, scale: float, shift: float) -> torch.Tensor:
    """Sampling coordinates ``A (x + u(x))`` with a random affine ``A`` about the grid centre."""
    m, t = _random_affine(len(shape), gen, rot_deg, scale, shift)
    return _apply_affine(shape, identity_grid(shape) + u, m, t)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, *S)`` with ``sigma`` voxels (replicate padding)."""
    if sigma <= 0.05:
        return x
    nd = x.dim() - 2
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    conv = F.conv3d if nd == 3 else F.conv2d
    for d in range(nd):
        shape = [1] * nd
        shape[d] = k.numel()
        weight = k.view(1, 1, *shape).repeat(c, 1, *([1] * nd))
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - d)] = radius
        pad[2 * (nd - 1 - d) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), weight, groups=c)
    return x


def synth_image(labels: torch.Tensor, gen: torch.Generator, means: torch.Tensor | None = None) -> torch.Tensor:
    """An image ``(1, 1, *S)`` in [0, 1] from a label map ``(*S)`` (int64): GMM, blur, bias, noise, gamma."""
    count = int(labels.max()) + 1
    if means is None:
        means = torch.rand(count, generator=gen)
    stds = torch.rand(count, generator=gen) * 0.08
    shape = tuple(labels.shape)
    img = means[labels] + stds[labels] * torch.randn(shape, generator=gen)
    img = gaussian_blur(img[None, None], _rand(gen, 0.0, 1.2))
    bias = torch.exp(_smooth_noise(1, shape, 16, gen) * _rand(gen, 0.0, 0.3))
    img = img * bias
    img = img + torch.randn(img.shape, generator=gen) * _rand(gen, 0.0, 0.04)
    lo, hi = img.min(), img.max()
    img = ((img - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return img ** math.exp(_rand(gen, -0.3, 0.3))


def _crop(arr: np.ndarray, shape: tuple[int, ...], gen: torch.Generator) -> np.ndarray:
    """A random crop (zero-padded where the map is smaller) of ``shape``."""
    out = np.zeros(shape, arr.dtype)
    src, dst = [], []
    for n_in, n_out in zip(arr.shape, shape, strict=False):
        if n_in >= n_out:
            start = int(torch.randint(0, n_in - n_out + 1, (), generator=gen))
            src.append(slice(start, start + n_out))
            dst.append(slice(0, n_out))
        else:
            start = int(torch.randint(0, n_out - n_in + 1, (), generator=gen))
            src.append(slice(0, n_in))
            dst.append(slice(start, start + n_in))
    out[tuple(dst)] = arr[tuple(src)]
    return out


class SynthPairs:
    """Draws training pairs: ``fixed, moving (1, 1, *S)``, one-hot label groups ``(1, G, *S)``.

    Args:
        sources: atlas label maps (:func:`label_sources`).
        shape: crop size (divisible by the network's divisor).
        groups: labels are merged at random into at most this many groups for the Dice loss.
        p_procedural: probability of a purely random label map.
        max_velocity_std: largest per-voxel std (voxels) of each image's random velocity.
        p_same_contrast: probability that both images share the label intensities (else each
            draws its own, as in SynthMorph).
        affine: largest rotation (degrees), relative scaling and shift (voxels) of each image's
            random affine (the pipeline aligns affinely before the network, so small ones suffice).
    """

    def __init__(self, sources: list[LabelSource], shape: tuple[int, ...] = (64, 64, 64), groups: int = 12,
                 p_procedural: float = 0.3, max_velocity_std: float = 3.0, p_same_contrast: float = 0.5,
                 affine: tuple[float, float, float] = (6.0, 0.06, 2.0)) -> None:
        self.sources = sources
        self.shape = tuple(shape)
        self.groups = groups
        self.p_procedural = p_procedural
        self.max_velocity_std = max_velocity_std
        self.p_same_contrast = p_same_contrast
        self.affine = tuple(float(a) for a in affine)

    def _label_map(self, gen: torch.Generator) -> torch.Tensor:
        if not self.sources or _rand(gen, 0, 1) < self.p_procedural:
            return procedural_labels(self.shape, gen)
        src = self.sources[int(torch.randint(0, len(self.sources), (), generator=gen))]
        labels = torch.from_numpy(_crop(src.labels, self.shape, gen).astype(np.int64))
        if _rand(gen, 0, 1) < 0.7:  # structure in the background too
            back = procedural_labels(self.shape, gen) + int(labels.max()) + 1
            labels = torch.where(labels == 0, back, labels)
        # compact the label ids
        _, labels = torch.unique(labels, return_inverse=True)
        return labels.reshape(self.shape)

    def _transform(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A random ``x -> A (x + exp(v)(x))``: ``(v (1, nd, *S), M, t)``."""
        v = random_velocity(self.shape, gen, self.max_velocity_std)
        rot_deg, scale, shift = self.affine
        m, t = _random_affine(len(self.shape), gen, rot_deg=rot_deg, scale=scale, shift=shift)
        return v, m, t

    def _coords(self, transform) -> torch.Tensor:
        v, m, t = transform
        return _apply_affine(self.shape, identity_grid(self.shape) + integrate(v, 5), m, t)

    def _inverse_coords(self, transform, points: torch.Tensor) -> torch.Tensor:
        """Where the inverse of ``transform`` sends ``points`` ``(1, nd, *S)``."""
        v, m, t = transform
        nd = len(self.shape)
        # y = M (x - c) + c + t  <=>  x = M^-1 ((y - t) - c) + c
        z = _apply_affine(self.shape, points - t.view(1, nd, *([1] * nd)), torch.linalg.inv(m), torch.zeros_like(t))
        return z + sample(integrate(-v, 5), z, padding_mode="border")

    def deform(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One random diffeomorphic + small affine copy of a label map (nearest neighbour)."""
        return self._deform(labels, self._transform(gen))

    def _deform(self, labels: torch.Tensor, transform) -> torch.Tensor:
        out = sample(labels[None, None].float(), self._coords(transform), mode="nearest", padding_mode="border")
        return out[0, 0].round().long()

    def __call__(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A pair; ``displacement`` ``(1, nd, *S)`` is the true one (voxels): ``moving(x + d(x)) ~ fixed(x)``."""
        labels = self._label_map(gen)
        tf = self._transform(gen)
        lf = self._deform(labels, tf)
        tm = self._transform(gen)
        lm = self._deform(labels, tm)
        count = int(labels.max()) + 1
        same = _rand(gen, 0, 1) < self.p_same_contrast
        means = torch.rand(count, generator=gen) if same else None
        fixed = synth_image(lf, gen, means)
        moving = synth_image(lm, gen, means)
        if count > self.groups:
            lut = torch.randint(0, self.groups, (count,), generator=gen)
        else:
            lut = torch.arange(count)
        g = int(lut.max()) + 1
        nd = len(self.shape)
        onehot = lambda lab: F.one_hot(lut[lab], g).permute(nd, *range(nd)).float()[None]  # noqa: E731
        # fixed(x) = L(T_f x) and moving(y) = L(T_m y), so moving(T_m^-1 T_f x) = fixed(x)
        displacement = self._inverse_coords(tm, self._coords(tf)) - identity_grid(self.shape)
        return {"fixed": fixed, "moving": moving, "fixed_labels": onehot(lf), "moving_labels": onehot(lm),
                "displacement": displacement}

    def segmentation_sample(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (1, 1, *S), tissue class (1, *S))`` from a source with tissue classes."""
        tissue_sources = [s for s in self.sources if s.tissue is not None]
        src = tissue_sources[int(torch.randint(0, len(tissue_sources), (), generator=gen))]
        state = gen.get_state()
        labels = torch.from_numpy(_crop(src.labels, self.shape, gen).astype(np.int64))
        gen.set_state(state)  # the same crop for the tissue map
        tissue = torch.from_numpy(_crop(src.tissue, self.shape, gen).astype(np.int64))
        back = procedural_labels(self.shape, gen) + int(labels.max()) + 1
        labels = torch.where(labels == 0, back, labels)
        stacked = torch.stack([labels, tissue]).float()[None]
        v = random_velocity(self.shape, gen, self.max_velocity_std)
        coords = _random_affine_coords(self.shape, integrate(v, 5), gen, rot_deg=10.0, scale=0.1, shift=3.0)
        warped = sample(stacked, coords, mode="nearest", padding_mode="border")[0].round().long()
        return synth_image(warped[0], gen), warped[1][None]
