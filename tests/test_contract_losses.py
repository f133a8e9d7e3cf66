"""The loss-term contract (group ``vaegan.losses``), run against every registered loss term.

Parametrised over ``registry.available("vaegan.losses")`` (a newly installed term is tested for free,
with its entry in tests/plugin_options.py when it needs one) and, for the forward/backward check, over
every generator in ``vaegan.generators`` too: each term meets a vector latent (``conv``, ``mlp``) and a
spatial one (``tiny_spatial``, (B, c, h, w)). Known answers of the built-in terms are in
test_losses.py; first-party plugin specifics in test_plugins.py.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from conftest import tiny_generator
from plugin_options import options_for

import vaegan
from vaegan import registry
from vaegan.api import Discriminator, LossTerm, TermInputs
from vaegan.config import ExperimentConfig
from vaegan.data import first_batch
from vaegan.errors import ConfigError
from vaegan.objective import Objective
from vaegan.registry import build_plugin

LOSSES = registry.available("vaegan.losses")
GENERATORS = registry.available("vaegan.generators")

# Images x output range x precision, pairwise (every value of each factor meets every value of the
# others: 4 cases instead of 8); the discriminator a term may call alternates so that each one meets both
# kinds of images and both ranges. A real or random batch of 4 each.
CASES = {
    "digits-unit-fp32": ("digits", "unit", torch.float32, "simple"),
    "digits-symmetric-bf16": ("digits", "symmetric", torch.bfloat16, "patchgan"),
    "rgb32-unit-bf16": ("rgb32", "unit", torch.bfloat16, "patchgan"),
    "rgb32-symmetric-fp32": ("rgb32", "symmetric", torch.float32, "simple"),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")


@functools.cache
def _shared_term(name: str) -> LossTerm:
    """One instance per term for the module's many cases (an LPIPS backbone takes 0.3 s to build)."""
    term = build_plugin("vaegan.losses", name, options_for("vaegan.losses", name))
    assert isinstance(term, LossTerm)
    return term


def _disc(name: str, image_shape) -> Discriminator:
    disc = build_plugin("vaegan.discriminators", name, options_for("vaegan.discriminators", name),
                        image_shape=tuple(image_shape))
    assert isinstance(disc, Discriminator)
    return disc


def _real(kind: str, output_range: str, digits: torch.Tensor) -> torch.Tensor:
    x = digits[:4] if kind == "digits" else torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return x * 2 - 1 if output_range == "symmetric" else x


def _inputs(term, vae, real, step, disc) -> TermInputs:
    """What the trainer hands a term: in the discriminator step the fakes are detached and D trains;
    in the generator step D is frozen and the fakes carry the generator's gradient."""
    is_d = term.player == "discriminator"
    disc.requires_grad_(is_d)
    out = vae(real, perturb_std=term.perturb_std)
    return TermInputs(real=real, output=out, step=step, value_range=vae.value_range,
                      fake=out.recon.detach() if is_d else out.recon,
                      discriminator=disc if term.needs_discriminator else None, last_layer=vae.last_layer)


def _first_value(term, vae, real, disc, dtype=torch.float32, steps=64):
    """The term's value at the first step it does not skip (a lazy term may return None)."""
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            value = term(_inputs(term, vae, real, step, disc))
        if value is not None:
            return value
    raise AssertionError(f"{type(term).__name__} returned None (skipped) at every step below {steps}")


def _grads(*modules):
    return [p.grad for m in modules for p in m.parameters() if p.grad is not None]


