"""Tiled encode / decode / reconstruct: images of any size through a spatial-latent VAE in bounded memory.

A convolutional autoencoder's activations grow with the image: an SD VAE's decoder holds several
(128, H, W) maps, gigabytes at 2048 px. Here the image (or the latent) is cut into overlapping square
tiles of ``tile`` pixels, each goes through the model on its own, and the outputs are blended where tiles
overlap with linear ramps (as diffusers' ``enable_tiling`` does): across an overlap of m output pixels one
tile's weight falls from ~1 to ~0 while its neighbour's rises, the weights summing to one. The network's
memory is then that of one tile, whatever the image size; only the input, the output and the tile-sized
activations are held.

Tiles overlap by at least ``overlap`` pixels; they are spread evenly so the last one ends at the image's
edge (every tile is full-size). An image whose sides are not multiples of the model's downsampling factor
f is padded (edge pixels repeated) to the next multiple: its latent is ``ceil(H / f) x ceil(W / f)``, and
:func:`reconstruct_tiled` crops the result back to ``H x W``. ``tile=None`` is one piece of any size.

Tiled results are close to, not equal to, untiled ones, as with diffusers' tiling: GroupNorm normalises
each tile by its own statistics, and a tile's border pixels see padding where the whole image has
neighbours (self-attention, where present, sees one tile only). Measured (tests/test_tiling.py holds the
bounds) on a tiny untrained ``autoencoder_kl`` without attention (widths 8/16, f = 2, 4 GroupNorm groups), a
64 x 96 photo-like image in [-1, 1], overlap 16 px, mean / worst absolute deviation of the reconstruction
over two seeds: 32 px tiles 0.16-0.24 / 2-3.7, 64 px tiles 0.04-0.07 / 0.8-1.4, all of it GroupNorm's: with
the norms removed the same tiling deviates by 6e-4 / 5e-3 (32 px) and 5e-5 / 1.4e-3 (64 px), the cut
receptive field alone, so the ramps leave no seam. Use tiles much larger than the model's receptive field
and large enough for representative statistics (diffusers uses 512 px for SD-class VAEs). A tile at least
as large as the image gives the untiled result exactly.

Example:
    >>> q = encode_tiled(model, images, tile=512, overlap=128)  # doctest: +SKIP
    >>> pixels = decode_tiled(model, q.mean, tile=512, overlap=128)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import image_of
from .distributions import DiagonalGaussian
from .errors import ConfigError, DataError

if TYPE_CHECKING:  # the type only: the generator module imports what imports this one
    from .generator import VAE

__all__ = ["Tiling", "downsampling_factor", "check_tiling", "tile_starts", "encode_tiled", "decode_tiled",
           "reconstruct_tiled", "check_any_size_images", "reconstruct_dataset"]


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile size and overlap in image pixels (multiples of the model's f); ``tile=None``: one piece, any size.

    ``overlap=None`` is a quarter of the tile rounded down to a multiple of f (diffusers' default share).
    """

    tile: Optional[int] = None
    overlap: Optional[int] = None


def downsampling_factor(model: VAE) -> int:
    """The model's f (image side / latent side).

    Raises:
        ConfigError: a model without a spatial (c, h, w) latent that divides the image evenly.
    """
    f = getattr(model, "downsampling_factor", None)
    shape, (_, h, w) = model.latent_shape, model.image_shape
    if f is None and len(shape) == 3 and h % shape[1] == 0 and h // shape[1] == w // shape[2] and w % shape[2] == 0:
        f = h // shape[1]
    if len(shape) != 3 or not f:
        raise ConfigError(f"Tiling and images of other sizes need a generator with a spatial latent (c, h, w) that is "
                          f"the image downsampled by a whole factor; this '{model.config.name}' model's latent shape is "
                          f"{tuple(shape)} for images {tuple(model.image_shape)}. Drop --tile / --image-size.")
    return int(f)


def check_tiling(model: VAE, tiling: Tiling) -> Tuple[Optional[int], int, int]:
    """``(tile, overlap, f)`` in pixels, checked against ``model``, before any work.

    Raises:
        ConfigError: a tile or overlap that is not a multiple of f, or an overlap not below the tile.
    """
    f = downsampling_factor(model)
    tile, overlap = tiling.tile, tiling.overlap
    if tile is None:
        return None, 0, f
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < f or tile % f:
        near = max(f, (tile // f) * f) if isinstance(tile, int) and not isinstance(tile, bool) else 8 * f
        raise ConfigError(f"--tile {tile} must be a multiple of this model's downsampling factor {f} (its latent is "
                          f"1/{f} of the image, so a tile must be a whole number of latent pixels): use --tile {near} "
                          f"or {near + f}.")
    if overlap is None:
        overlap = tile // 4 // f * f
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or overlap % f or overlap >= tile:
        raise ConfigError(f"--overlap {overlap} must be a multiple of {f} (the downsampling factor) from 0 to below the "
                          f"tile ({tile}); a quarter of the tile ({tile // 4 // f * f}) blends seams well.")
    return tile, overlap, f


def tile_starts(size: int, tile: Optional[int], overlap: int) -> Tuple[List[int], int]:
    """Start positions and the tile length covering ``size`` units with tiles of ``tile`` overlapping by at
    least ``overlap``, spread evenly so that the last ends at ``size`` (one tile of ``size`` when it fits).

    Example:
        >>> tile_starts(10, 4, 1)
        ([0, 3, 6], 4)
        >>> tile_starts(3, 4, 1)
        ([0], 3)
    """
    if tile is None or size <= tile:
        return [0], size
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)], tile


