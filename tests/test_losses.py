"""Known answers of the built-in loss terms (mse, l1, bce, gaussian_nll, kl, smoothness), of the
non-saturating GAN pair and of the objective's weighted sum.

The contract every loss term and every GAN pair must meet (finite scalars, gradients to its own player
only, bf16, every generator's latent, the trainer) is in test_contract_losses.py and
test_contract_adversarial.py; first-party plugin specifics are in test_plugins.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_generator
from plugin_options import options_for

from vaegan import registry
from vaegan.api import (
    AdversarialLoss,
    DiagonalGaussian,
    LossTerm,
    TermInputs,
    VAEOutput,
)
from vaegan.config import ExperimentConfig
from vaegan.errors import ConfigError
from vaegan.objective import Objective
from vaegan.registry import build_plugin

LATENT = 4  # the latent_dim of the conv and mlp test options (tests/plugin_options.py)
GENERATORS = registry.available("vaegan.generators")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")


def _term(name) -> LossTerm:
    term = build_plugin("vaegan.losses", name, options_for("vaegan.losses", name))
    assert isinstance(term, LossTerm)
    return term


# ---- known answers: reconstruction -----------------------------------------------------------------


def _output(recon, logits=None, mean=None, logvar=None) -> VAEOutput:
    b = recon.shape[0]
    mean = torch.zeros(b, LATENT) if mean is None else mean
    logvar = torch.zeros_like(mean) if logvar is None else logvar
    return VAEOutput(recon=recon, posterior=DiagonalGaussian(mean, logvar), z=mean, recon_logits=logits)


@pytest.mark.parametrize("name", ["mse", "l1"])
def test_mse_l1_zero_for_perfect_recon(name, digits):
    term = _term(name)
    assert term(TermInputs(real=digits, output=_output(digits.clone()), step=0)).item() == 0.0
    off = (digits + 0.5).clamp(0, 1)
    value = term(TermInputs(real=digits, output=_output(off), step=0)).item()
    expected = ((off - digits) ** 2).mean() if name == "mse" else (off - digits).abs().mean()
    assert value == pytest.approx(expected.item(), rel=1e-6)


def test_mse_l1_on_a_real_forward(digits):
    vae = tiny_generator()
    out = vae(digits)
    inputs = TermInputs(real=digits, output=out, step=0)
    assert _term("mse")(inputs).item() == pytest.approx(F.mse_loss(out.recon, digits).item(), rel=1e-6)
    assert _term("l1")(inputs).item() == pytest.approx(F.l1_loss(out.recon, digits).item(), rel=1e-6)


def test_bce_equals_torch_bce_of_sigmoid(digits):
    vae = tiny_generator(output_range="unit")
    out = vae(digits)
    value = _term("bce")(TermInputs(real=digits, output=out, step=0, value_range=(0.0, 1.0)))
    expected = F.binary_cross_entropy(torch.sigmoid(out.recon_logits), digits)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # Per-pixel mean, by hand.
    p = torch.sigmoid(out.recon_logits)
    by_hand = -(digits * torch.log(p) + (1 - digits) * torch.log(1 - p)).mean()
    torch.testing.assert_close(value, by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("output_range", ["unit", "symmetric"])
def test_bce_is_minimal_when_recon_equals_real(output_range):
    # Soft targets strictly inside the range; logits chosen so that the decoder outputs exactly them.
    unit = torch.linspace(0.05, 0.95, 2 * 1 * 3 * 3).view(2, 1, 3, 3)
    if output_range == "unit":
        real, logits, vr = unit, torch.logit(unit), (0.0, 1.0)
        recon = torch.sigmoid(logits)
    else:
        real, logits, vr = unit * 2 - 1, torch.atanh(unit * 2 - 1), (-1.0, 1.0)
        recon = torch.tanh(logits)
    torch.testing.assert_close(recon, real)
    logits.requires_grad_(True)
    value = _term("bce")(TermInputs(real=real, output=_output(recon, logits), step=0, value_range=vr))
    value.backward()
    assert logits.grad.abs().max() < 1e-6  # the Bernoulli likelihood peaks at recon == real
    entropy = -(unit * unit.log() + (1 - unit) * (1 - unit).log()).mean()
    torch.testing.assert_close(value.detach(), entropy, rtol=1e-5, atol=1e-6)


def test_bce_symmetric_range_matches_unit_range(digits):
    vae = tiny_generator(output_range="symmetric")
    real = digits * 2 - 1
    out = vae(real)
    value = _term("bce")(TermInputs(real=real, output=out, step=0, value_range=(-1.0, 1.0)))
    # tanh(l) = 2 sigmoid(2l) - 1: the Bernoulli mean is (recon + 1) / 2, the target (real + 1) / 2.
    expected = F.binary_cross_entropy((out.recon + 1) / 2, digits)
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)


def test_bce_is_stable_for_extreme_logits(digits):
    logits = torch.where(digits > 0.5, torch.tensor(-1e4), torch.tensor(1e4))  # confidently wrong
    value = _term("bce")(TermInputs(real=digits, output=_output(torch.sigmoid(logits), logits), step=0))
    assert torch.isfinite(value) and value > 100


def test_bce_requires_logits(digits):
    with pytest.raises(ValueError, match="logits"):
        _term("bce")(TermInputs(real=digits, output=_output(digits), step=0))


def test_gaussian_nll_with_zero_logvar(digits):
    vae = tiny_generator()
    out = vae(digits)
    term = _term("gaussian_nll")
    value = term(TermInputs(real=digits, output=out, step=0))
    mse = F.mse_loss(out.recon, digits)
    torch.testing.assert_close(value, 0.5 * (mse + math.log(2 * math.pi)), rtol=1e-6, atol=1e-6)
    value.backward()
    assert term.logvar.grad is not None and torch.isfinite(term.logvar.grad).all()
    # d/dlogvar of 0.5 (mse e^-lv + lv) at lv = 0 is 0.5 (1 - mse).
    assert term.logvar.grad.item() == pytest.approx(0.5 * (1 - mse.item()), rel=1e-5)
    assert vae.last_layer.grad is not None


def test_gaussian_nll_learned_logvar_and_per_channel():
    real = torch.rand(2, 3, 8, 8)
    recon = (real + 0.1).clamp(0, 1)
    term = build_plugin("vaegan.losses", "gaussian_nll", {"init_logvar": -1.0, "per_channel": True, "channels": 3})
    assert term.logvar.shape == (3,)
    value = term(TermInputs(real=real, output=_output(recon), step=0))
    sq = (real - recon) ** 2
    expected = 0.5 * (sq * math.e + -1.0 + math.log(2 * math.pi)).mean()
    torch.testing.assert_close(value, expected)
    value.backward()
    assert term.logvar.grad.shape == (3,) and (term.logvar.grad != 0).all()


# ---- known answers: KL -----------------------------------------------------------------------------


def test_kl_zero_at_the_prior():
    real = torch.rand(5, 1, 28, 28)
    value = _term("kl")(TermInputs(real=real, output=_output(real), step=0))
    assert value.item() == 0.0


def test_kl_closed_form_sum_over_dims_divided_by_pixels():
    real = torch.rand(3, 3, 8, 10)
    mean = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, -0.5, 0.3], [0.0, 0.2, 0.1, -2.0]])
    logvar = torch.tensor([[0.0, -1.0, 1.0, 0.5], [0.3, -0.2, 0.0, -3.0], [1.5, 0.0, -0.7, 0.2]])
    value = _term("kl")(TermInputs(real=real, output=_output(real, mean=mean, logvar=logvar), step=0))
    per_image = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=1)  # nats per image
    expected = per_image.mean() / (3 * 8 * 10)
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("generator", GENERATORS)
def test_kl_on_a_real_forward_matches_posterior(digits, generator):
    """Summed over every latent element (a vector or a (c, h, w) map), averaged over the batch."""
    vae = tiny_generator(generator)
    out = vae(digits)
    value = _term("kl")(TermInputs(real=digits, output=out, step=0))
    q = out.posterior
    expected = (0.5 * (q.mean**2 + q.logvar.exp() - 1 - q.logvar)).flatten(1).sum(1).mean() / 784
    torch.testing.assert_close(value, expected)
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())  # the encoder's
    assert vae.last_layer.grad is None  # the KL does not reach the decoder


def test_kl_closed_form_on_a_spatial_latent():
    real = torch.rand(2, 1, 4, 4)
    mean = torch.randn(2, 3, 2, 2)
    logvar = torch.randn(2, 3, 2, 2).clamp(-2, 2)
    value = _term("kl")(TermInputs(real=real, output=_output(real, mean=mean, logvar=logvar), step=0))
    per_image = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(value, per_image.mean() / 16)


def test_kl_free_bits_clamps_each_dimension():
    real = torch.rand(2, 1, 4, 4)
    term = build_plugin("vaegan.losses", "kl", {"free_bits": 0.5})
    at_prior = term(TermInputs(real=real, output=_output(real), step=0))
    assert at_prior.item() == pytest.approx(LATENT * 0.5 / 16)
    mean = torch.tensor([[2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])  # dim 0: KL 2 nats > 0.5
    value = term(TermInputs(real=real, output=_output(real, mean=mean), step=0))
    assert value.item() == pytest.approx((2.0 + 3 * 0.5) / 16)
    # Below the floor the gradient is zero; above it it flows.
    mean = mean.clone().requires_grad_(True)
    term(TermInputs(real=real, output=_output(real, mean=mean), step=0)).backward()
    assert (mean.grad[:, 1:] == 0).all() and (mean.grad[:, 0] > 0).all()


def test_kl_free_bits_per_channel_of_a_spatial_latent():
    """A (B, c, h, w) latent has c channels whose h*w positions share one free-bits budget: the floor
    applies to the channel's mean KL per element, not to each position."""
    real = torch.rand(2, 1, 4, 4)  # 16 pixels
    term = build_plugin("vaegan.losses", "kl", {"free_bits": 0.6})
    mean = torch.zeros(2, 2, 1, 2)  # 2 channels of 2 positions
    mean[:, 0] = 2.0  # channel 0: KL 2 nats at each position, above the floor
    mean[:, 1, 0, 1] = math.sqrt(2.0)  # channel 1: KL 0 and 1 at its positions, mean 0.5 < 0.6
    mean.requires_grad_(True)
    value = term(TermInputs(real=real, output=_output(real, mean=mean), step=0))
    assert value.item() == pytest.approx((2.0 + 0.6) * 2 / 16)  # per-channel floors, times 2 elements each
    value.backward()
    assert (mean.grad[:, 1] == 0).all()  # the position at 1 nat is inside its channel's budget
    assert (mean.grad[:, 0] > 0).all()
    without = _term("kl")(TermInputs(real=real, output=_output(real, mean=mean.detach()), step=0))
    assert without.item() == pytest.approx((2 * 2.0 + 1.0) / 16)


