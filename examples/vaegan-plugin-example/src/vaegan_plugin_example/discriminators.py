"""A tiny fully connected discriminator: any image size, any channel count."""

from __future__ import annotations

from typing import Tuple

from einops import rearrange
from torch import Tensor, nn

from vaegan.api import Discriminator, DiscriminatorOutput

__all__ = ["MLPDiscriminator"]


class MLPDiscriminator(Discriminator):
    """Flatten, one hidden LeakyReLU layer, one logit per image; the hidden layer is the feature.

    Args:
        image_shape: (C, H, W), passed by vaegan.
        hidden: Width of the hidden layer.

    Raises:
        ValueError: hidden < 1.

    Example:
        >>> d = MLPDiscriminator((1, 28, 28), hidden=32)
        >>> d(torch.rand(2, 1, 28, 28)).logits.shape
        torch.Size([2, 1])
    """

    def __init__(self, image_shape: Tuple[int, int, int], hidden: int = 256) -> None:
        super().__init__(image_shape)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"mlp: hidden must be an integer >= 1, got {hidden!r}.")
        c, h, w = self.image_shape
        self.body = nn.Sequential(nn.Linear(c * h * w, hidden), nn.LeakyReLU(0.2))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        feature = self.body(rearrange(x, "b c h w -> b (c h w)"))  # (B, hidden)
        return DiscriminatorOutput(self.head(feature), (feature,))
