"""Focal frequency loss (Jiang et al., ICCV 2021): a spectrum loss that focuses on the frequencies
the decoder gets most wrong, which for a blurry VAE are the high ones (edges).

Registered as ``focal_frequency`` in ``vaegan.losses``:

.. code-block:: yaml

    losses:
      - {name: bce}
      - {name: kl}
      - {name: focal_frequency, weight: 1.0, options: {alpha: 1.0}}

Written here rather than adding the ``focal-frequency-loss`` package as a dependency: the loss is
~20 lines, and vaegan needs control over two details a drop-in module would hide: the FFT in fp32
with autocast off, and the 0 / 0 of the weight normalisation at a perfect reconstruction.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor

from vaegan.api import LossTerm, Player, TermInputs
from vaegan.errors import ConfigError

__all__ = ["FocalFrequencyLoss"]


class FocalFrequencyLoss(LossTerm):
    """``mean(w * |F(recon) - F(real)|^2)`` with the focal weight ``w = |F(recon) - F(real)|^alpha``,
    normalised to [0, 1] and detached.

    ``F`` is the orthonormal 2-D FFT, computed in fp32 with autocast disabled (cuFFT has no bf16,
    and fp16 FFTs lose the small high-frequency coefficients this loss is about). Frequencies whose
    error is large get weight near 1, the ones already right near 0, so the gradient concentrates on
    the hard frequencies.

    Reduction: the orthonormal FFT preserves energy (Parseval), so the weighted squared spectrum
    difference is averaged over frequencies, channels and batch exactly like a per-pixel MSE; with
    ``alpha=0`` (all weights 1) the loss *is* the pixel MSE. A weight means the same at any size.
    The focal weights are normalised per image, channel and patch (or over the batch).

    Args:
        alpha: Focusing exponent; 0 disables the focus.
        patch_factor: Split each image into ``patch_factor x patch_factor`` patches and compare their
            spectra (local frequencies); the image sides must be divisible by it.
        log_weight: Use ``log(1 + |diff|^alpha)`` before normalising (softer focus).
        batch_weight: Normalise the weights by the maximum over the whole batch instead of per image.

    Raises:
        ValueError: a negative alpha or a patch_factor below 1.
        ConfigError: (at the first step) image sides not divisible by ``patch_factor``.

    Example:
        >>> FocalFrequencyLoss(alpha=1.0).alpha
        1.0
    """

    player: ClassVar[Player] = "generator"

    def __init__(self, alpha: float = 1.0, patch_factor: int = 1, log_weight: bool = False,
                 batch_weight: bool = False, image_shape: Optional[Tuple[int, int, int]] = None) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"focal_frequency: alpha must be a finite number >= 0, got {alpha!r}.")
        if isinstance(patch_factor, bool) or not isinstance(patch_factor, int) or patch_factor < 1:
            raise ValueError(f"focal_frequency: patch_factor must be an integer >= 1, got {patch_factor!r}.")
        self.alpha = float(alpha)
        self.patch_factor = patch_factor
        self.log_weight = bool(log_weight)
        self.batch_weight = bool(batch_weight)
        if image_shape is not None:  # given by the trainer: refuse a bad patch_factor before training
            self._spectrum(torch.zeros(1, *image_shape))

    def _spectrum(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> complex spectra (B, C, P, H / p, W / p) of the P = p * p patches."""
        p = self.patch_factor
        h, w = x.shape[-2:]
        if h % p or w % p:
            raise ConfigError(f"focal_frequency: image size {h}x{w} is not divisible by patch_factor={p}; "
                              "choose a patch_factor that divides both sides.")
        patches = rearrange(x, "b c (ph h) (pw w) -> b c (ph pw) h w", ph=p, pw=p)
        return torch.fft.fft2(patches, norm="ortho")

    def forward(self, inputs: TermInputs) -> Tensor:
        """The focal-weighted mean squared spectrum difference."""
        recon = inputs.output.recon
        with torch.autocast(device_type=recon.device.type, enabled=False):
            diff = self._spectrum(recon.float()) - self._spectrum(inputs.real.detach().float())
            distance = diff.real.pow(2) + diff.imag.pow(2)  # |diff|^2, smooth at 0 (no abs, no sqrt)
            with torch.no_grad():
                weight = distance.sqrt().pow(self.alpha)  # |diff|^alpha, (B, C, P, h, w)
                if self.log_weight:
                    weight = torch.log1p(weight)
                dims = tuple(range(weight.ndim)) if self.batch_weight else (-2, -1)
                peak = weight.amax(dim=dims, keepdim=True)
                # A spectrum that is already exact (peak 0) gets weight 0, not 0 / 0.
                weight = torch.where(peak > 0, weight / peak.clamp_min(torch.finfo(weight.dtype).tiny),
                                     torch.zeros_like(weight)).clamp(0.0, 1.0)
            return (weight * distance).mean()