def test_kl_rejects_negative_free_bits():
    with pytest.raises(ConfigError, match="free_bits"):
        build_plugin("vaegan.losses", "kl", {"free_bits": -1.0})
    with pytest.raises(ConfigError, match="nope"):
        build_plugin("vaegan.losses", "kl", {"nope": 1})


# ---- known answers: smoothness ---------------------------------------------------------------------


def _smoothness_at(scale, digits):
    """Smoothness of an MLP VAE whose decoder's first layer is multiplied by ``scale``."""
    torch.manual_seed(0)
    vae = tiny_generator("mlp")
    first = vae.decoder.body[0]
    with torch.no_grad():
        first.weight.mul_(scale)
        first.bias.zero_()
    term = _term("smoothness")
    torch.manual_seed(1)  # the same z and perturbation for every scale
    out = vae(digits, perturb_std=term.perturb_std)
    return term(TermInputs(real=digits, output=out, step=0)).item()


def test_smoothness_zero_for_a_decoder_that_ignores_z(digits):
    vae = tiny_generator("conv")
    with torch.no_grad():
        vae.decoder.fc.weight.zero_()
    term = _term("smoothness")
    out = vae(digits, perturb_std=term.perturb_std)
    assert not torch.equal(out.perturbation, torch.zeros_like(out.perturbation))
    assert term(TermInputs(real=digits, output=out, step=0)).item() < 1e-10
    assert _smoothness_at(0.0, digits) < 1e-10


