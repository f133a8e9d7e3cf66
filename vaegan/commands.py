"""Inference with a trained model, as the ``vaegan sample | reconstruct | interpolate`` commands do it, usable
from Python too: find and load a model folder, the dataset it was trained on, and uint8 images (N, C, H, W) out.
``encode`` and ``decode``, the codec use of a trained VAE, are in :mod:`vaegan.codec`; writing the images as
.png grids or .npz arrays is :mod:`vaegan.images`.

Example:
    >>> from vaegan.images import save_images
    >>> model = load_model("outputs/vaegan_mnist")  # doctest: +SKIP
    >>> save_images("samples.npz", sample(model, 16, seed=0))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ._deprecation import deprecated_names
from .config import DataConfig, from_dict, load_config
from .data import build_dataset, image_of
from .errors import CheckpointError, ConfigError, DataError, VaeganError
from .generator import CONFIG_NAME, VAE
from .images import to_uint8 as _uint8  # public as vaegan.images.to_uint8
from .samplers import LatentSampler, sample_latents

__all__ = ["resolve_model_dir", "load_model", "trained_data_config", "load_dataset", "sample",
           "reconstruct", "interpolate"]

logger = logging.getLogger(__name__)

def resolve_model_dir(path: Union[str, Path], raw: bool = False) -> Path:
    """The folder holding the weights to load: ``path`` itself, or ``path/final`` for a run's output
    directory; with ``raw``, the non-EMA weights in ``raw/`` under that folder.

    Raises:
        CheckpointError: no saved model there, or no raw weights (EMA was off).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"--model '{path}' does not exist. Pass the output directory of a training run (the folder "
            "that holds final/) or a folder written by VAE.save_pretrained."
        )
    model_dir = path if (path / CONFIG_NAME).is_file() else path / "final"
    if not (model_dir / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"'{path}' holds no saved vaegan model: neither it nor '{path / 'final'}' contains "
            f"{CONFIG_NAME} and model.safetensors. Pass the output directory of a finished training run, "
            "or its final/ folder."
        )
    if raw:
        if not (model_dir / "raw" / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"'{model_dir}' has no raw/ weights: that run trained without an EMA (train.ema_decay: "
                "null), so its final/ weights are the raw weights already. Drop --raw."
            )
        model_dir = model_dir / "raw"
    return model_dir


