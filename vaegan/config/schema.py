"""The configuration schema: typed, frozen dataclasses, one per section, every default in one place.

Each default carries a one-line reason. Values are checked in ``__post_init__`` and raise
:class:`~vaegan.errors.ConfigError` naming the key and what is allowed. Reading YAML, dotted overrides
and the conversion from plain data live in :mod:`vaegan.config.io`; this module only says what a
valid configuration is.

Two class-level hooks let a section accept more than its fields, without the converter knowing any
section by name:

- ``normalize_config(value, path)`` turns another spelling into the mapping of fields (a
  :class:`~vaegan.schedules.Schedule` given as a number);
- the same hook carries keys of an older release forward (``model.arch`` and ``model.latent_dim`` of
  vaegan 0.1 become ``model.name`` and ``model.options``), with a ``DeprecationWarning`` that shows the
  new form.

Example:
    >>> cfg = ExperimentConfig(train=TrainConfig(batch_size=32))
    >>> cfg.train.batch_size, cfg.model.name
    (32, 'conv')
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Tuple, Union

from ..errors import ConfigError
from ..schedules import Schedule
from .legacy import accept_legacy_keywords, legacy_model_attribute, normalize_model
from .values import parse_duration, parse_signal

__all__ = [
    "ModelConfig",
    "TermConfig",
    "DiscriminatorConfig",
    "AdversarialConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "SamplerConfig",
    "ExperimentConfig",
]


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            section = type(obj).__name__.replace("Config", "").lower()
            raise ConfigError(f"{section}.{name} must be a positive number, got {value!r}.")


@dataclass(frozen=True)
class ModelConfig:
    """The generator: a plugin in ``vaegan.generators``, its options, and the images it takes.

    The image fields are shared by every generator (and by the data and the discriminator); anything
    about the architecture (latent size, widths, depth) is an option of the plugin named here.
    """

    name: str = "conv"  # the MNIST conv VAE (widths 32/64, latent 32); `vaegan plugins` lists the others
    image_channels: int = 1  # MNIST; 3 for RGB
    image_size: Tuple[int, int] = (28, 28)  # (H, W); any size the generator's depth allows
    output_range: Literal["unit", "symmetric"] = "unit"  # [0, 1] via sigmoid or [-1, 1] via tanh
    options: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of the generator plugin

    def __post_init__(self) -> None:
        _positive(self, "image_channels")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ConfigError(f"model.image_size must be [height, width] >= 1, got {list(self.image_size)}.")

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of the images the model encodes and decodes."""
        return (self.image_channels, *self.image_size)

    @property
    def value_range(self) -> Tuple[float, float]:
        """(low, high) of pixel values: (0, 1) for ``unit``, (-1, 1) for ``symmetric``."""
        return (0.0, 1.0) if self.output_range == "unit" else (-1.0, 1.0)

    @classmethod
    def normalize_config(cls, value: Any, path: str) -> Any:
        """Carry vaegan 0.1's ``model`` keys into ``name`` and ``options``, with a warning
        (:func:`vaegan.config.legacy.normalize_model`)."""
        return normalize_model(cls, value, path)


