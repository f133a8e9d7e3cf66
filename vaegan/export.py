"""What a finished run leaves next to its weights: the latent scaling factor and a model card.

- :func:`estimate_scaling_factor`: latent diffusion trains on ``z * scaling_factor`` with the factor
  chosen so that the latents have unit variance: 1 / std of posterior samples of training images
  (Rombach et al. 2022, sec. G; SD's 0.18215 was computed this way). ``train.estimate_scaling_factor: N``
  does it on N training images at the end of a run and stores it in the generator's ``scaling_factor``
  option (when it has one: ``autoencoder_kl``), hence in ``final/config.json`` and the diffusers export.
- :func:`write_model_card`: ``final/README.md``: what was trained, on what, how, its metrics, and how to
  load it in vaegan (and in diffusers when ``final/diffusers`` exists).

Example:
    >>> scale, std = estimate_scaling_factor(model, dataset, num_images=256)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import yaml
from torch.utils.data import Dataset

from .config import ExperimentConfig, to_dict
from .data import image_of
from .files import save_safetensors, write_text_atomic
from .generator import VAE

__all__ = ["estimate_scaling_factor", "set_scaling_factor", "estimate_and_store_scaling_factor", "write_model_card"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def estimate_scaling_factor(model: VAE, dataset: Dataset, num_images: int = 1024, batch_size: int = 64,
                            seed: int = 0) -> Tuple[float, float]:
    """1 / std of posterior samples ``z ~ q(z|x)`` of the first ``num_images`` images of ``dataset``.

    Returns:
        ``(scaling_factor, std)``; the (unbiased) std is over every element of every latent, from fp64 sums
        (``vaegan encode --sample`` reports the same quantity for the latents it writes).

    Raises:
        ValueError: the dataset is empty or the latents are constant.
    """
    n = min(num_images, len(dataset))  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot estimate a scaling factor from an empty dataset")
    device = model.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = total_sq = count = 0.0
    was_training = model.training
    model.eval()
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([image_of(it) for it in items]).to(device)
        q = model.encode(x)
        eps = torch.randn(q.mean.shape, generator=gen).to(q.mean)  # seeded on the CPU: any device, same numbers
        z = (q.mean + q.std * eps).double()
        total += float(z.sum())
        total_sq += float(z.pow(2).sum())
        count += z.numel()
    model.train(was_training)
    var = (total_sq - total * total / count) / max(count - 1, 1)  # unbiased, as vaegan.codec.latent_stats
    if not var > 0:
        raise ValueError("the latents are constant: their std is 0")
    std = var ** 0.5
    return 1.0 / std, std


def set_scaling_factor(model: VAE, value: float) -> bool:
    """Store ``value`` as the generator's ``scaling_factor`` option; False when it has no such option."""
    if "scaling_factor" not in model.config.options:
        return False
    model.config = dataclasses.replace(model.config, options={**model.config.options, "scaling_factor": float(value)})
    if hasattr(model, "scaling_factor"):
        model.scaling_factor = float(value)
    return True


def estimate_and_store_scaling_factor(models: Sequence[VAE], dataset: Dataset, num_images: int,
                                     seed: int = 0) -> Tuple[str, ...]:
    """Estimate on ``models[0]`` (the saved, EMA generator) and store the factor in every model's options.
    Returns the model card's line about it (none when ``num_images`` is 0).

    Deprecated: ``train.estimate_scaling_factor`` now computes the shift and per-channel statistics too,
    on every process, with :func:`vaegan.latent_stats.estimate_and_store`.
    """
    from ._deprecation import warn_deprecated

    warn_deprecated("vaegan.export.estimate_and_store_scaling_factor is deprecated; use "
                    "vaegan.latent_stats.estimate_and_store (shift and per-channel statistics too, exact under several "
                    "processes).")
    if not num_images:
        return ()
    scale, std = estimate_scaling_factor(models[0], dataset, num_images, seed=seed)
    stored = [set_scaling_factor(m, scale) for m in {id(m): m for m in models}.values()]
    note = (f"Latent scaling factor {scale:.6g} = 1 / std of posterior samples of {num_images} training images "
            f"(std {std:.4g})")
    if not all(stored):
        logger.warning("%s; the '%s' generator has no scaling_factor option, so it is recorded in the model "
                       "card only.", note, models[0].config.name)
    logger.info("%s.", note)
    return (note + ("." if all(stored) else ", recorded here only: the generator has no scaling_factor option."),)


