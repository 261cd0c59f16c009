"""A small configurable U-Net for 2D and 3D (the backbone the capabilities build on)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet"]


def _conv(spatial_dims: int):
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


class _Block(nn.Module):
    def __init__(self, spatial_dims: int, cin: int, cout: int) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        self.body = nn.Sequential(
            conv(cin, cout, 3, padding=1), norm(cout, affine=True), nn.LeakyReLU(0.2, inplace=True),
            conv(cout, cout, 3, padding=1), norm(cout, affine=True), nn.LeakyReLU(0.2, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNet(nn.Module):
    """U-Net: ``features[i]`` channels at level i, max-pool down, linear upsampling and skip concat.

    Input ``(N, in_channels, *spatial)`` with every spatial size divisible by ``2 ** (len(features) - 1)``;
    output ``(N, out_channels, *spatial)``. ``encode`` returns the feature map of every encoder level
    (used as a frozen feature extractor, e.g. DeepSim).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1,
                 features: tuple[int, ...] | list[int] = (16, 32, 64)) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"UNet: expected spatial_dims 2 or 3, got {spatial_dims}")
        features = tuple(int(f) for f in features)
        self.spatial_dims = spatial_dims
        self.levels = len(features)
        self.down = nn.ModuleList()
        cin = in_channels
        for f in features:
            self.down.append(_Block(spatial_dims, cin, f))
            cin = f
        self.up = nn.ModuleList(
            _Block(spatial_dims, features[i + 1] + features[i], features[i]) for i in reversed(range(self.levels - 1))
        )
        self.head = _conv(spatial_dims)(features[0], out_channels, 1)
        self.pool = nn.MaxPool3d(2) if spatial_dims == 3 else nn.MaxPool2d(2)
        self._mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.levels - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"UNet: spatial size {tuple(x.shape[2:])} must be divisible by {factor}; pad the input")
        feats = self.encode(x)
        x = feats[-1]
        for block, skip in zip(self.up, reversed(feats[:-1]), strict=True):
            x = nn.functional.interpolate(x, size=skip.shape[2:], mode=self._mode, align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
