"""Pixel reconstruction terms: MSE, L1, BCE and a Gaussian NLL with a learned log-variance.

Reduction: every term is a mean over pixels and batch (a per-pixel quantity), so a weight means the
same at 28x28 and at 256x256, and ``bce``/``gaussian_nll`` + ``kl`` at weight 1 is the negative ELBO per
pixel in nats.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import LossTerm, Player, TermInputs

__all__ = ["MSELoss", "L1Loss", "BCELoss", "GaussianNLLLoss"]


class MSELoss(LossTerm):
    """Mean squared error per pixel (a Gaussian likelihood with fixed variance 1/2, up to a constant).

    Example:
        >>> MSELoss()  # options: none
        MSELoss()
    """

    player: ClassVar[Player] = "generator"

    def forward(self, inputs: TermInputs) -> Tensor:
        return F.mse_loss(inputs.output.recon.float(), inputs.real.float())


class L1Loss(LossTerm):
    """Mean absolute error per pixel (a Laplace likelihood; blurs less than MSE).

    Args:
        learned_logvar: Divide the error by ``exp(logvar)`` and add ``logvar``, with ``logvar`` a scalar
            parameter of this term that the generator's optimizer trains (latent diffusion's ``nll_loss``
            with its learned log-variance; there the parameter sat in no optimizer and never moved).

    Example:
        >>> L1Loss(learned_logvar=True).logvar.shape
        torch.Size([1])
    """

    player: ClassVar[Player] = "generator"

    def __init__(self, learned_logvar: bool = False) -> None:
        super().__init__()
        if not isinstance(learned_logvar, bool):
            raise ValueError(f"l1: learned_logvar must be true or false, got {learned_logvar!r}.")
        self.logvar = nn.Parameter(torch.zeros(1)) if learned_logvar else None

    def forward(self, inputs: TermInputs) -> Tensor:
        error = F.l1_loss(inputs.output.recon.float(), inputs.real.float())
        if self.logvar is None:
            return error
        logvar = self.logvar.float().squeeze()
        return error / torch.exp(logvar) + logvar


class BCELoss(LossTerm):
    """Binary cross-entropy per pixel in nats (a Bernoulli likelihood; suits MNIST).

    Computed from the decoder's logits, which is stable and autocast-safe (BCE on probabilities
    overflows in fp16 and is refused by autocast). For the [-1, 1] output range, tanh(l) = 2 sigmoid(2l) - 1,
    so the logits are 2l and the targets (x + 1) / 2.
    """

    player: ClassVar[Player] = "generator"

    def forward(self, inputs: TermInputs) -> Tensor:
        logits = inputs.output.recon_logits
        if logits is None:
            raise ValueError("bce needs the decoder's logits (VAEOutput.recon_logits)")
        low, high = inputs.value_range
        target = (inputs.real.float() - low) / (high - low)
        scale = high - low  # 1 for [0, 1] (sigmoid), 2 for [-1, 1] (tanh(l) = 2 sigmoid(2l) - 1)
        return F.binary_cross_entropy_with_logits(scale * logits.float(), target)


class GaussianNLLLoss(LossTerm):
    """Gaussian negative log-likelihood per pixel with a *learned* output log-variance.

    The log-variance is a parameter of this term; the trainer puts it in the generator's optimizer
    (and checkpoints it), so it really is learned, unlike a parameter that lives in a loss module no
    optimizer sees.

    Args:
        init_logvar: Starting log-variance.
        per_channel: Learn one log-variance per image channel instead of one in all.
        channels: Number of image channels (needed with ``per_channel``).
    """

    player: ClassVar[Player] = "generator"

    def __init__(self, init_logvar: float = 0.0, per_channel: bool = False, channels: int = 1) -> None:
        super().__init__()
        self.logvar = nn.Parameter(torch.full((channels if per_channel else 1,), float(init_logvar)))

    def forward(self, inputs: TermInputs) -> Tensor:
        recon, real = inputs.output.recon.float(), inputs.real.float()
        logvar = self.logvar.float().view(1, -1, 1, 1)  # broadcasts over (B, C, H, W)
        nll = 0.5 * ((real - recon) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))
        return nll.mean()
