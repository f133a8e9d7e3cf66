"""Images out of vaegan: uint8 conversion and .png grids / .npz arrays, for the commands and the trackers.

Images leave vaegan as uint8 arrays (N, C, H, W), the way image files and metric tools expect them:
``.npz`` files hold them under ``images``; ``.png`` files show them as one grid with exactly the same pixel
values, under a band naming its columns or saying what it shows (:mod:`vaegan.previews`). Every file is
written whole or not at all (:func:`vaegan.files.write_atomic`).

Example:
    >>> save_images("samples.npz", to_uint8(model.sample(16), model.value_range))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, VaeganError
from .files import write_atomic
from .previews import PAIR_LABELS, label_columns, strip_labels
from .previews import caption as add_caption

__all__ = ["OUTPUT_SUFFIXES", "check_output", "to_uint8", "save_images", "save_reconstructions",
           "save_interpolations"]

OUTPUT_SUFFIXES = (".png", ".npz")


def check_output(path: Union[str, Path], allowed: Sequence[str] = OUTPUT_SUFFIXES) -> str:
    """Return the lower-case suffix of ``path`` if vaegan can write it.

    Raises:
        ConfigError: any other extension (checked before any work is done).

    Example:
        >>> check_output("grid.PNG")
        '.png'
    """
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise ConfigError(
            f"--out '{path}' has the extension '{suffix or '(none)'}', which vaegan cannot write. Use "
            f"{' or '.join(allowed)}: .png writes one image grid, .npz a NumPy archive whose array "
            "'images' is uint8 with shape (N, C, H, W)."
        )
    return suffix


def to_uint8(images: Tensor, value_range: Tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Images in ``value_range`` to uint8 in [0, 255], rounded as torchvision's ``save_image`` does.

    Example:
        >>> to_uint8(torch.tensor([-1.0, 0.0, 1.0]), (-1.0, 1.0)).tolist()
        [0, 128, 255]
    """
    low, high = value_range
    unit = (images.detach().float() - low) / (high - low)
    return unit.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).cpu()


def save_images(path: Union[str, Path], images: Tensor, nrow: Optional[int] = None,
                labels: Optional[Sequence[str]] = None, caption: Optional[str] = None, **arrays: Tensor) -> Path:
    """Write uint8 images as a ``.png`` grid or as the array ``images`` of a ``.npz`` archive.

    Args:
        path: Ends in .png or .npz; parent folders are created.
        images: uint8 (N, C, H, W), or (P, S, C, H, W) for rows of S images (a .png lays out one
            row per P; a .npz keeps the shape).
        nrow: Images per row of a .png grid (default: about square).
        labels: Column names written in a band above a .png grid (:func:`vaegan.previews.label_columns`).
        caption: A line written in a band above a .png grid (:func:`vaegan.previews.caption`), e.g. where samples'
            latents came from.
        arrays: Further uint8 arrays stored in a .npz next to ``images`` (ignored for .png).

    Returns:
        ``path`` as a Path.

    Raises:
        ConfigError: an extension other than .png/.npz. VaeganError: the file cannot be written.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    suffix = check_output(path)
    if images.dtype != torch.uint8:
        raise TypeError(f"save_images takes uint8 images, got {images.dtype}")  # a caller's bug
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npz":
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:  # a file object: numpy would add ".npz" to the temporary's name
                    np.savez_compressed(f, images=images.numpy(), **{k: v.numpy() for k, v in arrays.items()})

            write_atomic(path, write)
        else:
            if images.ndim == 5:  # (P, S, C, H, W): one row per P
                nrow = images.shape[1]
                images = images.flatten(0, 1)
            nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
            grid = make_grid(images, nrow=nrow, padding=2, pad_value=0)  # uint8 (3, H', W')
            if labels:
                grid = label_columns(grid, labels, images.shape[-1])
            if caption:
                grid = add_caption(grid, caption)
            picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
            write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))
    except OSError as exc:
        raise VaeganError(f"Cannot write '{path}': {exc}. Choose another --out path.") from None
    return path


def save_reconstructions(path: Union[str, Path], inputs: Tensor, recons: Tensor) -> Path:
    """``.npz``: ``images`` (the reconstructions) and ``inputs``; ``.png``: a grid of input |
    reconstruction pairs, eight pairs per row. Both uint8 (N, C, H, W)."""
    if check_output(path) == ".png":
        return save_images(path, torch.stack([inputs, recons], dim=1).flatten(0, 1), nrow=16,  # in, out, in, ...
                           labels=PAIR_LABELS)
    return save_images(path, recons, inputs=inputs)


def save_interpolations(path: Union[str, Path], strips: Tensor, ends: Optional[Tensor] = None) -> Path:
    """``.npz``: ``images`` (P, steps, C, H, W) and, for dataset images, ``inputs`` (P, 2, C, H, W);
    ``.png``: one strip per row, with the real images at both ends (so labelled) when there are any."""
    if check_output(path) == ".npz":
        return save_images(path, strips, **({"inputs": ends} if ends is not None else {}))
    if ends is None:
        return save_images(path, strips)
    rows = torch.cat([ends[:, :1], strips, ends[:, 1:]], dim=1)  # (P, S + 2, C, H, W)
    return save_images(path, rows, labels=strip_labels(rows.shape[1]))
