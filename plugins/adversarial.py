"""GAN loss pairs beyond the built-in non-saturating one: hinge and least squares.

Both work on raw logits of any shape with a leading batch dimension (one per image, or a PatchGAN
map) and average over every logit, so a weight means the same at any image size. They compute in
fp32 whatever the dtype of the logits, so bf16/fp16 logits as large as ±1e4 give finite losses and
gradients.

.. code-block:: yaml

    adversarial: {name: hinge, weight: 0.5}
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vaegan.api import AdversarialLoss

__all__ = ["Hinge", "LeastSquares"]


class Hinge(AdversarialLoss):
    """The hinge loss (Lim & Ye 2017; SAGAN, BigGAN, VQGAN, LDM).

    Discriminator: ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``; generator:
    ``-mean(D(fake))``. Linear in the logits, so it never saturates or overflows. Means over images
    (and patches).

    Example:
        >>> Hinge().discriminator_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item()
        0.0
    """

    def generator_loss(self, fake_logits: Tensor) -> Tensor:
        """``-mean(D(fake))``: the generator raises the discriminator's score of its images."""
        return -fake_logits.float().mean()

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Margin 1 on both sides: confident, correct logits contribute nothing."""
        return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


class LeastSquares(AdversarialLoss):
    """The least-squares GAN loss (Mao et al. 2017, with labels a=0, b=c=1; pix2pix, CycleGAN).

    Discriminator: ``0.5 mean((D(real) - 1)^2) + 0.5 mean(D(fake)^2)``; generator:
    ``0.5 mean((D(fake) - 1)^2)``. Squares are taken in fp32: a bf16/fp16 logit of 1e4 squares to
    1e8, which overflows fp16 but not fp32. Means over images (and patches).

    Example:
        >>> LeastSquares().generator_loss(torch.tensor([1.0, 3.0])).item()
        1.0
    """

    def generator_loss(self, fake_logits: Tensor) -> Tensor:
        """Pull the discriminator's score of generated images towards the real label 1."""
        return 0.5 * (fake_logits.float() - 1.0).pow(2).mean()

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Regress real images to 1 and generated ones to 0."""
        return 0.5 * (real_logits.float() - 1.0).pow(2).mean() + 0.5 * fake_logits.float().pow(2).mean()
