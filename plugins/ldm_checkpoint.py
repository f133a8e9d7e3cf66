"""The single-file LDM / CompVis layout of a KL autoencoder (``vae.safetensors``), both ways.

ComfyUI, A1111/Forge, kohya and Stability's generative-models load a VAE as one ``.safetensors`` file
whose keys are those of the CompVis ``AutoencoderKL`` (latent-diffusion's ``ldm.models.autoencoder``):
``encoder.down.0.block.0.norm1.weight``, ``encoder.down.0.downsample.conv.weight``,
``encoder.mid.block_1...``, ``encoder.mid.attn_1.q.weight`` (attention projections as 1x1 convs, 4-D),
``encoder.norm_out``, ``quant_conv``, ``post_quant_conv``, and the decoder's ``decoder.up.N`` numbered
from the *highest* resolution (the reverse of diffusers' ``up_blocks``). vaegan's ``autoencoder_kl``
uses diffusers' module names, so this module renames and reshapes, nothing else: the weights are
bit-for-bit the same.

- :func:`ldm_state_dict` / :func:`save_ldm`: the LDM keys of an ``autoencoder_kl``; a trained model's
  ``final/ldm/vae.safetensors`` is written next to ``final/diffusers`` (see
  :meth:`~vaegan_plugins.autoencoder_kl.AutoencoderKL.save_extra_formats`).
- :func:`read_ldm`: the VAE tensors of a file in that layout (also under ``first_stage_model.`` or
  ``vae.``, as in a whole Stable Diffusion checkpoint), checked: a file of another layout, a truncated
  one or non-finite weights get one paragraph naming the layouts understood.
- :func:`pretrained_ldm_vae`, the generator plugin ``ldm_vae``: start training from such a file, its
  architecture read from the tensors' shapes and checked against a named preset or given options:

  .. code-block:: yaml

      model:
        name: ldm_vae
        image_channels: 3
        image_size: [256, 256]
        output_range: symmetric
        options: {pretrained: path/to/vae.safetensors, preset: sdxl, trainable: decoder}

Nothing here needs diffusers (``diffusers.AutoencoderKL.from_single_file`` reads the files written here).

Example:
    >>> from vaegan_plugins.autoencoder_kl import AutoencoderKL
    >>> ae = AutoencoderKL((3, 16, 16), block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1)
    >>> sorted(ldm_state_dict(ae))[:2]
    ['decoder.conv_in.bias', 'decoder.conv_in.weight']
    >>> tuple(ldm_state_dict(ae)["encoder.mid.attn_1.q.weight"].shape)
    (16, 16, 1, 1)
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from vaegan.errors import CheckpointError, ConfigError

from .autoencoder_kl import AutoencoderKL, channels_mismatch

__all__ = ["LDM_DIR", "LDM_FILE", "PRESETS", "LAYOUTS", "ldm_key", "ldm_state_dict", "save_ldm", "read_ldm",
           "options_from_ldm", "from_ldm_state_dict", "pretrained_ldm_vae"]

logger = logging.getLogger(__name__)

LDM_DIR = "ldm"  # final/ldm/vae.safetensors
LDM_FILE = "vae.safetensors"
PREFIXES = ("first_stage_model.", "vae.")  # the VAE inside a whole SD checkpoint, as diffusers strips them

# The published architectures of the family, with the latent normalisation their diffusion models use
# (SD 1/2: 0.18215; SDXL: 0.13025; SD3: 1.5305 after shifting by 0.0609; Flux: 0.3611, 0.1159).
_SD = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32,
       "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True}
_SD3 = {**_SD, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
PRESETS: Dict[str, Dict[str, Any]] = {
    "sd": {**_SD, "scaling_factor": 0.18215, "shift_factor": None},
    "sdxl": {**_SD, "scaling_factor": 0.13025, "shift_factor": None},
    "sd3": {**_SD3, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    "flux": {**_SD3, "scaling_factor": 0.3611, "shift_factor": 0.1159},
}
_SHAPE_FIELDS = ("block_out_channels", "layers_per_block", "latent_channels", "mid_block_add_attention",
                 "use_quant_conv", "use_post_quant_conv")

LAYOUTS = (
    "the CompVis/LDM AutoencoderKL keys that ComfyUI, A1111/Forge, kohya and Stability's generative-models load "
    "(encoder.down.0.block.0.norm1.weight, encoder.mid.attn_1.q.weight, quant_conv.weight, decoder.up.0..., as "
    "vaegan writes to final/ldm/vae.safetensors), and the same keys under first_stage_model. or vae. (the VAE "
    "inside a whole Stable Diffusion checkpoint)")

_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


# diffusers name pattern -> its LDM key, given the match and the number of levels. diffusers counts the decoder's
# up blocks from the lowest resolution, LDM from the highest.
_KEY_RULES: Tuple[Tuple[str, Callable[[re.Match, int], str]], ...] = (
    (r"(encoder|decoder)\.conv_norm_out\.(\w+)", lambda m, n: f"{m[1]}.norm_out.{m[2]}"),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
     lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3])}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)",
     lambda m, n: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3])}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)",
     lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3])}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)",
     lambda m, n: f"{m[1]}.mid.attn_1.{_ATTENTION[m[2]]}.{m[3]}"),
)


def ldm_key(name: str, levels: int) -> str:
    """The LDM key of the ``autoencoder_kl`` (diffusers) parameter ``name`` of a model with ``levels`` levels.

    Example:
        >>> ldm_key("decoder.up_blocks.0.upsamplers.0.conv.weight", levels=4)
        'decoder.up.3.upsample.conv.weight'
    """
    for pattern, key in _KEY_RULES:
        m = re.fullmatch(pattern, name)
        if m:
            return key(m, levels)
    return name  # conv_in, conv_out, quant_conv, post_quant_conv: the same in both


def _is_projection(ldm_name: str) -> bool:
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_name) is not None


def ldm_state_dict(model: AutoencoderKL) -> Dict[str, Tensor]:
    """``model``'s weights under their LDM keys, fp32 on the CPU; attention projections as (C, C, 1, 1) convs."""
    levels = len(model.config.options["block_out_channels"])
    out: Dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        key = ldm_key(name, levels)
        tensor = value.detach().float().cpu()
        out[key] = (tensor[:, :, None, None] if _is_projection(key) else tensor).contiguous()  # Linear -> 1x1 conv
    return out


