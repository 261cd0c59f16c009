"""Stain normalisation, separation and augmentation of RGB histology, all in torch.

Methods (see ``/work/shared/SCIENCE.md``, "Domain adaptation"):

* **Macenko** et al., ISBI 2009: optical density ``OD = -log((I + 1) / I0)``; tissue pixels have
  ``OD >= 0.15`` in every channel; the plane of the two largest eigenvectors of their OD
  covariance; the angles at the ``alpha`` and ``100 - alpha`` percentiles give the two stain
  vectors (H first: larger red component); concentrations by least squares; the 99th percentile of
  each concentration is scaled to the reference's and the image recomposed with the reference's
  stain matrix. The same rules (and nearest-rank percentiles) as the original code and torchstain.
* **Reinhard** et al., 2001: match the per-channel mean and standard deviation in CIE Lab.
* **Vahadane** et al., 2016: sparse non-negative factorisation ``OD ~ W C`` with an l1 penalty on
  ``C`` (lambda 0.1 while learning ``W``, 0.01 for the final concentrations, as staintools),
  ``W >= 0`` with unit columns. Solved by alternating exact steps: with two or three stains the
  non-negative lasso of each pixel is solved in closed form over the 2**k active sets, vectorised
  over all pixels, so a 256 x 256 patch takes milliseconds instead of SPAMS' ~1 s.
* **HED jitter** (Tellez et al., 2018; Stain-AgLr): scale and shift the haematoxylin, eosin and DAB
  concentrations of Ruifrok & Johnston's colour deconvolution, in scikit-image's ``rgb2hed`` units.

The stain parameters of an image are estimated once from a (strided) subsample of at most
``max_samples`` pixels; the mapping is then pixel-wise, so any image can be processed in chunks or
tiles (:mod:`meddl.adaptation.tiling`) with results identical to a single pass.

Pixel layout: a :class:`~meddl.volume.Volume` holds RGB as ``(3, I, J)`` (``I`` = image x,
``J`` = image y, the transpose of the usual ``(H, W, 3)`` array). Every operation here is
pixel-wise or uses pixel statistics, so it is done on the planar ``(3, N)`` view of the data and
reshaped back: the axis order is never changed.
"""

from __future__ import annotations

import enum
import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, Reporter
from ..volume import Kind, Volume
from ._common import as_tensor, check_intensity, percentile_nearest, torch_device

__all__ = [
    "StainMethod",
    "TissueDetector",
    "Separation",
    "StainConfig",
    "StainFit",
    "StainNormalizer",
    "adapt_stain",
    "separate_stains",
    "tissue_mask",
    "hed_jitter",
    "rgb_to_lab",
    "lab_to_rgb",
    "RUIFROK_HED",
]


class StainMethod(str, enum.Enum):
    """Stain normalisation method."""

    MACENKO = "macenko"
    REINHARD = "reinhard"
    VAHADANE = "vahadane"


class TissueDetector(str, enum.Enum):
    """How tissue is told from background."""

    OPTICAL_DENSITY = "od"  #: OD >= od_threshold in every channel (Macenko)
    LUMINOSITY = "luminosity"  #: Lab L / 100 < luminosity_threshold (staintools)


class Separation(str, enum.Enum):
    """Where the stain matrix of :func:`separate_stains` comes from."""

    HED = "hed"  #: Ruifrok & Johnston's fixed haematoxylin / eosin / DAB vectors
    MACENKO = "macenko"  #: estimated from the image (two stains)
    VAHADANE = "vahadane"  #: estimated from the image (two stains)


#: Ruifrok & Johnston (2001) stain OD vectors, one row per stain (H, E, DAB), as scikit-image.
RUIFROK_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)


