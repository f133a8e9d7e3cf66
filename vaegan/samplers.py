"""Latent samplers: where the latents of generated images come from, fitted, saved and loaded by name.

A VAE's decoder is trained on posterior samples, and the aggregate posterior of a finite model rarely
fills N(0, I): prior draws that land in its holes decode to images between the classes. A *fitted*
sampler draws from a density fitted to the posterior means of the training images instead (Dai &
Wipf 2019; Ghosh et al. 2020). Samplers are plugins (group ``vaegan.samplers``, contract
:class:`LatentSampler`):

- ``normal``: N(0, I) (what :meth:`vaegan.VAE.sample_prior` draws), nothing to fit;
- ``gmm``: a Gaussian mixture fitted by scikit-learn (``vaegan_plugins.gmm``);
- ``two_stage``: a second-stage VAE on the latents (``vaegan_plugins.two_stage``).

A fitted sampler is saved in the model folder, under ``samplers/<name>/`` as ``sampler.json`` (name,
options, latent shape, what it was fitted on) and ``sampler.safetensors`` (its tensors; no pickle).
``samplers/samplers.json`` records the folder's default sampler, the one ``vaegan sample`` uses
without ``--sampler``.

Example:
    >>> sampler = build_sampler("normal", (16,))
    >>> sampler.sample(4, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([4, 16])
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError, OutputError, PluginError
from .files import check_finite
from .progress import emit

__all__ = ["LatentSampler", "NormalSampler", "build_sampler", "fit_sampler", "fit_configured", "fit_after_training",
           "save_sampler",
           "load_sampler", "check_size",
           "default_sampler_name", "saved_samplers", "sample_latents", "SAMPLERS_DIR", "GROUP"]

logger = logging.getLogger(__name__)

GROUP = "vaegan.samplers"
SAMPLERS_DIR = "samplers"
INDEX_NAME = "samplers.json"
CONFIG_NAME, WEIGHTS_NAME = "sampler.json", "sampler.safetensors"
FORMAT_VERSION = 1
MAX_NUMBERS = 2 ** 26  # a sampler with more parameters than this (256 MiB of fp32) is refused before fitting


class LatentSampler(nn.Module):
    """Base class of latent samplers (group ``vaegan.samplers``): a density over latents (N, *latent_shape).

    A plugin implements :meth:`fit_latents` and :meth:`draw` (and may add ``log_prob``). It is
    constructed as ``cls(latent_shape=(...), **options)`` and keeps everything it learns
    in buffers or parameters whose shapes follow from the options alone, so ``load_state_dict``
    restores a fitted copy exactly. A constructor that cannot serve ``latent_shape`` (too many
    dimensions for its parameters) raises :class:`~vaegan.errors.ConfigError` saying what to use.

    Class attributes:
        requires_fit: False for a sampler with nothing to learn (``normal``).

    A sampler that needs more than one latent to fit sets ``self.min_latents`` (checked before training).

    Attributes:
        name, options: The registry name and constructor options it was built with
            (:func:`build_sampler` sets them; :func:`save_sampler` writes them).
        temperature: The spread :meth:`sample` draws with by default (saved with the sampler; 1.0: as fitted).
    """

    requires_fit: ClassVar[bool] = True
    min_latents: int = 1  # the fewest latents fit() accepts (a mixture needs one per component)

    def __init__(self, latent_shape: Sequence[int]) -> None:
        super().__init__()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.name, self.options = "", {}
        self.temperature = 1.0  # what sample() draws with unless told otherwise; saved with the sampler
        self.register_buffer("fitted", torch.tensor(not self.requires_fit))

    @property
    def dim(self) -> int:
        """Number of latent elements, prod(latent_shape)."""
        return math.prod(self.latent_shape)

    def fit_latents(self, latents: Tensor, seed: int) -> Dict[str, Any]:  # pragma: no cover - abstract
        """Learn from ``latents`` (N, *latent_shape), seeded by ``seed``; return a JSON-able summary of the fit."""
        raise NotImplementedError

    def fit(self, latents: Tensor, *, seed: int = 0) -> Dict[str, Any]:
        """Fit to ``latents`` (N, *latent_shape) (posterior means); returns a summary of the fit (logged, saved).

        Raises:
            DataError: too few latents for the options.
        """
        summary = self.fit_latents(latents, seed)
        self.fitted.fill_(True)
        return summary

    def fit_plan(self) -> str:
        """What :meth:`fit` will do, for the line said before it ("a 50-component mixture (up to 200 EM
        iterations)"); plugins with a long fit say how long it can take. Default: "the sampler"."""
        return "the sampler"

    def draw(self, n: int, generator: Optional[torch.Generator], temperature: float) -> Tensor:  # pragma: no cover
        """``n`` latents (n, *latent_shape) on the CPU; ``temperature`` scales the spread around the modes."""
        raise NotImplementedError

    def check_state(self) -> None:
        """Raise ``ValueError`` (one sentence) when the loaded state cannot be sampled from: a plugin's own rules
        beyond finite values (mixture weights, scales); :func:`load_sampler` calls it. Default: nothing to check."""

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None,
               temperature: Optional[float] = None) -> Tensor:
        """``n`` latents (n, *latent_shape), fp32 on the CPU, from ``generator`` (the same draws for the same seed),
        at ``temperature`` (default: the sampler's own, :attr:`temperature`).

        Raises:
            RuntimeError: the sampler has not been fitted.
        """
        if not bool(self.fitted):
            raise RuntimeError(f"The '{self.name or type(self).__name__}' sampler has not been fitted; call fit() "
                               "or load a fitted one with load_sampler().")
        return self.draw(n, generator, self.temperature if temperature is None else temperature).float()