def _architecture_metadata(model: AutoencoderKL) -> Dict[str, Any]:
    o = model.config.options
    keep = (*_SHAPE_FIELDS, "norm_num_groups", "scaling_factor", "shift_factor", "latents_mean", "latents_std")
    return {k: o[k] for k in keep if k in o}


def save_ldm(model: AutoencoderKL, path: Union[str, Path]) -> Path:
    """Write ``model`` as one LDM-layout ``.safetensors`` file (ComfyUI's ``models/vae``, A1111's ``models/VAE``).

    The metadata carries vaegan's options (``vaegan_options``: the GroupNorm groups, which no tensor shape
    tells, and the latent normalisation), so :func:`pretrained_ldm_vae` rebuilds the very same model.
    ComfyUI, A1111 and generative-models assume 32 groups and a middle attention: another model is
    written all the same, with a warning that only diffusers and vaegan rebuild it correctly.

    Raises:
        ConfigError: a ``tanh`` output, which the LDM decoder (ending in its last convolution) cannot express.
    """
    from vaegan.files import dumps_json, save_safetensors

    if model.config.options.get("output_activation", "identity") != "identity":
        raise ConfigError("autoencoder_kl with output_activation: tanh has no LDM equivalent (the LDM decoder ends "
                          "with its last convolution); train with output_activation: identity to export it.")
    o = model.config.options
    if o.get("norm_num_groups") != 32 or not o.get("mid_block_add_attention", True):
        logger.warning("%s: ComfyUI, A1111 and generative-models build the LDM VAE with 32 GroupNorm groups and a "
                       "middle self-attention; this model has %s groups%s, so only diffusers (with the diffusers "
                       "folder as config) and vaegan rebuild it correctly.", path, o.get("norm_num_groups"),
                       "" if o.get("mid_block_add_attention", True) else " and no middle attention")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "library": "vaegan", "layout": "ldm_autoencoder_kl",
            "vaegan_options": dumps_json(_architecture_metadata(model))}
    return save_safetensors(ldm_state_dict(model), path, metadata=meta)


def _bad_file(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"'{path}' cannot be used as a single-file VAE: {what}. vaegan reads {LAYOUTS}. A diffusers "
                           "AutoencoderKL (keys encoder.down_blocks.0.resnets.0...) is a folder: start from it with "
                           "model.name: diffusers_vae and options.pretrained: <the folder>.")


