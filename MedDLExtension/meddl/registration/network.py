"""The registration network: a small U-Net predicting a stationary velocity field.

VoxelMorph-diff style (Dalca et al. 2018; SCIENCE.md "Registration"): the U-Net takes the
channel-stacked ``(fixed, moving)`` pair and outputs a velocity ``v`` in voxels of its input grid;
``exp(v)`` by scaling and squaring (:func:`meddl.registration.svf.integrate`) is the
diffeomorphic displacement. Trained contrast-agnostic on synthetic pairs
(:mod:`meddl.registration.synth`, :mod:`meddl.registration.train`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.unet import UNet
from .svf import integrate

__all__ = ["VelocityNet", "SegmentationNet", "correlation", "correlation_offsets"]


def correlation(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """Local correlation ``<a(x), b(x + o)>`` for every offset ``o`` in ``[-radius, radius]^nd``.

    ``a``, ``b``: ``(N, C, *S)`` feature maps (``b`` zero beyond its edges). Returns
    ``(N, (2 radius + 1)^nd, *S)``, offsets in C order (last axis fastest), as :func:`correlation_offsets`.
    """
    nd = a.dim() - 2
    sizes = a.shape[2:]
    padded = F.pad(b, [radius] * (2 * nd))
    out = []
    for offset in itertools.product(range(2 * radius + 1), repeat=nd):
        window = padded[(slice(None), slice(None), *(slice(o, o + n) for o, n in zip(offset, sizes, strict=True)))]
        out.append((a * window).sum(1))
    return torch.stack(out, 1)


def correlation_offsets(radius: int, nd: int) -> torch.Tensor:
    """``(nd, (2 radius + 1)^nd)``: the offsets (voxels) of :func:`correlation`'s channels."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return torch.stack(torch.meshgrid(*([r] * nd), indexing="ij")).reshape(nd, -1)


class VelocityNet(nn.Module):
    """``(N, 2, *S)`` pair -> velocity ``(N, ndim, *S)`` in voxels; ``S`` divisible by ``2**(levels-1)``.

    With ``correlation_radius > 0`` (the bundled model) the pair is not simply stacked: a shared
    encoder maps each image to unit feature vectors, their local correlation over every offset up to
    the radius gives a cost volume (PWC-Net / PDD-Net style), its soft-argmax is a first
    displacement estimate, and the U-Net, fed the compressed cost volume, the fixed image's
    features and that estimate, predicts the correction. Matching is then explicit, so the network
    learns in hundreds of CPU steps what the stacked U-Net had not learnt in thousands.

    Args:
        spatial_dims: 2 or 3.
        features: U-Net channels per level.
        steps: scaling-and-squaring steps used by :meth:`displacement`.
        correlation_radius: largest matching offset (voxels); 0 stacks the two images instead.
        feature_channels: channels of the shared encoder (with a correlation).
    """

    def __init__(self, spatial_dims: int = 3, features: tuple[int, ...] | list[int] = (8, 16, 16, 32),
                 steps: int = 7, correlation_radius: int = 0, feature_channels: int = 8) -> None:
        super().__init__()
        self.spatial_dims = int(spatial_dims)
        self.features = tuple(int(f) for f in features)
        self.steps = int(steps)
        self.correlation_radius = int(correlation_radius)
        self.feature_channels = int(feature_channels)
        conv = nn.Conv3d if self.spatial_dims == 3 else nn.Conv2d
        if self.correlation_radius > 0:
            fc = self.feature_channels
            norm = nn.InstanceNorm3d if self.spatial_dims == 3 else nn.InstanceNorm2d
            self.encoder = nn.Sequential(
                conv(1, fc, 3, padding=1), norm(fc, affine=True), nn.LeakyReLU(0.2),
                conv(fc, fc, 3, padding=1), nn.LeakyReLU(0.2), conv(fc, fc, 3, padding=1),
            )
            offsets = (2 * self.correlation_radius + 1) ** self.spatial_dims
            self.compress = nn.Sequential(conv(offsets, 2 * fc, 1), nn.LeakyReLU(0.2))
            self.register_buffer("offsets", correlation_offsets(self.correlation_radius, self.spatial_dims),
                                 persistent=False)
            self.sharpness = nn.Parameter(torch.tensor(10.0))
            in_channels = 3 * fc + self.spatial_dims
        else:
            in_channels = 2
        self.unet = UNet(self.spatial_dims, in_channels=in_channels, out_channels=self.spatial_dims,
                         features=self.features)
        # Start near the identity transform (VoxelMorph initialises the flow head with N(0, 1e-5)).
        nn.init.normal_(self.unet.head.weight, std=1e-5)
        nn.init.zeros_(self.unet.head.bias)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.features) - 1)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Velocity ``(N, ndim, *S)`` (voxels) for ``fixed`` and ``moving`` ``(N, 1, *S)`` in [0, 1]."""
        if self.correlation_radius == 0:
            return self.unet(torch.cat([fixed, moving], dim=1))
        a = F.normalize(self.encoder(fixed), dim=1)
        b = F.normalize(self.encoder(moving), dim=1)
        cost = correlation(a, b, self.correlation_radius)
        estimate = torch.einsum("dk,nk...->nd...", self.offsets, torch.softmax(cost * self.sharpness, dim=1))
        return estimate + self.unet(torch.cat([self.compress(cost), a, estimate], dim=1))

    def displacement(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(velocity, exp(velocity))``, both ``(N, ndim, *S)`` in voxels."""
        v = self(fixed, moving)
        return v, integrate(v, self.steps)


class SegmentationNet(nn.Module):
    """Tissue segmentation U-Net whose frozen encoder is the DeepSim feature extractor.

    Trained on synthetic images (random contrasts) to segment background / CSF / grey / white
    matter, so its features are semantic and contrast-agnostic (Czolbe et al., DeepSim).
    ``(N, 1, *S)`` -> logits ``(N, classes, *S)``; :meth:`encode` gives one map per level.
    """

    def __init__(self, spatial_dims: int = 3, classes: int = 4,
                 features: tuple[int, ...] | list[int] = (8, 16, 32)) -> None:
        super().__init__()
        self.spatial_dims = int(spatial_dims)
        self.features = tuple(int(f) for f in features)
        self.classes = int(classes)
        self.unet = UNet(self.spatial_dims, in_channels=1, out_channels=self.classes, features=self.features)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.features) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.unet.encode(x)