DISCRIMINATOR_DIR = "discriminator"


def save_discriminator(discriminator: torch.nn.Module, config: ExperimentConfig, final: Path) -> Path:
    """Write the trained discriminator into ``final/discriminator/`` (``config.json`` with its plugin name,
    options and image shape; ``model.safetensors``), so ``vaegan score`` can report its logits.

    Example:
        >>> save_discriminator(trainer.train_step.disc_net, trainer.config, Path("outputs/run/final"))  # doctest: +SKIP
    """
    folder = Path(final) / DISCRIMINATOR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    dc = config.discriminator
    spec = {"name": dc.name, "options": to_dict(dict(dc.options)), "image_shape": list(config.model.image_shape)}
    state = {k: v.detach().contiguous().cpu() for k, v in discriminator.state_dict().items()}
    save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt", "library": "vaegan"})
    write_text_atomic(folder / "config.json", json.dumps(spec, indent=2) + "\n")
    return folder


def load_discriminator(model_dir: Path, map_location: str = "cpu") -> Optional[torch.nn.Module]:
    """The discriminator a run saved next to its generator (:func:`save_discriminator`), in eval mode;
    None when there is none (a plain VAE, or a run of vaegan 0.2 or older).

    Raises:
        CheckpointError: the files are corrupt or do not fit the discriminator they name.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from . import registry
    from .errors import CheckpointError, ConfigError

    folder = Path(model_dir) / DISCRIMINATOR_DIR
    if not (folder / "config.json").is_file():
        return None
    try:
        spec = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"), device=map_location)
        disc = registry.build_plugin("vaegan.discriminators", spec["name"], spec.get("options") or {},
                                     image_shape=tuple(spec["image_shape"]))
        disc.load_state_dict(state)
    except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ConfigError,
            RuntimeError) as exc:
        raise CheckpointError(f"The discriminator saved in '{folder}' cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); the files are corrupt or come from "
                              "another model. Delete that folder to score without discriminator logits.") from None
    return disc.to(map_location).eval()


def _latent_stats_section(final: Path, latent_dims: int) -> list:
    """The card's lines on ``final/latent_stats.json``: how a diffusion pipeline normalises latents with it."""
    from .latent_stats import LATENT_STATS_FILE, load_latent_stats

    if not (final / LATENT_STATS_FILE).is_file():
        return []
    s = load_latent_stats(final / LATENT_STATS_FILE)
    view = ", ".join(["1", "-1"] + ["1"] * (latent_dims - 1))  # (1, c, 1, 1) for a (c, h, w) latent
    return ["", f"## Latent statistics (`{LATENT_STATS_FILE}`)", "",
            f"Posterior {'samples' if s.posterior == 'sample' else 'means'} of {s.images} training images: mean "
            f"{s.mean:.6g}, std {s.std:.6g}; per channel in the file. A diffusion model trains on normalised latents:",
            "",
            f"- globally (SD3 / FLUX; SD and SDXL pipelines use the scale only): `latents = (z - {s.shift_factor:.6g}) * "
            f"{s.scaling_factor:.6g}` (shift_factor, scaling_factor; also in `config.json` and the diffusers config), "
            f"back with `z = latents / {s.scaling_factor:.6g} + {s.shift_factor:.6g}`. `vaegan encode --scaled` writes "
            "such latents and `vaegan decode` undoes it.",
            "- per channel (FLUX.2 style):", "", "```python", "import json", "", "import torch", "",
            f'stats = json.load(open("{final / LATENT_STATS_FILE}"))',
            f'mean = torch.tensor(stats["channel_mean"]).view({view})',
            f'std = torch.tensor(stats["channel_std"]).view({view})',
            "latents = (z - mean) / std  # and z = latents * std + mean before decoding", "```"]


