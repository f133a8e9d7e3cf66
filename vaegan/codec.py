"""The codec use of a trained VAE (a frozen encoder / decoder): images <-> a latents file.

What ``vaegan encode`` and ``vaegan decode`` do, usable from Python. Latents leave vaegan as a
``.safetensors`` file: fp32 tensors ``latents`` and ``logvar`` (N, *latent_shape), vector or spatial,
and string metadata saying where they come from (the model, the split, whether and how they were
scaled, their std and the scaling factor latent diffusion would use, 1 / std).

Example:
    >>> model = load_model("outputs/ldm_kl_f4")  # doctest: +SKIP
    >>> save_latents("z.safetensors", *encode(model, load_dataset(model, "image_folder", "photos")))  # doctest: +SKIP
    >>> save_images("decoded.png", decode(model, load_latents("z.safetensors").latents))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .data import image_of
from .errors import ConfigError, DataError, VaeganError
from .images import to_uint8
from .progress import Phase
from .tiling import Tiling, check_any_size_images, check_tiling, decode_tiled, encode_tiled

if TYPE_CHECKING:  # the type only: the generator module imports what imports this one
    from .generator import VAE

__all__ = ["LATENTS_SUFFIX", "LatentsFile", "scaling_of", "encode", "decode", "latent_stats",
           "check_latents_output", "save_latents", "load_latents"]

LATENTS_SUFFIX = ".safetensors"


class LatentsFile(NamedTuple):
    """A file read by :func:`load_latents`: ``latents`` (N, *latent_shape) fp32, ``logvar`` (or None), the
    string ``metadata``, and the (scaling_factor, shift_factor) the metadata says the latents were scaled
    with (None: not scaled)."""

    latents: Tensor
    logvar: Optional[Tensor]
    metadata: Dict[str, str]
    scaling: Optional[Tuple[float, float]]


def scaling_of(model: VAE) -> Tuple[float, float]:
    """The model's latent normalisation ``(scaling_factor, shift_factor)`` from its options (an unset shift
    is 0), which diffusion pipelines apply as ``(z - shift_factor) * scaling_factor``.

    Raises:
        ConfigError: no (usable) scaling factor set; the message says how to set one.
    """
    options, name = model.config.options, model.config.name
    scaling, shift = options.get("scaling_factor"), options.get("shift_factor")
    if scaling is None or not math.isfinite(scaling) or scaling == 0:
        how = ("set \"scaling_factor\" (and optionally \"shift_factor\") under \"options\" in the model's "
               "config.json, or train with model.options.scaling_factor=VALUE" if "scaling_factor" in options
               else f"the '{name}' generator has no scaling_factor option, so scale the latents yourself")
        raise ConfigError(
            f"--scaled / --unscale use the model's (z - shift_factor) * scaling_factor, but this '{name}' model "
            f"has no scaling factor set ({scaling}): {how}. `vaegan encode` without --scaled prints a suggested "
            "value (1 / std of the latents, as latent diffusion estimates it).")
    return float(scaling), float(shift or 0.0)


@torch.no_grad()
def encode(model: VAE, dataset: Dataset, sample: bool = False, seed: int = 0, batch_size: int = 256,
           scaled: bool = False, progress: bool = True, tiling: Optional[Tiling] = None) -> Tuple[Tensor, Tensor]:
    """Encode every image of ``dataset`` in order to its posterior mean (or, with ``sample``, a draw from it).

    The noise of ``sample`` is drawn on the CPU from ``seed`` for all images at once: the latents do not
    depend on ``batch_size`` or the device. ``scaled`` applies ``(z - shift) * scaling`` (see
    :func:`scaling_of`) and adds ``2 log |scaling|`` to the log-variance, which stays that of the latents.
    ``progress`` shows the images encoded and the time left once it takes more than a few seconds
    (:mod:`vaegan.progress`). ``tiling`` (:mod:`vaegan.tiling`) encodes tile by tile, images of any size.

    Returns:
        (latents, logvar), both fp32 (N, *latent_shape) on the CPU ((N, c, ceil(H / f), ceil(W / f)) tiled).

    Raises:
        DataError: the images do not fit the model. ConfigError: ``scaled`` without a scaling factor.
    """
    scaling = scaling_of(model) if scaled else None  # refused before any work
    if tiling is not None:
        check_tiling(model, tiling)
    means, logvars = [], []
    with Phase("encode", total=len(dataset), unit="img", enabled=progress) as phase:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x = image_of(batch)  # (B, C, H, W); labels dropped
            if not means and tiling is None:
                model.check_images(x, "the dataset")
            elif not means:  # any size
                check_any_size_images(model, x, "the dataset")
            q = model.encode(x.to(model.device)) if tiling is None else encode_tiled(model, x, tiling.tile, tiling.overlap)
            means.append(q.mean.float().cpu())
            logvars.append(q.logvar.float().cpu())
            phase.update(x.shape[0])
    if not means:
        raise DataError("The dataset has no images to encode.")
    z, logvar = torch.cat(means), torch.cat(logvars)  # (N, *latent_shape)
    if sample:
        z = z + torch.exp(0.5 * logvar) * torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    if scaling is not None:
        z, logvar = (z - scaling[1]) * scaling[0], logvar + 2 * math.log(abs(scaling[0]))
    return z, logvar


@torch.no_grad()
def decode(model: VAE, latents: Tensor, batch_size: int = 256, scaling: Optional[Tuple[float, float]] = None,
           source: str = "The latents", progress: bool = True, tiling: Optional[Tiling] = None) -> Tensor:
    """Decode latents (N, *latent_shape) to uint8 images (N, C, H, W), ``batch_size`` at a time.

    Args:
        scaling: The (scaling_factor, shift_factor) the latents were scaled with, undone first
            (``z / scaling + shift``). None: they are the model's own latents.
        source: What the latents are called in errors (a file, say).
        progress: Show the images decoded and the time left once it takes more than a few seconds.
        tiling: Decode tile by tile (:mod:`vaegan.tiling`); latents of any spatial size, the model's channels.

    Raises:
        DataError: no latents, or latents whose shape is not the model's ``latent_shape`` (its channel
            count, with ``tiling``).
    """
    got, want = tuple(latents.shape[1:]), tuple(model.latent_shape)
    if tiling is not None:
        check_tiling(model, tiling)
    if latents.ndim < 2 or (got != want if tiling is None else got[:1] != want[:1] or len(got) != 3) \
            or latents.shape[0] == 0:
        raise DataError(
            f"{source} have the shape {tuple(latents.shape)}, i.e. latent shape {got} per image, but this "
            f"'{model.config.name}' model's latent_shape is {want}: they were encoded by another model (or there "
            "are none). Decode them with the model that encoded them.")
    if scaling is not None:
        latents = latents.float() / scaling[0] + scaling[1]
    p = next(model.parameters())
    images = []
    with Phase("decode", total=latents.shape[0], unit="img", enabled=progress) as phase:
        for chunk in latents.split(batch_size):
            pixels = model.decode(chunk.to(p.device, p.dtype)) if tiling is None else decode_tiled(
                model, chunk, tiling.tile, tiling.overlap)
            images.append(to_uint8(pixels, model.value_range))  # (b, C, H, W)
            phase.update(chunk.shape[0])
    return torch.cat(images)


def latent_stats(latents: Tensor, scaling: Optional[Tuple[float, float]] = None) -> Dict[str, Optional[float]]:
    """``std`` of all the latents' elements (unbiased), ``unscaled_std`` (the same before ``scaling``) and
    ``suggested_scaling_factor`` = 1 / unscaled_std, latent diffusion's rule (None when that std is 0)."""
    std = float(latents.double().std()) if latents.numel() > 1 else float("nan")
    unscaled = std / abs(scaling[0]) if scaling is not None else std
    return {"std": std, "unscaled_std": unscaled,
            "suggested_scaling_factor": 1.0 / unscaled if math.isfinite(unscaled) and unscaled > 0 else None}


