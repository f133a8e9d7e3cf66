"""vaegan: hybrid VAE-GAN training whose losses and discriminators are entry-point plugins.

Example:
    >>> import vaegan
    >>> cfg = vaegan.ExperimentConfig.from_dict({"train": {"max_steps": 100}})
    >>> vaegan.train(cfg)  # doctest: +SKIP
"""

from .config import (
    AdversarialConfig,
    DataConfig,
    DiscriminatorConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TermConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from .discriminators import Discriminator
from .errors import CheckpointError, ConfigError, DataError, PluginError, TrainingDiverged, VaeganError
from .factory import build_discriminator, build_model, build_trainer, train
from .model import VAE, VAEOutput
from .objective import AdversarialLoss, DiscriminatorOutput, LossTerm, Objective, TermInputs
from .schedules import Schedule
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "AdversarialConfig", "DataConfig", "DiscriminatorConfig", "ExperimentConfig", "ModelConfig",
    "OptimConfig", "TermConfig", "TrainConfig", "apply_overrides", "load_config", "Discriminator",
    "CheckpointError", "ConfigError", "DataError", "PluginError", "TrainingDiverged", "VaeganError", "build_discriminator",
    "build_model", "build_trainer", "train", "VAE", "VAEOutput", "AdversarialLoss", "DiscriminatorOutput",
    "LossTerm", "Objective", "TermInputs", "Schedule", "Trainer",
]
