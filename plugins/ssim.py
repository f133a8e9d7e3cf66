"""SSIM / MS-SSIM reconstruction loss through torchmetrics' functional implementation.

Registered as ``ssim`` in ``vaegan.losses``:

.. code-block:: yaml

    losses:
      - {name: l1}
      - {name: ssim, weight: 0.2, options: {ms: false, kernel_size: 7}}
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure as _ms_ssim,
)
from torchmetrics.functional.image import (
    structural_similarity_index_measure as _ssim,
)

from vaegan.api import LossTerm, Player, TermInputs
from vaegan.errors import ConfigError

__all__ = ["SSIMLoss"]


class SSIMLoss(LossTerm):
    """``1 - SSIM(recon, real)`` (Wang et al. 2004), or ``1 - MS-SSIM`` (Wang et al. 2003) with ``ms``.

    SSIM compares local means, variances and covariance in a Gaussian window, so it rewards sharp,
    well-placed structure that a per-pixel loss averages away. The data range is taken from
    ``inputs.value_range``. Computed in fp32 with autocast disabled (the local variances are
    differences of nearly equal numbers, which bf16 cannot resolve).

    MS-SSIM uses torchmetrics' ``normalize="simple"`` ((x + 1) / 2 before the powers): with the
    default ``"relu"`` a negative contrast term is clamped to 0 and ``0 ** beta`` has an infinite
    derivative, which gives NaN gradients early in training. MS-SSIM needs large images (five scales
    and an 11-pixel window need more than 160 pixels a side); smaller ones raise a ConfigError
    suggesting a smaller ``kernel_size``, fewer ``betas`` or ``ms: false``.

    Reduction: SSIM is a mean over the window positions of each image (and over channels), then over
    the batch, so the weight means the same at any image size. The loss is in [0, 2]; 0 is a
    perfect reconstruction.

    Args:
        ms: Use multi-scale SSIM.
        kernel_size: Side of the Gaussian window (odd).
        sigma: Standard deviation of the Gaussian window, in pixels.
        betas: MS-SSIM's per-scale exponents (their count is the number of scales); None keeps the
            published five.

    Raises:
        ValueError: an even or non-positive kernel size, a non-positive sigma, or empty betas.
        ConfigError: (at the first step) images too small for MS-SSIM with these options.

    Example:
        >>> SSIMLoss(ms=True, kernel_size=3, betas=[0.3, 0.3, 0.4]).betas
        (0.3, 0.3, 0.4)
    """

    player: ClassVar[Player] = "generator"

    def __init__(self, ms: bool = False, kernel_size: int = 11, sigma: float = 1.5,
                 betas: Optional[Sequence[float]] = None, image_shape: Optional[Tuple[int, int, int]] = None) -> None:
        super().__init__()
        if not isinstance(ms, bool):
            raise ValueError(f"ssim: ms must be true or false, got {ms!r}.")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ssim: kernel_size must be an odd integer >= 1, got {kernel_size!r}.")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"ssim: sigma must be a positive number, got {sigma!r}.")
        if betas is not None and (len(betas) == 0 or not all(isinstance(b, (int, float)) and b >= 0 for b in betas)):
            raise ValueError(f"ssim: betas must be a non-empty list of numbers >= 0, got {betas!r}.")
        self.ms = ms
        self.kernel_size = kernel_size
        self.sigma = float(sigma)
        self.betas: Optional[Tuple[float, ...]] = None if betas is None else tuple(float(b) for b in betas)
        if image_shape is not None and ms:  # given by the trainer: refuse too-small images before training
            from vaegan.api import VAEOutput

            probe = torch.zeros(1, *image_shape)
            self.forward(TermInputs(real=probe, output=VAEOutput(recon=probe, posterior=None, z=None), step=0))  # type: ignore[arg-type]

    def forward(self, inputs: TermInputs) -> Tensor:
        """``1 - SSIM`` (or ``1 - MS-SSIM``), averaged over the batch."""
        low, high = inputs.value_range
        recon = inputs.output.recon
        with torch.autocast(device_type=recon.device.type, enabled=False):
            preds, target = recon.float(), inputs.real.detach().float()  # (B, C, H, W)
            common = dict(kernel_size=self.kernel_size, sigma=self.sigma, data_range=float(high - low))
            if not self.ms:
                return 1.0 - _ssim(preds, target, **common)
            extra = {} if self.betas is None else {"betas": self.betas}
            try:
                return 1.0 - _ms_ssim(preds, target, normalize="simple", **common, **extra)
            except ValueError as exc:  # torchmetrics' size checks
                raise ConfigError(
                    f"ssim with ms: true cannot use {tuple(preds.shape[-2:])} images with kernel_size="
                    f"{self.kernel_size} and {len(self.betas or (0,) * 5)} scales: {exc} Use a smaller "
                    "kernel_size, fewer betas (scales), or ms: false."
                ) from exc
