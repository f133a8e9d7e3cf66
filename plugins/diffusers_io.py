"""Exact conversion between vaegan's ``autoencoder_kl`` and ``diffusers.AutoencoderKL``, both ways.

- :func:`to_diffusers` / :func:`from_diffusers`: the same architecture and weights (the module names are
  diffusers' own, so the state dict maps one to one), hence the same outputs for the same input and noise.
- :func:`pretrained_autoencoder_kl`, registered as the generator plugin ``diffusers_vae``: start from any
  diffusers AutoencoderKL (a local folder, or a hub id when the network allows), e.g. to fine-tune its
  decoder only:

  .. code-block:: yaml

      model:
        name: diffusers_vae
        image_channels: 3
        image_size: [256, 256]
        output_range: symmetric
        options: {pretrained: path/to/sd-vae-ft-mse, trainable: decoder}

- :func:`save_diffusers`: the diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
  that ``AutoencoderKL.from_pretrained`` loads; the trainer writes one into ``final/diffusers``.

diffusers itself is needed only here (``pip install "vaegan[diffusers]"``); training and loading an
``autoencoder_kl`` do not need it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple, Union

from vaegan.errors import ConfigError, PluginError

from .autoencoder_kl import AutoencoderKL, channels_mismatch

__all__ = ["require_diffusers", "diffusers_config", "options_from_diffusers", "to_diffusers", "from_diffusers",
           "pretrained_autoencoder_kl", "save_diffusers"]

logger = logging.getLogger(__name__)

_SUPPORTED = {"act_fn": "silu", "down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def require_diffusers() -> Any:
    """The ``diffusers`` module, or a PluginError that says how to install it."""
    try:
        import diffusers
    except ImportError:
        raise PluginError(
            "This needs the diffusers package, which is not installed: pip install 'vaegan[diffusers]' (or pip "
            "install diffusers). vaegan's own autoencoder_kl generator trains and loads without it; diffusers is "
            "needed to start from a diffusers AutoencoderKL and to write the diffusers copy of a trained one."
        ) from None
    return diffusers


def diffusers_config(model: AutoencoderKL) -> Dict[str, Any]:
    """The ``diffusers.AutoencoderKL`` constructor arguments of ``model``'s architecture.

    Raises:
        ConfigError: a model diffusers cannot represent (a tanh output, a non-square image is fine).
    """
    o = model.config.options
    if o["output_activation"] != "identity":
        raise ConfigError("autoencoder_kl with output_activation: tanh has no diffusers equivalent (diffusers' "
                          "decoder ends with its last convolution); train with output_activation: identity to export.")
    levels = len(o["block_out_channels"])
    c, h, _ = model.image_shape
    return {
        "in_channels": c, "out_channels": c, "down_block_types": [_SUPPORTED["down_block_types"]] * levels,
        "up_block_types": [_SUPPORTED["up_block_types"]] * levels, "block_out_channels": list(o["block_out_channels"]),
        "layers_per_block": o["layers_per_block"], "act_fn": "silu", "latent_channels": o["latent_channels"],
        "norm_num_groups": o["norm_num_groups"], "sample_size": h,
        # diffusers needs a number; 1.0 (no scaling) when it was never set or estimated.
        "scaling_factor": 1.0 if o["scaling_factor"] is None else o["scaling_factor"], "shift_factor": o["shift_factor"],
        "use_quant_conv": o["use_quant_conv"], "use_post_quant_conv": o["use_post_quant_conv"],
        "mid_block_add_attention": o["mid_block_add_attention"],
    }


def options_from_diffusers(config: Dict[str, Any]) -> Dict[str, Any]:
    """``autoencoder_kl`` options for a diffusers AutoencoderKL config (its ``config`` mapping).

    Raises:
        ConfigError: a config this implementation does not cover (another block type or activation).
    """
    for key, want in _SUPPORTED.items():
        values = config.get(key, want)
        values = [values] if isinstance(values, str) else list(values)
        if any(v != want for v in values):
            raise ConfigError(f"This diffusers AutoencoderKL has {key} = {values}; vaegan's autoencoder_kl implements "
                              f"{want} only (every Stable Diffusion, SDXL, SD3 and Flux VAE).")
    if config.get("in_channels", 3) != config.get("out_channels", 3):
        raise ConfigError("This diffusers AutoencoderKL has different input and output channel counts; vaegan's "
                          "generators reconstruct their input.")
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        logger.warning("The diffusers config sets latents_mean/latents_std; vaegan keeps scaling_factor and "
                       "shift_factor only (the pipeline's per-channel normalisation is not part of the autoencoder).")
    return {
        "block_out_channels": list(config["block_out_channels"]), "layers_per_block": config["layers_per_block"],
        "latent_channels": config["latent_channels"], "norm_num_groups": config["norm_num_groups"],
        "mid_block_add_attention": config.get("mid_block_add_attention", True),
        "use_quant_conv": config.get("use_quant_conv", True), "use_post_quant_conv": config.get("use_post_quant_conv", True),
        "scaling_factor": config.get("scaling_factor"), "shift_factor": config.get("shift_factor"),
    }


def to_diffusers(model: AutoencoderKL) -> Any:
    """A ``diffusers.AutoencoderKL`` with ``model``'s architecture and weights (on the CPU, fp32)."""
    diffusers = require_diffusers()
    ae = diffusers.AutoencoderKL(**diffusers_config(model))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    ae.load_state_dict(state, strict=True)
    return ae.eval()


