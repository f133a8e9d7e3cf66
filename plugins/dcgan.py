"""A global DCGAN-style discriminator: one logit per image, suited to small images such as MNIST.

Registered as ``dcgan`` in ``vaegan.discriminators``:

.. code-block:: yaml

    discriminator:
      name: dcgan
      options: {n_layers: 2, base_width: 64, norm: none, spectral_norm: true}
"""

from __future__ import annotations

from typing import List, Tuple

from einops import rearrange
from torch import Tensor, nn

from vaegan.api import Discriminator, DiscriminatorOutput
from vaegan.errors import ConfigError

from ._layers import check_norm, check_positive_int, make_norm, maybe_spectral, min_side, spatial_sizes

__all__ = ["DCGAN"]

_MAX_MULT = 8  # widths double per layer up to 8 x base_width


class DCGAN(Discriminator):
    """Radford et al.'s discriminator: stride-2 4x4 convs with LeakyReLU(0.2), then a linear logit.

    The final linear layer reads the whole last feature map, so any (H, W) the depth allows works
    (DCGAN's original 4x4 "valid" conv only fits 64x64). The default is SN-DCGAN (Miyato et al.
    2018): spectral normalisation and no normalisation layer, so there are no batch statistics to
    diverge across DDP ranks or to couple the real and fake batches. ``norm: batch`` gives the
    original DCGAN (then see the SyncBatchNorm note in docs/plugins.md).

    Args:
        image_shape: (C, H, W) of the images; any channel count.
        n_layers: Stride-2 conv layers; images need a side of at least ``2**n_layers`` pixels.
        base_width: Channels of the first conv (then x2 per layer, capped at 8x).
        norm: ``none`` (default), ``group``, ``instance`` or ``batch``; never on the first layer.
        spectral_norm: Wrap every conv and the linear head in spectral normalisation.
        dropout: Dropout probability after each hidden layer (0 disables it).

    Raises:
        ConfigError: unknown norm, invalid sizes or dropout, or images too small for ``n_layers``.

    Example:
        >>> d = DCGAN((1, 28, 28), n_layers=2, base_width=16)
        >>> out = d(torch.rand(4, 1, 28, 28))
        >>> out.logits.shape, [f.shape[-1] for f in out.features]
        (torch.Size([4, 1]), [14, 7])
    """

    def __init__(self, image_shape: Tuple[int, int, int], n_layers: int = 2, base_width: int = 64,
                 norm: str = "none", spectral_norm: bool = True, dropout: float = 0.0) -> None:
        super().__init__(image_shape)
        c, h, w = self.image_shape
        check_positive_int(n_layers, "n_layers", "dcgan")
        check_positive_int(base_width, "base_width", "dcgan")
        check_norm(norm, "dcgan")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dcgan: dropout must be in [0, 1), got {dropout!r}.")
        geometry = ((4, 2, 1),) * n_layers
        sizes = spatial_sizes((h, w), geometry)
        if len(sizes) < n_layers or min(sizes[-1]) < 1:
            need = min_side(geometry)
            raise ConfigError(
                f"dcgan with n_layers={n_layers} needs images of at least {need}x{need} pixels, got "
                f"{h}x{w}. Lower discriminator.options.n_layers (each layer halves the size) or use "
                "larger images."
            )
        bias = norm == "none"
        blocks: List[nn.Module] = []
        c_in = c
        for i in range(n_layers):
            width = base_width * min(2**i, _MAX_MULT)
            conv = nn.Conv2d(c_in, width, 4, stride=2, padding=1, bias=bias or i == 0)  # (B, width, H/2, W/2)
            layers: List[nn.Module] = [maybe_spectral(conv, spectral_norm)]
            if i > 0:  # DCGAN leaves the input layer unnormalised
                layers.append(make_norm(norm, width))
            layers.append(nn.LeakyReLU(0.2))
            if dropout > 0:
                layers.append(nn.Dropout2d(float(dropout)))
            blocks.append(nn.Sequential(*layers))
            c_in = width
        self.blocks = nn.ModuleList(blocks)
        h_out, w_out = sizes[-1]
        self.head = maybe_spectral(nn.Linear(c_in * h_out * w_out, 1), spectral_norm)

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        """Logits (B, 1) and the output of every conv block (B, C_i, H / 2**i, W / 2**i)."""
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return DiscriminatorOutput(self.head(rearrange(x, "b c h w -> b (c h w)")), tuple(features))
