"""A tiny generator with a *spatial* latent (B, c, h, w), defined here to prove that nothing in vaegan
assumes a vector latent: conftest registers it as ``tiny_spatial`` in ``vaegan.generators``, so every
generator contract test, loss term, metric, command, checkpoint/resume and the 2-process run meet it.
"""

from __future__ import annotations

from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from vaegan.api import VAE, DiagonalGaussian

__all__ = ["SpatialVAE", "NAME", "VALUE", "register"]

NAME = "tiny_spatial"
VALUE = "spatial_generator:SpatialVAE"


def _half(size: Tuple[int, int]) -> Tuple[int, int]:
    return ((size[0] + 1) // 2, (size[1] + 1) // 2)  # a 3x3 stride-2 conv with padding 1


class SpatialVAE(VAE):
    """Two stride-2 convs down to a ``latent_channels`` x H/4 x W/4 latent, nearest upsampling back.

    Args:
        image_shape: (C, H, W). output_range: ``unit`` or ``symmetric``.
        latent_channels: Channels of the latent map.
        width: Channels of the hidden layers.
    """

    def __init__(self, image_shape: Tuple[int, int, int], output_range: str = "unit", latent_channels: int = 2,
                 width: int = 8) -> None:
        super().__init__(image_shape, output_range)
        c, h, w = self.image_shape
        self.sizes = [(h, w), _half((h, w)), _half(_half((h, w)))]
        self.latent_shape = (latent_channels, *self.sizes[-1])
        self.encoder = nn.Sequential(
            nn.Conv2d(c, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * latent_channels, 1),  # (B, 2c, h, w): mean and log-variance
        )
        self.inlet = nn.Conv2d(latent_channels, width, 1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, c, 3, padding=1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return self.posterior(self.encoder(x))

    def decode_logits(self, z: Tensor) -> Tensor:
        x = F.silu(self.inlet(z))  # (B, width, h, w)
        x = F.silu(self.mid(F.interpolate(x, size=self.sizes[1], mode="nearest")))
        return self.out(F.interpolate(x, size=self.sizes[0], mode="nearest"))  # (B, C, H, W)

    @property
    def last_layer(self) -> Tensor:
        return self.out.weight


def register() -> None:
    """Make ``tiny_spatial`` a generator plugin of this process (tests, and the test subprocesses)."""
    from vaegan import registry

    registry.register("vaegan.generators", NAME, VALUE)
