"""Typed, frozen configuration, built once from YAML / CLI overrides and passed down explicitly.

The schema (one frozen dataclass per section, every default with its reason) is in
:mod:`vaegan.config.schema`; reading YAML, applying dotted overrides and the typed conversion are in
:mod:`vaegan.config.io`. Unknown keys and values of the wrong type raise
:class:`~vaegan.errors.ConfigError` naming the key and what is allowed: a typo never silently
changes training.

Example:
    >>> cfg = ExperimentConfig.from_dict({"train": {"batch_size": 32}})
    >>> cfg.train.batch_size
    32
    >>> cfg = apply_overrides(cfg, ["optim_g.lr=1e-3", "model.options.latent_dim=8"])
"""

from .io import apply_overrides, from_dict, load_config, parse_yaml, to_dict
from .schema import (
    AdversarialConfig,
    DataConfig,
    DiscriminatorConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    SamplerConfig,
    TermConfig,
    TrainConfig,
)

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
    "load_config",
    "apply_overrides",
    "from_dict",
    "to_dict",
    "parse_yaml",
]
