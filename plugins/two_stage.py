"""``two_stage``: a second-stage VAE on the latents (Dai & Wipf 2019, "Diagnosing and Enhancing VAE Models").

The first-stage VAE's aggregate posterior is not N(0, I); a second, small VAE trained on its latents
(here the posterior means, standardised) learns a map from N(0, I) onto it. Its decoder's noise
scale gamma is learned, as in the paper, so the second stage can fit the latents as closely as they
allow. Sampling draws u ~ N(0, temperature^2 I) and returns the decoder's mean, un-standardised.

Why a second-stage VAE and not a normalising flow from zuko, nflows or normflows: it needs no
further dependency (none of those three is among vaegan's requirements), trains in seconds on a
CPU for vector latents, and is the learned density the paper pairs with exactly this problem.

Example:
    >>> from vaegan.samplers import build_sampler
    >>> sampler = build_sampler("two_stage", (4,), {"epochs": 2})
    >>> _ = sampler.fit(torch.randn(64, 4))
    >>> sampler.sample(3).shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaegan.errors import DataError
from vaegan.samplers import LatentSampler, check_size

__all__ = ["TwoStageVAE"]


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class TwoStageVAE(LatentSampler):
    """A second VAE whose data are the first VAE's latents (flattened; any latent shape that fits in memory).

    Args:
        latent_shape: Shape of one first-stage latent.
        hidden: Width of the hidden layers of both MLPs.
        depth: Hidden layers per MLP.
        latent_dim: The second stage's latent size (default: the first stage's number of elements, as in
            the paper).
        epochs: Passes over the latents when fitting.
        batch_size: Latents per step.
        lr: Adam's learning rate (cosine-decayed to 0 over the fit).

    Raises:
        ConfigError: a latent too large for the MLPs (more than ``vaegan.samplers.MAX_NUMBERS`` weights).
    """

    def __init__(self, latent_shape, hidden: int = 256, depth: int = 3, latent_dim: Optional[int] = None,
                 epochs: int = 50, batch_size: int = 256, lr: float = 1e-3) -> None:
        super().__init__(latent_shape)
        if min(hidden, depth, epochs, batch_size) < 1 or not lr > 0 or (latent_dim is not None and latent_dim < 1):
            raise ValueError("hidden, depth, latent_dim, epochs and batch_size must be >= 1 and lr > 0")
        d = self.dim
        self.min_latents = 2  # standardisation needs a spread
        self.latent_dim = int(latent_dim or d)
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        check_size(self, 2 * (d + self.latent_dim) * hidden + 2 * depth * hidden * hidden,
                   "Use the gmm sampler with covariance_type: diag, or lower hidden.")
        self.encoder = _mlp([d, *[hidden] * depth, 2 * self.latent_dim])  # -> mean, log-variance
        self.decoder = _mlp([self.latent_dim, *[hidden] * depth, d])
        self.log_gamma = nn.Parameter(torch.zeros(()))  # the decoder's noise std, learned (Dai & Wipf)
        self.register_buffer("shift", torch.zeros(d))  # standardisation of the first-stage latents
        self.register_buffer("scale", torch.ones(d))

    def _loss(self, x: Tensor) -> Tensor:
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, d2) each
        u = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        err = (x - self.decoder(u)).pow(2).sum(1)  # (B,)
        gamma2 = torch.exp(2 * self.log_gamma)
        nll = err / (2 * gamma2) + x.shape[1] * (self.log_gamma + 0.5 * math.log(2 * math.pi))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return (nll + kl).mean()

    def fit_latents(self, latents: Tensor, seed: int) -> Dict[str, Any]:
        x = latents.detach().flatten(1).float().cpu()  # (N, D)
        if x.shape[0] < 2:
            raise DataError(f"The two-stage sampler needs at least 2 latents to fit; got {x.shape[0]}.")
        self.shift.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp_min(1e-6))
        x = (x - self.shift) / self.scale
        gen = torch.Generator().manual_seed(seed)
        steps = self.epochs * math.ceil(x.shape[0] / self.batch_size)
        with torch.enable_grad(), torch.random.fork_rng():  # seeded, without touching the caller's RNG
            torch.manual_seed(seed)
            for module in (self.encoder, self.decoder):
                for layer in module:
                    if isinstance(layer, nn.Linear):
                        layer.reset_parameters()
            self.log_gamma.data.zero_()
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            self.train()
            for _ in range(self.epochs):
                for idx in torch.randperm(x.shape[0], generator=gen).split(self.batch_size):
                    loss = self._loss(x[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            self.eval()
            with torch.no_grad():
                final, gamma = float(self._loss(x)), float(self.log_gamma.exp())
        return {"final_loss": final, "gamma": gamma, "steps": steps}

    def draw(self, n: int, generator: Optional[torch.Generator], temperature: float) -> Tensor:
        u = torch.randn(n, self.latent_dim, generator=generator) * temperature  # (n, d2)
        with torch.no_grad():
            z = self.decoder(u) * self.scale + self.shift  # (n, D)
        return z.view(n, *self.latent_shape)

    def reconstruction_error(self, z: Tensor) -> Tensor:
        """Mean squared error (standardised units) of the second stage's reconstruction of latents, (N,)."""
        x = (z.flatten(1).float() - self.shift) / self.scale
        with torch.no_grad():
            return F.mse_loss(self.decoder(self.encoder(x).chunk(2, dim=1)[0]), x, reduction="none").mean(1)
