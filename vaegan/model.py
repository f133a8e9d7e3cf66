"""vaegan's built-in generators, ``conv`` and ``mlp``, and the layers they share with the plugins.

Both are registered in ``setup.cfg`` (group ``vaegan.generators``) exactly like a third-party
generator, and both have a vector latent ``(B, latent_dim)``:

- ``conv`` (:class:`ConvVAE`): strided convolutions with GroupNorm + SiLU (optional residual blocks),
  a linear head to the posterior, and a mirrored decoder that upsamples to the encoder's exact sizes
  (any H and W round-trip). The MNIST recipe's default.
- ``mlp`` (:class:`MLPVAE`): the seed documents' fully connected 784-400-20 VAE.

:class:`GroupNorm` is ``nn.GroupNorm`` made fast for channels_last bf16 input on CPUs; the
first-party discriminators use it too.

Example:
    >>> vae = ConvVAE((1, 28, 28), latent_dim=8)
    >>> vae(torch.rand(4, 1, 28, 28)).z.shape
    torch.Size([4, 8])
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._deprecation import deprecated_names
from .errors import ConfigError
from .generator import VAE as _VAE
from .generator import DiagonalGaussian as _DiagonalGaussian

__all__ = ["GroupNorm", "ResBlock", "ConvEncoder", "ConvDecoder", "MLPEncoder", "MLPDecoder", "ConvVAE", "MLPVAE"]


def _spatial_sizes(size: Tuple[int, int], levels: int) -> List[Tuple[int, int]]:
    """(H, W) at every resolution: a 3x3 stride-2 conv with padding 1 maps s to ceil(s / 2)."""
    sizes = [tuple(size)]
    for _ in range(levels):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes  # type: ignore[return-value]


class _Relayout(torch.autograd.Function):
    """``x.contiguous(memory_format=to)`` whose backward gives the gradient back in ``back``.

    A plain ``.contiguous()`` passes the gradient on in whatever layout it arrives, so the layers
    before it would run their backward on operands of two layouts (``silu_backward`` measured 7x
    slower on this CPU that way).
    """

    @staticmethod
    def forward(ctx, x: Tensor, to: torch.memory_format, back: torch.memory_format) -> Tensor:  # type: ignore[override]
        ctx.back = back
        return x.contiguous(memory_format=to)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad.contiguous(memory_format=ctx.back), None, None


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state_dict) that normalises bf16/fp16 channels_last
    CPU input in NCHW.

    With ``train.channels_last`` the convolutions and upsampling run in NHWC, which oneDNN's bf16
    kernels want (a (128, 32, 28, 28) 3x3 conv: 2.8 ms NHWC vs 19.6 ms NCHW on an AMX CPU), but
    PyTorch's CPU GroupNorm kernel is slow on channels_last bf16: forward + backward 44 ms, against
    13 ms for a switch to NCHW and back around the NCHW kernel. So in bf16/fp16 on the CPU the norm
    alone switches layout (docs/benchmarks.md has the end-to-end numbers). fp32 keeps the NHWC kernel
    (12 ms against 23 ms with the switch), and CUDA's kernel computes on an NCHW copy by itself.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() != 4 or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16)
                or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        cl, nchw = torch.channels_last, torch.contiguous_format
        return _Relayout.apply(super().forward(_Relayout.apply(x, nchw, cl)), cl, nchw)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block (no batch statistics: safe under DDP and tiny batches)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvEncoder(nn.Module):
    """Strided convs halve H and W per level; a linear head gives mean and log-variance (B, 2D)."""

    def __init__(self, image_shape: Tuple[int, int, int], latent_dim: int, channels: Sequence[int],
                 res_blocks: int, norm_groups: int) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c_in = image_shape[0]
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), GroupNorm(norm_groups, c), nn.SiLU()]
            layers += [ResBlock(c, norm_groups) for _ in range(res_blocks)]
            c_in = c
        self.features = nn.Sequential(*layers)
        h, w = _spatial_sizes(image_shape[1:], len(channels))[-1]
        self.head = nn.Linear(c_in * h * w, 2 * latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = rearrange(self.features(x), "b c h w -> b (c h w)")
        return self.head(h)  # (B, 2D)


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: nearest upsampling to the exact encoder sizes, then conv.

    Upsampling to the recorded sizes (not a fixed x2) makes any (H, W) round-trip exactly, and
    avoids the checkerboard artefacts of transposed convolutions.
    """

    def __init__(self, image_shape: Tuple[int, int, int], latent_dim: int, channels: Sequence[int],
                 res_blocks: int, norm_groups: int) -> None:
        super().__init__()
        widths = list(channels)[::-1]
        self.sizes = _spatial_sizes(image_shape[1:], len(widths))[::-1]  # smallest first
        self.c0 = widths[0]
        self.fc = nn.Linear(latent_dim, widths[0] * self.sizes[0][0] * self.sizes[0][1])
        self.stages = nn.ModuleList()
        for i, c in enumerate(widths):
            c_out = widths[i + 1] if i + 1 < len(widths) else widths[-1]
            blocks: List[nn.Module] = [ResBlock(c, norm_groups) for _ in range(res_blocks)]
            blocks += [nn.Conv2d(c, c_out, 3, padding=1), GroupNorm(norm_groups, c_out), nn.SiLU()]
            self.stages.append(nn.Sequential(*blocks))
        # The last layer: the adaptive GAN weight (plugins) measures gradient norms here.
        self.out = nn.Conv2d(widths[-1], image_shape[0], 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h0, w0 = self.sizes[0]
        x = rearrange(self.fc(z), "b (c h w) -> b c h w", c=self.c0, h=h0, w=w0)
        for stage, size in zip(self.stages, self.sizes[1:]):
            x = stage(F.interpolate(x, size=size, mode="nearest"))
        return self.out(x)  # (B, C, H, W) logits / pre-activation


class MLPEncoder(nn.Module):
    """The seed documents' fully connected encoder (784-400-2x20 for MNIST)."""

    def __init__(self, image_shape: Tuple[int, int, int], latent_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        c, h, w = image_shape
        dims = [c * h * w, *hidden]
        layers: List[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], 2 * latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(rearrange(x, "b c h w -> b (c h w)")))


class MLPDecoder(nn.Module):
    """The seed documents' fully connected decoder (20-400-784 for MNIST)."""

    def __init__(self, image_shape: Tuple[int, int, int], latent_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(image_shape)
        dims = [latent_dim, *list(hidden)[::-1]]
        layers: List[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        c, h, w = self.shape
        self.out = nn.Linear(dims[-1], c * h * w)

    def forward(self, z: Tensor) -> Tensor:
        c, h, w = self.shape
        return rearrange(self.out(self.body(z)), "b (c h w) -> b c h w", c=c, h=h, w=w)


def _check_int(value: object, name: str, owner: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _check_widths(widths: object, name: str, owner: str) -> Tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
        raise ConfigError(f"{owner}: {name} must be a non-empty list of widths, got {widths!r}.")
    return tuple(_check_int(c, name, owner) for c in widths)


class ConvVAE(_VAE):
    """The convolutional VAE (generator ``conv``): vector latent, any image size and channel count.

    Args:
        image_shape: (C, H, W), passed by vaegan.
        output_range: ``unit`` or ``symmetric``, passed by vaegan.
        latent_dim: Size of the latent vector (32 since vaegan 0.3: MNIST samples need the room; 0.2 and
            pythae's MNIST VAEGAN use 16; docs/training.md).
        channels: Conv widths per resolution; each level halves H and W (32/64: fast on a CPU).
        res_blocks: Residual blocks per resolution in encoder and decoder (0 keeps MNIST fast).
        norm_groups: GroupNorm groups; every width must be divisible by it (no batch statistics:
            safe under DDP and tiny batches).
        logvar_min, logvar_max: Clamp of the posterior log-variance.

    Raises:
        ConfigError: widths not divisible by ``norm_groups``, or non-positive sizes.
    """

    def __init__(self, image_shape: Tuple[int, int, int], output_range: str = "unit", latent_dim: int = 32,
                 channels: Sequence[int] = (32, 64), res_blocks: int = 0, norm_groups: int = 8,
                 logvar_min: float = -30.0, logvar_max: float = 20.0) -> None:
        super().__init__(image_shape, output_range, (logvar_min, logvar_max))
        latent_dim = _check_int(latent_dim, "latent_dim", "conv")
        channels = _check_widths(channels, "channels", "conv")
        _check_int(res_blocks, "res_blocks", "conv", minimum=0)
        _check_int(norm_groups, "norm_groups", "conv")
        bad = [c for c in channels if c % norm_groups]
        if bad:
            raise ConfigError(f"conv: channels {list(channels)} must all be divisible by norm_groups ({norm_groups}) "
                              "for GroupNorm; change model.options.channels or model.options.norm_groups.")
        self.latent_shape = (latent_dim,)
        self.encoder = ConvEncoder(self.image_shape, latent_dim, channels, res_blocks, norm_groups)
        self.decoder = ConvDecoder(self.image_shape, latent_dim, channels, res_blocks, norm_groups)

    def encode(self, x: Tensor) -> _DiagonalGaussian:
        return self.posterior(self.encoder(x))  # (B, D) each

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.out.weight


class MLPVAE(_VAE):
    """The fully connected VAE of the seed documents (generator ``mlp``): 784-400-20 on MNIST.

    Args:
        image_shape: (C, H, W), passed by vaegan.
        output_range: ``unit`` or ``symmetric``, passed by vaegan.
        latent_dim: Size of the latent vector.
        hidden: Hidden widths of the encoder (the decoder mirrors them).
        logvar_min, logvar_max: Clamp of the posterior log-variance.
    """

    def __init__(self, image_shape: Tuple[int, int, int], output_range: str = "unit", latent_dim: int = 16,
                 hidden: Sequence[int] = (400,), logvar_min: float = -30.0, logvar_max: float = 20.0) -> None:
        super().__init__(image_shape, output_range, (logvar_min, logvar_max))
        latent_dim = _check_int(latent_dim, "latent_dim", "mlp")
        hidden = _check_widths(hidden, "hidden", "mlp")
        self.latent_shape = (latent_dim,)
        self.encoder = MLPEncoder(self.image_shape, latent_dim, hidden)
        self.decoder = MLPDecoder(self.image_shape, latent_dim, hidden)

    def encode(self, x: Tensor) -> _DiagonalGaussian:
        return self.posterior(self.encoder(x))

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.out.weight


# vaegan 0.1 defined these here; they are the generator contract now (vaegan.api).
__getattr__ = deprecated_names(__name__, {
    "VAE": "vaegan.api:VAE", "VAEOutput": "vaegan.api:VAEOutput", "DiagonalGaussian": "vaegan.api:DiagonalGaussian",
    "CONFIG_NAME": "vaegan.generator:CONFIG_NAME", "WEIGHTS_NAME": "vaegan.generator:WEIGHTS_NAME",
})