def from_diffusers(ae: Any, image_shape: Optional[Tuple[int, int, int]] = None, output_range: str = "symmetric",
                   trainable: Literal["all", "decoder"] = "all",
                   source: str = "The diffusers AutoencoderKL") -> AutoencoderKL:
    """vaegan's ``autoencoder_kl`` with the architecture and weights of ``ae`` (a diffusers AutoencoderKL).

    Args:
        ae: The diffusers model.
        image_shape: (C, H, W) of the images to train on; default: its ``sample_size`` square.
        output_range: The range of the images (SD-family VAEs: ``symmetric``).
        trainable: ``all`` or ``decoder`` (see :class:`~vaegan_plugins.autoencoder_kl.AutoencoderKL`).
        source: What ``ae`` is called in errors ("The diffusers AutoencoderKL in 'path'").
    """
    config = dict(ae.config)
    size = config.get("sample_size", 32)
    size = size if isinstance(size, int) else size[0]
    shape = tuple(image_shape) if image_shape is not None else (config.get("in_channels", 3), size, size)
    if shape[0] != config.get("in_channels", 3):
        raise ConfigError(channels_mismatch(source, config.get("in_channels", 3), shape[0]))
    model = AutoencoderKL(shape, output_range, trainable=trainable, **options_from_diffusers(config))
    model.load_state_dict({k: v.detach().float() for k, v in ae.state_dict().items()}, strict=True)
    return model


def pretrained_autoencoder_kl(image_shape: Tuple[int, int, int], output_range: str = "symmetric",
                              pretrained: str = "", subfolder: Optional[str] = None, revision: Optional[str] = None,
                              trainable: Literal["all", "decoder"] = "decoder") -> AutoencoderKL:
    """Generator plugin ``diffusers_vae``: an ``autoencoder_kl`` initialised from a diffusers AutoencoderKL.

    The model it returns is an ordinary ``autoencoder_kl`` (its saved config names that plugin and the
    full architecture), so a trained copy loads without the original folder.

    Args:
        image_shape, output_range: Passed by vaegan.
        pretrained: A local diffusers folder (``config.json`` + weights) or a hub id (needs a network).
        subfolder: The folder inside it that holds the VAE (``vae`` for a whole pipeline's folder).
        revision: A hub revision.
        trainable: ``decoder`` (default: the latents stay those of the original) or ``all``.

    Raises:
        PluginError: diffusers is missing, or the model cannot be found or read.
        ConfigError: no ``pretrained`` given, or an architecture or image size it cannot take.
    """
    if not pretrained:
        raise ConfigError("diffusers_vae needs model.options.pretrained: a local diffusers AutoencoderKL folder or a "
                          "hub id, e.g. stabilityai/sd-vae-ft-mse.")
    diffusers = require_diffusers()
    kwargs = {k: v for k, v in {"subfolder": subfolder, "revision": revision}.items() if v is not None}
    try:
        ae = diffusers.AutoencoderKL.from_pretrained(pretrained, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        where = "a local folder" if Path(pretrained).exists() else "a hub id (downloads need a network)"
        raise PluginError(
            f"Could not load a diffusers AutoencoderKL from '{pretrained}'{f' (subfolder {subfolder})' if subfolder else ''}, "
            f"read as {where}: {str(exc).splitlines()[0][:300]}. Pass a folder holding config.json and "
            "diffusion_pytorch_model.safetensors (set subfolder: vae for a whole pipeline), or a reachable hub id."
        ) from None
    return from_diffusers(ae, image_shape, output_range, trainable,
                          source=f"The diffusers AutoencoderKL in '{pretrained}'")



def save_diffusers(model: AutoencoderKL, directory: Union[str, Path]) -> Path:
    """Write ``model`` as a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""
    from vaegan.files import share_like_umask

    directory = Path(directory)
    to_diffusers(model).save_pretrained(str(directory), safe_serialization=True)
    share_like_umask(directory)  # diffusers writes its weights through safetensors, mode 0600
    return directory
