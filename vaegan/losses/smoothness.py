"""A smoothness regulariser on the latent space (the seed documents' remedy).

What we chose: penalise how fast the decoder's output changes around the posterior sample. With
``u ~ N(0, I)`` and ``delta = sigma * u``, the finite difference ``D(z + delta) - D(z)`` is about
``J delta`` (J the decoder's Jacobian), and ``E[|J delta|^2] = sigma^2 |J|_F^2``. So

    R = mean over batch and pixels of (D(z + delta) - D(z))^2 / sigma^2

is a stochastic, per-pixel estimate of the decoder's squared Jacobian norm, the quantity that
decides how abruptly images change along a latent path (and so along interpolations). Both decodes
come from the generator's single forward (``perturb_std``), so DDP and autocast cover them.
"""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor

from ..api import LossTerm, Player, TermInputs

__all__ = ["LatentSmoothness"]


class LatentSmoothness(LossTerm):
    """Penalise the decoder's local Jacobian norm by a finite difference in latent space.

    Args:
        sigma: Standard deviation of the latent perturbation (latent units; the prior has std 1).

    Example:
        >>> LatentSmoothness(sigma=0.1).perturb_std
        0.1
    """

    player: ClassVar[Player] = "generator"

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma}")
        self.perturb_std = float(sigma)

    def forward(self, inputs: TermInputs) -> Tensor:
        out = inputs.output
        if out.perturbed is None:
            raise ValueError("smoothness needs VAE.forward(..., perturb_std>0); the trainer asks for it")
        diff = out.perturbed.float() - out.recon.float()
        return diff.pow(2).mean() / self.perturb_std**2
