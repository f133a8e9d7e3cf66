"""The gradient-difference loss (Mathieu et al. 2016): match image edges, not just pixels."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from vaegan.api import LossTerm, Player, TermInputs

__all__ = ["GradientDifferenceLoss"]


class GradientDifferenceLoss(LossTerm):
    """``mean | |dx recon| - |dx real| |^alpha + mean | |dy recon| - |dy real| |^alpha``.

    Penalises edges that are missing or too soft in the reconstruction, the blur a pixel loss
    leaves behind. A generator term: it reads only ``inputs.output.recon`` and ``inputs.real``.

    Reduction: means over batch, channels and pixel pairs of each direction, so a weight means the
    same at any image size. Computed in fp32 with autocast disabled.

    Args:
        alpha: Exponent of the edge difference (1: L1, 2: squared).

    Raises:
        ValueError: alpha not a positive number.

    Example:
        >>> GradientDifferenceLoss(alpha=2.0).alpha
        2.0
    """

    player: ClassVar[Player] = "generator"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"gradient_difference: alpha must be a positive number, got {alpha!r}.")
        self.alpha = float(alpha)

    def forward(self, inputs: TermInputs) -> Tensor:
        recon = inputs.output.recon
        with torch.autocast(device_type=recon.device.type, enabled=False):
            fake, real = recon.float(), inputs.real.float()  # (B, C, H, W)
            total = fake.new_zeros(())
            for dim in (-1, -2):  # horizontal, then vertical neighbours
                edge_fake = fake.diff(dim=dim).abs()
                edge_real = real.diff(dim=dim).abs()
                # A small offset keeps |.|^alpha differentiable at 0 for alpha < 1.
                total = total + ((edge_fake - edge_real).abs() + 1e-12).pow(self.alpha).mean()
            return total