@dataclass(frozen=True)
class StainConfig:
    """Options of stain normalisation and separation (validated on creation).

    Attributes:
        method: ``macenko``, ``reinhard`` or ``vahadane``.
        light_intensity: transmitted light intensity ``I0`` in ``OD = -log((I + 1) / I0)``.
        alpha: Macenko's angle percentile (the stain vectors are at ``alpha`` and ``100 - alpha``).
        tissue: tissue detector, ``od`` or ``luminosity``.
        od_threshold: tissue has at least this optical density in every channel.
        luminosity_threshold: tissue has Lab lightness below this fraction of 100.
        percentile: the concentration percentile matched to the reference's.
        percentile_over_tissue: take that percentile over tissue pixels only (robust when the
            background fraction differs between slides); the original methods and torchstain use
            all pixels (the default).
        sparsity: Vahadane's l1 weight while learning the stain matrix.
        concentration_sparsity: Vahadane's l1 weight for the final concentrations.
        iterations: Vahadane's alternating steps at most.
        tolerance: Vahadane stops once no stain-vector component moves more than this.
        dictionary_pixels: at most this many tissue pixels (strided) to learn Vahadane's matrix.
        max_samples: at most this many pixels (strided) to estimate stain statistics; images up
            to this size use every pixel. 100,000 (every 3rd pixel of a 512 x 512 image, every
            42nd of a 2048 x 2048 one) kept Macenko within one grey level of the all-pixel estimate
            (torchstain's) on re-stained 512 x 512 slides and a 2048 x 2048 mosaic
            (benchmarks/adaptation.py; with 2^16, 244 of the mosaic's 4.2 M pixels were 2 grey
            levels off) and made a 512 x 512 image 2.8x faster to normalise than with every pixel.
        chunk_pixels: pixels transformed at once (bounds the memory of one step; 2^18 keeps a
            chunk in cache: a 2048 x 2048 image took 68 ms instead of 177 ms with 2^22).
        min_tissue_pixels: fewer tissue pixels than this is "no tissue found".
    """

    method: StainMethod | str = StainMethod.MACENKO
    light_intensity: float = 240.0
    alpha: float = 1.0
    tissue: TissueDetector | str = TissueDetector.OPTICAL_DENSITY
    od_threshold: float = 0.15
    luminosity_threshold: float = 0.8
    percentile: float = 99.0
    percentile_over_tissue: bool = False
    sparsity: float = 0.1
    concentration_sparsity: float = 0.01
    iterations: int = 60
    tolerance: float = 1e-4
    dictionary_pixels: int = 1024
    max_samples: int = 100_000
    chunk_pixels: int = 1 << 18
    min_tissue_pixels: int = 64

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "method", StainMethod(self.method))
        except ValueError:
            raise InputError(
                f"stain method: expected one of {', '.join(m.value for m in StainMethod)}, got '{self.method}'"
            ) from None
        try:
            object.__setattr__(self, "tissue", TissueDetector(self.tissue))
        except ValueError:
            raise InputError(
                f"tissue detector: expected one of {', '.join(m.value for m in TissueDetector)}, got '{self.tissue}'"
            ) from None
        _check_range("light_intensity", self.light_intensity, 1.0, 255.0)
        _check_range("alpha", self.alpha, 0.0, 49.0)
        _check_range("od_threshold", self.od_threshold, 0.0, 3.0)
        _check_range("luminosity_threshold", self.luminosity_threshold, 0.0, 1.0)
        _check_range("percentile", self.percentile, 50.0, 100.0)
        _check_range("sparsity", self.sparsity, 0.0, 10.0)
        _check_range("concentration_sparsity", self.concentration_sparsity, 0.0, 10.0)
        _check_range("tolerance", self.tolerance, 0.0, 1.0)
        for name in ("iterations", "dictionary_pixels", "max_samples", "chunk_pixels", "min_tissue_pixels"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"StainConfig.{name}: expected a positive integer, got {value!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not isinstance(value, (int, float, np.floating, np.integer)) or not (low <= float(value) <= high):
        raise InputError(f"StainConfig.{name}: expected a number in [{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True)
class StainFit:
    """The stain statistics of one image (what the mapping between two images needs).

    Attributes:
        method: the method they were estimated for.
        stain_matrix: ``(3, k)`` unit OD vectors, one column per stain, H first (Macenko, Vahadane).
        max_concentration: ``(k,)`` the concentration percentile (Macenko, Vahadane).
        lab_mean, lab_std: ``(3,)`` Lab statistics (Reinhard).
        tissue_pixels: tissue pixels in the sample the fit saw.
    """

    method: StainMethod
    stain_matrix: Any = None
    max_concentration: Any = None
    lab_mean: Any = None
    lab_std: Any = None
    tissue_pixels: int = 0
    extra: dict = field(default_factory=dict)

    def to(self, device) -> StainFit:
        """The same fit with its tensors on ``device``."""
        moved = {
            k: (getattr(self, k).to(device) if getattr(self, k) is not None else None)
            for k in ("stain_matrix", "max_concentration", "lab_mean", "lab_std")
        }
        return StainFit(self.method, tissue_pixels=self.tissue_pixels, extra=self.extra, **moved)


# -- pixels ------------------------------------------------------------------------------------


def _rgb_pixels(data: Any, role: str, device) -> tuple[Any, Any]:
    """Channel-first RGB(A) data -> ``(3, N)`` uint8 tensor on ``device`` and the alpha (or None).

    Accepts uint8, other integers in 0-255, and floats in [0, 1] or [0, 255].
    """
    import torch

    t = as_tensor(data, device)
    if t.shape[0] not in (3, 4):
        raise InputError(
            f"{role}: expected an RGB colour image (3 components), got {t.shape[0]} component(s); "
            "stain methods need colour, use histogram matching or Fourier adaptation for grey images"
        )
    alpha = t[3] if t.shape[0] == 4 else None
    t = t[:3].reshape(3, -1)
    if t.dtype != torch.uint8:
        if t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"{role}: expected 8-bit colour values, got {t.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{role}: expected finite colour values, got NaN or infinite pixels; fill them first")
        wide = t if t.is_floating_point() else t.to(torch.int64)  # torch has no min/max for uint16/uint32
        lo, hi = float(wide.min()), float(wide.max())
        if lo < 0 or hi > 255:
            raise InputError(f"{role}: expected colour values in 0-255, got the range [{lo:g}, {hi:g}]; convert to 8-bit first")
        scale = 255.0 if t.is_floating_point() and hi <= 1.0 else 1.0
        t = (wide * scale).round().to(torch.uint8) if t.is_floating_point() else wide.to(torch.uint8)
        if alpha is not None:  # the alpha in the colour's scale (a float 1.0 is opaque, 255)
            wide_a = alpha.double() if alpha.is_floating_point() else alpha.to(torch.int64)
            alpha = (wide_a * scale).round().clamp(0, 255).to(torch.uint8)
    return t.contiguous(), alpha


def sample_step(pixels: int, max_samples: int, line: int = 1) -> int:
    """The stride of the stain-statistics sample: ``ceil(pixels / max_samples)``, raised until it
    shares at most a factor 2 with ``line`` (the length of the fastest-varying image axis).

    A stride that divides the line length would take the same few columns of every row (every 64th
    column of a 2048-wide slide); one with ``gcd(step, line) <= 2`` reaches every (other) column.
    """
    step = max(1, -(-int(pixels) // int(max_samples)))
    while step > 2 and math.gcd(step, max(int(line), 1)) > 2:
        step += 1
    return step


def _strided(px, max_samples: int, line: int = 1, alpha=None):
    """At most ``max_samples`` columns of ``px`` (every ``step``-th, :func:`sample_step`), deterministic;
    transparent pixels (``alpha`` 0) are left out: they are not tissue, whatever colour they store."""
    step = sample_step(px.shape[-1], max_samples, line)
    return _opaque(px[:, ::step] if step > 1 else px, alpha, step)


def _opaque(sample, alpha, step: int):
    """The columns of a ``step``-strided sample whose pixel is not fully transparent."""
    if alpha is None:
        return sample
    keep = alpha.reshape(-1)[::step].to(sample.device) > 0
    return sample if bool(keep.all()) else sample[:, keep]


def _od_lut(light_intensity: float, device):
    import torch

    return -torch.log((torch.arange(256, dtype=torch.float32, device=device) + 1.0) / float(light_intensity))


def _od(px, lut):
    """``(3, N)`` uint8 -> ``(3, N)`` float32 optical density through a 256-entry table."""
    return lut.index_select(0, px.reshape(-1).to(lut.device).long()).view(px.shape)


# -- CIE Lab (sRGB, D65), as scikit-image ---------------------------------------------------------

_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb):
    """sRGB in [0, 1], ``(3, ...)`` -> CIE Lab ``(3, ...)`` (D65), as ``skimage.color.rgb2lab``."""
    import torch

    m = torch.as_tensor(_XYZ_FROM_RGB / _WHITE_D65[:, None], dtype=rgb.dtype, device=rgb.device)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,j...->i...", m, lin)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    return torch.stack((116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])))


def lab_to_rgb(lab):
    """CIE Lab ``(3, ...)`` -> sRGB in [0, 1] ``(3, ...)`` (clipped), as ``skimage.color.lab2rgb``."""
    import torch

    fy = (lab[0] + 16.0) / 116.0
    fx = fy + lab[1] / 500.0
    fz = (fy - lab[2] / 200.0).clamp_min(0.0)
    f = torch.stack((fx, fy, fz))
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * torch.as_tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device).view(3, *([1] * (lab.dim() - 1)))
    m = torch.as_tensor(np.linalg.inv(_XYZ_FROM_RGB), dtype=lab.dtype, device=lab.device)
    lin = torch.einsum("ij,j...->i...", m, xyz)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1.0 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0.0, 1.0)


