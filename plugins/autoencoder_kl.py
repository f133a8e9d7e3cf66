"""The LDM / Stable Diffusion KL autoencoder as a vaegan generator: a spatial latent (B, c, H/f, W/f).

Registered as ``autoencoder_kl`` in ``vaegan.generators``:

.. code-block:: yaml

    model:
      name: autoencoder_kl
      image_channels: 3
      image_size: [64, 64]
      output_range: symmetric
      options: {block_out_channels: [64, 128, 256], layers_per_block: 2, latent_channels: 3}

The architecture is the one of latent diffusion's first stage (Rombach et al. 2022), which every
``diffusers.AutoencoderKL`` uses (SD 1/2, SDXL, SD3 and Flux differ only in configuration): residual
blocks with GroupNorm + SiLU, one stride-2 downsampling per level but the last (f = 2^(levels - 1)), a
middle block with one self-attention layer at the lowest resolution, and a mirrored decoder with
nearest-neighbour upsampling. The module names are diffusers' own, so a state dict converts one to one
(:mod:`vaegan_plugins.diffusers_io`); the implementation is vaegan's and needs no diffusers.

The decoder's output is the image itself (``output_activation: identity``, diffusers' convention: no
squashing; images leave vaegan clamped to the range), or ``tanh``.
"""

from __future__ import annotations

import math
import logging
from typing import List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaegan.api import VAE, DiagonalGaussian
from vaegan.errors import ConfigError
from vaegan.model import GroupNorm  # nn.GroupNorm that stays fast on channels_last bf16 CPU input

__all__ = ["ResnetBlock", "Attention", "Encoder", "Decoder", "AutoencoderKL", "channels_mismatch"]

logger = logging.getLogger(__name__)