def read_ldm(path: Union[str, Path]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """The VAE tensors (LDM keys, any prefix removed, fp32) of a single file, and its ``vaegan_options`` metadata.

    Raises:
        CheckpointError: a missing, unreadable or truncated file, a ``.ckpt`` (a pickle), a file of
            another layout (a diffusers state dict, unrelated keys), or NaN/inf weights; one paragraph
            naming the layouts understood.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise _bad_file(path, f"only .safetensors files are read (a {path.suffix or 'suffix-less'} file may be a "
                              "pickle, which can run code when loaded; convert it to safetensors first)")
    if not path.is_file():
        raise _bad_file(path, "there is no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            names, meta = list(f.keys()), dict(f.metadata() or {})
            prefix = next((p for p in PREFIXES if any(n.startswith(p + "encoder.") for n in names)), "")
            wanted = [n for n in names if n.startswith(prefix)]
            if not any(n[len(prefix):].startswith(("encoder.down.", "decoder.up.")) for n in wanted):
                diffusers = any(".down_blocks." in n or ".up_blocks." in n for n in names)
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "no tensors"
                raise _bad_file(path, "its keys are those of a diffusers AutoencoderKL state dict (encoder.down_blocks."
                                      "...), not the LDM layout" if diffusers else f"it holds {shown}, not the "
                                      "LDM AutoencoderKL keys")
            state = {n[len(prefix):]: f.get_tensor(n).float() for n in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _bad_file(path, f"it is not a readable safetensors file ({' '.join(str(exc).split())[:200]}; a truncated "
                              "download or a different format)") from None
    bad = [(k, int((~torch.isfinite(t)).sum()), t.numel()) for k, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        k, n, total = bad[0]
        raise _bad_file(path, f"{len(bad)} tensor(s) hold NaN or inf values (e.g. {n} of the {total} values of '{k}'); "
                              "the weights are damaged (a diverged run or an fp16 overflow)")
    try:
        options = json.loads(meta["vaegan_options"]) if "vaegan_options" in meta else {}
    except json.JSONDecodeError:
        options = {}
    return state, options if isinstance(options, dict) else {}


def options_from_ldm(state: Mapping[str, Tensor]) -> Dict[str, Any]:
    """The ``autoencoder_kl`` architecture that the shapes of LDM tensors ``state`` determine (all but
    ``norm_num_groups``, which no shape tells), plus ``image_channels``.

    Raises:
        CheckpointError: a key the architecture needs is missing.
    """
    try:
        levels = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        widths = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
        layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
        latent = int(state["encoder.conv_out.weight"].shape[0]) // 2  # mean and log-variance
        channels = int(state["encoder.conv_in.weight"].shape[1])
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"The LDM VAE tensors lack {exc} (a key every AutoencoderKL has); the file is incomplete "
                              "or holds another kind of model.") from None
    return {"image_channels": channels, "block_out_channels": widths, "layers_per_block": layers,
            "latent_channels": latent, "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state,
            "use_quant_conv": "quant_conv.weight" in state, "use_post_quant_conv": "post_quant_conv.weight" in state}


def from_ldm_state_dict(model: AutoencoderKL, state: Mapping[str, Tensor], source: str = "The file") -> AutoencoderKL:
    """Load LDM tensors ``state`` into ``model`` (built with the matching architecture), in place.

    Raises:
        CheckpointError: a tensor missing, left over, or of another shape; the message names the first few.
    """
    levels = len(model.config.options["block_out_channels"])
    own = model.state_dict()
    names = {ldm_key(name, levels): name for name in own}
    missing = [k for k in names if k not in state]
    extra = [k for k in state if k not in names]
    loaded: Dict[str, Tensor] = {}
    wrong: List[str] = []
    for key, name in names.items():
        if key not in state:
            continue
        t = state[key]
        t = t[:, :, 0, 0] if _is_projection(key) and t.ndim == 4 else t  # 1x1 conv -> Linear
        if tuple(t.shape) != tuple(own[name].shape):
            wrong.append(f"{key} {tuple(t.shape)} (the model's is {tuple(own[name].shape)})")
        loaded[name] = t
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(extra)} not in the model (e.g. {', '.join(extra[:3])})" if extra else "",
                 f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})" if wrong else ""]
        raise CheckpointError(f"{source} does not fit the autoencoder_kl architecture {dict(model.config.options)}: "
                              f"tensors {'; '.join(p for p in parts if p)}. Check the preset and options "
                              "(norm_num_groups, block_out_channels, ...) against the model the file came from.")
    model.load_state_dict(loaded, strict=True)
    return model


def _finite_or_none(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"ldm_vae: {name} must be a finite number or null, got {value!r}.")
    return float(value)


def pretrained_ldm_vae(image_shape: Tuple[int, int, int], output_range: str = "symmetric", pretrained: str = "",
                       preset: Optional[Literal["sd", "sdxl", "sd3", "flux"]] = None,
                       trainable: Literal["all", "decoder"] = "decoder", norm_num_groups: Optional[int] = None,
                       block_out_channels: Optional[Sequence[int]] = None, layers_per_block: Optional[int] = None,
                       latent_channels: Optional[int] = None, mid_block_add_attention: Optional[bool] = None,
                       use_quant_conv: Optional[bool] = None, use_post_quant_conv: Optional[bool] = None,
                       scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None) -> AutoencoderKL:
    """Generator plugin ``ldm_vae``: an ``autoencoder_kl`` initialised from a single-file LDM VAE.

    The architecture comes from the tensors' shapes; a ``preset`` (``sd``, ``sdxl``: 4 latent channels;
    ``sd3``, ``flux``: 16, no quant convs) or explicit options are checked against them, and supply what no
    shape tells: ``norm_num_groups`` (32 in the whole family) and the latent normalisation. Precedence:
    an explicit option, then the preset, then the file's own ``vaegan_options`` metadata (files vaegan
    wrote), then the defaults (32 groups, no scaling). The model it returns is an ordinary ``autoencoder_kl``
    (its saved config names that plugin and the full architecture), so a trained copy loads without the file.

    Args:
        image_shape, output_range: Passed by vaegan (SD-family VAEs: ``symmetric``).
        pretrained: A ``.safetensors`` file in the LDM layout (see :data:`LAYOUTS`).
        preset: A named architecture to check the file against.
        trainable: ``decoder`` (default: the latents stay those of the original) or ``all``.
        norm_num_groups ... use_post_quant_conv: The architecture (default: the file's, or the preset's).
        scaling_factor, shift_factor: The latent normalisation (default: the preset's or the file's).

    Raises:
        ConfigError: no file given, an unknown preset, or a preset/option that contradicts the file.
        CheckpointError: the file cannot be read or is not in the LDM layout (see :func:`read_ldm`).

    Example:
        >>> model = pretrained_ldm_vae((3, 256, 256), pretrained="sdxl_vae.safetensors", preset="sdxl")  # doctest: +SKIP
    """
    if not pretrained:
        raise ConfigError("ldm_vae needs model.options.pretrained: a single-file VAE (.safetensors) in the LDM layout, "
                          "e.g. one ComfyUI loads from models/vae or a run's final/ldm/vae.safetensors.")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"ldm_vae: unknown preset {preset!r}; the presets are {', '.join(PRESETS)} (or none: the "
                          "architecture is read from the file).")
    state, meta = read_ldm(pretrained)
    found = options_from_ldm(state)
    if found.pop("image_channels") != image_shape[0]:
        raise ConfigError(channels_mismatch(f"The LDM VAE file '{pretrained}'", state["encoder.conv_in.weight"].shape[1],
                                            image_shape[0]))
    given = {k: v for k, v in {"block_out_channels": block_out_channels, "layers_per_block": layers_per_block,
                               "latent_channels": latent_channels, "mid_block_add_attention": mid_block_add_attention,
                               "use_quant_conv": use_quant_conv, "use_post_quant_conv": use_post_quant_conv}.items()
             if v is not None}
    named = PRESETS.get(preset, {}) if preset else {}
    clashes = []
    for key in _SHAPE_FIELDS:
        for source, value in (("option", given.get(key)), (f"preset {preset}", named.get(key))):
            want = list(value) if isinstance(value, (list, tuple)) else value
            if value is not None and want != found[key]:
                clashes.append(f"{key} = {found[key]} (the {source} says {want})")
    if clashes:
        raise ConfigError(f"ldm_vae: '{pretrained}' has {', '.join(clashes)}. Drop those options or the preset (the "
                          "file's shapes decide the architecture), or pick the file that goes with them.")

    def pick(key: str, explicit: Any, default: Any) -> Any:
        for value in (explicit, named.get(key), meta.get(key)):
            if value is not None:
                return value
        return default

    options = {**found, "norm_num_groups": pick("norm_num_groups", norm_num_groups, 32),
               "scaling_factor": _finite_or_none("scaling_factor", pick("scaling_factor", scaling_factor, None)),
               "shift_factor": _finite_or_none("shift_factor", pick("shift_factor", shift_factor, None))}
    for key in ("latents_mean", "latents_std"):  # per-channel statistics a vaegan run stored, when the model has them
        if meta.get(key) is not None and key in AutoencoderKL.__signature__.parameters:
            options[key] = meta[key]
    model = AutoencoderKL(tuple(image_shape), output_range, trainable=trainable, **options)
    return from_ldm_state_dict(model, state, source=f"'{pretrained}'")
