"""The preview panels the trainer draws: real | reconstruction pairs, prior samples, interpolations.

Example:
    >>> grids = preview_grids(model, real, model.sample_prior(64))  # doctest: +SKIP
    >>> sorted(grids)  # doctest: +SKIP
    ['interpolations', 'reconstructions', 'samples']
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from .generator import VAE

__all__ = ["preview_grids"]


@torch.no_grad()
def preview_grids(model: VAE, real: Tensor, noise: Tensor,
                  sampled: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
    """The trainer's preview panels as image grids: real | reconstruction pairs, decoded ``noise``,
    decoded latents of fitted samplers, and interpolation strips between real images (whose ends are
    the real images).

    Args:
        model: The generator (put in eval mode while drawing, then back).
        real: (N, C, H, W) images in the model's value range, on the model's device.
        noise: (M, *latent_shape) prior latents.
        sampled: Sampler name -> (M', *latent_shape) latents it drew; each gives a panel ``samples_<name>``.

    Returns:
        ``{"reconstructions", "samples", "interpolations", "samples_<name>"...}`` -> (3, H', W') float grids
        in [0, 1], the format of ``torchvision.utils.save_image`` and the trackers (no interpolations when N < 2).
    """
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    recon = model.reconstruct(real)
    panels = {  # name -> (images, images per row)
        "reconstructions": (torch.stack([real, recon], dim=1).flatten(0, 1), 16),  # (2N, C, H, W): real, recon, ...
        "samples": (model.decode(noise), 8),  # (M, C, H, W)
        **{f"samples_{name}": (model.decode(z.to(noise)), 8) for name, z in (sampled or {}).items()},
    }
    k = min(8, real.shape[0] // 2)  # strips between real images i and k + i
    if k:
        strip = model.interpolate(real[:k], real[k:2 * k], steps=8)  # (k, 8, C, H, W)
        rows = torch.cat([real[:k, None], strip, real[k:2 * k, None]], dim=1)  # (k, 10, C, H, W): ends are real
        panels["interpolations"] = (rows.flatten(0, 1), rows.shape[1])
    model.train(was_training)
    return {key: make_grid(images.float(), nrow=nrow, normalize=True, value_range=model.value_range)
            for key, (images, nrow) in panels.items()}
