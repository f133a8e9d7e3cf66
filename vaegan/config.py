"""Typed, frozen configuration, built once from YAML / CLI overrides and passed down explicitly.

Every default lives in one place below, with a one-line reason. Unknown keys and values of the wrong
type raise :class:`~vaegan.errors.ConfigError` naming the key and what is allowed: a typo never
silently changes training.

Example:
    >>> cfg = ExperimentConfig.from_dict({"train": {"batch_size": 32}})
    >>> cfg.train.batch_size
    32
    >>> cfg = apply_overrides(cfg, ["optim_g.lr=1e-3", "model.latent_dim=8"])
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .errors import ConfigError
from .schedules import Schedule

__all__ = [
    "ModelConfig",
    "TermConfig",
    "DiscriminatorConfig",
    "AdversarialConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "ExperimentConfig",
    "load_config",
    "apply_overrides",
    "from_dict",
    "to_dict",
]


class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats: only true/false are booleans (so
    ``mixed_precision: no`` stays "no"), and ``1e-3`` is a number, not a string."""


_YAMLLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def parse_yaml(text: str) -> Any:
    """Parse YAML safely (no object construction) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 - _YAMLLoader is a SafeLoader


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            section = type(obj).__name__.replace("Config", "").lower()
            raise ConfigError(f"{section}.{name} must be a positive number, got {value!r}.")


@dataclass(frozen=True)
class ModelConfig:
    """The VAE: image shape, architecture and latent space."""

    arch: Literal["conv", "mlp"] = "conv"  # conv for images; mlp is the seed documents' 784-400-20
    image_channels: int = 1  # MNIST; 3 for RGB
    image_size: Tuple[int, int] = (28, 28)  # (H, W); any size the depth allows
    latent_dim: int = 16  # pythae's MNIST VAEGAN uses 16
    channels: Tuple[int, ...] = (32, 64)  # conv widths per resolution (each halves H and W)
    res_blocks: int = 0  # residual blocks per resolution; 0 keeps MNIST fast on a CPU
    norm_groups: int = 8  # GroupNorm groups (no batch statistics to diverge across DDP ranks)
    mlp_hidden: Tuple[int, ...] = (400,)  # hidden widths of the MLP variant
    output_range: Literal["unit", "symmetric"] = "unit"  # [0, 1] via sigmoid or [-1, 1] via tanh
    logvar_min: float = -30.0  # posterior log-variance clamp: exp(-30) keeps the std > 0 ...
    logvar_max: float = 20.0  # ... and exp(20) keeps fp16/bf16 activations finite

    def __post_init__(self) -> None:
        _positive(self, "image_channels", "latent_dim", "norm_groups")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ConfigError(f"model.image_size must be [height, width] >= 1, got {self.image_size}.")
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"model.channels must be a non-empty list of widths, got {self.channels}.")
        bad = [c for c in self.channels if c % self.norm_groups]
        if self.arch == "conv" and bad:
            raise ConfigError(
                f"model.channels {list(self.channels)} must all be divisible by model.norm_groups "
                f"({self.norm_groups}) for GroupNorm; change one or the other."
            )
        if self.res_blocks < 0:
            raise ConfigError(f"model.res_blocks must be >= 0, got {self.res_blocks}.")
        if not self.logvar_min < self.logvar_max:
            raise ConfigError("model.logvar_min must be smaller than model.logvar_max.")

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of the images the model encodes and decodes."""
        return (self.image_channels, *self.image_size)


@dataclass(frozen=True)
class TermConfig:
    """One loss term: a plugin name in ``vaegan.losses``, its weight and constructor options."""

    name: str
    weight: Schedule = Schedule()
    options: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of the plugin
    label: Optional[str] = None  # name in logs; defaults to ``name`` (set it to use a term twice)

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The discriminator network: a plugin name in ``vaegan.discriminators`` and its options."""

    name: str = "simple"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdversarialConfig:
    """The GAN objective: a loss pair in ``vaegan.adversarial`` and when each player starts."""

    name: str = "non_saturating"
    weight: Schedule = Schedule(value=0.05)  # generator weight; small so reconstruction leads (docs/training.md)
    disc_start: int = 0  # first step at which the discriminator trains (may precede weight.start)
    # What D is shown as fake. Prior samples are what must look like data (reconstructions-only fakes
    # leave them as fragments); "prior" also skips the decoder-only reconstruction pass, 1.6x faster
    # than "both" and better at 20 epochs (FD 13 vs 25, sharpness 1.12 vs 1.71; docs/training.md).
    fake: Literal["reconstruction", "prior", "both"] = "prior"
    train_encoder: bool = False  # Larsen et al.: no GAN gradient reaches the encoder
    adaptive: bool = False  # VQGAN/LDM: scale by |grad rec| / |grad adv| at the decoder's last layer
    adaptive_eps: float = 1e-4
    adaptive_max: float = 1e4
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.disc_start < 0:
            raise ConfigError(f"adversarial.disc_start must be >= 0, got {self.disc_start}.")
        if self.train_encoder and self.fake == "prior":
            raise ConfigError(
                "adversarial.train_encoder: true has no effect with adversarial.fake: prior: prior samples "
                "never pass through the encoder. Set fake to 'reconstruction' or 'both' for the GAN gradient "
                "to reach the encoder, or drop train_encoder."
            )
        _positive(self, "adaptive_eps", "adaptive_max")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from: a plugin name in ``vaegan.datasets`` and its arguments."""

    name: str = "mnist"
    root: str = "data"  # MNIST is downloaded here when missing (needs a network)
    split: Literal["train", "test"] = "train"
    download: bool = True
    limit: Optional[int] = None  # use only the first N images (quick runs, tests)
    num_workers: int = 0  # in-memory datasets need none

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be a positive number of images, got {self.limit}.")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}.")