# -- tissue --------------------------------------------------------------------------------------


def _tissue(px, od, config: StainConfig):
    """Boolean ``(N,)`` tissue mask of ``(3, N)`` uint8 pixels (``od`` their optical density)."""
    if config.tissue is TissueDetector.OPTICAL_DENSITY:
        return od.amin(0) >= config.od_threshold
    lightness = rgb_to_lab(px.float() / 255.0)[0] / 100.0
    return lightness < config.luminosity_threshold


def _check_tissue(px, mask, config: StainConfig, role: str) -> int:
    """Refuse background-only and grey (R = G = B) images with one clear message; the tissue count."""
    n = int(mask.sum())
    if n < config.min_tissue_pixels and n >= px.shape[1] // 2:
        raise InputError(
            f"{role}: expected at least {config.min_tissue_pixels} tissue pixels to estimate stains from, got "
            f"{n} (the image has {px.shape[1]} pixels); give a larger image or region"
        )
    if n < config.min_tissue_pixels:
        rule = (
            f"optical density >= {config.od_threshold:g} in every channel"
            if config.tissue is TissueDetector.OPTICAL_DENSITY
            else f"lightness below {config.luminosity_threshold:g}"
        )
        raise InputError(
            f"{role}: expected stained tissue, got {n} tissue pixel(s) of {px.shape[1]} ({rule}); "
            "the image looks like background only. Check the image or lower the tissue threshold"
        )
    step = max(1, px.shape[1] // 16384)
    sub, sub_mask = px[:, ::step], mask[::step]
    coloured = ((sub.amax(0).int() - sub.amin(0).int()) > 2) & sub_mask
    if int(coloured.sum()) < 0.01 * max(int(sub_mask.sum()), 1):
        raise InputError(
            f"{role}: expected a colour image of stained tissue, got a grey image (R = G = B); "
            "stain methods need colour, use histogram matching or Fourier adaptation for grey images"
        )
    return n


# -- non-negative lasso in closed form --------------------------------------------------------------


def nonnegative_lasso(gram, rhs, penalty: float = 0.0):
    """Solve ``min_c 0.5 c'Gc - (b - penalty)'c`` subject to ``c >= 0`` for every column of ``b``.

    With ``G = W'W`` and ``b = W'x`` this is the non-negative lasso
    ``min_c 0.5 ||x - W c||^2 + penalty * sum(c)``, and with ``penalty = 0`` non-negative least
    squares. Exact: the solution is the active-set solution of least objective among the
    ``2**k - 1`` non-empty supports whose equality-constrained solution is non-negative (``k <= 4``).

    Args:
        gram: ``(k, k)`` symmetric positive (semi-)definite.
        rhs: ``(k, M)``.
    Returns:
        ``(k, M)`` non-negative solutions.
    """
    import torch

    k = gram.shape[0]
    if k == 2:
        return _nonnegative_lasso_2(gram, rhs - penalty)
    if k > 4:
        raise InputError(f"non-negative lasso: expected at most 4 stains, got {k}")
    b = rhs - penalty
    best = torch.zeros_like(b)
    best_q = torch.zeros(b.shape[1], dtype=b.dtype, device=b.device)  # the empty support: c = 0, q = 0
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            inv = torch.linalg.pinv(gram[idx][:, idx])
            c_s = inv @ b[idx]  # (size, M)
            q = -0.5 * (b[idx] * c_s).sum(0)
            better = (c_s >= 0).all(0) & (q < best_q)
            if not bool(better.any()):
                continue
            best_q = torch.where(better, q, best_q)
            cand = torch.zeros_like(b)
            cand[idx] = c_s
            best = torch.where(better.unsqueeze(0), cand, best)
    return best


def _nonnegative_lasso_2(gram, b):
    """Two stains: the unconstrained solution if non-negative, else the better of the two rays.

    On the ray ``c1 = 0`` the best point is ``c0 = max(b0, 0) / g00`` with objective
    ``-max(b0, 0)^2 / (2 g00)`` (and alike for ``c0 = 0``). Few, large tensor operations: this
    runs inside Vahadane's loop.
    """
    import torch

    (g00, g01), (_, g11) = gram.tolist()
    det = g00 * g11 - g01 * g01
    diag = torch.tensor([[max(g00, 1e-12)], [max(g11, 1e-12)]], dtype=b.dtype, device=b.device)
    ray = b.clamp_min(0.0) / diag  # (2, M): the best point of each ray
    score = ray * ray * diag  # twice the objective decrease on each ray
    first = score[0] >= score[1]
    rays = torch.stack((ray[0] * first, ray[1] * ~first))
    if det <= 1e-12 * max(g00 * g11, 1e-30):
        return rays
    inv = torch.tensor([[g11, -g01], [-g01, g00]], dtype=b.dtype, device=b.device) / det
    c = inv @ b
    return torch.where((c >= 0).all(0), c, rays)


# -- fitting -------------------------------------------------------------------------------------


def _order_h_first(matrix):
    """Columns sorted so the one with the larger red OD (haematoxylin) comes first."""
    import torch

    order = torch.argsort(matrix[0], descending=True)
    return matrix[:, order]


def _macenko_matrix(od, alpha: float, mask=None, count: int | None = None):
    """Macenko's two stain vectors ``(3, 2)`` (H first) from OD ``(3, n)`` (tissue: ``mask``)."""
    import torch

    if mask is None:
        count = od.shape[1]
        mean = od.mean(1, keepdim=True)
        centred = od - mean
        cov = centred @ centred.T / (count - 1)
    else:
        weight = mask.to(od.dtype)
        mean = (od @ weight).unsqueeze(1) / count
        centred = od - mean
        cov = (centred * weight) @ centred.T / (count - 1)
    _, vecs = torch.linalg.eigh(cov)
    plane = vecs[:, 1:]  # (3, 2): second, then principal eigenvector
    # eigenvector signs are arbitrary: make the principal one point into the positive OD octant
    plane = plane * torch.where(plane[:, 1].sum() < 0, -1.0, 1.0).to(plane.dtype)
    proj = plane.T @ od
    phi = torch.atan2(proj[1], proj[0])
    if mask is not None:
        phi = torch.where(mask, phi, torch.full_like(phi, float("inf")))
    lo = percentile_nearest(phi, alpha, count)
    hi = percentile_nearest(phi, 100.0 - alpha, count)
    v_lo = plane @ torch.stack((torch.cos(lo), torch.sin(lo)))
    v_hi = plane @ torch.stack((torch.cos(hi), torch.sin(hi)))
    return torch.stack((v_lo, v_hi), 1) if bool(v_lo[0] > v_hi[0]) else torch.stack((v_hi, v_lo), 1)


def _vahadane_matrix(od_tissue, config: StainConfig):
    """Sparse non-negative factorisation ``OD ~ W C`` of tissue OD ``(3, n)``: ``W`` ``(3, 2)``.

    ``W`` non-negative with unit columns, H first. Alternating exact steps from Macenko's estimate:
    ``C`` by the closed-form non-negative lasso of every pixel, ``W`` by non-negative least
    squares of each channel (a 2 x 2 problem, solved in Python floats: it is too small for torch),
    over-relaxed (factor 1.5) to cut the zig-zag of plain alternation.
    """

    x = od_tissue
    w = _macenko_matrix(x, config.alpha).clamp_min(0.0)
    w = w / w.norm(dim=0, keepdim=True).clamp_min(1e-8)
    start = w.clone()
    relax = 1.5
    with _one_thread(x.device):
        w = _alternate(x, w, start, relax, config)
    return _order_h_first(w)


@contextmanager
def _one_thread(device):
    """Run a loop of many tiny CPU operations on one thread.

    Each step of Vahadane's loop works on ~1000 pixels: splitting it over threads costs more in
    synchronisation than it saves, and on a loaded machine (more threads than free cores) the
    OpenMP barriers make it 10-20x slower. Restores the thread count afterwards.
    """
    import torch

    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _alternate(x, w, start, relax: float, config: StainConfig):
    import torch

    for _ in range(config.iterations):
        c = nonnegative_lasso(w.T @ w, w.T @ x, config.sparsity)  # (2, n)
        gram = (c @ c.T).tolist()
        rhs = (c @ x.T).tolist()  # (2, 3)
        cols = [_nnls_2(gram, rhs[0][ch], rhs[1][ch]) for ch in range(3)]
        w_step = torch.tensor(cols, dtype=x.dtype, device=x.device)  # (3, 2)
        norms = w_step.norm(dim=0, keepdim=True)
        if bool((norms < 1e-8).any()):  # a stain died out: restart it
            w_step = torch.where(norms < 1e-8, start, w_step / norms.clamp_min(1e-8))
        else:
            w_step = w_step / norms
        w_new = (w + relax * (w_step - w)).clamp_min(0.0)
        w_new = w_new / w_new.norm(dim=0, keepdim=True).clamp_min(1e-8)
        moved = float((w_new - w).abs().max())
        w = w_new
        if moved < config.tolerance:
            break
    return w


def _nnls_2(gram: list, b0: float, b1: float) -> tuple[float, float]:
    """``min 0.5 c'Gc - b'c`` s.t. ``c >= 0`` for a 2 x 2 ``G`` given as nested lists."""
    g00, g01, g11 = gram[0][0], gram[0][1], gram[1][1]
    det = g00 * g11 - g01 * g01
    if det > 1e-12:
        c0 = (g11 * b0 - g01 * b1) / det
        c1 = (g00 * b1 - g01 * b0) / det
        if c0 >= 0 and c1 >= 0:
            return c0, c1
    r0 = max(b0, 0.0) / g00 if g00 > 1e-12 else 0.0
    r1 = max(b1, 0.0) / g11 if g11 > 1e-12 else 0.0
    return (r0, 0.0) if r0 * r0 * g00 >= r1 * r1 * g11 else (0.0, r1)


def _concentrations(od, fit: StainFit, config: StainConfig):
    """Stain concentrations ``(k, N)`` of OD pixels ``(3, N)`` under ``fit``'s stain matrix."""
    import torch

    w = fit.stain_matrix
    if fit.method is StainMethod.VAHADANE:
        return nonnegative_lasso(w.T @ w, w.T @ od, config.concentration_sparsity)
    return torch.linalg.pinv(w) @ od


def fit_stains(px, config: StainConfig, role: str = "image", od=None) -> StainFit:
    """Estimate the stain statistics of ``(3, N)`` uint8 pixels (a sample of the whole image).

    ``od``: their optical density, if already computed.
    """
    import torch

    if od is None:
        od = _od(px, _od_lut(config.light_intensity, px.device))
    mask = _tissue(px, od, config)
    n_tissue = _check_tissue(px, mask, config, role)
    if config.method is StainMethod.REINHARD:
        lab = rgb_to_lab(px.float() / 255.0)
        std = lab.std(dim=1).clamp_min(1e-6)
        return StainFit(StainMethod.REINHARD, lab_mean=lab.mean(dim=1), lab_std=std, tissue_pixels=n_tissue)
    if config.method is StainMethod.MACENKO:
        matrix = _macenko_matrix(od, config.alpha, mask, n_tissue)
    else:
        index = mask.nonzero().squeeze(1)
        step = max(1, -(-index.numel() // config.dictionary_pixels))
        matrix = _vahadane_matrix(od[:, index[::step]], config)
    fit = StainFit(config.method, stain_matrix=matrix, tissue_pixels=n_tissue)
    conc = _concentrations(od, fit, config)
    count = None
    if config.percentile_over_tissue:
        conc = torch.where(mask.unsqueeze(0), conc, torch.full_like(conc, float("inf")))
        count = n_tissue
    max_c = torch.stack([percentile_nearest(conc[i], config.percentile, count) for i in range(conc.shape[0])])
    if bool((max_c <= 1e-6).any()):
        raise InputError(
            f"{role}: expected two stains, got a stain with (almost) no concentration "
            f"({config.percentile:g}th percentile {max_c.tolist()}); the image may hold a single stain"
        )
    return StainFit(config.method, stain_matrix=matrix, max_concentration=max_c, tissue_pixels=n_tissue)


def map_stains(px, source: StainFit, target: StainFit, config: StainConfig, od=None):
    """Pixel-wise map of ``(3, N)`` uint8 pixels from ``source``'s stains to ``target``'s -> uint8."""
    import torch

    if source.method is StainMethod.REINHARD:
        lab = rgb_to_lab(px.float() / 255.0)
        scale = (target.lab_std / source.lab_std).unsqueeze(1)
        lab = (lab - source.lab_mean.unsqueeze(1)) * scale + target.lab_mean.unsqueeze(1)
        return lab_to_rgb(lab).mul_(255.0).round_().to(torch.uint8)
    if od is None:
        od = _od(px, _od_lut(config.light_intensity, px.device))
    ratio = (target.max_concentration / source.max_concentration).unsqueeze(1)
    # I_out = I0 exp(-OD_out) = exp(log I0 - OD_out): the log-intensity in one fused product
    log_i0 = torch.full((3, 1), math.log(config.light_intensity), dtype=od.dtype, device=od.device)
    if source.method is StainMethod.MACENKO:
        # OD_out = W_t diag(ratio) W_s^+ OD_in: one 3x3 matrix for all pixels
        mixing = target.stain_matrix @ (ratio * torch.linalg.pinv(source.stain_matrix))
        log_out = torch.addmm(log_i0, mixing, od, alpha=-1.0)
    else:
        log_out = torch.addmm(log_i0, target.stain_matrix, _concentrations(od, source, config) * ratio, alpha=-1.0)
    # truncated to 8 bits as the original Macenko code and torchstain do (not rounded), so that
    # outputs agree with theirs to the grey level, not just within one
    return log_out.exp_().clamp_max_(255.0).to(torch.uint8)


# -- public API ----------------------------------------------------------------------------------


class StainNormalizer:
    """Fit a reference once, then normalise many images or patches to it.

    ``transform`` accepts a :class:`Volume` (RGB ``(3, I, J)`` or ``(3, I, J, K)``) and returns one,
    or a channel-first tensor/array ``(3, ...)`` and returns a uint8 tensor of the same shape.
    """

    def __init__(self, config: StainConfig | None = None, device: Any = None) -> None:
        self.config = config if config is not None else StainConfig()
        self.device = torch_device(device)
        self.target: StainFit | None = None

    def fit(self, reference: Volume | Any) -> StainNormalizer:
        data = _data_of(reference, "reference")
        px, alpha = _rgb_pixels(data, "reference", self.device)
        self.target = fit_stains(_strided(px, self.config.max_samples, data.shape[-1], alpha), self.config,
                                 "reference")
        return self

    def fit_image(self, image: Volume | Any, role: str = "image") -> StainFit:
        """The stain statistics of ``image`` (from at most ``max_samples`` pixels)."""
        data = _data_of(image, role)
        px, alpha = _rgb_pixels(data, role, self.device)
        return fit_stains(_strided(px, self.config.max_samples, data.shape[-1], alpha), self.config, role)

    def transform(
        self,
        image: Volume | Any,
        progress: ProgressCallback | Reporter | None = None,
        cancel: CancelToken | None = None,
        source: StainFit | None = None,
    ) -> Volume | Any:
        """Normalise ``image`` to the fitted reference (``source``: the image's own fit, if known)."""
        import torch

        if self.target is None:
            raise InputError("stain normaliser: expected a fitted reference, got none; call fit(reference) first")
        rep = Reporter.of(progress, cancel)
        data = _data_of(image, "image")
        shape = tuple(data.shape)
        px, alpha = _rgb_pixels(data, "image", self.device)
        rep(0.0, "estimating the image's stains")
        n = px.shape[1]
        od = None
        if n <= self.config.chunk_pixels and self.config.method is not StainMethod.REINHARD:
            od = _od(px, _od_lut(self.config.light_intensity, px.device))  # shared by fit and map
        if source is None:
            step = sample_step(n, self.config.max_samples, shape[-1])
            sample = _opaque(px[:, ::step] if step > 1 else px, alpha, step)
            od_sample = None if od is None else _opaque(od[:, ::step], alpha, step).contiguous()
            source = fit_stains(sample, self.config, "image", od=od_sample)
        rep(0.1, "normalising")
        if od is not None:
            result = map_stains(px, source, self.target, self.config, od=od)
            rep(1.0, "normalising")
            return self._finish(image, result, shape, alpha)
        out = torch.empty_like(px)
        chunks = max(1, -(-n // self.config.chunk_pixels))
        for i in range(chunks):
            sl = slice(i * self.config.chunk_pixels, min(n, (i + 1) * self.config.chunk_pixels))
            out[:, sl] = map_stains(px[:, sl], source, self.target, self.config)
            rep(0.1 + 0.9 * (i + 1) / chunks, "normalising")
        return self._finish(image, out, shape, alpha)

    def _finish(self, image, out, shape, alpha):
        import torch

        result = out.view(3, *shape[1:])
        if alpha is not None:
            result = torch.cat((result, alpha.to(result.device, torch.uint8).unsqueeze(0)))
        if isinstance(image, Volume):
            return image.with_data(result.cpu().numpy(), stain_method=self.config.method.value)
        return result


def _data_of(image: Volume | Any, role: str):
    if isinstance(image, Volume):
        check_intensity(image, role, rgb=False)
        return image.data
    if getattr(image, "ndim", 0) < 2:
        raise InputError(f"{role}: expected a channel-first RGB array (3, ...), got {type(image).__name__}")
    return image


def adapt_stain(
    image: Volume,
    reference: Volume,
    config: StainConfig | None = None,
    progress: ProgressCallback | Reporter | None = None,
    cancel: CancelToken | None = None,
    device: Any = None,
) -> Volume:
    """Normalise the stain colours of an RGB histology image to those of a reference.

    Args:
        image: RGB(A) volume ``(3, I, J)`` (or ``(3, I, J, K)``), 8-bit values.
        reference: RGB(A) volume with the target staining (any size).
        config: method and parameters (:class:`StainConfig`); Macenko by default.
        device: torch device (``None``: CUDA, then MPS, then CPU).
    Returns:
        A uint8 RGB volume on the image's grid (alpha kept).
    Raises:
        InputError: grey or non-RGB input, no tissue found, NaN values, bad options.
    """
    config = config if config is not None else StainConfig()
    rep = Reporter.of(progress, cancel)
    norm = StainNormalizer(config, device)
    rep(0.0, "estimating the reference's stains")
    norm.fit(reference)
    return norm.transform(image, rep.stage(0.1, 1.0))


def separate_stains(
    image: Volume,
    method: Separation | str = Separation.HED,
    config: StainConfig | None = None,
    progress: ProgressCallback | Reporter | None = None,
    cancel: CancelToken | None = None,
    device: Any = None,
) -> dict[str, Volume]:
    """Stain concentrations of an RGB image, one scalar float32 volume per stain.

    ``hed`` uses Ruifrok & Johnston's fixed vectors and gives ``H``, ``E`` and ``DAB``;
    ``macenko`` and ``vahadane`` estimate two stains from the image and give ``H`` and ``E``
    (the second stain, whatever it is: eosin, or DAB on an IHC slide). Concentrations are optical
    densities along each stain vector (``OD = -log((I + 1) / I0)``).
    """
    import torch

    config = config if config is not None else StainConfig()
    try:
        method = Separation(method)
    except ValueError:
        raise InputError(
            f"stain separation: expected one of {', '.join(m.value for m in Separation)}, got '{method}'"
        ) from None
    rep = Reporter.of(progress, cancel)
    dev = torch_device(device)
    data = _data_of(image, "image")
    px, _ = _rgb_pixels(data, "image", dev)
    rep(0.0, "estimating stains")
    if method is Separation.HED:
        matrix = torch.as_tensor(RUIFROK_HED.T / np.linalg.norm(RUIFROK_HED, axis=1), dtype=torch.float32, device=dev)
        fit = StainFit(StainMethod.MACENKO, stain_matrix=matrix)
        names = ("H", "E", "DAB")
    else:
        cfg = StainConfig(**{**_config_dict(config), "method": StainMethod(method.value)})
        fit = fit_stains(_strided(px, cfg.max_samples, data.shape[-1]), cfg, "image")
        config = cfg
        names = ("H", "E")
    lut = _od_lut(config.light_intensity, dev)
    n = px.shape[1]
    conc = torch.empty((len(names), n), dtype=torch.float32, device=dev)
    chunks = max(1, -(-n // config.chunk_pixels))
    for i in range(chunks):
        sl = slice(i * config.chunk_pixels, min(n, (i + 1) * config.chunk_pixels))
        conc[:, sl] = _concentrations(_od(px[:, sl], lut), fit, config)
        rep((i + 1) / chunks, "separating stains")
    shape = tuple(data.shape[1:])
    stains = fit.stain_matrix.T.cpu().numpy().round(6).tolist()
    return {
        name: image.with_data(conc[i].view(1, *shape).cpu().numpy(), kind=Kind.INTENSITY, stain=name,
                              stain_vector=stains[i], units="optical density")
        for i, name in enumerate(names)
    }


def _config_dict(config: StainConfig) -> dict:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def tissue_mask(image: Volume, config: StainConfig | None = None, device: Any = None) -> Volume:
    """A label volume ``(1, I, J)``: 1 where there is tissue, by optical density or luminosity."""
    config = config if config is not None else StainConfig()
    dev = torch_device(device)
    data = _data_of(image, "image")
    px, _ = _rgb_pixels(data, "image", dev)
    mask = _tissue(px, _od(px, _od_lut(config.light_intensity, dev)), config)
    return image.with_data(mask.view(1, *data.shape[1:]).to("cpu").numpy().astype(np.uint8), kind=Kind.LABEL)


def hed_jitter(
    image: Any,
    sigma: float = 0.05,
    bias: float | None = None,
    generator: Any = None,
) -> Any:
    """HED colour augmentation (Tellez et al. 2018): per image, per stain ``c' = c * a + b``.

    ``a ~ U(1 - sigma, 1 + sigma)``, ``b ~ U(-bias, bias)`` (``bias`` defaults to ``sigma``;
    0.05 is "HED-light", 0.2 "HED-strong"), with the concentrations ``c`` of Ruifrok & Johnston's
    colour deconvolution in scikit-image's ``rgb2hed`` units, so the numbers mean what they mean in
    the paper (unlike ``rgb2hed`` negative concentrations are kept, so zero jitter is the identity).
    Vectorised over the batch: for training pipelines.

    Args:
        image: a torch tensor ``(..., 3, H, W)`` (uint8, or float in [0, 1]) with one draw per
            leading index, or an RGB :class:`Volume` ``(3, I, J)`` (one draw).
        generator: a ``torch.Generator`` for reproducible draws.
    Returns:
        The same type, shape and dtype.
    """
    import torch

    bias = sigma if bias is None else bias
    if not (0.0 <= sigma < 1.0) or not (0.0 <= bias <= 1.0):
        raise InputError(f"HED jitter: expected 0 <= sigma < 1 and 0 <= bias <= 1, got sigma={sigma}, bias={bias}")
    if isinstance(image, Volume):
        check_intensity(image, "image", rgb=True)
        px, alpha = _rgb_pixels(image.data, "image", torch.device("cpu"))
        out = hed_jitter(px.view(3, -1, 1), sigma, bias, generator).view(3, *image.spatial_shape)
        if alpha is not None:
            out = torch.cat((out, alpha.unsqueeze(0)))
        src = image.numpy()
        if np.issubdtype(src.dtype, np.floating):  # back to the input's dtype and scale ([0, 1] or 0-255)
            scale = 255.0 if float(src[:3].max(initial=0.0)) > 1.0 else 1.0
            return image.with_data((out.numpy().astype(np.float64) * (scale / 255.0)).astype(src.dtype))
        return image.with_data(out.numpy().astype(src.dtype))
    x = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if x.dim() < 3 or x.shape[-3] != 3:
        raise InputError(f"HED jitter: expected a tensor (..., 3, H, W), got shape {tuple(x.shape)}")
    is_byte = x.dtype == torch.uint8
    rgb = x.float() / 255.0 if is_byte else x.float()
    if not bool(torch.isfinite(rgb).all()):
        raise InputError("HED jitter: expected finite values, got NaN or infinite pixels")
    lead = rgb.shape[:-3]
    shape = (*lead, 3, 1, 1)
    a = 1.0 + (torch.rand(shape, generator=generator) * 2.0 - 1.0) * sigma
    b = (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bias
    a, b = a.to(rgb.device), b.to(rgb.device)
    rgb_from_hed = torch.as_tensor(_rgb_from_hed(), dtype=torch.float32, device=rgb.device)
    hed_from_rgb = torch.linalg.inv(rgb_from_hed)
    log_adjust = math.log(1e-6)
    # scikit-image rgb2hed: stains = (log(rgb) / log(1e-6)) @ hed_from_rgb (not clipped at 0 here,
    # so zero jitter gives the image back)
    log_rgb = torch.log(rgb.clamp_min(1e-6)) / log_adjust
    hed = torch.einsum("...chw,cs->...shw", log_rgb, hed_from_rgb)
    hed = hed * a + b
    # scikit-image hed2rgb: rgb = exp((stains * log(1e-6)) @ rgb_from_hed)
    out = torch.exp(torch.einsum("...shw,sc->...chw", hed * log_adjust, rgb_from_hed)).clamp(0.0, 1.0)
    if is_byte:
        return out.mul(255.0).round().to(torch.uint8)
    return out.to(x.dtype)


def _rgb_from_hed() -> np.ndarray:
    """scikit-image's ``rgb_from_hed`` (rows H, E, DAB; Ruifrok & Johnston's values as given)."""
    return RUIFROK_HED.copy()