def check_latents_output(path: Union[str, Path]) -> None:
    """Raise ConfigError unless ``path`` ends in .safetensors (checked before any work)."""
    if Path(path).suffix.lower() != LATENTS_SUFFIX:
        raise ConfigError(f"--out '{path}' must end in {LATENTS_SUFFIX}: latents are written as a safetensors "
                          "file (tensors 'latents' and 'logvar', fp32 (N, *latent_shape), and metadata).")


def save_latents(path: Union[str, Path], latents: Tensor, logvar: Optional[Tensor] = None, model: Optional[VAE] = None,
                 scaled: bool = False, metadata: Optional[Dict[str, object]] = None) -> Path:
    """Write fp32 ``latents`` (and ``logvar``) to a .safetensors file with string metadata: ``count``,
    ``scaled``, the :func:`latent_stats`; with ``model``, its ``generator``, ``latent_shape`` and the
    ``scaling_factor`` / ``shift_factor`` applied (null when not ``scaled``); then ``metadata``.
    Values other than strings are stored as JSON.

    Raises:
        ConfigError: not a .safetensors path, or ``scaled`` for a model without a scaling factor.
        VaeganError: the file cannot be written.
    """
    from .files import save_safetensors

    check_latents_output(path)
    path, scaling = Path(path), scaling_of(model) if scaled and model is not None else None
    meta: Dict[str, object] = {"library": "vaegan", "count": int(latents.shape[0]), "scaled": bool(scaled),
                               **latent_stats(latents, scaling)}
    if model is not None:
        meta.update(generator=model.config.name, latent_shape=list(model.latent_shape),
                    scaling_factor=scaling and scaling[0], shift_factor=scaling and scaling[1])
    meta.update(metadata or {})
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in (("latents", latents), ("logvar", logvar))
               if v is not None}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, path, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    except OSError as exc:
        raise VaeganError(f"Cannot write '{path}': {exc}. Choose another --out path.") from None
    return path