class NormalSampler(LatentSampler):
    """N(0, I): every latent element an independent standard normal, ``temperature`` its standard deviation.

    The same draws as :meth:`vaegan.VAE.sample_prior` for the same generator.
    """

    requires_fit = False

    def fit_latents(self, latents: Tensor, seed: int) -> Dict[str, Any]:
        return {}

    def draw(self, n: int, generator: Optional[torch.Generator], temperature: float) -> Tensor:
        return torch.randn((n, *self.latent_shape), generator=generator) * temperature


def build_sampler(name: str, latent_shape: Sequence[int], options: Optional[Mapping[str, Any]] = None) -> LatentSampler:
    """The sampler plugin ``name`` for latents of ``latent_shape``, unfitted.

    Raises:
        PluginError: unknown or broken plugin, or one that is not a :class:`LatentSampler`.
        ConfigError: an option it does not accept, or a latent it cannot serve.

    Example:
        >>> build_sampler("gmm", (16,), {"n_components": 10}).options
        {'n_components': 10}
    """
    from . import registry

    options = dict(options or {})
    sampler = registry.build_plugin(GROUP, name, options, latent_shape=tuple(latent_shape))
    sampler.name, sampler.options = name, options
    return sampler


@torch.no_grad()
def fit_sampler(model, dataset, name: str, options: Optional[Mapping[str, Any]] = None, *, seed: int = 0,
                batch_size: int = 256, limit: Optional[int] = None, temperature: float = 1.0,
                announce: Optional[str] = "`limit` fits on fewer images") -> Tuple[LatentSampler, Dict[str, Any]]:
    """Fit sampler ``name`` to the posterior means of ``dataset``'s images under ``model``.

    Args:
        model: A :class:`vaegan.VAE` (the EMA one, usually).
        dataset: The images the model was trained on (any dataset plugin's).
        limit: Fit on the first ``limit`` images only.
        temperature: The spread the fitted sampler draws with by default.
        announce: How to make the fit shorter, said in a line before the fit starts (None: no line). The
            encoding and the fit itself then show progress (:mod:`vaegan.progress`).

    Returns:
        (the fitted sampler, a JSON-able record of the fit: images, seconds, the sampler's summary).

    Raises:
        ConfigError, PluginError: see :func:`build_sampler` (raised before any image is encoded).
        DataError: images that do not fit the model, or too few for the sampler.
    """
    import time

    from torch.utils.data import Subset

    from .codec import encode

    sampler = build_sampler(name, model.latent_shape, options)
    sampler.temperature = float(temperature)
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    t0 = time.perf_counter()
    if announce:
        emit(f"Fitting the '{name}' sampler to the posterior means of {len(dataset)} images: encoding them, then "
             f"fitting {sampler.fit_plan()}. Progress shows after a few seconds; {announce}.")
    latents, _ = encode(model, dataset, batch_size=batch_size)  # (N, *latent_shape) posterior means, CPU fp32
    summary = sampler.fit(latents, seed=seed)
    record = {"images": int(latents.shape[0]), "posterior": "mean", "seed": seed,
              "seconds": round(time.perf_counter() - t0, 2), **{k: _plain(v) for k, v in summary.items()}}
    logger.info("Fitted the '%s' sampler to %d posterior means: %s", name, latents.shape[0], record)
    return sampler, record