@dataclass(frozen=True)
class OptimConfig:
    """One player's Adam(W) optimizer and learning-rate schedule (steps are optimizer updates)."""

    lr: float = 2e-4  # DCGAN/VQGAN-style rate, stable for both players
    betas: Tuple[float, float] = (0.5, 0.9)  # low beta1: the standard GAN choice (LDM, VQGAN)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear LR warm-up
    decay: Literal["constant", "cosine"] = "constant"  # after warm-up
    grad_clip: Optional[float] = 1.0  # max global grad norm; None disables clipping

    def __post_init__(self) -> None:
        _positive(self, "lr")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ConfigError(f"Adam betas must be two numbers in [0, 1), got {self.betas}.")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("weight_decay and warmup_steps must be >= 0.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or null, got {self.grad_clip}.")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, batch, precision, checkpoints, logging."""

    output_dir: str = "outputs/vaegan_mnist"
    epochs: int = 20
    max_steps: Optional[int] = None  # stops early when reached (optimizer steps, NaN/inf-skipped ones included)
    batch_size: int = 64  # per process
    grad_accum: int = 1  # micro-batches per optimizer update
    seed: int = 0
    # None: as `accelerate launch` says; without it, bf16 on GPUs that support it, else fp32
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = None
    tf32: bool = True  # TF32 for fp32 matmuls/convs on Ampere+ GPUs (no effect on CPUs)
    channels_last: bool = False  # NHWC memory format for the conv nets (GPU tensor cores; bf16 on AMX CPUs)
    compile: Optional[Literal["inductor", "aot_eager", "eager"]] = None  # torch.compile backend; None: off
    ema_decay: Optional[float] = 0.999  # EMA of the generator for sampling; None disables it
    checkpoint_every: int = 1000  # steps; 0 disables periodic checkpoints
    checkpoints_total_limit: int = 3  # keep the newest K complete checkpoints
    sample_every: int = 500  # steps between PNG grids; 0 disables them
    log_every: int = 50  # steps between logged scalars: the only host syncs (metrics, skipped-step counts)
    max_nonfinite_steps: int = 20  # skipped NaN/inf steps in a row before training stops
    num_samples: int = 64  # images in each PNG grid
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    plot_loss_curves: bool = True  # loss_curves.png at the end (matplotlib; ~1 s)
    project: str = "vaegan"  # tracker project name
    resume: Optional[str] = None  # "latest" or a checkpoint directory

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "grad_accum", "log_every", "num_samples", "max_nonfinite_steps")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.max_steps}.")
        if self.checkpoint_every < 0 or self.sample_every < 0:
            raise ConfigError("train.checkpoint_every and train.sample_every must be >= 0.")
        if self.checkpoints_total_limit < 1:
            raise ConfigError("train.checkpoints_total_limit must be >= 1: the last one is never deleted.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}.")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (:func:`vaegan.evaluation.evaluate`): ``vaegan eval`` and, with ``every > 0``, during training.

    The defaults of ``num_samples`` and the NLL sizes are small enough to evaluate every few thousand
    steps; the published benchmark uses 10,000 samples (``vaegan eval --num-samples 10000``).
    """

    every: int = 0  # steps between evaluations during training (and one at the end); 0: off
    split: Literal["train", "test"] = "test"  # evaluated split of the training dataset plugin
    limit: Optional[int] = None  # evaluate only the first N images of the split
    ema: bool = True  # evaluate the EMA generator (the one that is saved and sampled)
    num_samples: int = 2000  # prior samples for FD, sharpness, histogram, precision/recall
    nll_images: int = 500  # images for the ELBO / IWAE bounds
    nll_samples: int = 50  # importance samples per image (K)
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"  # Bernoulli on binarised pixels
    batch_size: int = 500
    classifier: Optional[bool] = None  # classifier metrics (FD, histogram, P/R); None: when the data has labels
    lpips: Optional[bool] = None  # LPIPS distance of reconstructions; None: when the backbone weights are local
    inception: bool = False  # also the Inception FID (needs torch-fidelity and its weights; slow on CPUs)
    seed: int = 0  # prior latents and importance noise: the same images on any number of processes

    def __post_init__(self) -> None:
        _positive(self, "num_samples", "nll_images", "nll_samples", "batch_size")
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0 (0 turns evaluation during training off), got {self.every}.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit must be a positive number of images or null, got {self.limit}.")


