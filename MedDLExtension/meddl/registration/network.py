"""The registration network: a small U-Net predicting a stationary velocity field.

VoxelMorph-diff style (Dalca et al. 2018; SCIENCE.md "Registration"): the U-Net takes the
channel-stacked ``(fixed, moving)`` pair and outputs a velocity ``v`` in voxels of its input grid;
``exp(v)`` by scaling and squaring (:func:`meddl.registration.svf.integrate`) is the
diffeomorphic displacement. Trained contrast-agnostic on synthetic pairs
(:mod:`meddl.registration.synth`, :mod:`meddl.registration.train`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nets.unet import UNet
from .svf import integrate

__all__ = ["VelocityNet", "SegmentationNet"]


class VelocityNet(nn.Module):
    """``(N, 2, *S)`` pair -> velocity ``(N, ndim, *S)`` in voxels; ``S`` divisible by ``2**(levels-1)``.

    Args:
        spatial_dims: 2 or 3.
        features: U-Net channels per level.
        steps: scaling-and-squaring steps used by :meth:`displacement`.
    """

    def __init__(self, spatial_dims: int = 3, features: tuple[int, ...] | list[int] = (8, 16, 16, 32),
                 steps: int = 7) -> None:
        super().__init__()
        self.spatial_dims = int(spatial_dims)
        self.features = tuple(int(f) for f in features)
        self.steps = int(steps)
        self.unet = UNet(self.spatial_dims, in_channels=2, out_channels=self.spatial_dims, features=self.features)
        # Start near the identity transform (VoxelMorph initialises the flow head with N(0, 1e-5)).
        nn.init.normal_(self.unet.head.weight, std=1e-5)
        nn.init.zeros_(self.unet.head.bias)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.features) - 1)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Velocity ``(N, ndim, *S)`` (voxels) for ``fixed`` and ``moving`` ``(N, 1, *S)`` in [0, 1]."""
        return self.unet(torch.cat([fixed, moving], dim=1))

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