def fit_configured(model, dataset, config) -> Optional[Tuple[LatentSampler, Dict[str, Any]]]:
    """Fit ``config.sampler`` (an :class:`~vaegan.config.ExperimentConfig`'s) to ``dataset``'s posterior means
    under ``model``, as the trainer does: (sampler, record), or None when the fit fails (logged with what to
    run instead: a failed fit never costs a training run)."""
    sc = config.sampler
    try:
        with torch.random.fork_rng():  # a dataset's random flips or crops must not move the training's RNG
            return fit_sampler(model, dataset, sc.name, sc.options, seed=config.train.seed, limit=sc.limit,
                               temperature=sc.temperature,
                               announce="`sampler.limit: N` fits on fewer images, `sampler: null` skips the fit "
                                        "(`vaegan fit-sampler` fits one later)")
    except Exception as exc:  # noqa: BLE001 - the model is saved; the sampler can be fitted again from it
        logger.error("Fitting the '%s' sampler failed (%s: %s). Fit one to the saved model later with `vaegan "
                     "fit-sampler --model <output-dir> --sampler %s`.", sc.name, type(exc).__name__, exc, sc.name)
        return None


def fit_after_training(model, dataset, config, final: Union[str, Path]) -> Optional[str]:
    """Fit ``config.sampler`` (:func:`fit_configured`) and save it in ``final`` as the default sampler; the
    trainer calls it once the model is saved.

    Returns:
        A line for the model card, or None when the fit failed (logged; the saved model is kept).
    """
    fitted = fit_configured(model, dataset, config)
    if fitted is None:
        return None
    sampler, record = fitted
    save_sampler(sampler, final, fitted_on={"dataset": config.data.name, "split": config.data.split, **record})
    return (f"Default sampler: `{sampler.name}`, fitted to {record['images']} posterior means "
            f"(`final/samplers/{sampler.name}`; `--sampler normal` draws from N(0, I)).")


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _weights_digest(model_dir: Path) -> Optional[str]:
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        return None
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_sampler(sampler: LatentSampler, model_dir: Union[str, Path], *, default: bool = True,
                 fitted_on: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a fitted sampler into ``model_dir/samplers/<name>/``; with ``default``, make it the folder's default.

    Returns:
        The sampler's folder.

    Raises:
        PluginError: the sampler was not built by :func:`build_sampler` (no name to rebuild it by).
        RuntimeError: it has not been fitted.
    """
    from .config import to_dict
    from .files import save_safetensors, write_text_atomic

    if not sampler.name:
        raise PluginError(f"{type(sampler).__qualname__} has no registry name; build it with vaegan.samplers.build_sampler.")
    if not bool(sampler.fitted):
        raise RuntimeError(f"The '{sampler.name}' sampler has not been fitted; fit it before saving.")
    model_dir = Path(model_dir)
    folder = model_dir / SAMPLERS_DIR / sampler.name
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in sampler.state_dict().items()}
    save_safetensors(state, folder / WEIGHTS_NAME, metadata={"format": "pt", "library": "vaegan", "sampler": sampler.name})
    record = {"format_version": FORMAT_VERSION, "name": sampler.name, "options": to_dict(dict(sampler.options)),
              "latent_shape": list(sampler.latent_shape), "temperature": sampler.temperature,
              "model_weights_sha256": _weights_digest(model_dir),
              "fitted_on": dict(fitted_on or {})}
    write_text_atomic(folder / CONFIG_NAME, json.dumps(record, indent=2) + "\n")
    if default:
        write_text_atomic(model_dir / SAMPLERS_DIR / INDEX_NAME, json.dumps({"default": sampler.name}, indent=2) + "\n")
    return folder


def saved_samplers(model_dir: Union[str, Path]) -> Tuple[str, ...]:
    """Names of the samplers saved in ``model_dir`` (sorted)."""
    root = Path(model_dir) / SAMPLERS_DIR
    return tuple(sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())) if root.is_dir() else ()


def check_replace(model_dir: Union[str, Path], name: str, overwrite: bool) -> None:
    """Refuse to replace the fitted sampler ``name`` of ``model_dir`` unless ``overwrite`` (before any fit).

    Raises:
        OutputError: a sampler of that name is saved there and ``overwrite`` is false.
    """
    folder = Path(model_dir) / SAMPLERS_DIR / name
    if overwrite or name not in saved_samplers(model_dir):
        return
    try:
        fitted_on = json.loads((folder / CONFIG_NAME).read_text()).get("fitted_on", {})
        what = f", fitted to {fitted_on['images']} images of the {fitted_on['split']} split" if fitted_on else ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        what = ""
    default = " and is the folder's default sampler" if default_sampler_name(model_dir) == name else ""
    raise OutputError(
        f"'{folder}' already holds a fitted '{name}' sampler{what}{default}; fitting again would replace it. Pass "
        "--overwrite to replace it, or copy the model folder and fit there to keep both.")


def default_sampler_name(model_dir: Union[str, Path]) -> str:
    """The sampler ``model_dir`` records as its default, or ``"normal"`` when it records none.

    Raises:
        CheckpointError: the record is unreadable.
    """
    index = Path(model_dir) / SAMPLERS_DIR / INDEX_NAME
    if not index.is_file():
        return "normal"
    try:
        name = json.loads(index.read_text())["default"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"'{index}' is corrupt ({type(exc).__name__}: {exc}). Delete it (N(0, I) becomes the "
                              "default) or re-fit a sampler with `vaegan fit-sampler`.") from None
    return str(name)


def load_sampler(model_dir: Union[str, Path], name: Optional[str] = None,
                 latent_shape: Optional[Sequence[int]] = None) -> LatentSampler:
    """A sampler saved in ``model_dir`` (``name``, or the folder's default); ``normal`` needs no file.

    Args:
        model_dir: The model folder (a run's ``final/``).
        name: The sampler's name; None: the folder's default (``normal`` when it records none).
        latent_shape: The latent shape of the model it will serve; checked against the saved one.

    Raises:
        CheckpointError: not fitted for this folder, corrupt files, or fitted to another latent shape.
        PluginError: the sampler plugin is not installed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    name = name or default_sampler_name(model_dir)
    folder = model_dir / SAMPLERS_DIR / name
    if not (folder / CONFIG_NAME).is_file():
        from . import registry

        if not registry.load(GROUP, name).requires_fit:  # an unknown name: PluginError listing the installed ones
            if latent_shape is None:
                raise ConfigError(f"The '{name}' sampler needs the model's latent shape to be built.")
            return build_sampler(name, latent_shape)
        fitted = ", ".join(saved_samplers(model_dir)) or "none"
        raise CheckpointError(
            f"No fitted '{name}' sampler in '{model_dir}' (fitted there: {fitted}). Fit one with `vaegan fit-sampler "
            f"--model {model_dir} --sampler {name}`, or use --sampler normal for N(0, I).")
    try:
        record = json.loads((folder / CONFIG_NAME).read_text())
        saved_shape = tuple(record["latent_shape"])
        state = load_file(str(folder / WEIGHTS_NAME))
    except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"The '{name}' sampler in '{folder}' cannot be read ({type(exc).__name__}: {exc}); the "
                              "files are corrupt or truncated. Re-fit it with `vaegan fit-sampler`.") from None
    if latent_shape is not None and saved_shape != tuple(latent_shape):
        raise CheckpointError(
            f"The '{name}' sampler in '{folder}' was fitted to latents of shape {saved_shape}, but this model's latents "
            f"have shape {tuple(latent_shape)}: it belongs to another model. Re-fit it for this one with `vaegan "
            f"fit-sampler --model {model_dir} --sampler {name}`.")
    fix = f"Re-fit it with `vaegan fit-sampler --model {model_dir} --sampler {name} --overwrite`."
    temperature = record.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise CheckpointError(f"'{folder / CONFIG_NAME}' has temperature {temperature!r}, not a finite number >= 0; "
                              f"the file was edited or is corrupt. Set it to 1.0 (as fitted), or: {fix}")
    try:
        sampler = build_sampler(name, saved_shape, record.get("options") or {})
    except ConfigError as exc:
        raise CheckpointError(f"'{folder / CONFIG_NAME}' holds options the '{name}' sampler refuses: {exc} {fix}") from None
    sampler.temperature = float(temperature)
    check_finite(state, folder / WEIGHTS_NAME)  # NaN/inf means or scales would draw NaN latents: black images
    try:
        sampler.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"'{folder / WEIGHTS_NAME}' does not fit the options in '{folder / CONFIG_NAME}' "
                              f"({str(exc).splitlines()[0]}); re-fit the sampler.") from None
    if not bool(sampler.fitted):
        raise CheckpointError(f"'{folder / WEIGHTS_NAME}' holds a '{name}' sampler that says it was never fitted "
                              f"(fitted: false); it would draw from its initial state. {fix}")
    try:
        sampler.check_state()
    except ValueError as exc:
        raise CheckpointError(f"'{folder / WEIGHTS_NAME}' cannot be sampled from: {exc} {fix}") from None
    digest = record.get("model_weights_sha256")
    if digest is not None and digest != _weights_digest(model_dir):
        logger.warning("The '%s' sampler in %s was fitted to other weights than the model.safetensors now there; "
                       "re-fit it with `vaegan fit-sampler` if the model was retrained.", name, folder)
    return sampler


def sample_latents(model, n: int, *, generator: Optional[torch.Generator] = None, temperature: Optional[float] = None,
                   sampler: Optional[LatentSampler] = None) -> Tensor:
    """``n`` latents (n, *latent_shape) on the CPU: from ``sampler`` (at its own temperature unless given one), or
    the model's own prior when None (temperature 1 unless given)."""
    if sampler is None:
        return model.sample_prior(n, generator=generator) * (1.0 if temperature is None else temperature)
    if tuple(sampler.latent_shape) != tuple(model.latent_shape):
        raise ConfigError(f"The '{sampler.name}' sampler draws latents of shape {sampler.latent_shape}, but the model's "
                          f"latents have shape {tuple(model.latent_shape)}; fit a sampler for this model.")
    return sampler.sample(n, generator=generator, temperature=temperature)


def check_size(sampler: LatentSampler, numbers: int, advice: str) -> None:
    """Refuse, before fitting, a sampler that would hold more than :data:`MAX_NUMBERS` numbers."""
    if numbers > MAX_NUMBERS:
        raise ConfigError(
            f"The '{sampler.name or type(sampler).__name__}' sampler would hold {numbers:,} numbers for latents of shape "
            f"{sampler.latent_shape} ({sampler.dim} dimensions), more than the {MAX_NUMBERS:,} vaegan allows. {advice}")
