"""Network building blocks shared by the capabilities."""

from .unet import UNet

__all__ = ["UNet"]
