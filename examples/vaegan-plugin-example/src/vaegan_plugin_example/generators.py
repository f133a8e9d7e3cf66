"""A residual MLP VAE: pre-LayerNorm residual blocks in encoder and decoder, any image shape.

vaegan's own ``mlp`` generator is a plain stack of Linear + ReLU layers (the seed papers' 784-400-20
VAE). ``resmlp`` keeps the fully connected design (no assumption about image size or channel count,
cheap on a CPU) but puts every hidden layer in a pre-norm residual block
``x + W2 SiLU(W1 LayerNorm(x))`` whose last layer starts at zero: each block starts as the identity, so
adding depth does not make the network harder to optimise at initialisation (the recipe of pre-norm
transformers and ResMLP, Touvron et al. 2021). LayerNorm has no batch statistics: safe under DDP and
with tiny batches.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vaegan.api import VAE, DiagonalGaussian

__all__ = ["ResidualBlock", "ResMLPVAE"]


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"resmlp: {name} must be an integer >= {minimum}, got {value!r}.")
    return value


class ResidualBlock(nn.Module):
    """``x + W2 SiLU(W1 LayerNorm(x))`` on (B, width) features; ``W2`` (and its bias) start at zero.

    Args:
        width: Feature width in and out.
        expansion: Hidden width of the block as a multiple of ``width``.
    """

    def __init__(self, width: int, expansion: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * expansion)
        self.fc2 = nn.Linear(width * expansion, width)
        nn.init.zeros_(self.fc2.weight)  # the block starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))


class ResMLPVAE(VAE):
    """A VAE whose encoder and decoder are residual MLPs (generator ``resmlp``); vector latent (D,).

    Encoder: flatten, ``Linear(C*H*W, width)``, ``depth`` residual blocks, LayerNorm, SiLU,
    ``Linear(width, 2 * latent_dim)`` (mean and log-variance). Decoder: ``Linear(latent_dim, width)``,
    ``depth`` residual blocks, LayerNorm, SiLU, ``Linear(width, C*H*W)`` (the last layer), reshaped to
    (B, C, H, W). Any channel count and image size; the parameter count grows with ``C*H*W * width``, so
    keep ``width`` modest for large images.

    Args:
        image_shape: (C, H, W), passed by vaegan.
        output_range: ``unit`` or ``symmetric``, passed by vaegan.
        latent_dim: Size of the latent vector.
        width: Width of the residual stream.
        depth: Residual blocks in the encoder, and as many in the decoder (0: a one-hidden-layer MLP).
        expansion: Hidden width of each block, as a multiple of ``width``.
        logvar_min, logvar_max: Clamp of the posterior log-variance.

    Raises:
        ValueError: a size that is not a positive integer (``depth`` may be 0), or
            ``logvar_min >= logvar_max`` (vaegan reports either as a ``ConfigError``).

    Example:
        >>> vae = ResMLPVAE((1, 28, 28), latent_dim=8, width=64, depth=2)
        >>> vae(torch.rand(4, 1, 28, 28)).recon.shape, vae.latent_shape
        (torch.Size([4, 1, 28, 28]), (8,))
    """

    def __init__(self, image_shape: Tuple[int, int, int], output_range: str = "unit", latent_dim: int = 16,
                 width: int = 256, depth: int = 2, expansion: int = 2, logvar_min: float = -30.0,
                 logvar_max: float = 20.0) -> None:
        for name, value in (("logvar_min", logvar_min), ("logvar_max", logvar_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"resmlp: {name} must be a finite number, got {value!r}.")
        super().__init__(image_shape, output_range, (logvar_min, logvar_max))
        latent_dim = _check_int(latent_dim, "latent_dim", 1)
        width = _check_int(width, "width", 1)
        depth = _check_int(depth, "depth", 0)
        expansion = _check_int(expansion, "expansion", 1)
        c, h, w = self.image_shape
        self.latent_shape = (latent_dim,)
        self.encoder = nn.Sequential(
            nn.Linear(c * h * w, width),
            *[ResidualBlock(width, expansion) for _ in range(depth)],
            nn.LayerNorm(width), nn.SiLU(),
            nn.Linear(width, 2 * latent_dim),  # (B, 2D): mean and log-variance
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, width),
            *[ResidualBlock(width, expansion) for _ in range(depth)],
            nn.LayerNorm(width), nn.SiLU(),
        )
        self.out = nn.Linear(width, c * h * w)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return self.posterior(self.encoder(rearrange(x, "b c h w -> b (c h w)")))  # mean, logvar: (B, D)

    def decode_logits(self, z: Tensor) -> Tensor:
        c, h, w = self.image_shape
        return rearrange(self.out(self.decoder(z)), "b (c h w) -> b c h w", c=c, h=h, w=w)

    @property
    def last_layer(self) -> Tensor:
        return self.out.weight
