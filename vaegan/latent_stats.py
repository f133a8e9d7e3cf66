"""Latent statistics for diffusion training: global shift and scale, per-channel mean and std, in one pass.

A diffusion model is trained on normalised latents. Two conventions are in use:

- global (SD 1/2/XL: scale only; SD3 and FLUX: shift and scale): ``(z - shift_factor) * scaling_factor``
  with ``shift_factor`` = the mean and ``scaling_factor`` = 1 / std of every latent element;
- per channel (FLUX.2, and diffusers' ``latents_mean`` / ``latents_std``): ``(z - mean_c) / std_c``.

:func:`compute_latent_stats` gives both from one pass over the first N images of a dataset. The moments
are those of posterior samples ``z ~ q(z|x)``, computed in closed form (``E[z] = mu``,
``E[z^2] = mu^2 + sigma^2`` for each element): what averaging over endless draws gives, with no noise, so
the numbers depend neither on a seed nor on the batch size. Under several processes each one encodes
its own share of the N images (image ``i`` on process ``i mod world``, each image exactly once) and the
fp64 sums are all-reduced: the result is that of one process, up to the order of fp64 additions.

``train.estimate_scaling_factor: N`` computes them at the end of training, stores them in the
generator's options (``scaling_factor``, ``shift_factor``, and ``latents_mean`` / ``latents_std`` where it
has them: ``autoencoder_kl``), hence in ``final/config.json`` and the diffusers copy's ``scaling_factor`` /
``shift_factor``, and writes ``final/latent_stats.json`` (:func:`save_latent_stats`). The per-channel pair
is not written into the diffusers config: the diffusers pipelines that read ``latents_mean`` /
``latents_std`` (the SDXL family) multiply by ``scaling_factor`` as well, which would scale twice.

Example:
    >>> stats = compute_latent_stats(model, dataset, num_images=1024)  # doctest: +SKIP
    >>> z_normalised = (z - stats.shift_factor) * stats.scaling_factor  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .data import image_of
from .errors import DataError
from .generator import VAE

__all__ = ["LATENT_STATS_FILE", "LatentStats", "compute_latent_stats", "store_latent_stats", "save_latent_stats",
           "load_latent_stats", "estimate_and_store"]

logger = logging.getLogger(__name__)

LATENT_STATS_FILE = "latent_stats.json"


@dataclasses.dataclass(frozen=True)
class LatentStats:
    """The statistics of the latents of ``images`` images (``posterior``: ``sample`` or ``mean``).

    Attributes:
        mean, std: Over every element of every latent (the population std).
        channel_mean, channel_std: The same per channel (dim 1 of the latent: c of (c, h, w), or each
            dimension of a vector latent).
    """

    images: int
    posterior: str
    mean: float
    std: float
    channel_mean: Tuple[float, ...]
    channel_std: Tuple[float, ...]

    @property
    def scaling_factor(self) -> float:
        """1 / std: latent diffusion's rule (SD's 0.18215 was computed so)."""
        return 1.0 / self.std

    @property
    def shift_factor(self) -> float:
        """The mean, subtracted before scaling (SD3 and FLUX)."""
        return self.mean

    def to_dict(self) -> Dict[str, Any]:
        """The fields, the global pair and how a pipeline applies them (what :func:`save_latent_stats` writes)."""
        return {"images": self.images, "posterior": self.posterior, "mean": self.mean, "std": self.std,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "channel_mean": list(self.channel_mean), "channel_std": list(self.channel_std),
                "normalise": {"global": "(z - shift_factor) * scaling_factor",
                              "per_channel": "(z - channel_mean[c]) / channel_std[c]"}}


@torch.no_grad()
def compute_latent_stats(model: VAE, dataset: Dataset, num_images: int = 1024, batch_size: int = 64,
                         posterior: Literal["sample", "mean"] = "sample", accelerator: Any = None) -> LatentStats:
    """Global and per-channel mean and std of the latents of the first ``num_images`` images of ``dataset``.

    Args:
        model: The generator (any latent shape; put on its device already).
        dataset: Images (or (image, label) pairs) the model takes.
        num_images: How many of the first images (fewer when the dataset is smaller).
        batch_size: Images per forward on each process.
        posterior: ``sample`` (the moments of ``z ~ q(z|x)``, what diffusion training draws) or ``mean``
            (of the posterior means, what ``vaegan encode`` writes without ``--sample``).
        accelerator: An Accelerate ``Accelerator``: every process must call this, each encodes its share.

    Returns:
        A :class:`LatentStats`, the same on every process.

    Raises:
        DataError: no images, images the model does not take, or constant latents (std 0).

    Example:
        >>> compute_latent_stats(model, dataset, 256).scaling_factor  # doctest: +SKIP
        0.1852...
    """
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
    n = min(int(num_images), len(dataset))  # type: ignore[arg-type]
    if n <= 0:
        raise DataError("Latent statistics need images, but the dataset (or num_images) is empty.")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device = model.device
    c = model.latent_shape[0]
    sums = torch.zeros(3, c, dtype=torch.float64, device=device)  # per channel: count, sum z, sum z^2
    was_training = model.training
    model.eval()
    try:
        for batch in DataLoader(Subset(dataset, range(rank, n, world)), batch_size=batch_size, shuffle=False):
            x = image_of(batch)  # (B, C, H, W); labels dropped
            if not sums[0].any():
                model.check_images(x, "the dataset")
            q = model.encode(x.to(device))
            mu = q.mean.double()  # (B, c, ...)
            second = mu.square() + (q.logvar.double().exp() if posterior == "sample" else 0.0)
            dims = [0, *range(2, mu.ndim)]  # all but the channel
            sums[0] += mu.numel() // c
            sums[1] += mu.sum(dims)
            sums[2] += second.sum(dims)
    finally:
        model.train(was_training)
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")  # exact: each image was counted on one process
    count, first, second = sums.cpu().unbind(0)
    total = float(count.sum())
    mean = float(first.sum()) / total
    var = float(second.sum()) / total - mean * mean
    channel_mean = first / count
    channel_var = (second / count - channel_mean.square()).clamp_min(0.0)
    if not var > 0 or not math.isfinite(var):
        raise DataError(f"The latents of {n} images are constant (std 0) or not finite: no scaling factor can make them "
                        "unit-variance. Check the model (a collapsed or diverged encoder) and the images.")
    return LatentStats(images=n, posterior=posterior, mean=mean, std=math.sqrt(var),
                       channel_mean=tuple(float(v) for v in channel_mean),
                       channel_std=tuple(float(v) for v in channel_var.sqrt()))


def store_latent_stats(model: VAE, stats: LatentStats) -> Tuple[str, ...]:
    """Set the generator options among ``scaling_factor``, ``shift_factor``, ``latents_mean``, ``latents_std``
    that ``model`` has (so ``save_pretrained`` writes them); returns the names it set.

    A per-channel std of 0 (a dead channel of posterior means) is not stored: the pair is left as it was.
    """
    values: Dict[str, Any] = {"scaling_factor": stats.scaling_factor, "shift_factor": stats.shift_factor}
    if all(s > 0 for s in stats.channel_std):
        values.update(latents_mean=list(stats.channel_mean), latents_std=list(stats.channel_std))
    else:
        logger.warning("A latent channel is constant (std 0); latents_mean/latents_std are not stored.")
    present = {k: v for k, v in values.items() if k in model.config.options}
    model.config = dataclasses.replace(model.config, options={**model.config.options, **present})
    for key in ("scaling_factor", "shift_factor"):  # the attributes autoencoder_kl keeps
        if key in present and hasattr(model, key):
            setattr(model, key, present[key])
    return tuple(present)


def save_latent_stats(stats: LatentStats, path: Union[str, Path]) -> Path:
    """Write ``stats`` (:meth:`LatentStats.to_dict`) as JSON, atomically; ``final/latent_stats.json`` in a run."""
    from .files import dumps_json, write_text_atomic

    return write_text_atomic(Path(path), dumps_json(stats.to_dict(), indent=2) + "\n")


def load_latent_stats(path: Union[str, Path]) -> LatentStats:
    """Read a file written by :func:`save_latent_stats`.

    Raises:
        DataError: a missing or unreadable file, or one without the fields.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        return LatentStats(images=int(d["images"]), posterior=str(d["posterior"]), mean=float(d["mean"]),
                           std=float(d["std"]), channel_mean=tuple(float(v) for v in d["channel_mean"]),
                           channel_std=tuple(float(v) for v in d["channel_std"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"'{path}' cannot be read as latent statistics ({type(exc).__name__}: {exc}); it is written "
                        f"by a training run with train.estimate_scaling_factor (final/{LATENT_STATS_FILE}).") from None


def estimate_and_store(models: Sequence[VAE], dataset: Dataset, num_images: int,
                       accelerator: Any = None) -> Tuple[Optional[LatentStats], Tuple[str, ...]]:
    """``train.estimate_scaling_factor``: the statistics of ``models[0]`` (the saved, EMA generator) on
    ``num_images`` images, stored in every model's options; and the model card's line about them.

    Every process calls it (each encodes its share); ``(None, ())`` when ``num_images`` is 0.
    """
    if not num_images:
        return None, ()
    stats = compute_latent_stats(models[0], dataset, num_images, accelerator=accelerator)
    stored = [store_latent_stats(m, stats) for m in {id(m): m for m in models}.values()]
    note = (f"Latent scaling factor {stats.scaling_factor:.6g} = 1 / std of posterior samples of {stats.images} "
            f"training images (std {stats.std:.4g}); shift factor {stats.shift_factor:.4g} = their mean; per-channel "
            f"mean and std in {LATENT_STATS_FILE}")
    if not all("scaling_factor" in s for s in stored):
        logger.warning("%s; the '%s' generator has no scaling_factor option, so they are recorded in the model card "
                       "and %s only.", note, models[0].config.name, LATENT_STATS_FILE)
        return stats, (note + ", recorded here only: the generator has no scaling_factor option.",)
    logger.info("%s.", note)
    return stats, (note + ".",)
