"""vaegan: hybrid VAE-GAN training whose generators, losses and discriminators are entry-point plugins.

The plugin contracts are in :mod:`vaegan.api`; a config names plugins, :func:`build_trainer` builds
them and :meth:`Trainer.fit` trains.

Example:
    >>> import vaegan
    >>> cfg = vaegan.ExperimentConfig.from_dict({"train": {"max_steps": 100}})
    >>> vaegan.train(cfg)  # doctest: +SKIP
"""

from .api import (
    VAE,
    AdversarialLoss,
    DatasetFactory,
    DiagonalGaussian,
    Discriminator,
    DiscriminatorOutput,
    LatentSampler,
    LossTerm,
    Player,
    TermInputs,
    VAEOutput,
)
from .callbacks import Callback
from .config import (
    AdversarialConfig,
    DataConfig,
    DiscriminatorConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TermConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PluginError,
    TrainingDiverged,
    TrainingStopped,
    VaeganError,
)
from .factory import build_components, build_discriminator, build_generator, build_model, build_trainer, train
from .objective import Objective
from .schedules import Schedule
from .step import StepOutput, TrainStep
from .trainer import Trainer

__version__ = "0.3.0"

__all__ = [
    "AdversarialConfig", "DataConfig", "DiscriminatorConfig", "EvalConfig", "ExperimentConfig", "ModelConfig",
    "OptimConfig", "TermConfig", "TrainConfig", "apply_overrides", "load_config",
    "AdversarialLoss", "DatasetFactory", "DiagonalGaussian", "Discriminator", "DiscriminatorOutput", "LatentSampler", "LossTerm",
    "Player", "TermInputs", "VAE", "VAEOutput",
    "CheckpointError", "ConfigError", "DataError", "PluginError", "TrainingDiverged", "TrainingStopped",
    "VaeganError",
    "build_components", "build_discriminator", "build_generator", "build_model", "build_trainer", "train",
    "Callback", "Objective", "Schedule", "StepOutput", "TrainStep", "Trainer",
]