def _ramps(starts: Sequence[int], length: int, scale: int) -> List[Tensor]:
    """Per-tile 1-D blend weights (length * scale each): linear ramps over the overlaps with each neighbour."""
    size = length * scale
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(size, dtype=torch.float64)
        if i > 0:  # rising over the overlap with the previous tile
            m = (starts[i - 1] + length - start) * scale
            if m > 0:
                w[:m] *= (torch.arange(m, dtype=torch.float64) + 0.5) / m
        if i + 1 < len(starts):  # falling over the overlap with the next one
            m = (start + length - starts[i + 1]) * scale
            if m > 0:
                w[size - m:] *= 1 - (torch.arange(m, dtype=torch.float64) + 0.5) / m
        weights.append(w)
    return weights


def _blend(inputs: Tensor, run: Callable[[Tensor], Sequence[Tensor]], scale_in: int, scale_out: int, f: int,
           tile: Optional[int], overlap: int, name: str) -> List[Tensor]:
    """Run ``run`` on each tile of ``inputs`` (B, C, H', W') and blend its outputs (each (B, C_k, h*, w*)).

    Positions are planned in latent pixels (units of f); ``scale_in`` / ``scale_out`` are the pixels per
    latent pixel of the input and the outputs (f and 1 for encoding, 1 and f for decoding).
    """
    size = (math.ceil(inputs.shape[-2] / scale_in), math.ceil(inputs.shape[-1] / scale_in))  # latent pixels
    t, o = (None if tile is None else tile // f), overlap // f
    (ys, ty), (xs, tx) = tile_starts(size[0], t, o), tile_starts(size[1], t, o)
    wy, wx = _ramps(ys, ty, scale_out), _ramps(xs, tx, scale_out)
    sum_y = torch.zeros(size[0] * scale_out, dtype=torch.float64)
    sum_x = torch.zeros(size[1] * scale_out, dtype=torch.float64)
    for y, w in zip(ys, wy):
        sum_y[y * scale_out:(y + ty) * scale_out] += w
    for x, w in zip(xs, wx):
        sum_x[x * scale_out:(x + tx) * scale_out] += w
    outs: List[Tensor] = []
    for y, w_y in zip(ys, wy):
        for x, w_x in zip(xs, wx):
            piece = inputs[..., y * scale_in:(y + ty) * scale_in, x * scale_in:(x + tx) * scale_in]
            short = (ty * scale_in - piece.shape[-2], tx * scale_in - piece.shape[-1])
            if short[0] or short[1]:  # the image's last row/column repeated, as padding the whole image would
                piece = F.pad(piece, (0, short[1], 0, short[0]), mode="replicate")
            results = run(piece.contiguous())
            want = (ty * scale_out, tx * scale_out)
            if any(tuple(r.shape[-2:]) != want for r in results):
                raise ConfigError(f"This '{name}' generator turned a {tuple(piece.shape[-2:])} input into "
                                  f"{tuple(results[0].shape[-2:])}, not {want}: it only takes its own image size, so it "
                                  "cannot tile. Drop --tile / --image-size.")
            if not outs:
                outs = [torch.zeros(*r.shape[:-2], size[0] * scale_out, size[1] * scale_out, dtype=r.dtype,
                                    device=r.device) for r in results]
            weight = (w_y[:, None] * w_x[None, :]).to(results[0].device, results[0].dtype)  # (h*, w*)
            for out, r in zip(outs, results):
                out[..., y * scale_out:(y + ty) * scale_out, x * scale_out:(x + tx) * scale_out] += r * weight
    if len(ys) * len(xs) > 1:  # the weights sum to 1 wherever ramps meet exactly; separable, so no (h*, w*) buffer
        for out in outs:
            out.div_(sum_y.to(out.device, out.dtype)[:, None]).div_(sum_x.to(out.device, out.dtype)[None, :])
    return outs


def check_any_size_images(model: VAE, x: Tensor, where: str = "the data") -> None:
    """Raise :class:`DataError` unless ``x`` is a (B, C, H, W) batch of ``model``'s channels and range, any H, W."""
    c = model.image_shape[0]
    if x.ndim != 4 or x.shape[0] == 0 or x.shape[1] != c:
        raise DataError(f"Images from {where} have shape {tuple(x.shape)}, but the model takes (B, {c}, H, W) batches of "
                        f"{c}-channel images (any H, W when tiled). Convert the images or use the matching model.")
    lo, hi = (float(v) for v in torch.aminmax(x))  # NaN and inf show in the extremes: no image-sized temporaries
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DataError(f"Images from {where} contain NaN or infinite pixels; clean the data.")
    low, high = model.value_range
    if lo < low - 1e-3 or hi > high + 1e-3:
        raise DataError(f"Pixels from {where} span [{lo:.3g}, {hi:.3g}] but the model's output range is [{low:g}, "
                        f"{high:g}] (model.output_range='{model.output_range}'). Rescale the data.")


class _Encoder:
    def __init__(self, model: VAE) -> None:
        self.model = model

    def __call__(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        q = self.model.encode(x)
        return q.mean, q.logvar


class _Decoder:
    def __init__(self, model: VAE) -> None:
        self.model = model

    def __call__(self, z: Tensor) -> Tuple[Tensor]:
        return (self.model.decode(z),)


@torch.no_grad()
def encode_tiled(model: VAE, x: Tensor, tile: Optional[int] = None, overlap: Optional[int] = None) -> DiagonalGaussian:
    """The posterior of images ``x`` (B, C, H, W) of any size, encoded tile by tile and blended.

    Mean and log-variance are blended alike (as diffusers blends the moments). The latent is
    (B, c, ceil(H / f), ceil(W / f)).

    Raises:
        ConfigError: a tile/overlap the model cannot take (see :func:`check_tiling`).
        DataError: images of another channel count or range, or non-finite pixels.

    Example:
        >>> q = encode_tiled(model, torch.rand(1, 3, 1000, 1500) * 2 - 1, tile=256, overlap=64)  # doctest: +SKIP
    """
    tile, overlap, f = check_tiling(model, Tiling(tile, overlap))
    check_any_size_images(model, x, "the input")
    p = next(model.parameters())
    mean, logvar = _blend(x.to(p.device), _Encoder(model), f, 1, f, tile, overlap, model.config.name)
    return DiagonalGaussian(mean, logvar)


@torch.no_grad()
def decode_tiled(model: VAE, z: Tensor, tile: Optional[int] = None, overlap: Optional[int] = None) -> Tensor:
    """Images (B, C, h f, w f) for latents ``z`` (B, c, h, w) of any spatial size, decoded tile by tile.

    ``tile`` and ``overlap`` are in image pixels (tile / f latent pixels per tile).

    Raises:
        ConfigError: a tile/overlap the model cannot take. DataError: latents of another channel count,
            or non-finite ones.
    """
    tile, overlap, f = check_tiling(model, Tiling(tile, overlap))
    c = model.latent_shape[0]
    if z.ndim != 4 or z.shape[0] == 0 or z.shape[1] != c:
        raise DataError(f"The latents have shape {tuple(z.shape)}, but this model decodes (B, {c}, h, w) latents (any h, "
                        "w when tiled): they come from another model. Decode them with the model that encoded them.")
    if not all(math.isfinite(float(v)) for v in torch.aminmax(z)):
        raise DataError("The latents contain NaN or inf values; they would decode to NaN images.")
    p = next(model.parameters())
    (images,) = _blend(z.to(p.device, p.dtype), _Decoder(model), 1, f, f, tile, overlap, model.config.name)
    return images


@torch.no_grad()
def reconstruct_tiled(model: VAE, x: Tensor, tile: Optional[int] = None, overlap: Optional[int] = None,
                      sample: bool = False) -> Tensor:
    """Tiled :func:`encode_tiled` then :func:`decode_tiled` of the posterior mean (or a draw, ``sample``),
    cropped to the input's (H, W).

    Example:
        >>> reconstruct_tiled(model, torch.rand(1, 3, 70, 90) * 2 - 1, tile=32, overlap=8).shape  # doctest: +SKIP
        torch.Size([1, 3, 70, 90])
    """
    q = encode_tiled(model, x, tile, overlap)
    z = q.rsample() if sample else q.mean
    return decode_tiled(model, z.contiguous(), tile, overlap)[..., : x.shape[-2], : x.shape[-1]]


@torch.no_grad()
def reconstruct_dataset(model: VAE, dataset, tiling: Tiling, batch_size: int = 1) -> Tuple[Tensor, Tensor]:
    """``vaegan reconstruct --tile``: every image of ``dataset`` in order, tiled; (inputs, reconstructions) uint8.

    Raises:
        ConfigError: a tiling the model cannot take. DataError: images the model does not take.
    """
    from torch.utils.data import DataLoader

    from .images import to_uint8

    check_tiling(model, tiling)
    inputs, recons = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = image_of(batch)  # (B, C, H, W); labels dropped
        inputs.append(to_uint8(x, model.value_range))
        recons.append(to_uint8(reconstruct_tiled(model, x, tiling.tile, tiling.overlap), model.value_range))
    if not inputs:
        raise DataError("The dataset has no images to reconstruct.")
    return torch.cat(inputs), torch.cat(recons)
