"""vaegan's small default discriminator (``simple``); the contract is :class:`vaegan.api.Discriminator`.

Richer designs (PatchGAN, DCGAN) are first-party plugins in ``vaegan_plugins``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from . import api
from ._deprecation import deprecated_names
from .errors import ConfigError

__all__ = ["SimpleDiscriminator"]


class SimpleDiscriminator(api.Discriminator):
    """A compact global discriminator: strided 4x4 convs with LeakyReLU, then one logit per image.

    No BatchNorm (no running statistics to diverge across DDP ranks, and no coupling between real
    and fake batches); spectral normalisation by default for a stable, Lipschitz-bounded critic.

    Args:
        image_shape: (C, H, W).
        channels: Widths of the strided conv layers; each halves H and W.
        spectral_norm: Wrap every conv/linear in spectral normalisation.

    Raises:
        ConfigError: the images are too small for that many stride-2 layers.

    Example:
        >>> d = SimpleDiscriminator((1, 28, 28))
        >>> d(torch.rand(2, 1, 28, 28)).logits.shape
        torch.Size([2, 1])
    """

    def __init__(self, image_shape: Tuple[int, int, int], channels: Sequence[int] = (64, 128), spectral_norm: bool = True) -> None:
        super().__init__(image_shape)
        c, h, w = image_shape
        if min(h, w) < 2 ** len(channels):
            raise ConfigError(
                f"The 'simple' discriminator with {len(channels)} stride-2 layers needs images of at "
                f"least {2 ** len(channels)}x{2 ** len(channels)}, got {h}x{w}. Use fewer 'channels'."
            )
        wrap = _sn if spectral_norm else (lambda m: m)
        self.blocks = nn.ModuleList()
        for width in channels:
            self.blocks.append(nn.Sequential(wrap(nn.Conv2d(c, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)))
            c = width
            h, w = h // 2, w // 2
        self.head = wrap(nn.Linear(c * h * w, 1))

    def forward(self, x: Tensor) -> api.DiscriminatorOutput:
        features: List[Tensor] = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return api.DiscriminatorOutput(self.head(rearrange(x, "b c h w -> b (c h w)")), tuple(features))


# vaegan 0.1 defined the discriminator contract here; it is in vaegan.api now.
__getattr__ = deprecated_names(__name__, {"Discriminator": "vaegan.api:Discriminator",
                                          "DiscriminatorOutput": "vaegan.api:DiscriminatorOutput"})
