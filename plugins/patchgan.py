"""PatchGAN: a fully convolutional discriminator that judges overlapping patches (pix2pix, VQGAN).

Registered as ``patchgan`` in ``vaegan.discriminators``:

.. code-block:: yaml

    discriminator:
      name: patchgan
      options: {n_layers: 3, base_width: 64, norm: group, spectral_norm: false}
"""

from __future__ import annotations

from typing import List, Tuple

from torch import Tensor, nn

from vaegan.api import Discriminator, DiscriminatorOutput
from vaegan.errors import ConfigError

from ._layers import check_norm, check_positive_int, make_norm, maybe_spectral, min_side, spatial_sizes

__all__ = ["PatchGAN"]

_MAX_MULT = 8  # widths grow x2 per layer up to 8 x base_width (the pix2pix / VQGAN cap)


class PatchGAN(Discriminator):
    """The pix2pix / VQGAN "NLayerDiscriminator": one logit per receptive-field patch.

    ``n_layers`` stride-2 4x4 convs (the first without normalisation), one stride-1 4x4 conv, and a
    stride-1 4x4 conv to one channel. With ``n_layers=3`` each logit sees a 70x70 patch; on 28x28
    MNIST the map is 1x1, on 256x256 images it is 30x30. The adversarial losses average over the map,
    so a weight means the same at any image size.

    Norms come from a registry (``batch``, ``instance``, ``group``, ``none``). The default ``group``
    keeps no running statistics, so it is correct under DDP with no conversion and does not couple
    the real and fake batches; ``batch`` is the pix2pix original but its per-process statistics need
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` in a multi-process run (the trainer does not
    convert; see docs/plugins.md).

    Args:
        image_shape: (C, H, W) of the images; any channel count.
        n_layers: Stride-2 layers; images need a side of at least ``3 * 2**n_layers`` pixels.
        base_width: Channels of the first layer (then x2 per layer, capped at 8x).
        norm: ``group`` (default), ``instance``, ``batch`` or ``none``.
        spectral_norm: Wrap every conv in spectral normalisation.

    Raises:
        ConfigError: unknown norm, non-positive sizes, or images too small for ``n_layers``.

    Example:
        >>> d = PatchGAN((3, 64, 64), n_layers=3, base_width=16)
        >>> out = d(torch.rand(2, 3, 64, 64))
        >>> out.logits.shape, len(out.features)
        (torch.Size([2, 1, 6, 6]), 4)
    """

    def __init__(self, image_shape: Tuple[int, int, int], n_layers: int = 3, base_width: int = 64,
                 norm: str = "group", spectral_norm: bool = False) -> None:
        super().__init__(image_shape)
        c, h, w = self.image_shape
        check_positive_int(n_layers, "n_layers", "patchgan")
        check_positive_int(base_width, "base_width", "patchgan")
        check_norm(norm, "patchgan")
        # (kernel, stride, padding) of every conv, the head included.
        geometry = ((4, 2, 1),) * n_layers + ((4, 1, 1), (4, 1, 1))
        sizes = spatial_sizes((h, w), geometry)
        if len(sizes) < len(geometry) or min(sizes[-1]) < 1:
            need = min_side(geometry)
            raise ConfigError(
                f"patchgan with n_layers={n_layers} needs images of at least {need}x{need} pixels, got "
                f"{h}x{w}. Lower discriminator.options.n_layers (each layer halves the size) or use "
                "larger images."
            )
        bias = norm == "none"  # a norm with an affine shift makes the conv bias redundant
        widths = [base_width * min(2**i, _MAX_MULT) for i in range(n_layers + 1)]
        blocks: List[nn.Module] = [nn.Sequential(
            maybe_spectral(nn.Conv2d(c, widths[0], 4, stride=2, padding=1), spectral_norm), nn.LeakyReLU(0.2))]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1  # the last feature layer keeps the resolution (pix2pix)
            conv = nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=bias)
            blocks.append(nn.Sequential(
                maybe_spectral(conv, spectral_norm),
                make_norm(norm, widths[i]),
                nn.LeakyReLU(0.2),
            ))
        self.blocks = nn.ModuleList(blocks)
        self.head = maybe_spectral(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1), spectral_norm)
        self.logits_size = sizes[-1]  # (h', w') of the logit map

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        """Logits (B, 1, h', w'), one per patch, and the output of every block (B, C_i, H_i, W_i)."""
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return DiscriminatorOutput(self.head(x), tuple(features))