# ---- the contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_loss_term_declares_its_player(name):
    term = _shared_term(name)
    assert term.player in ("generator", "discriminator")
    assert isinstance(term.needs_discriminator, bool)
    assert isinstance(term.perturb_std, float) and math.isfinite(term.perturb_std) and term.perturb_std >= 0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_term_forward_backward(name, generator, case, digits):
    """Construct, forward, backward with every generator (vector and spatial latents), 1-channel digits
    and 3-channel 32x32 images, both output ranges, fp32 and bf16 autocast on the CPU: a finite scalar
    whose gradient reaches its own player (and the term's own parameters), never the other player."""
    kind, output_range, dtype, disc_name = CASES[case]
    term = _shared_term(name)
    term.zero_grad(set_to_none=True)
    real = _real(kind, output_range, digits)
    shape = tuple(real.shape[1:])
    try:
        vae = tiny_generator(generator, shape, output_range)
    except ConfigError as exc:  # a generator may refuse an image shape it cannot take (the generator contract)
        pytest.skip(f"{generator} refuses images of shape {shape}: {exc}")
    disc = _disc(disc_name, shape)
    value = _first_value(term, vae, real, disc, dtype)
    disc.requires_grad_(True)
    assert value.ndim == 0 and value.dtype.is_floating_point, f"{name}: not a scalar"
    assert torch.isfinite(value.float())
    value.float().backward()
    is_d = term.player == "discriminator"
    mine = _grads(disc, term) if is_d else _grads(vae, term)
    other = _grads(vae) if is_d else _grads(disc)
    assert mine, f"{name}: no parameter of its player received a gradient"
    assert all(torch.isfinite(g).all() for g in mine), f"{name}: non-finite gradient"
    assert any(g.abs().sum() > 0 for g in mine), f"{name}: the gradient of its player is zero"
    assert not other, f"{name} ({term.player}) sent a gradient to the other player"


@pytest.mark.parametrize("name", LOSSES)
def test_loss_term_builds_through_the_objective(name):
    cfg = ExperimentConfig.from_dict({"losses": [{"name": name, "options": options_for("vaegan.losses", name)}],
                                      "discriminator": None, "adversarial": None})
    objective = Objective.from_config(cfg)
    side = objective.generator_terms if _shared_term(name).player == "generator" else objective.discriminator_terms
    assert set(side) == {name} and isinstance(side[name], registry.load("vaegan.losses", name))
    assert set(objective.generator_terms) | set(objective.discriminator_terms) == {name}


@pytest.mark.parametrize("name", LOSSES)
def test_loss_term_in_the_trainer_touches_only_its_player(tiny, name):
    """Through the real trainer under bf16: the term's parameters are in its player's optimizer only;
    the D step leaves no gradient in the generator, the G step none in the discriminator (whose weights
    do not move); then two real steps give finite metrics with the term logged."""
    options = json.dumps(options_for("vaegan.losses", name))
    trainer = vaegan.build_trainer(tiny(
        f"losses=[{{name: bce}}, {{name: kl}}, {{name: {name}, label: under_test, weight: 0.5, options: {options}}}]",
        "train.mixed_precision=bf16", "train.max_steps=2"))
    step = trainer.train_step
    gen, disc = step.generator.module, step.discriminator.module
    objective = step.objective
    side = "d" if "under_test" in objective.discriminator_terms else "g"
    term = (objective.discriminator_terms if side == "d" else objective.generator_terms)["under_test"]
    own, theirs = (step.discriminator, step.generator) if side == "d" else (step.generator, step.discriminator)
    in_optimizer = lambda player: {id(p) for g in player.optimizer.param_groups for p in g["params"]}
    trained = [p for p in term.parameters() if p.requires_grad]
    assert all(id(p) in in_optimizer(own) for p in trained), "the term's parameters are not trained"
    assert not {id(p) for p in term.parameters()} & in_optimizer(theirs)

    x = first_batch(trainer.loader.dataset, 16).to(trainer.accelerator.device)
    out = gen(x, **objective.forward_kwargs(x.shape[0]))
    step.discriminator_backward(x, out, 0)
    assert not _grads(gen), "the discriminator step left gradients in the generator"
    assert all(torch.isfinite(g).all() for g in _grads(disc))
    step.discriminator.optimizer.zero_grad(set_to_none=True)
    d_params = [p.detach().clone() for p in disc.parameters()]
    step.generator_backward(x, out, 0)
    assert not _grads(disc), "the generator step left gradients in the discriminator"
    assert all(torch.isfinite(g).all() for g in _grads(gen))
    assert all(torch.equal(a, b) for a, b in zip(d_params, disc.parameters()))
    step.generator.optimizer.zero_grad(set_to_none=True)
    trainer.fit()
    assert trainer.history
    for row in trainer.history:
        assert all(math.isfinite(v) for v in row.values()), row
    assert f"{side}/under_test" in trainer.history[-1]
