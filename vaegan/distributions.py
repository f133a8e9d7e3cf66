"""What a generator's forward returns: the diagonal Gaussian posterior and the :class:`VAEOutput` bundle.

Both are part of the generator contract (:mod:`vaegan.api` and :mod:`vaegan.generator` export them);
they live here so that the contract's base class, :class:`vaegan.generator.VAE`, reads on its own.

Example:
    >>> q = DiagonalGaussian(torch.zeros(2, 4), torch.zeros(2, 4))
    >>> q.kl().shape, float(q.kl().sum())
    (torch.Size([2, 4]), 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["DiagonalGaussian", "VAEOutput"]


@dataclass
class DiagonalGaussian:
    """A factorised Gaussian q(z|x): ``mean`` and (clamped) ``logvar``, each (B, *latent_shape), fp32."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def rsample(self) -> Tensor:
        """The reparameterisation trick: z = mean + std * eps, differentiable in both."""
        return self.mean + self.std * torch.randn_like(self.std)

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per latent element, shape (B, *latent_shape), in nats."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


@dataclass
class VAEOutput:
    """What one generator forward produces. Images are (B, C, H, W); latents (B, *latent_shape)."""

    recon: Tensor
    posterior: DiagonalGaussian
    z: Tensor
    recon_logits: Optional[Tensor] = None  # decoder pre-activation of recon (BCE with logits)
    recon_decoder_only: Optional[Tensor] = None  # decode(z.detach()): fakes whose gradient skips the encoder
    perturbed: Optional[Tensor] = None  # decode(z + sigma * u), for the smoothness regulariser
    perturbation: Optional[Tensor] = None  # sigma * u, like z
    prior_samples: Optional[Tensor] = None  # decode(z ~ prior), for a discriminator's fakes
    # decode(z ~ a kernel density of the batch's detached posterior means): where fitted samplers draw
    aggregate_samples: Optional[Tensor] = None
