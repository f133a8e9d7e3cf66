"""The VAE: encoders, decoders, a diagonal Gaussian posterior, and save/load without pickle.

``VAE.forward`` returns everything the objective needs (reconstruction, posterior, latent, and on
request a perturbed decode and prior samples) in one call. Training always goes through this one
``forward`` of the (possibly DDP-wrapped) module, so DDP all-reduces every generator gradient and
autocast covers the whole generator; nothing calls ``.module.encode`` around the wrapper.

Example:
    >>> vae = VAE(ModelConfig(image_channels=1, image_size=(28, 28), latent_dim=8))
    >>> out = vae(torch.rand(4, 1, 28, 28))
    >>> out.recon.shape, out.z.shape
    (torch.Size([4, 1, 28, 28]), torch.Size([4, 8]))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import ModelConfig, from_dict, to_dict
from .errors import CheckpointError, ConfigError, DataError

__all__ = ["DiagonalGaussian", "VAEOutput", "VAE"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DiagonalGaussian:
    """A factorised Gaussian q(z|x) with mean and (clamped) log-variance, each (B, D)."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def rsample(self) -> Tensor:
        """The reparameterisation trick: z = mean + std * eps, differentiable in both."""
        return self.mean + self.std * torch.randn_like(self.std)

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per latent dimension, shape (B, D), in nats."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


@dataclass
class VAEOutput:
    """What one generator forward produces. Image tensors are (B, C, H, W); latents (B, D)."""

    recon: Tensor
    posterior: DiagonalGaussian
    z: Tensor
    recon_logits: Optional[Tensor] = None  # decoder pre-activation of recon (BCE with logits)
    recon_decoder_only: Optional[Tensor] = None  # decode(z.detach()): fakes whose gradient skips the encoder
    perturbed: Optional[Tensor] = None  # decode(z + sigma * u), for the smoothness regulariser
    perturbation: Optional[Tensor] = None  # sigma * u, (B, D)
    prior_samples: Optional[Tensor] = None  # decode(z ~ N(0, I)), for a discriminator's fakes


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
    """Strided convs halve H and W per level; a linear head gives mean and log-variance."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c_in = cfg.image_channels
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), GroupNorm(cfg.norm_groups, c), nn.SiLU()]
            layers += [ResBlock(c, cfg.norm_groups) for _ in range(cfg.res_blocks)]
            c_in = c
        self.features = nn.Sequential(*layers)
        h, w = _spatial_sizes(cfg.image_size, len(cfg.channels))[-1]
        self.head = nn.Linear(c_in * h * w, 2 * cfg.latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = rearrange(self.features(x), "b c h w -> b (c h w)")
        return self.head(h)  # (B, 2D)


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: nearest upsampling to the exact encoder sizes, then conv.

    Upsampling to the recorded sizes (not a fixed x2) makes any (H, W) round-trip exactly, and
    avoids the checkerboard artefacts of transposed convolutions.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = list(cfg.channels)[::-1]
        self.sizes = _spatial_sizes(cfg.image_size, len(widths))[::-1]  # smallest first
        self.c0 = widths[0]
        self.fc = nn.Linear(cfg.latent_dim, widths[0] * self.sizes[0][0] * self.sizes[0][1])
        self.stages = nn.ModuleList()
        for i, c in enumerate(widths):
            c_out = widths[i + 1] if i + 1 < len(widths) else widths[-1]
            blocks: List[nn.Module] = [ResBlock(c, cfg.norm_groups) for _ in range(cfg.res_blocks)]
            blocks += [nn.Conv2d(c, c_out, 3, padding=1), GroupNorm(cfg.norm_groups, c_out), nn.SiLU()]
            self.stages.append(nn.Sequential(*blocks))
        # The last layer: the adaptive GAN weight (plugins) measures gradient norms here.
        self.out = nn.Conv2d(widths[-1], cfg.image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h0, w0 = self.sizes[0]
        x = rearrange(self.fc(z), "b (c h w) -> b c h w", c=self.c0, h=h0, w=w0)
        for stage, size in zip(self.stages, self.sizes[1:]):
            x = stage(F.interpolate(x, size=size, mode="nearest"))
        return self.out(x)  # (B, C, H, W) logits / pre-activation


class MLPEncoder(nn.Module):
    """The seed documents' fully connected encoder (784-400-2x20 for MNIST)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dims = [cfg.image_channels * cfg.image_size[0] * cfg.image_size[1], *cfg.mlp_hidden]
        layers: List[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], 2 * cfg.latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(rearrange(x, "b c h w -> b (c h w)")))