def load_model(path: Union[str, Path], raw: bool = False, device: Optional[Union[str, torch.device]] = None) -> VAE:
    """Load the EMA generator of a run (or the raw one), in eval mode, on ``device``.

    Args:
        path: A run's output directory, its ``final/`` folder, or any ``save_pretrained`` folder.
        raw: Load the non-EMA weights from ``final/raw``.
        device: Where to put the model; default: CUDA when available, else the CPU.

    Raises:
        CheckpointError: see :func:`resolve_model_dir` and :meth:`VAE.from_pretrained`.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = VAE.from_pretrained(resolve_model_dir(path, raw), map_location=str(device))
    return model.eval()


def trained_data_config(path: Union[str, Path]) -> Optional[DataConfig]:
    """The data section of the run that trained the model at ``path``, when it can be found.

    ``final/training_config.yaml`` is written next to the weights; None when it is missing or unreadable.
    """
    model_dir = resolve_model_dir(path)
    for folder in (model_dir, model_dir.parent):
        cfg_file = folder / "training_config.yaml"
        if cfg_file.is_file():
            try:
                return load_config(cfg_file).data
            except VaeganError as exc:
                logger.warning("Ignoring %s: %s", cfg_file, exc)
    return None


def load_dataset(model: VAE, name: str, root: Union[str, Path], split: str = "test", limit: Optional[int] = None,
                 download: bool = False, options: Optional[Mapping[str, Any]] = None) -> Dataset:
    """A dataset plugin's ``split`` in the shape and value range ``model`` expects.

    Args:
        options: The plugin's options (``data.options``); the CLI passes those the model was trained with.

    Raises:
        ConfigError: bad split, limit or options. DataError: missing or unreadable data. PluginError: unknown name.
    """
    data = from_dict(DataConfig, {"name": name, "root": str(root), "split": split, "limit": limit,
                                  "download": download, "options": dict(options or {})}, "data")
    return build_dataset(data, model.config)


@torch.no_grad()
def sample(model: VAE, num: int, seed: int = 0, batch_size: int = 256, temperature: Optional[float] = None,
           sampler: Optional[LatentSampler] = None) -> Tensor:
    """Draw ``num`` images: latents from ``sampler`` (a fitted :mod:`vaegan.samplers` one, at its own temperature
    unless given one), or from the prior ``z ~ N(0, temperature^2 I)`` when None, decoded.

    The latents are drawn on the CPU from ``seed`` in one go, so the images do not depend on
    ``batch_size`` or the device.

    Returns:
        uint8 (num, C, H, W).

    Example:
        >>> sample(build_generator(ModelConfig()), 4).shape  # doctest: +SKIP
        torch.Size([4, 1, 28, 28])
    """
    z = sample_latents(model, num, generator=torch.Generator().manual_seed(seed), temperature=temperature,
                       sampler=sampler)  # (num, *latent_shape)
    out = [model.decode(chunk.to(model.device)) for chunk in z.split(batch_size)]
    return _uint8(torch.cat(out), model.value_range)


@torch.no_grad()
def reconstruct(model: VAE, dataset: Dataset, batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """Reconstruct every image of ``dataset`` in order, from the posterior mean.

    :meth:`VAE.reconstruct` decodes contiguous latents, as :func:`vaegan.codec.decode` gets them from a
    latents file, so ``decode(model, encode(model, dataset)[0])`` gives the very same pixels.

    Returns:
        (inputs, reconstructions), both uint8 (N, C, H, W).

    Raises:
        DataError: the images do not fit the model.
    """
    inputs, recons = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = image_of(batch)  # (B, C, H, W); labels dropped
        if not inputs:
            model.check_images(x, "the dataset")
        x = x.to(model.device)
        inputs.append(_uint8(x, model.value_range))
        recons.append(_uint8(model.reconstruct(x), model.value_range))
    return torch.cat(inputs), torch.cat(recons)


@torch.no_grad()
def interpolate(model: VAE, num_pairs: int = 4, steps: int = 8, seed: int = 0, dataset: Optional[Dataset] = None,
                indices: Optional[Sequence[int]] = None,
                sampler: Optional[LatentSampler] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Decode ``steps`` evenly spaced points between pairs of latents.

    Without ``dataset`` the pairs are random latents from ``sampler`` (the prior when None). With it,
    they are the posterior means of pairs of its images: ``indices`` (consecutive pairs) or, by default,
    images drawn from ``seed``.

    Returns:
        (strips uint8 (P, steps, C, H, W), the pairs' end images uint8 (P, 2, C, H, W) or None).

    Raises:
        ConfigError: an odd number of indices, or indices outside the dataset.
    """
    gen = torch.Generator().manual_seed(seed)
    device = model.device
    if dataset is None:
        z0, z1 = sample_latents(model, 2 * num_pairs, generator=gen, sampler=sampler).to(device).chunk(2)  # (P, *latent)
        images = model.decode_path(z0, z1, steps)  # (P, steps, C, H, W)
        return _uint8(images, model.value_range), None
    n = len(dataset)  # type: ignore[arg-type]
    if indices is None:
        if n < 2:
            raise DataError("Interpolating between dataset images needs at least 2 images.")
        picks = [int(i) for i in torch.randperm(n, generator=gen)[: 2 * num_pairs]]
        picks += picks[: 2 * num_pairs - len(picks)]  # a tiny dataset: reuse images
    else:
        picks = list(indices)
        if len(picks) % 2 or not picks:
            raise ConfigError(f"--indices takes pairs of image numbers (an even count), got {len(picks)}.")
        bad = [i for i in picks if not 0 <= i < n]
        if bad:
            raise ConfigError(f"--indices {bad} are outside the dataset, which has {n} images (0 to {n - 1}).")
    x = torch.stack([image_of(dataset[i]) for i in picks])  # (2P, C, H, W): start, end, start, end, ...
    model.check_images(x, "the dataset")
    x = x.to(device)
    strips = model.interpolate(x[0::2], x[1::2], steps=steps)  # (P, steps, C, H, W)
    ends = torch.stack([x[0::2], x[1::2]], dim=1)  # (P, 2, C, H, W)
    return _uint8(strips, model.value_range), _uint8(ends, model.value_range)


# The trainer's preview panels moved to their own module (the trainer no longer imports this CLI-side one).
__getattr__ = deprecated_names(__name__, {
    "preview_grids": "vaegan.previews:preview_grids",
    # 0.5: images out of vaegan have their own module
    **{name: f"vaegan.images:{name}" for name in ("OUTPUT_SUFFIXES", "check_output", "to_uint8", "save_images",
                                                   "save_reconstructions", "save_interpolations")},
})
