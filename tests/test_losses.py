"""Loss-term and adversarial plugins: a generic contract every installed plugin must meet (new plugins
are tested for free), plus known-answer checks of the built-ins."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vaegan import registry
from vaegan.config import DataConfig, ExperimentConfig, ModelConfig
from vaegan.data import build_dataset, first_batch
from vaegan.discriminators import SimpleDiscriminator
from vaegan.errors import ConfigError
from vaegan.model import VAE, DiagonalGaussian, VAEOutput
from vaegan.objective import AdversarialLoss, LossTerm, Objective, TermInputs, build_plugin

from plugin_options import options_for  # the one table of per-plugin test options

LATENT = 4
LOSS_NAMES = registry.available("vaegan.losses")
ADV_NAMES = registry.available("vaegan.adversarial")


pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")


def tiny_model(output_range="unit", arch="conv") -> ModelConfig:
    return ModelConfig(arch=arch, channels=(8, 16), norm_groups=4, latent_dim=LATENT, mlp_hidden=(32,),
                       output_range=output_range)


@pytest.fixture(scope="module")
def digits():
    """Eight real MNIST digits from the committed fixtures, in [0, 1]."""
    root = Path(__file__).parent / "fixtures"  # tests/fixtures/MNIST/raw, as in conftest.py
    ds = build_dataset(DataConfig(root=str(root), download=False, limit=8), ModelConfig())
    return first_batch(ds, 8)


def _inputs(term, vae, real, step=0, disc=None) -> TermInputs:
    """What the trainer hands a term: for a discriminator term the fakes are detached and D trains;
    for a generator term D (if any) is frozen and the fakes carry the generator's gradient."""
    if term.needs_discriminator and disc is None:
        disc = SimpleDiscriminator(vae.config.image_shape, channels=(8, 16))
    if disc is not None:
        disc.requires_grad_(term.player == "discriminator")
    out = vae(real, perturb_std=term.perturb_std)
    fake = out.recon.detach() if term.player == "discriminator" else out.recon
    return TermInputs(real=real, output=out, step=step, value_range=vae.value_range, fake=fake,
                      discriminator=disc, last_layer=vae.last_layer)


def _first_value(term, vae, real, disc=None, steps=64):
    """The term's value at the first step it does not skip (a lazy term may return None)."""
    for step in range(steps):
        value = term(_inputs(term, vae, real, step, disc))
        if value is not None:
            return value
    raise AssertionError(f"{type(term).__name__} returned None (skipped) at every step below {steps}")


def _term(name):
    term = registry.load("vaegan.losses", name)(**options_for("vaegan.losses", name))
    assert isinstance(term, LossTerm)
    assert term.player in ("generator", "discriminator")
    return term


# ---- the generic contract --------------------------------------------------------------------------


