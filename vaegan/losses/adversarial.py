"""The plain GAN loss pair; richer variants (hinge, least-squares) are plugins."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..api import AdversarialLoss

__all__ = ["NonSaturating"]


class NonSaturating(AdversarialLoss):
    """The non-saturating GAN loss (Goodfellow et al. 2014), on logits.

    Generator: ``softplus(-D(fake))`` = -log sigmoid(D(fake)); discriminator:
    ``softplus(-D(real)) + softplus(D(fake))``. Computed with softplus on logits, never sigmoid then
    log, so it stays finite at any logit in fp16/bf16. Means over images (and patches).
    """

    def generator_loss(self, fake_logits: Tensor) -> Tensor:
        return F.softplus(-fake_logits).mean()

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