def test_smoothness_grows_with_decoder_sensitivity(digits):
    values = [_smoothness_at(s, digits) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert values[0] < 1e-10
    assert all(a < b for a, b in zip(values, values[1:])), values
    # For small scales the decoder is ~linear in z: R ~ scale^2.
    assert values[2] / values[1] == pytest.approx(4.0, rel=0.25)


@pytest.mark.parametrize("generator", GENERATORS)
def test_smoothness_matches_its_formula(digits, generator):
    vae = tiny_generator(generator)
    term = build_plugin("vaegan.losses", "smoothness", {"sigma": 0.2})
    assert term.perturb_std == 0.2
    out = vae(digits, perturb_std=0.2)
    assert out.perturbation.shape == out.z.shape == (8, *vae.latent_shape)
    value = term(TermInputs(real=digits, output=out, step=0))
    torch.testing.assert_close(value, ((out.perturbed - out.recon) ** 2).mean() / 0.04)
    assert value > 0


def test_smoothness_needs_the_perturbed_decode_and_a_valid_sigma(digits):
    with pytest.raises(ValueError, match="perturb_std"):
        _term("smoothness")(TermInputs(real=digits, output=_output(digits), step=0))
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="sigma"):
            build_plugin("vaegan.losses", "smoothness", {"sigma": bad})


