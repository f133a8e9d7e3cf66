"""vaegan: hybrid VAE-GAN training whose generators, losses and discriminators are entry-point plugins.

The plugin contracts are in :mod:`vaegan.api`; a config names plugins, :func:`build_trainer` builds
them and :meth:`Trainer.fit` trains.

``import vaegan`` loads only the configuration and the errors (no torch): every other public name is
imported from its module on first use, so ``vaegan --help`` and the config tools start at once.

Example:
    >>> import vaegan
    >>> cfg = vaegan.ExperimentConfig.from_dict({"train": {"max_steps": 100}})
    >>> vaegan.train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

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
from .schedules import Schedule

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
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
    from .factory import build_components, build_discriminator, build_generator, build_model, build_trainer, train
    from .objective import Objective
    from .progress import set_progress
    from .step import StepOutput, TrainStep
    from .trainer import Trainer

__version__ = "0.4.0"

# Public name -> the module that defines it; imported on first access (PEP 562), because these pull in
# torch, torchvision, torchmetrics and Accelerate (about 4 s on a 2-core machine).
_LAZY = {
    **dict.fromkeys(["VAE", "AdversarialLoss", "DatasetFactory", "DiagonalGaussian", "Discriminator",
                     "DiscriminatorOutput", "LatentSampler", "LossTerm", "Player", "TermInputs", "VAEOutput"], "api"),
    "Callback": "callbacks",
    **dict.fromkeys(["build_components", "build_discriminator", "build_generator", "build_model", "build_trainer",
                     "train"], "factory"),
    "Objective": "objective",
    "set_progress": "progress",
    "StepOutput": "step",
    "TrainStep": "step",
    "Trainer": "trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule (`vaegan.metrics` after a bare `import vaegan`), as when all were eager
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'vaegan' has no attribute '{name}'") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdversarialConfig", "DataConfig", "DiscriminatorConfig", "EvalConfig", "ExperimentConfig", "ModelConfig",
    "OptimConfig", "TermConfig", "TrainConfig", "apply_overrides", "load_config",
    "AdversarialLoss", "DatasetFactory", "DiagonalGaussian", "Discriminator", "DiscriminatorOutput", "LatentSampler",
    "LossTerm", "Player", "TermInputs", "VAE", "VAEOutput",
    "CheckpointError", "ConfigError", "DataError", "PluginError", "TrainingDiverged", "TrainingStopped",
    "VaeganError",
    "build_components", "build_discriminator", "build_generator", "build_model", "build_trainer", "train",
    "Callback", "Objective", "Schedule", "StepOutput", "TrainStep", "Trainer", "set_progress",
]