def load_latents(path: Union[str, Path]) -> LatentsFile:
    """Read a file written by :func:`save_latents` (or any safetensors file with a ``latents`` tensor).

    Raises:
        DataError: a missing or unreadable file, no ``latents`` tensor, or metadata saying the latents
            were scaled but not by what.
    """
    from safetensors import SafetensorError, safe_open

    path, hint = Path(path), "Pass a file written by `vaegan encode` (safetensors with a tensor 'latents')."
    if not path.is_file():
        raise DataError(f"--latents '{path}' does not exist or is not a file. {hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            names, meta = list(f.keys()), dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k).float() for k in ("latents", "logvar") if k in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())  # one paragraph
        raise DataError(f"'{path}' cannot be read as a safetensors file ({reason}). {hint}") from None
    if "latents" not in tensors:
        raise DataError(f"'{path}' has no tensor 'latents' (it holds {names or 'no tensors'}). {hint}")
    for key, t in tensors.items():  # NaN latents decode to black images, silently
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise DataError(f"'{path}': {bad} of the {t.numel()} values of '{key}' are NaN or inf; they would decode to "
                            "black or NaN images. Encode the images again (or drop those latents).")
    scaling = None
    if meta.get("scaled") == "true":
        try:
            scaling = (float(json.loads(meta["scaling_factor"])), float(json.loads(meta.get("shift_factor", "0")) or 0))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"'{path}' says its latents were scaled, but its metadata has no usable scaling_factor; "
                            "the file is damaged. Encode the images again.") from None
        if not (math.isfinite(scaling[0]) and scaling[0] > 0 and math.isfinite(scaling[1])):
            raise DataError(f"'{path}' says its latents were scaled by {scaling[0]!r} (shift {scaling[1]!r}): dividing by "
                            "it gives zeros, inf or NaN. The file is damaged; encode the images again.")
    return LatentsFile(tensors["latents"], tensors.get("logvar"), meta, scaling)