def _default_losses() -> Tuple[TermConfig, ...]:
    # BCE suits MNIST's near-binary pixels; the KL warm-up avoids early posterior collapse.
    return (TermConfig("bce"), TermConfig("kl", Schedule(value=1.0, warmup=1000)))


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs. Built once; every component receives its own part."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    losses: Tuple[TermConfig, ...] = field(default_factory=_default_losses)
    discriminator: Optional[DiscriminatorConfig] = DiscriminatorConfig()  # None: a plain VAE
    adversarial: Optional[AdversarialConfig] = AdversarialConfig()
    optim_g: OptimConfig = OptimConfig()
    optim_d: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self) -> None:
        if (self.discriminator is None) != (self.adversarial is None):
            raise ConfigError(
                "'discriminator' and 'adversarial' go together: set both for a VAE-GAN, or both to "
                "null for a plain VAE."
            )
        keys = [t.key for t in self.losses]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ConfigError(f"Loss terms {dupes} appear twice; give each copy a distinct 'label'.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExperimentConfig":
        """Build and validate a config from plain data (YAML, JSON)."""
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        """Plain data that :meth:`from_dict` turns back into an equal config."""
        return to_dict(self)


# --------------------------------------------------------------------------------------------
# Typed conversion from plain data. Hand-written because it is ~100 lines with no dependency,
# while pydantic/omegaconf would add a heavy runtime dependency for a handful of dataclasses.
# --------------------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1 and isinstance(value, Mapping):  # Optional[section]: name the nested key
            return _convert(candidates[0], value, path)
        for arg in candidates:
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"'{path}' must be {_describe(tp)}, got {value!r}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"'{path}' must be {_describe(tp)}, got {value!r}.")
        return value
    if tp is Schedule:
        if isinstance(value, Schedule):
            return value
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return Schedule.constant(float(value))
            return from_dict(Schedule, value, path)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if f"'{path}" in message else f"'{path}': {message}") from None
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"'{path}' must be a list of {len(args)} items, got {value!r}.")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (collections.abc.Mapping, dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{path}' must be a mapping of option names to values, got {value!r}.")
        return types.MappingProxyType(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{path}' must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"'{path}' must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"'{path}' must be a finite number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{path}' must be a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in vaegan, not user input


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Raises:
        ConfigError: naming the offending key and what it accepts.
    """
    where = f"'{path}'" if path else "the config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {unknown} in {where}. Allowed keys are: {', '.join(names)}. "
            "Check the spelling; vaegan never ignores a key it does not understand."
        )
    kwargs = {}
    for name in names:
        if name in data:
            sub = f"{path}.{name}" if path else name
            tp = hints[name]
            if name == "losses" and cls is ExperimentConfig:
                value = data[name]
                if not isinstance(value, (list, tuple)):
                    raise ConfigError("'losses' must be a list of {name, weight, options} mappings.")
                kwargs[name] = tuple(_convert(TermConfig, v, f"losses[{i}]") for i, v in enumerate(value))
            else:
                kwargs[name] = _convert(tp, data[name], sub)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}. Required keys: {names}.") from None


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe data for a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML file (or start from defaults) and apply ``key=value`` overrides.

    Args:
        path: A YAML file with any subset of the :class:`ExperimentConfig` keys, or None.
        overrides: Dotted assignments such as ``"train.batch_size=128"``; values are parsed as YAML.

    Raises:
        ConfigError: unreadable file, unknown key or wrong type.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{p}' does not exist. Pass the path of a YAML file, "
                              "for example recipes/configs/vaegan_mnist.yaml.")
        try:
            data = parse_yaml(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file '{p}' is not valid YAML: {exc}") from None
    # Overrides apply on top of the defaults, so `losses.1.weight=0.5` works even when the file does
    # not spell the list out; mappings in the file replace only the keys they name.
    return from_dict(ExperimentConfig, _merge_overrides(_deep_merge(to_dict(ExperimentConfig()), data), overrides))


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Return a new config with dotted ``key=value`` overrides applied (see :func:`load_config`)."""
    return from_dict(ExperimentConfig, _merge_overrides(to_dict(config), overrides))


def _deep_merge(base: Any, data: Any) -> Any:
    """``data`` on top of ``base``: mappings merge key by key, anything else replaces."""
    if isinstance(base, Mapping) and isinstance(data, Mapping):
        merged = dict(base)
        for key, value in data.items():
            merged[key] = _deep_merge(base[key], value) if key in base else value
        return merged
    return data


def _merge_overrides(data: Any, overrides: Sequence[str]) -> dict:
    if not isinstance(data, Mapping):
        raise ConfigError(f"The config must be a mapping of sections, got {data!r}.")
    data = to_dict(data)  # deep copy into plain containers
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override '{item}' must look like section.key=value, e.g. train.epochs=5.")
        try:
            value = parse_yaml(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"Override '{item}': the value is not valid YAML ({exc}).") from None
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_index(part, node, key)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"Override '{item}': '{where}' is a value, not a section; set it with {where}=VALUE.")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, node, key)] = value
        else:
            node[last] = value
    return data


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"Override '{key}': '{part}' must be an index below {len(node)}.")
    return int(part)