ModelConfig.__getattr__ = legacy_model_attribute  # type: ignore[attr-defined]
ModelConfig.__init__ = accept_legacy_keywords(ModelConfig.__init__)  # type: ignore[method-assign]


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
    weight: Schedule = Schedule(value=0.15)  # generator weight; reconstruction still leads (docs/training.md)
    disc_start: int = 0  # first step at which the discriminator trains (may precede weight.start)
    # What D is shown as fake. "aggregate": decoded draws near the batch's posterior means, where the fitted
    # sampler (`sampler`) draws, so that is where the decoder becomes sharp; as cheap as "prior" (N(0, I)
    # draws, vaegan 0.2's default) and 1.6x faster than "both" (docs/training.md, docs/benchmarks.md).
    fake: Literal["reconstruction", "prior", "both", "aggregate"] = "aggregate"
    # With fake: aggregate, D judges decoded draws of a kernel density of each batch's posterior means: the
    # region a fitted sampler (`sampler`) draws from. The kernels' std, as a fraction of the means' spread.
    bandwidth: float = 0.5
    train_encoder: bool = False  # Larsen et al.: no GAN gradient reaches the encoder
    adaptive: bool = False  # VQGAN/LDM: scale by |grad rec| / |grad adv| at the decoder's last layer
    adaptive_eps: float = 1e-4
    adaptive_max: float = 1e4
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.disc_start < 0:
            raise ConfigError(f"adversarial.disc_start must be >= 0, got {self.disc_start}.")
        if self.train_encoder and self.fake in ("prior", "aggregate"):
            raise ConfigError(
                f"adversarial.train_encoder: true has no effect with adversarial.fake: {self.fake}: those latents "
                "carry no gradient to the encoder. Set fake to 'reconstruction' or 'both' for the GAN gradient "
                "to reach the encoder, or drop train_encoder."
            )
        _positive(self, "adaptive_eps", "adaptive_max")
        if not (math.isfinite(self.bandwidth) and self.bandwidth >= 0):
            raise ConfigError(f"adversarial.bandwidth must be a number >= 0, got {self.bandwidth!r}.")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from: a plugin name in ``vaegan.datasets`` and its arguments."""

    name: str = "mnist"
    root: str = "data"  # MNIST is downloaded here when missing (needs a network)
    split: Literal["train", "test"] = "train"
    download: bool = True
    limit: Optional[int] = None  # use only the first N images (quick runs, tests)
    num_workers: int = 0  # in-memory datasets need none
    options: Mapping[str, Any] = field(default_factory=dict)  # further keyword arguments of the dataset plugin

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
    # None: as `accelerate launch` says; without it, bf16 on GPUs that support it, else fp32.
    # auto: bf16 where the hardware has bf16 units (such GPUs; CPUs with AMX-BF16 or AVX512-BF16), else fp32
    mixed_precision: Optional[Literal["no", "fp16", "bf16", "auto"]] = None
    tf32: bool = True  # TF32 for fp32 matmuls/convs on Ampere+ GPUs (no effect on CPUs)
    channels_last: bool = False  # NHWC memory format for the conv nets (GPU tensor cores; bf16 on AMX CPUs)
    # Intra-op threads per process on a CPU; None: torch's choice, except that accelerate launch's default of one
    # thread is replaced by this process's share of the cores (vaegan.factory.cpu_threads)
    cpu_threads: Optional[int] = None
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
    resume: Optional[str] = None  # "latest", "auto" (latest when there is one, else a fresh start) or a folder
    # A fresh run into a folder that holds a run: refused unless true, which moves that run's files to
    # <output_dir>/previous/<time>/ (nothing deleted; vaegan.run_folder)
    overwrite: bool = False
    # Wall-clock budget of this process's training (seconds or [D-]HH:MM:SS, from the start of fit): the run
    # stops with a checkpoint before it (docs/distributed.md: SLURM). None: no limit.
    max_time: Optional[Union[float, str]] = None
    checkpoint_every_minutes: float = 0.0  # also checkpoint when this long has passed since the last one; 0: off
    # A scheduler's advance warning (`#SBATCH --signal=USR1@90`): checkpoint, then stop. None: not caught.
    warning_signal: Optional[str] = "USR1"
    requeue: bool = False  # under SLURM, `scontrol requeue` the job after a warning-signal or max_time stop
    progress: Literal["auto", "bar", "log", "off"] = "auto"  # auto: a bar on a terminal, else log lines
    progress_seconds: float = 30.0  # log mode: at most one progress line per this many seconds (at log intervals)
    # At the end, set the generator's latent scaling_factor to 1/std of posterior samples of this many
    # training images (latent diffusion's rule; autoencoder_kl has the option); 0: off.
    estimate_scaling_factor: int = 0

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
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"train.cpu_threads must be >= 1 or null (automatic), got {self.cpu_threads}.")
        if self.max_time is not None:
            parse_duration(self.max_time, "train.max_time")
        if not (math.isfinite(self.checkpoint_every_minutes) and self.checkpoint_every_minutes >= 0):
            raise ConfigError("train.checkpoint_every_minutes must be a number of minutes >= 0 (0: off), got "
                              f"{self.checkpoint_every_minutes!r}.")
        if not (math.isfinite(self.progress_seconds) and self.progress_seconds >= 0):
            raise ConfigError(f"train.progress_seconds must be >= 0, got {self.progress_seconds!r}.")
        if self.warning_signal is not None and parse_signal(self.warning_signal, "train.warning_signal") in (
                signal.SIGINT, signal.SIGTERM):
            raise ConfigError("train.warning_signal must differ from INT and TERM, which always stop the run with a "
                              f"checkpoint; use USR1 or USR2 (got {self.warning_signal!r}).")
        if self.estimate_scaling_factor < 0:
            raise ConfigError("train.estimate_scaling_factor is a number of images (0: off), got "
                              f"{self.estimate_scaling_factor}.")


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
    st_lpips: Optional[bool] = None  # shift-tolerant LPIPS (alex) of reconstructions; None: when stlpips-pytorch is installed
    inception: bool = False  # also the Inception FID (needs torch-fidelity and its weights; slow on CPUs)
    seed: int = 0  # prior latents and importance noise: the same images on any number of processes

    def __post_init__(self) -> None:
        _positive(self, "num_samples", "nll_images", "nll_samples", "batch_size")
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0 (0 turns evaluation during training off), got {self.every}.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit must be a positive number of images or null, got {self.limit}.")


@dataclass(frozen=True)
class SamplerConfig:
    """A latent sampler fitted at the end of training (a plugin in ``vaegan.samplers``).

    It is fitted to the posterior means of the training images under the EMA generator, saved in
    ``final/samplers/<name>/`` and made the model's default: ``vaegan sample`` and ``vaegan eval``
    draw from it unless told ``--sampler normal``, and the final sample grids show both.
    """

    name: str = "gmm"  # a Gaussian mixture over the posterior means (docs/benchmarks.md: samplers)
    options: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of the sampler plugin
    limit: Optional[int] = None  # fit on the first N training images; None: all of them
    # The spread the saved sampler draws with by default. MNIST: 1.5 gives the recall of 0.2's N(0, I) samples
    # (0.93) at a 0.12x FD; 1.0 (as fitted) gives recall 0.79, 1.25 the lowest FD (docs/benchmarks.md).
    temperature: float = 1.5

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"sampler.limit must be a positive number of images or null, got {self.limit}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"sampler.temperature must be a number > 0, got {self.temperature!r}.")


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
    # Fitted to the training images' posterior means at the end of training and made the model's default
    # sampler (MNIST: FD and recognisability of samples, docs/benchmarks.md); None: samples come from N(0, I).
    sampler: Optional[SamplerConfig] = field(default_factory=SamplerConfig)

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
        """Build and validate a config from plain data (YAML, JSON).

        Raises:
            ConfigError: an unknown key or a value of the wrong type, named with its dotted path.
        """
        from .convert import from_dict

        return from_dict(cls, data)

    def to_dict(self) -> dict:
        """Plain data that :meth:`from_dict` turns back into an equal config."""
        from .convert import to_dict

        return to_dict(self)


