"""The GAN loss-pair contract (group ``vaegan.adversarial``), run against every registered pair.

Parametrised over ``registry.available("vaegan.adversarial")``: a newly installed pair is tested for
free. Known answers of the built-in ``non_saturating`` are in test_losses.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from plugin_options import options_for

import vaegan
from vaegan import registry
from vaegan.api import AdversarialLoss, Discriminator
from vaegan.config import ExperimentConfig
from vaegan.data import first_batch
from vaegan.objective import Objective
from vaegan.registry import build_plugin

PAIRS = registry.available("vaegan.adversarial")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")


def _pair(name: str) -> AdversarialLoss:
    pair = build_plugin("vaegan.adversarial", name, options_for("vaegan.adversarial", name))
    assert isinstance(pair, AdversarialLoss)
    return pair


def _disc_overrides(name: str, **extra) -> tuple:
    return (f"discriminator.name={name}",
            f"discriminator.options={json.dumps({**options_for('vaegan.discriminators', name), **extra})}")


def _grads(module: torch.nn.Module):
    return [p.grad for p in module.parameters() if p.grad is not None]


def _generator_backward(trainer):
    """One generator forward and backward of the real step, on the first 16 training digits."""
    step = trainer.train_step
    x = first_batch(trainer.loader.dataset, 16).to(trainer.accelerator.device)
    out = step.generator.module(x, **step.objective.forward_kwargs(x.shape[0]))
    return step.generator_backward(x, out, 0)


def _finite_history(trainer) -> None:
    assert trainer.history
    for row in trainer.history:
        bad = {k: v for k, v in row.items() if not math.isfinite(v)}
        assert not bad, f"non-finite metrics {bad}"


# ---- on logits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", PAIRS)
def test_adversarial_pair_finite_and_correctly_signed(name, dtype):
    """Finite losses and gradients at logits of +-1e4 in every precision, for one logit per image and
    for a PatchGAN map; and the signs: G wants D(fake) high, D wants D(real) high and D(fake) low."""
    pair = _pair(name)
    for shape in [(4, 1), (4, 1, 3, 3)]:  # one logit per image, or a PatchGAN map
        extreme = torch.tensor([1e4, -1e4, 0.0, 3.0]).view(4, *([1] * (len(shape) - 1))).expand(shape)
        fake = extreme.to(dtype).clone().requires_grad_(True)
        real = (-extreme).to(dtype).clone().requires_grad_(True)
        g, d = pair.generator_loss(fake), pair.discriminator_loss(real, fake)
        assert g.ndim == 0 and d.ndim == 0
        assert torch.isfinite(g.float()) and torch.isfinite(d.float())
        # Each player's gradient on its own: summed, a Wasserstein pair's fake terms cancel (-D(fake) + D(fake)).
        (g_fake,) = torch.autograd.grad(g.float(), fake)
        d_real, d_fake = torch.autograd.grad(d.float(), (real, fake))
        for grad in (g_fake, d_real, d_fake):
            assert torch.isfinite(grad.float()).all() and grad.float().abs().sum() > 0
    ones = torch.ones(4, 1, dtype=dtype)
    assert pair.generator_loss(ones) < pair.generator_loss(-ones)
    assert pair.discriminator_loss(ones, -ones) < pair.discriminator_loss(-ones, ones)


class Wasserstein(AdversarialLoss):
    """A correct pair whose losses cancel when summed (G: -D(fake); D: D(fake) - D(real)): the contract's
    sign and gradient checks must hold it, as they hold a third party's WGAN."""

    def generator_loss(self, fake_logits):
        return -fake_logits.float().mean()

    def discriminator_loss(self, real_logits, fake_logits):
        return fake_logits.float().mean() - real_logits.float().mean()


def test_a_wasserstein_pair_passes_the_sign_and_gradient_contract():
    from conftest import registered

    with registered("vaegan.adversarial", "wasserstein_probe", f"{__name__}:Wasserstein") as name:
        test_adversarial_pair_finite_and_correctly_signed(name, torch.float32)


@pytest.mark.parametrize("name", PAIRS)
def test_adversarial_through_a_real_discriminator_under_bf16(name, digits):
    pair = _pair(name)
    disc = build_plugin("vaegan.discriminators", "simple", options_for("vaegan.discriminators", "simple"),
                        image_shape=(1, 28, 28))
    assert isinstance(disc, Discriminator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = disc(torch.rand_like(digits)).logits
        real = disc(digits).logits
        g, d = pair.generator_loss(fake.float()), pair.discriminator_loss(real.float(), fake.float())
    assert torch.isfinite(g) and torch.isfinite(d)
    d.backward()
    grads = _grads(disc)
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", PAIRS)
def test_adversarial_pair_builds_through_the_objective(name):
    cfg = ExperimentConfig.from_dict({"losses": [{"name": "mse"}], "adversarial": {"name": name},
                                      "discriminator": {"name": "simple"}})
    objective = Objective.from_config(cfg)
    assert set(objective.generator_terms) == {"mse", "adversarial"}
    assert set(objective.discriminator_terms) == {"discriminator"}
    assert isinstance(objective.generator_terms["adversarial"].pair, registry.load("vaegan.adversarial", name))
    assert objective.needs_discriminator


# ---- in the trainer -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAIRS)
def test_adversarial_generator_loss_never_changes_the_discriminator(tiny, name):
    trainer = vaegan.build_trainer(tiny(f"adversarial.name={name}", "adversarial.weight=1.0",
                                        "losses=[{name: mse, weight: 0.0}]"))
    step = trainer.train_step
    gen, disc = step.generator.module, step.discriminator.module
    d_params = [p.detach().clone() for p in disc.parameters()]
    g_params = [p.detach().clone() for p in gen.parameters()]
    loss, parts = _generator_backward(trainer)
    assert set(parts) == {"adversarial"} and torch.isfinite(loss)
    assert not _grads(disc)
    assert step.model.last_layer.grad is not None and step.model.last_layer.grad.abs().sum() > 0, \
        "the adversarial term trained nothing"
    step.generator.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(d_params, disc.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g_params, gen.parameters()))


@pytest.mark.parametrize("name", PAIRS)
def test_adversarial_pair_trains(tiny, name):
    trainer = vaegan.build_trainer(tiny(f"adversarial.name={name}", *_disc_overrides("patchgan"), "train.max_steps=3"))
    disc = trainer.train_step.discriminator.module
    d0 = [p.detach().clone() for p in disc.parameters()]
    trainer.fit()
    _finite_history(trainer)
    assert {"g/adversarial", "d/discriminator"} <= set(trainer.history[-1])
    assert any(not torch.equal(a, b) for a, b in zip(d0, disc.parameters()))


@pytest.mark.parametrize("name", PAIRS)
def test_adaptive_weight_finite_when_the_adversarial_gradient_is_zero(tiny, name):
    """A discriminator whose weights are all zero outputs a constant: the adversarial gradient at the
    decoder's last layer is exactly 0, and the adaptive weight must still be finite."""
    cfg = tiny(f"adversarial.name={name}", "adversarial.adaptive=true",
               *_disc_overrides("patchgan", spectral_norm=False))
    trainer = vaegan.build_trainer(cfg)
    with torch.no_grad():
        for p in trainer.train_step.disc_net.parameters():
            p.zero_()
    loss, parts = _generator_backward(trainer)
    weight = parts["adaptive_weight"]
    assert torch.isfinite(weight) and 0 < float(weight) <= cfg.adversarial.adaptive_max
    grads = _grads(trainer.train_step.generator.module)
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
