"""The preview panels the trainer draws: real | reconstruction pairs, prior samples, interpolations.

Panels a person reads without the docs say what they show: the pairs and the interpolation strips carry
a band on top naming their columns (:func:`label_columns`), sample grids a caption naming where their latents
came from (:func:`caption`: "N(0, I)" or the fitted sampler).

Example:
    >>> grids = preview_grids(model, real, model.sample_prior(64))  # doctest: +SKIP
    >>> sorted(grids)  # doctest: +SKIP
    ['interpolations', 'reconstructions', 'samples']
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # the type only: the generator module imports what imports this one
    from .generator import VAE

__all__ = ["preview_grids", "write_previews", "label_columns", "caption", "sample_caption", "LABEL_HEIGHT",
           "PAIR_LABELS", "strip_labels"]

LABEL_HEIGHT = 12  # pixels of the band above a labelled grid
PAIR_LABELS = ("real", "recon")  # the columns of a real | reconstruction grid, repeated


def strip_labels(columns: int) -> Sequence[str]:
    """Column labels of interpolation strips whose first and last columns are real images."""
    return ["real", *([""] * (columns - 2)), "real"]


def label_columns(grid: Tensor, labels: Sequence[str], cell: int, padding: int = 2) -> Tensor:
    """``grid`` with a white band of :data:`LABEL_HEIGHT` pixels on top naming its columns.

    Args:
        grid: (C, H, W) image grid from ``make_grid``: float in [0, 1] or uint8.
        labels: Column names, repeated along the row when there are more columns (``("real", "recon")``).
        cell: Width of one image of the grid, without padding.
        padding: ``make_grid``'s padding.

    Returns:
        (C, LABEL_HEIGHT + H, W), the same dtype. A label wider than its column is written once, as a caption
        ``"real | recon"`` at the left, so small images stay readable.
    """
    step = cell + padding

    def write(draw, font, width: int) -> None:
        if max(draw.textlength(t, font=font) for t in labels) <= step:
            for i in range((width - padding) // step):
                text = labels[i % len(labels)]
                x = padding + i * step + (cell - draw.textlength(text, font=font)) / 2
                draw.text((x, 0), text, fill=0, font=font)
        else:
            draw.text((padding, 0), " | ".join(t for t in dict.fromkeys(labels) if t), fill=0, font=font)

    return _with_band(grid, write)


def caption(grid: Tensor, text: str, padding: int = 2) -> Tensor:
    """``grid`` with a white band of :data:`LABEL_HEIGHT` pixels on top holding ``text`` at the left (cut with
    "..." when wider than the grid).

    Args:
        grid: (C, H, W) image grid: float in [0, 1] or uint8.
        text: The caption ("samples: N(0, I)").

    Returns:
        (C, LABEL_HEIGHT + H, W), the same dtype.

    Example:
        >>> caption(torch.zeros(3, 30, 120), "samples: N(0, I)").shape
        torch.Size([3, 42, 120])
    """
    def write(draw, font, width: int) -> None:
        shown = text
        while shown and draw.textlength(shown, font=font) > width - 2 * padding:
            shown = shown[:-4] + "..." if len(shown) > 4 else ""
        draw.text((padding, 0), shown, fill=0, font=font)

    return _with_band(grid, write)


def sample_caption(sampler: Optional[str]) -> str:
    """The caption of a sample grid: where its latents came from (None: the prior, N(0, I))."""
    return "samples: N(0, I) prior" if sampler in (None, "normal") else f"samples: the fitted '{sampler}' sampler"


def _with_band(grid: Tensor, write) -> Tensor:
    """``grid`` (C, H, W) under a white band of :data:`LABEL_HEIGHT` pixels that ``write(draw, font, width)`` fills."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    c, h, w = grid.shape
    band = Image.new("L", (w, LABEL_HEIGHT), 255)
    draw = ImageDraw.Draw(band)
    write(draw, ImageFont.load_default(), w)
    pixels = torch.from_numpy(np.asarray(band).copy())  # (LABEL_HEIGHT, W) uint8
    top = pixels.to(grid.dtype) if grid.dtype == torch.uint8 else pixels.to(grid.dtype) / 255.0
    return torch.cat([top.expand(c, -1, -1).to(grid.device), grid], dim=1)


@torch.no_grad()
def preview_grids(model: VAE, real: Tensor, noise: Optional[Tensor],
                  sampled: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
    """The trainer's preview panels as image grids: real | reconstruction pairs, decoded ``noise``,
    decoded latents of fitted samplers, and interpolation strips between real images (whose ends are
    the real images).

    Args:
        model: The generator (put in eval mode while drawing, then back).
        real: (N, C, H, W) images in the model's value range, on the model's device.
        noise: (M, *latent_shape) prior latents; None: no ``samples`` panel (a model not meant to be sampled from
            its prior, such as a spatial latent a diffusion model samples).
        sampled: Sampler name -> (M', *latent_shape) latents it drew; each gives a panel ``samples_<name>``.

    Returns:
        ``{"reconstructions", "samples", "interpolations", "samples_<name>"...}`` -> (3, H', W') float grids
        in [0, 1], the format of ``torchvision.utils.save_image`` and the trackers (no interpolations when N < 2).
        Sample panels carry a caption naming their latents' source (:func:`sample_caption`).
    """
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    recon = model.reconstruct(real)
    panels = {  # name -> (images, images per row)
        "reconstructions": (torch.stack([real, recon], dim=1).flatten(0, 1), 16),  # (2N, C, H, W): real, recon, ...
        **({"samples": (model.decode(noise), 8)} if noise is not None else {}),  # (M, C, H, W)
        **{f"samples_{name}": (model.decode(z.to(real)), 8) for name, z in (sampled or {}).items()},
    }
    k = min(8, real.shape[0] // 2)  # strips between real images i and k + i
    if k:
        strip = model.interpolate(real[:k], real[k:2 * k], steps=8)  # (k, 8, C, H, W)
        rows = torch.cat([real[:k, None], strip, real[k:2 * k, None]], dim=1)  # (k, 10, C, H, W): ends are real
        panels["interpolations"] = (rows.flatten(0, 1), rows.shape[1])
    model.train(was_training)
    grids = {key: make_grid(images.float(), nrow=nrow, normalize=True, value_range=model.value_range)
             for key, (images, nrow) in panels.items()}
    width = real.shape[-1]
    grids["reconstructions"] = label_columns(grids["reconstructions"], PAIR_LABELS, width)
    for key in grids:
        if key == "samples" or key.startswith("samples_"):
            grids[key] = caption(grids[key], sample_caption(key[len("samples_"):] or None))
    if "interpolations" in grids:
        grids["interpolations"] = label_columns(grids["interpolations"], strip_labels(panels["interpolations"][1]),
                                                width)
    return grids


def write_previews(folder: Path, name: str, model: VAE, real: Tensor, noise: Optional[Tensor],
                   sampled: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
    """:func:`preview_grids` written as ``folder/<name>_<panel>.png``; returns the grids (for the trackers).

    Raises:
        OSError: a grid cannot be written (the trainer warns and goes on).
    """
    from torchvision.utils import save_image

    grids = preview_grids(model, real, noise, sampled)
    folder.mkdir(parents=True, exist_ok=True)
    for key, grid in grids.items():
        save_image(grid, folder / f"{name}_{key}.png")
    return grids
