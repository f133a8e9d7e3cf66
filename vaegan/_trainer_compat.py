"""vaegan 0.1's Trainer attributes that moved to :class:`~vaegan.step.TrainStep`, kept with a warning."""

from __future__ import annotations

from typing import Any, Tuple

from ._deprecation import warn_deprecated

__all__ = ["moved_to_step", "legacy_components"]

_MOVED_TO_STEP = {  # old Trainer attribute -> (its new spelling, how to get it)
    "gen": ("generator.module", lambda t: t.train_step.generator.module),
    "g_opt": ("generator.optimizer", lambda t: t.train_step.generator.optimizer),
    "g_sched": ("generator.scheduler", lambda t: t.train_step.generator.scheduler),
    "disc": ("discriminator.module", lambda t: t.train_step.discriminator.module),
    "d_opt": ("discriminator.optimizer", lambda t: t.train_step.discriminator.optimizer),
    "d_sched": ("discriminator.scheduler", lambda t: t.train_step.discriminator.scheduler),
    "disc_net": ("disc_net", lambda t: t.train_step.disc_net),
    "has_disc": ("discriminator is not None", lambda t: t.train_step.discriminator is not None),
    "objective": ("objective", lambda t: t.train_step.objective),
    "ema": ("ema", lambda t: t.train_step.ema),
    "guard": ("guard", lambda t: t.train_step.guard),
    "discriminator_backward": ("discriminator_backward(x, out, step)",
                               lambda t: lambda x, out: t.train_step.discriminator_backward(x, out, t.state.step)),
    "generator_backward": ("generator_backward(x, out, step)",
                           lambda t: lambda x, out: t.train_step.generator_backward(x, out, t.state.step)),
}


def moved_to_step(trainer: Any, name: str) -> Any:
    """``trainer.<name>`` of vaegan 0.1, with a DeprecationWarning naming its place on ``trainer.train_step``.

    Raises:
        AttributeError: ``name`` is not one of the moved attributes.
    """
    moved = _MOVED_TO_STEP.get(name)
    if moved is None:
        raise AttributeError(f"'Trainer' object has no attribute '{name}'")
    warn_deprecated(f"Trainer.{name} is deprecated; use trainer.train_step.{moved[0]}.", stacklevel=3)
    return moved[1](trainer)


def legacy_components(config: Any, model: Any, objective: Any, dataset: Any, *legacy: Any) -> Tuple[Any, ...]:
    """vaegan 0.1's ``Trainer(config, model, objective, dataset, discriminator, accelerator)``: the step, loader,
    total steps and evaluation built from those, with a DeprecationWarning naming the new way."""
    warn_deprecated("Trainer(config, model, objective, dataset, discriminator, accelerator) is deprecated; "
                    "use vaegan.build_trainer(config) or vaegan.factory.build_components(...).", stacklevel=3)
    from .factory import build_components

    parts = build_components(config, model, objective, dataset, *legacy)
    return parts.train_step, parts.loader, parts.total_steps, parts.evaluation