# ---- known answers: the non-saturating pair and the objective ------------------------------------


def _pair(name) -> AdversarialLoss:
    pair = build_plugin("vaegan.adversarial", name, options_for("vaegan.adversarial", name))
    assert isinstance(pair, AdversarialLoss)
    return pair


def test_non_saturating_known_values():
    pair = _pair("non_saturating")
    zeros = torch.zeros(5, 1)
    assert pair.generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert pair.discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    # Confident and right: ~0; confident and wrong: ~|logit|.
    assert pair.generator_loss(torch.full((3, 1), 50.0)).item() == pytest.approx(0.0, abs=1e-12)
    assert pair.generator_loss(torch.full((3, 1), -1e4)).item() == pytest.approx(1e4)
    assert pair.discriminator_loss(torch.full((2, 1), 1e4), torch.full((2, 1), -1e4)).item() == pytest.approx(0.0)
    # The generator loss is -log sigmoid(D(fake)).
    logits = torch.tensor([[-2.0], [0.5], [3.0]])
    torch.testing.assert_close(pair.generator_loss(logits), -torch.log(torch.sigmoid(logits)).mean())


def test_objective_sums_weighted_terms(digits):
    cfg = ExperimentConfig.from_dict({"losses": [{"name": "mse", "weight": 2.0},
                                                 {"name": "kl", "weight": {"value": 1.0, "warmup": 4}}],
                                      "discriminator": None, "adversarial": None})
    objective = Objective.from_config(cfg)
    vae = tiny_generator()
    out = vae(digits)
    inputs = TermInputs(real=digits, output=out, step=1)
    total, parts = objective.generator_loss(inputs)
    assert set(parts) == {"mse", "kl"}
    torch.testing.assert_close(total, 2.0 * parts["mse"] + 0.25 * parts["kl"])


def test_l1_with_a_learned_log_variance_is_trained_by_the_generator(tiny):
    """LDM's nll_loss = |x - x'| / exp(s) + s, whose s sat in no optimizer there: here it is trained."""
    import vaegan
    from vaegan.api import DiagonalGaussian, TermInputs, VAEOutput
    from vaegan.losses.reconstruction import L1Loss

    term = L1Loss(learned_logvar=True)
    real = torch.zeros(2, 1, 4, 4)
    recon = torch.full_like(real, 0.5)
    with torch.no_grad():
        term.logvar.fill_(math.log(0.5))
    out = VAEOutput(recon=recon, posterior=DiagonalGaussian(torch.zeros(2, 2), torch.zeros(2, 2)), z=torch.zeros(2, 2))
    assert float(term(TermInputs(real=real, output=out, step=0)).detach()) == pytest.approx(0.5 / 0.5 + math.log(0.5))
    trainer = vaegan.build_trainer(tiny("losses=[{name: l1, options: {learned_logvar: true}}, {name: kl}]",
                                        "train.max_steps=3"))
    logvar = trainer.train_step.objective.generator_terms["l1"].logvar
    assert any(logvar is p for g in trainer.train_step.generator.optimizer.param_groups for p in g["params"])
    trainer.fit()
    assert logvar.item() != 0.0
