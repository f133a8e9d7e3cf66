"""The KL divergence between the posterior and the standard normal prior."""

from __future__ import annotations

import math
from typing import ClassVar

from einops import reduce
from torch import Tensor

from ..api import LossTerm, Player, TermInputs

__all__ = ["KLDivergence"]


class KLDivergence(LossTerm):
    """KL(q(z|x) || N(0, I)), summed over the latent's elements, divided by the pixel count.

    Dividing by the number of pixels puts the KL on the same per-pixel scale as the reconstruction
    terms, so weight 1 is the ELBO (beta = 1) at any image size. Warm-up and cyclical annealing
    are the weight's schedule (``weight: {value: 1, warmup: 1000}``).

    Args:
        free_bits: Nats per latent element below which the KL is not penalised (Kingma et al.
            2016), per latent channel: each channel's batch-mean KL per element is clamped from below at
            this value. A vector latent (B, D) has D channels of one element (the paper's free bits
            per dimension); a spatial latent (B, c, h, w) has c channels of h*w elements, whose
            positions share one budget. 0 disables.

    Example:
        >>> KLDivergence(free_bits=0.1).free_bits
        0.1
    """

    player: ClassVar[Player] = "generator"

    def __init__(self, free_bits: float = 0.0) -> None:
        super().__init__()
        if not (math.isfinite(free_bits) and free_bits >= 0):
            raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits}")
        self.free_bits = float(free_bits)

    def forward(self, inputs: TermInputs) -> Tensor:
        kl = inputs.output.posterior.kl()  # (B, c, ...) nats per latent element
        per_channel = reduce(kl, "b c ... -> c", "mean")  # (c,): mean over the batch and the positions
        if self.free_bits > 0:
            per_channel = per_channel.clamp(min=self.free_bits)
        elements = kl[0, 0].numel()  # latent elements per channel: 1 for a vector latent
        pixels = inputs.real[0].numel()
        return per_channel.sum() * elements / pixels