def write_model_card(final: Path, config: ExperimentConfig, model: VAE, steps: int, images_seen: int,
                     results: Optional[Dict[str, Any]] = None, notes: Tuple[str, ...] = ()) -> Path:
    """Write ``final/README.md``: the generator, the data, the objective, the metrics, how to load it.

    Args:
        final: The run's ``final/`` folder (its weights are written already).
        config: The run's configuration. model: The saved (EMA) generator.
        steps: Optimizer steps trained. images_seen: Images over all processes.
        results: ``final/eval.json``'s metrics, if the run evaluated.
        notes: Extra lines (e.g. how the scaling factor was estimated).
    """
    mc = model.config
    c, h, w = model.image_shape
    options = yaml.safe_dump(to_dict(dict(mc.options)), sort_keys=False, default_flow_style=None).strip()
    terms = ", ".join(f"{t.key} ({t.name}, weight {t.weight.value:g})" for t in config.losses)
    adv = config.adversarial
    lines = [
        f"# A `{mc.name}` generator trained with vaegan",
        "",
        f"- Images: {c} x {h} x {w}, pixel range {list(model.value_range)}; latent shape "
        f"{list(model.latent_shape)}.",
        f"- Data: the `{config.data.name}` dataset, split `{config.data.split}`"
        f"{f', first {config.data.limit} images' if config.data.limit else ''} (`{config.data.root}`).",
        f"- Training: {steps} optimizer steps, {images_seen} images; batch {config.train.batch_size} per process x "
        f"{config.train.grad_accum} accumulation; seed {config.train.seed}; EMA decay {config.train.ema_decay}.",
        f"- Objective: {terms}"
        + (f"; adversarial `{adv.name}` (weight {adv.weight.value:g}{', adaptive' if adv.adaptive else ''}) against "
           f"the `{config.discriminator.name}` discriminator" if adv is not None and config.discriminator is not None
           else "; no discriminator") + ".",
        *[f"- {note}" for note in notes],
        "",
        "Generator options:",
        "",
        "```yaml",
        options,
        "```",
    ]
    if results:
        lines += ["", "## Metrics (`eval.json`)", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in results.items() if isinstance(v, float)]
        lines += ["", f"Protocol: `{json.dumps(results.get('protocol', {}))}`"]
    lines += ["", "## Load it", "", "```python", "import vaegan", "",
              f'model = vaegan.VAE.from_pretrained("{final}")']
    if (final / "samplers" / "samplers.json").is_file():  # latents from the fitted default sampler, not N(0, I)
        lines += ["from vaegan.samplers import load_sampler", "",
                  f'sampler = load_sampler("{final}", latent_shape=model.latent_shape)  # the default sampler',
                  "images = model.decode(sampler.sample(4))  # or model.reconstruct(x), model.encode(x).mean", "```"]
    else:
        lines += ["images = model.sample(4)  # or model.reconstruct(x), model.encode(x).mean, model.decode(z)", "```"]
    if (final / "diffusers").is_dir():
        scale, shift = mc.options.get("scaling_factor"), mc.options.get("shift_factor")
        # Pipelines normalise latents as (z - shift_factor) * scaling_factor (SD3, Flux); SD/SDXL have no shift.
        sample = "vae.encode(x).latent_dist.sample()"
        normalised = f"({sample} - vae.config.shift_factor)" if shift is not None else sample
        lines += ["", "In diffusers (the same weights, the same outputs):", "", "```python",
                  "from diffusers import AutoencoderKL", "",
                  f'vae = AutoencoderKL.from_pretrained("{final / "diffusers"}")',
                  f"latents = {normalised} * vae.config.scaling_factor"
                  + (f"  # {scale:g}" if scale is not None else "  # 1.0: not estimated (train.estimate_scaling_factor)")
                  + (f", shift {shift:g}" if shift is not None else ""),
                  "```"]
    if (final / "ldm" / "vae.safetensors").is_file():  # vaegan_plugins.ldm_checkpoint's single file
        lines += ["", f"ComfyUI, A1111/Forge and Stability's generative-models load `{final / 'ldm' / 'vae.safetensors'}` "
                  "(the LDM key layout): put it in `ComfyUI/models/vae/` or `stable-diffusion-webui/models/VAE/`; "
                  f'diffusers reads it too: `AutoencoderKL.from_single_file(path, config="{final / "diffusers"}")`.']
    lines += _latent_stats_section(final, len(model.latent_shape))
    path = final / "README.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
