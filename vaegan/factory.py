"""Factories: turn an :class:`~vaegan.config.ExperimentConfig` into components, then a trainer.

Example:
    >>> cfg = load_config("recipes/configs/vaegan_mnist.yaml", ["train.max_steps=10"])  # doctest: +SKIP
    >>> build_trainer(cfg).fit()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from .config import ExperimentConfig
from .data import build_dataset
from .discriminators import Discriminator
from .errors import PluginError
from .model import VAE
from .objective import Objective, build_plugin
from .trainer import Trainer

__all__ = ["build_model", "build_discriminator", "build_trainer", "train"]


def build_model(config: ExperimentConfig) -> VAE:
    """The VAE described by ``config.model``."""
    return VAE(config.model)


def build_discriminator(config: ExperimentConfig) -> Optional[nn.Module]:
    """The discriminator plugin named in ``config.discriminator`` (None for a plain VAE).

    Raises:
        PluginError: unknown or broken plugin, or one that is not a Discriminator.
        ConfigError: options it does not accept (e.g. too deep for the image size).
    """
    dc = config.discriminator
    if dc is None:
        return None
    disc = build_plugin("vaegan.discriminators", dc.name, dict(dc.options), image_shape=config.model.image_shape)
    if not isinstance(disc, Discriminator):
        raise PluginError(f"Discriminator plugin '{dc.name}' built a {type(disc).__name__}, not a vaegan Discriminator.")
    return disc


def build_trainer(config: ExperimentConfig, accelerator: Optional[Accelerator] = None) -> Trainer:
    """Build model, discriminator, objective and dataset from ``config`` and inject them.

    Every plugin is resolved and the data is checked here, before any training starts. The seed is
    set first, so the initial weights depend only on ``config.train.seed``.
    """
    set_seed(config.train.seed)
    objective = Objective.from_config(config)
    model = build_model(config)
    disc = build_discriminator(config)
    dataset = build_dataset(config.data, config.model)
    return Trainer(config, model, objective, dataset, disc, accelerator)


def train(config: ExperimentConfig):
    """Build everything and train; returns the folder of the final model."""
    return build_trainer(config).fit()