@pytest.mark.parametrize("output_range", ["unit", "symmetric"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_plugin_contract(name, output_range, digits):
    term = _term(name)
    vae = VAE(tiny_model(output_range))
    disc = SimpleDiscriminator(vae.config.image_shape, channels=(8, 16)) if term.needs_discriminator else None
    real = digits * 2 - 1 if output_range == "symmetric" else digits
    loss = _first_value(term, vae, real, disc)
    assert loss.ndim == 0 and loss.dtype.is_floating_point
    assert torch.isfinite(loss)
    loss.backward()
    trained = list(term.parameters())
    trained += list(vae.parameters()) if term.player == "generator" else list(disc.parameters())
    grads = [p.grad for p in trained if p.grad is not None]
    assert grads, f"{name}: no parameter of its player received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # A term's gradient reaches only its own player.
    others = list(disc.parameters()) if disc is not None and term.player == "generator" else []
    others += list(vae.parameters()) if term.player == "discriminator" else []
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in others), f"{name} leaks into the other player"


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_plugin_finite_under_bf16_autocast(name, digits):
    term = _term(name)
    vae = VAE(tiny_model())
    disc = SimpleDiscriminator(vae.config.image_shape, channels=(8, 16)) if term.needs_discriminator else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _first_value(term, vae, digits, disc)
    assert loss.ndim == 0 and torch.isfinite(loss.float())
    loss.float().backward()
    params = list(vae.parameters()) + list(term.parameters()) + (list(disc.parameters()) if disc else [])
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_plugin_builds_through_objective(name):
    cfg = ExperimentConfig.from_dict({"losses": [{"name": name, "options": options_for("vaegan.losses", name)}],
                                      "discriminator": None, "adversarial": None})
    objective = Objective.from_config(cfg)
    terms = {**objective.generator_terms, **objective.discriminator_terms}
    assert set(terms) == {name}


# ---- known answers: reconstruction -----------------------------------------------------------------


def _output(recon, logits=None, mean=None, logvar=None) -> VAEOutput:
    b = recon.shape[0]
    mean = torch.zeros(b, LATENT) if mean is None else mean
    logvar = torch.zeros(b, LATENT) if logvar is None else logvar
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
    vae = VAE(tiny_model())
    out = vae(digits)
    inputs = TermInputs(real=digits, output=out, step=0)
    assert _term("mse")(inputs).item() == pytest.approx(F.mse_loss(out.recon, digits).item(), rel=1e-6)
    assert _term("l1")(inputs).item() == pytest.approx(F.l1_loss(out.recon, digits).item(), rel=1e-6)


BCE_BUG = ("BUG: BCELoss uses scale = 2 / (high - low), which is 2 for the [0, 1] range and 1 for [-1, 1] -- "
           "the inverse of its own comment -- so the loss is the BCE of sigmoid(2 l) (unit) / sigmoid(l) "
           "(symmetric), not of the decoder's actual output")


def test_bce_equals_torch_bce_of_sigmoid(digits):
    vae = VAE(tiny_model("unit"))
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
    vae = VAE(tiny_model("symmetric"))
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
    vae = VAE(tiny_model())
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


def test_kl_on_a_real_forward_matches_posterior(digits):
    vae = VAE(tiny_model())
    out = vae(digits)
    value = _term("kl")(TermInputs(real=digits, output=out, step=0))
    q = out.posterior
    expected = (0.5 * (q.mean**2 + q.logvar.exp() - 1 - q.logvar)).sum(1).mean() / 784
    torch.testing.assert_close(value, expected)
    value.backward()
    assert vae.encoder.head.weight.grad.abs().sum() > 0
    assert vae.last_layer.grad is None  # the KL does not reach the decoder


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


def test_kl_rejects_negative_free_bits():
    with pytest.raises(ConfigError, match="free_bits"):
        build_plugin("vaegan.losses", "kl", {"free_bits": -1.0})
    with pytest.raises(ConfigError, match="nope"):
        build_plugin("vaegan.losses", "kl", {"nope": 1})


# ---- known answers: smoothness ---------------------------------------------------------------------


def _smoothness_at(scale, digits):
    """Smoothness of an MLP VAE whose decoder's first layer is multiplied by ``scale``."""
    torch.manual_seed(0)
    vae = VAE(tiny_model(arch="mlp"))
    first = vae.decoder.body[0]
    with torch.no_grad():
        first.weight.mul_(scale)
        first.bias.zero_()
    term = _term("smoothness")
    torch.manual_seed(1)  # the same z and perturbation for every scale
    out = vae(digits, perturb_std=term.perturb_std)
    return term(TermInputs(real=digits, output=out, step=0)).item()


def test_smoothness_zero_for_a_decoder_that_ignores_z(digits):
    vae = VAE(tiny_model())
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


def test_smoothness_matches_its_formula(digits):
    vae = VAE(tiny_model())
    term = build_plugin("vaegan.losses", "smoothness", {"sigma": 0.2})
    assert term.perturb_std == 0.2
    out = vae(digits, perturb_std=0.2)
    value = term(TermInputs(real=digits, output=out, step=0))
    torch.testing.assert_close(value, ((out.perturbed - out.recon) ** 2).mean() / 0.04)


def test_smoothness_needs_the_perturbed_decode_and_a_valid_sigma(digits):
    with pytest.raises(ValueError, match="perturb_std"):
        _term("smoothness")(TermInputs(real=digits, output=_output(digits), step=0))
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="sigma"):
            build_plugin("vaegan.losses", "smoothness", {"sigma": bad})


# ---- adversarial pairs -----------------------------------------------------------------------------


def _pair(name) -> AdversarialLoss:
    pair = registry.load("vaegan.adversarial", name)()
    assert isinstance(pair, AdversarialLoss)
    return pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ADV_NAMES)
def test_adversarial_finite_at_extreme_logits(name, dtype):
    pair = _pair(name)
    for shape in [(4, 1), (4, 1, 3, 3)]:  # global and patch logits
        extreme = torch.tensor([1e4, -1e4, 0.0, 3.0]).view(4, *([1] * (len(shape) - 1))).expand(shape)
        fake = extreme.to(dtype).clone().requires_grad_(True)
        real = (-extreme).to(dtype).clone().requires_grad_(True)
        g = pair.generator_loss(fake)
        d = pair.discriminator_loss(real, fake)
        assert g.ndim == 0 and d.ndim == 0
        assert torch.isfinite(g.float()) and torch.isfinite(d.float())
        (g.float() + d.float()).backward()
        assert torch.isfinite(fake.grad.float()).all() and torch.isfinite(real.grad.float()).all()


@pytest.mark.parametrize("name", ADV_NAMES)
def test_adversarial_through_a_real_discriminator_under_bf16(name, digits):
    pair = _pair(name)
    disc = SimpleDiscriminator((1, 28, 28), channels=(8, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = disc(torch.rand_like(digits)).logits
        real = disc(digits).logits
        g, d = pair.generator_loss(fake.float()), pair.discriminator_loss(real.float(), fake.float())
    assert torch.isfinite(g) and torch.isfinite(d)
    d.backward()
    assert all(torch.isfinite(p.grad).all() for p in disc.parameters() if p.grad is not None)


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
    vae = VAE(tiny_model())
    out = vae(digits)
    inputs = TermInputs(real=digits, output=out, step=1)
    total, parts = objective.generator_loss(inputs)
    assert set(parts) == {"mse", "kl"}
    torch.testing.assert_close(total, 2.0 * parts["mse"] + 0.25 * parts["kl"])