_EPS = 1e-6  # GroupNorm epsilon of every LDM/SD VAE


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in, eps=_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = GroupNorm(groups, c_out, eps=_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the positions of a (B, C, H, W) map, with a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x.reshape(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        out = self.to_out[0](attended).transpose(1, 2).reshape(b, c, h, w)
        return out + x


class Downsample(nn.Module):
    """A stride-2 3x3 conv after padding one pixel right and bottom: (H, W) -> (H/2, W/2) for even sizes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (no checkerboard artefacts of transposed convolutions)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder or the decoder: residual blocks, then an optional resampler."""

    def __init__(self, widths: Sequence[Tuple[int, int]], groups: int, resample: Optional[nn.Module],
                 resampler_name: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(a, b, groups) for a, b in widths])
        setattr(self, resampler_name, nn.ModuleList([resample] if resample is not None else []))
        self._resampler = resampler_name

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        for resample in getattr(self, self._resampler):
            x = resample(x)
        return x


class _Middle(nn.Module):
    """Residual block, self-attention (optional), residual block: the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Images (B, C, H, W) -> (B, 2c, H/f, W/f): the posterior's mean and log-variance maps."""

    def __init__(self, in_channels: int, latent_channels: int, widths: Sequence[int], layers: int, groups: int,
                 attention: bool) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks: List[nn.Module] = []
        c = widths[0]
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            pairs = [(c, width)] + [(width, width)] * (layers - 1)
            blocks.append(_Level(pairs, groups, None if last else Downsample(width), "downsamplers"))
            c = width
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = _Middle(c, groups, attention)
        self.conv_norm_out = GroupNorm(groups, c, eps=_EPS)
        self.conv_out = nn.Conv2d(c, 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents (B, c, h, w) -> images (B, C, h f, w f), before the output activation."""

    def __init__(self, out_channels: int, latent_channels: int, widths: Sequence[int], layers: int, groups: int,
                 attention: bool) -> None:
        super().__init__()
        rev = list(widths)[::-1]
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = _Middle(rev[0], groups, attention)
        blocks: List[nn.Module] = []
        c = rev[0]
        for i, width in enumerate(rev):
            last = i == len(rev) - 1
            pairs = [(c, width)] + [(width, width)] * layers  # one block more than the encoder's level
            blocks.append(_Level(pairs, groups, None if last else Upsample(width), "upsamplers"))
            c = width
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = GroupNorm(groups, c, eps=_EPS)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _positive_ints(values: object, name: str) -> Tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"autoencoder_kl: {name} must be a list of positive integers, got {values!r}.")
    out = tuple(values)  # type: ignore[arg-type]
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ConfigError(f"autoencoder_kl: {name} must be a non-empty list of positive integers, got {values!r}.")
    return out


class AutoencoderKL(VAE):
    """The KL autoencoder of latent diffusion (generator ``autoencoder_kl``); spatial latent (c, H/f, W/f).

    Args:
        image_shape: (C, H, W), passed by vaegan; H and W must be multiples of f.
        output_range: ``symmetric`` ([-1, 1], what every SD-family VAE is trained on) or ``unit``.
        block_out_channels: Width of each resolution level; f = 2^(levels - 1). SD's VAE: 128, 256, 512, 512.
        layers_per_block: Residual blocks per encoder level (the decoder has one more per level).
        latent_channels: c, the latent map's channels (SD 1/2/XL: 4; SD3, Flux: 16; LDM kl-f4: 3).
        norm_num_groups: GroupNorm groups; every width must be divisible by it.
        mid_block_add_attention: Self-attention at the lowest resolution (SD: true).
        use_quant_conv, use_post_quant_conv: The 1x1 convs after the encoder and before the decoder
            (SD 1/2/XL: true; SD3, Flux: false).
        output_activation: ``identity`` (diffusers' convention) or ``tanh``.
        scaling_factor, shift_factor: Latent normalisation ``(z - shift) * scaling`` that diffusion
            pipelines apply (not the autoencoder); kept in the model's config and its diffusers export,
            used by ``vaegan encode --scaled``. None: not set.
        latents_mean, latents_std: Per-channel mean and std of the latents (c values each), the
            per-channel normalisation ``(z - mean_c) / std_c``; set with the global pair by
            ``train.estimate_scaling_factor`` (:mod:`vaegan.latent_stats`). None: not set.
        trainable: ``all``, or ``decoder`` to fine-tune only the decoder: the encoder and the quant conv
            are frozen (no gradient, not in the optimizer, skipped by the EMA), so latents stay
            compatible with models trained on them.
        logvar_min, logvar_max: Clamp of the posterior log-variance (-30, 20 as in LDM and diffusers).

    Raises:
        ConfigError: widths not divisible by the groups, or an image size that is not a multiple of f.

    Example:
        >>> ae = AutoencoderKL((3, 32, 32), "symmetric", block_out_channels=[8, 16], norm_num_groups=4,
        ...                    latent_channels=2, layers_per_block=1)
        >>> ae.latent_shape, ae(torch.rand(2, 3, 32, 32) * 2 - 1).recon.shape
        ((2, 16, 16), torch.Size([2, 3, 32, 32]))
    """

    def __init__(self, image_shape: Tuple[int, int, int], output_range: str = "symmetric",
                 block_out_channels: Sequence[int] = (128, 256, 512, 512), layers_per_block: int = 2,
                 latent_channels: int = 4, norm_num_groups: int = 32, mid_block_add_attention: bool = True,
                 use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 output_activation: Literal["identity", "tanh"] = "identity", scaling_factor: Optional[float] = None,
                 shift_factor: Optional[float] = None, trainable: Literal["all", "decoder"] = "all",
                 logvar_min: float = -30.0, logvar_max: float = 20.0, latents_mean: Optional[Sequence[float]] = None,
                 latents_std: Optional[Sequence[float]] = None) -> None:
        super().__init__(image_shape, output_range, (logvar_min, logvar_max))
        widths = _positive_ints(block_out_channels, "block_out_channels")
        (layers,) = _positive_ints([layers_per_block], "layers_per_block")
        (c,) = _positive_ints([latent_channels], "latent_channels")
        (groups,) = _positive_ints([norm_num_groups], "norm_num_groups")
        if any(w % groups for w in widths):
            raise ConfigError(f"autoencoder_kl: every width in block_out_channels {list(widths)} must be divisible by "
                              f"norm_num_groups ({groups}); change one or the other.")
        if output_activation not in ("identity", "tanh"):
            raise ConfigError(f"autoencoder_kl: output_activation must be 'identity' or 'tanh', got {output_activation!r}.")
        if trainable not in ("all", "decoder"):
            raise ConfigError(f"autoencoder_kl: trainable must be 'all' or 'decoder', got {trainable!r}.")
        channels, h, w = self.image_shape
        f = 2 ** (len(widths) - 1)
        if h % f or w % f:
            raise ConfigError(
                f"autoencoder_kl with {len(widths)} levels downsamples by f = {f}, so the image height and width must "
                f"be multiples of {f}; got {h}x{w}. Use model.image_size = [{max(f, h // f * f)}, {max(f, w // f * f)}] "
                "(images are resized and centre-cropped to it) or fewer levels in block_out_channels.")
        self.downsampling_factor = f
        self.latent_shape = (c, h // f, w // f)
        self.output_activation = output_activation
        for name, value in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or (name == "scaling_factor" and value <= 0)):
                rule = "a finite number > 0" if name == "scaling_factor" else "a finite number"
                raise ConfigError(f"autoencoder_kl: {name} must be {rule} or null, got {value!r}: latents scaled by it "
                                  "would be all zeros or NaN. Remove it (null) or set it again (train.estimate_scaling_factor).")
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if values is not None and (isinstance(values, (str, bytes)) or not hasattr(values, "__len__")
                                       or len(values) != c or not all(
                                           isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                           and (name == "latents_mean" or v > 0) for v in values)):
                rule = "finite numbers" if name == "latents_mean" else "finite numbers > 0"
                raise ConfigError(f"autoencoder_kl: {name} must be null or {c} {rule} (one per latent channel), got "
                                  f"{values!r}. Remove it (null) or estimate it again (train.estimate_scaling_factor).")
        attention = bool(mid_block_add_attention)
        self.encoder = Encoder(channels, c, widths, layers, groups, attention)
        self.decoder = Decoder(channels, c, widths, layers, groups, attention)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if use_post_quant_conv else None
        if trainable == "decoder":
            for frozen in (self.encoder, self.quant_conv):
                if frozen is not None:
                    frozen.requires_grad_(False)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)  # (B, 2c, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return self.posterior(moments)

    def decode_logits(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def activate(self, logits: Tensor) -> Tensor:
        return logits if self.output_activation == "identity" else torch.tanh(logits)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    def save_extra_formats(self, directory) -> None:
        """Also write ``directory/diffusers``, the same model as a diffusers AutoencoderKL folder, and
        ``directory/ldm/vae.safetensors``, the single-file LDM layout ComfyUI and A1111 load."""
        from vaegan.errors import PluginError

        from .diffusers_io import save_diffusers
        from .ldm_checkpoint import LDM_DIR, LDM_FILE, save_ldm

        if self.output_activation != "identity":
            return  # no diffusers or LDM equivalent
        save_ldm(self, directory / LDM_DIR / LDM_FILE)  # needs nothing but safetensors
        try:
            save_diffusers(self, directory / "diffusers")
        except PluginError as exc:  # diffusers is optional: the vaegan files are complete without it
            logger.warning("No diffusers copy in %s: %s", directory, str(exc).split(". ")[0] + ".")


def channels_mismatch(source: str, vae_channels: int, model_channels: int) -> str:
    """The one paragraph for a pretrained VAE made for other images than the config's (both are named)."""
    return (f"{source} was made for {vae_channels}-channel images (its input convolution), but model.image_channels "
            f"is {model_channels}: set model.image_channels to {vae_channels}, or start from a VAE for "
            f"{model_channels}-channel images.")
