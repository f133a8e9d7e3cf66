"""LeCam regularisation of the discriminator (Tseng et al., CVPR 2021), a discriminator loss term.

Registered as ``lecam`` in ``vaegan.losses``; it goes in ``losses`` and the trainer routes it to the
discriminator's optimizer:

.. code-block:: yaml

    losses:
      - {name: lecam, weight: 0.1, options: {decay: 0.99}}

It keeps exponential moving averages of the discriminator's mean logit on real images (``alpha_R``) and
on fakes (``alpha_F``) and penalises predictions that run past the other side's average:

    R_LC = E_real[ relu(D(x) - alpha_F)^2 ] + E_fake[ relu(alpha_R - D(G(z)))^2 ]

so the discriminator cannot push real and fake logits arbitrarily far apart, which is how it wins
against a generator that starts from a trained autoencoder (the fakes are close to the reals, so a
discriminator that separates them confidently has learned pixel-level tells, and the generator's
hinge loss saturates). The averages are buffers of this term, so they are in the discriminator's
checkpoint file and a resumed run continues them exactly; under several processes the mean logits
are averaged over processes before they enter the averages, so every rank holds the same anchors.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from vaegan.api import LossTerm, Player, TermInputs

__all__ = ["LeCam"]


class LeCam(LossTerm):
    """LeCam regularisation: anchors each side's logits to the moving average of the other side's.

    Reduction: means over images and patches (like the adversarial terms), so the weight means the same
    for a PatchGAN map and a per-image critic. Computed in fp32.

    Args:
        decay: EMA decay of the mean logits (Tseng et al.: 0.99). The first step sets the averages to
            that step's means.

    Raises:
        ValueError: ``decay`` outside [0, 1).

    Example:
        >>> term = LeCam(decay=0.99)
        >>> float(term.alpha_real), bool(term.started)
        (0.0, False)
    """

    player: ClassVar[Player] = "discriminator"
    needs_discriminator: ClassVar[bool] = True

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 <= decay < 1.0) \
                or not math.isfinite(decay):
            raise ValueError(f"lecam: decay must be a number in [0, 1), got {decay!r}.")
        self.decay = float(decay)
        self.register_buffer("alpha_real", torch.zeros(()))
        self.register_buffer("alpha_fake", torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _update(self, real: Tensor, fake: Tensor) -> None:
        means = torch.stack([real.mean(), fake.mean()])  # (2,)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means /= dist.get_world_size()
        means = means.to(self.alpha_real.device)
        d = torch.where(self.started, torch.tensor(self.decay, device=means.device), torch.zeros((), device=means.device))
        self.alpha_real.mul_(d).add_((1 - d) * means[0])  # no host read: the first step is decided on the device
        self.alpha_fake.mul_(d).add_((1 - d) * means[1])
        self.started.fill_(True)

    def forward(self, inputs: TermInputs) -> Optional[Tensor]:
        """The regulariser for this step's real and fake logits (after updating the averages)."""
        real = inputs.disc("real").logits.float()  # (B, ...) a logit per image or per patch
        fake = inputs.disc("fake").logits.float()
        self._update(real.detach(), fake.detach())
        return F.relu(real - self.alpha_fake).pow(2).mean() + F.relu(self.alpha_real - fake).pow(2).mean()

    def extra_repr(self) -> str:
        return f"decay={self.decay}"