class MLPDecoder(nn.Module):
    """The seed documents' fully connected decoder (20-400-784 for MNIST)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.shape = cfg.image_shape
        dims = [cfg.latent_dim, *cfg.mlp_hidden[::-1]]
        layers: List[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        c, h, w = self.shape
        self.out = nn.Linear(dims[-1], c * h * w)

    def forward(self, z: Tensor) -> Tensor:
        c, h, w = self.shape
        return rearrange(self.out(self.body(z)), "b (c h w) -> b c h w", c=c, h=h, w=w)


# Two built-in architectures; a new one is a new (encoder, decoder) pair here.
_ARCHITECTURES = {"conv": (ConvEncoder, ConvDecoder), "mlp": (MLPEncoder, MLPDecoder)}


class VAE(nn.Module):
    """A variational autoencoder for images of shape ``config.image_shape``.

    Args:
        config: The architecture; see :class:`~vaegan.config.ModelConfig`.

    Raises:
        DataError: from :meth:`check_images` when an input does not fit.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        enc, dec = _ARCHITECTURES[config.arch]
        self.encoder = enc(config)
        self.decoder = dec(config)
        low, high = (0.0, 1.0) if config.output_range == "unit" else (-1.0, 1.0)
        self.value_range = (low, high)

    # ---- building blocks -------------------------------------------------------------------
    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight: where the adaptive adversarial weight compares gradients."""
        return self.decoder.out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x) for images ``x`` of shape (B, C, H, W)."""
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)  # posterior math in fp32
        logvar = logvar.clamp(self.config.logvar_min, self.config.logvar_max)
        return DiagonalGaussian(mean, logvar)

    def decode_logits(self, z: Tensor) -> Tensor:
        """The decoder's pre-activation output (B, C, H, W): logits for BCE, for instance."""
        return self.decoder(z)

    def activate(self, logits: Tensor) -> Tensor:
        """Map decoder pre-activations into the configured output range."""
        return torch.sigmoid(logits) if self.config.output_range == "unit" else torch.tanh(logits)

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, C, H, W) in the output range for latents ``z`` (B, D)."""
        return self.activate(self.decode_logits(z))

    # ---- training ----------------------------------------------------------------------------
    def forward(self, x: Tensor, perturb_std: float = 0.0, num_prior: int = 0, decoder_only: bool = False) -> VAEOutput:
        """Encode, sample, decode; optionally decode a perturbed latent, prior samples, and a copy of
        the reconstruction whose gradient reaches only the decoder.

        Args:
            x: Images (B, C, H, W) in the output range.
            perturb_std: When > 0, also decode ``z + perturb_std * u`` with ``u ~ N(0, I)``.
            num_prior: When > 0, also decode that many ``z ~ N(0, I)``.
            decoder_only: Also decode ``z.detach()`` (same values as ``recon``, no encoder gradient).

        Returns:
            A :class:`VAEOutput`; ``recon`` is in the output range.
        """
        posterior = self.encode(x)
        z = posterior.rsample()
        zs = [z]
        if decoder_only:
            zs.append(z.detach())
        delta = None
        if perturb_std > 0:
            delta = perturb_std * torch.randn_like(z)
            zs.append(z + delta)
        if num_prior > 0:
            zs.append(torch.randn(num_prior, z.shape[1], device=z.device, dtype=z.dtype))
        # One decoder call for all latents: one kernel launch per layer instead of three.
        logits = self.decode_logits(torch.cat(zs))
        images = self.activate(logits)
        b = x.shape[0]
        out = VAEOutput(recon=images[:b], posterior=posterior, z=z, recon_logits=logits[:b])
        offset = b
        if decoder_only:
            out.recon_decoder_only = images[offset : offset + b]
            offset += b
        if delta is not None:
            out.perturbed, out.perturbation = images[offset : offset + b], delta
            offset += b
        if num_prior > 0:
            out.prior_samples = images[offset:]
        return out

    # ---- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Tensor, sample: bool = False) -> Tensor:
        """Reconstruct images; uses the posterior mean unless ``sample`` is True."""
        q = self.encode(x)
        return self.decode(q.rsample() if sample else q.mean)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw ``n`` images (n, C, H, W) from the prior, scaled by ``temperature``."""
        p = next(self.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=p.device) * temperature
        return self.decode(z.to(p.dtype))

    @torch.no_grad()
    def interpolate(self, x0: Tensor, x1: Tensor, steps: int = 8) -> Tensor:
        """Decode ``steps`` points on the line between the posterior means of x0 and x1.

        Args:
            x0, x1: Images (B, C, H, W).
        Returns:
            (B, steps, C, H, W) images; index 0 is near x0 and index -1 near x1.
        """
        z0, z1 = self.encode(x0).mean, self.encode(x1).mean
        t = torch.linspace(0, 1, steps, device=z0.device).view(1, steps, 1)
        z = torch.lerp(z0.unsqueeze(1), z1.unsqueeze(1), t)  # (B, steps, D)
        imgs = self.decode(rearrange(z, "b s d -> (b s) d"))
        return rearrange(imgs, "(b s) c h w -> b s c h w", s=steps)

    def check_images(self, x: Tensor, where: str = "the data") -> None:
        """Raise :class:`DataError` unless ``x`` is a (B, C, H, W) batch this model accepts."""
        want = self.config.image_shape
        if x.numel() == 0:
            raise DataError(f"{where} gave an empty batch; the dataset must contain images.")
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise DataError(
                f"Images from {where} have shape {tuple(x.shape[1:]) if x.ndim == 4 else tuple(x.shape)}"
                f" but the model expects (C, H, W) = {want}. Set model.image_channels and "
                "model.image_size to match the data, or resize/convert the images."
            )
        if not torch.isfinite(x).all():
            raise DataError(f"Images from {where} contain NaN or infinite pixels; clean the data.")
        low, high = self.value_range
        lo, hi = float(x.min()), float(x.max())
        if lo < low - 1e-3 or hi > high + 1e-3:
            raise DataError(
                f"Pixels from {where} span [{lo:.3g}, {hi:.3g}] but the model's output range is "
                f"[{low:g}, {high:g}] (model.output_range='{self.config.output_range}'). Rescale "
                "the data or change model.output_range."
            )

    # ---- serialisation -----------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (no pickle) into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt", "library": "vaegan"})
        (d / CONFIG_NAME).write_text(json.dumps(to_dict(self.config), indent=2) + "\n")
        return d

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], map_location: str = "cpu") -> "VAE":
        """Load a model written by :meth:`save_pretrained`.

        Raises:
            CheckpointError: missing/corrupt files or weights that do not fit the config.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise CheckpointError(
                    f"'{p}' is missing: '{d}' is not a saved vaegan model. Pass the folder written by "
                    "save_pretrained (a training run's <output-dir>/final)."
                )
        try:
            config = from_dict(ModelConfig, json.loads(cfg_path.read_text()), "model")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"'{cfg_path}' is not valid JSON ({exc}); the save is corrupt.") from None
        except ConfigError as exc:
            raise CheckpointError(f"'{cfg_path}' is not a vaegan model config: {exc}") from None
        try:
            state = load_file(str(w_path), device=map_location)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"'{w_path}' cannot be read as safetensors ({exc}); the file is corrupt or truncated. "
                "Re-export it from a training checkpoint."
            ) from None
        model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"'{w_path}' does not fit the architecture in '{cfg_path}': missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}. The two files come from "
                "different models; re-save them together."
            )
        model.load_state_dict(state)
        return model.to(map_location)
