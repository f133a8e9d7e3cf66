"""First-party plugins (vaegan_plugins): what is specific to each of them.

The contracts every registered plugin meets (loss terms, GAN pairs, discriminators), parametrised over
the registry, are in the test_contract_*.py files; this file holds what only LPIPS, SSIM, the focal
frequency loss, R1, feature matching, PatchGAN and DCGAN do. Everything is real: real torch, real
Accelerate, the real ``lpips`` and ``torchmetrics`` packages, real MNIST digits (conftest's ``digits``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from urllib.parse import urlparse

import lpips
import pytest
import torch
import torch.nn.functional as F
from einops import repeat
from plugin_options import options_for
from safetensors.torch import load_file

import vaegan
from vaegan import registry
from vaegan.api import (
    DiagonalGaussian,
    Discriminator,
    DiscriminatorOutput,
    LossTerm,
    TermInputs,
    VAEOutput,
)
from vaegan.data import first_batch
from vaegan.errors import ConfigError, PluginError
from vaegan.registry import build_plugin

pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)


def _term(name: str, **extra) -> LossTerm:
    term = build_plugin("vaegan.losses", name, {**options_for("vaegan.losses", name), **extra})
    assert isinstance(term, LossTerm)
    return term


def _disc(name: str, image_shape, **extra) -> Discriminator:
    disc = build_plugin("vaegan.discriminators", name, {**options_for("vaegan.discriminators", name), **extra},
                        image_shape=tuple(image_shape))
    assert isinstance(disc, Discriminator)
    return disc


def _output(recon: torch.Tensor) -> VAEOutput:
    b = recon.shape[0]
    return VAEOutput(recon=recon, posterior=DiagonalGaussian(torch.zeros(b, 2), torch.zeros(b, 2)), z=torch.zeros(b, 2))


def _grads(module: torch.nn.Module):
    return [p.grad for p in module.parameters() if p.grad is not None]


def _losses_override(name: str, weight: float = 0.5, **extra) -> str:
    options = {**options_for("vaegan.losses", name), **extra}
    return (f"losses=[{{name: bce}}, {{name: kl}}, {{name: {name}, label: under_test, weight: {weight}, "
            f"options: {json.dumps(options)}}}]")


def _disc_overrides(name: str, **extra) -> tuple:
    return (f"discriminator.name={name}",
            f"discriminator.options={json.dumps({**options_for('vaegan.discriminators', name), **extra})}")


def _batch(trainer, n: int = 16) -> torch.Tensor:
    return first_batch(trainer.loader.dataset, n).to(trainer.accelerator.device)


# ---- PatchGAN and DCGAN ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["patchgan", "dcgan"])
def test_too_small_images_are_refused_with_the_exact_minimum_size(name, n_layers):
    with pytest.raises(ConfigError, match="n_layers") as info:
        _disc(name, (1, 1, 1), n_layers=n_layers)
    minimum = int(re.search(r"at least (\d+)x\1", str(info.value)).group(1))
    # The stated minimum is exact: it builds and runs at that size, and not one pixel below.
    with pytest.raises(ConfigError):
        _disc(name, (3, minimum - 1, minimum), n_layers=n_layers)
    with pytest.raises(ConfigError):
        _disc(name, (3, minimum, minimum - 1), n_layers=n_layers)
    disc = _disc(name, (3, minimum, minimum), n_layers=n_layers)
    assert torch.isfinite(disc(torch.rand(2, 3, minimum, minimum)).logits).all()


@pytest.mark.parametrize("spectral_norm", [False, True])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("name", ["patchgan", "dcgan"])
def test_norms_and_spectral_norm(name, norm, spectral_norm):
    disc = _disc(name, (3, 32, 32), norm=norm, spectral_norm=spectral_norm)
    out = disc(torch.rand(4, 3, 32, 32))
    out.logits.mean().backward()
    assert all(torch.isfinite(g).all() for g in _grads(disc))
    has_sn = any("parametrizations" in n for n, _ in disc.named_parameters())
    assert has_sn == spectral_norm


def test_unknown_norm_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="group"):
        _disc("patchgan", (1, 28, 28), norm="layer")


def test_patchgan_returns_a_map_that_grows_with_the_image():
    small = _disc("patchgan", (1, 32, 32)).logits_size
    large = _disc("patchgan", (1, 64, 64)).logits_size
    assert large[0] > small[0] >= 1
    assert _disc("patchgan", (1, 64, 64))(torch.rand(2, 1, 64, 64)).logits.shape == (2, 1, *large)


# ---- feature matching -----------------------------------------------------------------------------


def test_feature_matching_trains_encoder_and_decoder_never_the_discriminator(tiny):
    """Larsen et al.: the learned-similarity loss trains the whole VAE; D is not trained by it."""
    trainer = vaegan.build_trainer(tiny("losses=[{name: feature_matching}]", "adversarial.weight=0.0",
                                        *_disc_overrides("patchgan")))
    step = trainer.train_step
    x = _batch(trainer)
    _, parts = step.generator_backward(x, step.generator.module(x, **step.objective.forward_kwargs(x.shape[0])), 0)
    assert set(parts) == {"feature_matching"}
    assert not _grads(step.discriminator.module)
    for part in (trainer.model.encoder, trainer.model.decoder):
        assert any(g.abs().sum() > 0 for g in _grads(part))


def test_feature_matching_layers(digits):
    disc = _disc("patchgan", (1, 28, 28)).requires_grad_(False)
    recon = (digits + 0.2 * torch.rand_like(digits)).clamp(0, 1)

    def inputs():
        return TermInputs(real=digits, output=_output(recon), step=0, discriminator=disc)

    with torch.no_grad():
        real_f, fake_f = disc(digits).features, disc(recon).features
    last = _term("feature_matching", layers=[-1])(inputs())
    torch.testing.assert_close(last, F.mse_loss(fake_f[-1], real_f[-1]))
    every = _term("feature_matching")(inputs())
    torch.testing.assert_close(every, torch.stack([F.mse_loss(a, b) for a, b in zip(fake_f, real_f)]).mean())
    same = TermInputs(real=digits, output=_output(digits.clone()), step=0, discriminator=disc)
    assert _term("feature_matching")(same).item() == 0.0
    with pytest.raises(ConfigError, match="layers"):
        _term("feature_matching", layers=[len(real_f)])(inputs())
    with pytest.raises(ConfigError, match="layers"):
        _term("feature_matching", layers=[])


# ---- R1 -------------------------------------------------------------------------------------------


class _Linear(Discriminator):
    """D(x) = <w, x> + b: its input gradient is w for every image, so R1 = gamma / 2 * |w|^2."""

    def __init__(self, image_shape) -> None:
        super().__init__(image_shape)
        self.w = torch.nn.Parameter(torch.randn(*image_shape))
        self.b = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return DiscriminatorOutput((x * self.w).flatten(1).sum(1, keepdim=True) + self.b, (x,))


def test_r1_known_answer_and_gradient_to_the_discriminator(digits):
    disc = _Linear((1, 28, 28))
    term = _term("r1", gamma=3.0)
    value = term(TermInputs(real=digits, output=_output(digits), step=0, discriminator=disc))
    torch.testing.assert_close(value, 1.5 * disc.w.detach().pow(2).sum())
    value.backward()  # create_graph: the penalty trains D's weights (d/dw = gamma * w)
    torch.testing.assert_close(disc.w.grad, 3.0 * disc.w.detach())


def test_r1_lazy_runs_every_k_steps_scaled_by_k(digits):
    disc = _disc("patchgan", (1, 28, 28))
    eager, lazy = _term("r1", gamma=2.0), _term("r1", gamma=2.0, every=4)

    def at(term, step):
        return term(TermInputs(real=digits, output=_output(digits), step=step, discriminator=disc))

    assert [at(lazy, s) is None for s in range(9)] == [s % 4 != 0 for s in range(9)]
    for step in (0, 4, 8):
        torch.testing.assert_close(at(lazy, step), 4 * at(eager, step))
    with pytest.raises(ConfigError, match="every"):
        _term("r1", every=0)


# ---- LeCam ----------------------------------------------------------------------------------------


def test_lecam_known_answer_anchors_and_gradient_to_the_discriminator(digits):
    disc = _Linear((1, 28, 28))
    term = _term("lecam", decay=0.5)
    fakes = digits.flip(0) * 0.5

    def inputs():
        return TermInputs(real=digits, output=_output(fakes), step=0, fake=fakes, discriminator=disc)

    with torch.no_grad():
        real, fake = disc(digits).logits, disc(fakes).logits
    value = term(inputs())  # first step: the averages are this step's means
    torch.testing.assert_close(term.alpha_real, real.mean())
    torch.testing.assert_close(term.alpha_fake, fake.mean())
    expected = F.relu(real - fake.mean()).pow(2).mean() + F.relu(real.mean() - fake).pow(2).mean()
    torch.testing.assert_close(value, expected)
    value.backward()
    assert disc.w.grad is not None and disc.w.grad.abs().sum() > 0
    a_real = float(term.alpha_real)
    with torch.no_grad():
        disc.b += 1.0  # every logit moves by one: the averages follow at rate 1 - decay
    term(inputs())
    torch.testing.assert_close(float(term.alpha_real), 0.5 * a_real + 0.5 * (a_real + 1.0))
    assert set(term.state_dict()) == {"alpha_real", "alpha_fake", "started"}  # saved with the discriminator
    with pytest.raises(ConfigError, match="decay"):
        _term("lecam", decay=1.0)


@pytest.mark.slow
def test_lecam_averages_are_checkpointed_and_resume_exactly(tmp_path):
    from conftest import assert_resume_is_exact

    common = ("losses=[{name: bce}, {name: kl}, {name: lecam, weight: 0.3}]", "train.epochs=3",
              "train.max_steps=6", "train.checkpoint_every=2")
    assert_resume_is_exact(tmp_path, common, stop_at=4)


# ---- LPIPS ----------------------------------------------------------------------------------------


def _lpips_value(term, recon, real, value_range=(0.0, 1.0)) -> torch.Tensor:
    return term(TermInputs(real=real, output=_output(recon), step=0, value_range=value_range))


@pytest.mark.parametrize("net", ["alex", pytest.param("vgg", marks=pytest.mark.slow), "squeeze"])
def test_lpips_matches_the_lpips_package(net):
    term = _term("lpips", net=net)
    a, b = torch.rand(2, 3, 40, 40), torch.rand(2, 3, 40, 40)
    torch.testing.assert_close(_lpips_value(term, a, b), term.network(a, b, normalize=True).mean())


def test_lpips_normalisation_has_a_finite_gradient_at_zero_features():
    """lpips' normalize_tensor divides by sqrt(sum x^2) + eps, whose gradient is NaN where the sum is
    0 (all-zero feature vectors, or an fp16 sum that underflows); ours keeps eps inside the root."""
    from vaegan_plugins.perceptual import _unit

    features = torch.zeros(2, 8, 3, 3)
    features[0, :, 1, 1] = torch.randn(8)  # one live feature vector, every other one exactly 0
    features.requires_grad_(True)
    target = torch.randn(2, 8, 3, 3)
    (_unit(features) - _unit(target)).pow(2).sum().backward()
    assert torch.isfinite(features.grad).all()
    torch.testing.assert_close(_unit(target), lpips.normalize_tensor(target))


def test_lpips_gradient_is_finite_at_identical_and_black_images(digits):
    term = _term("lpips")
    same = digits.clone().requires_grad_(True)
    value = _lpips_value(term, same, digits)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(same.grad).all()
    black = torch.zeros_like(digits).requires_grad_(True)
    value = _lpips_value(term, black, digits)
    value.backward()
    assert value.item() > 0 and torch.isfinite(black.grad).all() and black.grad.abs().sum() > 0


def test_lpips_is_fp32_under_autocast_and_maps_channels_and_range(digits):
    term = _term("lpips")
    recon = (digits + 0.3 * torch.rand_like(digits)).clamp(0, 1)
    plain = _lpips_value(term, recon, digits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _lpips_value(term, recon, digits)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    # One channel is repeated to three.
    rgb = [repeat(t, "b 1 h w -> b 3 h w") for t in (recon, digits)]
    torch.testing.assert_close(_lpips_value(term, *rgb), plain)
    # [0, 1] images and the same images in [-1, 1] are the same to LPIPS.
    torch.testing.assert_close(_lpips_value(term, 2 * recon - 1, 2 * digits - 1, (-1.0, 1.0)), plain)
    with pytest.raises(ConfigError, match="channels"):
        _lpips_value(term, torch.rand(2, 2, 32, 32), torch.rand(2, 2, 32, 32))


def test_lpips_is_pinned_in_eval_and_kept_out_of_optimizers_and_checkpoints(tiny):
    cfg = tiny(_losses_override("lpips", weight=0.1), "train.max_steps=2", "train.checkpoint_every=2")
    trainer = vaegan.build_trainer(cfg)
    step = trainer.train_step
    term = step.objective.generator_terms["under_test"]
    net = term.network
    step.generator.module.train()  # what the trainer's parent modules do
    term.train()
    assert not any(m.training for m in net.modules()), "LPIPS left eval mode (dropout would be active)"
    x = _batch(trainer)
    out = trainer.model(x)
    inputs = TermInputs(real=x, output=out, step=0)
    assert torch.equal(term(inputs), term(inputs)), "LPIPS is not deterministic in train mode"
    frozen = {id(p) for p in net.parameters()}
    assert all(not p.requires_grad for p in net.parameters())
    for opt in (step.generator.optimizer, step.discriminator.optimizer):
        assert not frozen & {id(p) for g in opt.param_groups for p in g["params"]}
    assert not term.state_dict() and not list(term.parameters())
    trainer.fit()
    ckpt = Path(cfg.train.output_dir) / "checkpoints" / "step_00000002"
    keys = [k for f in ckpt.glob("*.safetensors") for k in load_file(str(f))]
    assert keys and not [k for k in keys if "under_test" in k or "lpips" in k or "lin0" in k]


def _torchvision_file(net: str) -> str:
    import torchvision.models as tvm

    weights = {"alex": tvm.AlexNet_Weights, "vgg": tvm.VGG16_Weights, "squeeze": tvm.SqueezeNet1_1_Weights}[net]
    return Path(urlparse(weights.IMAGENET1K_V1.url).path).name


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("VAEGAN_LPIPS_BACKBONE", raising=False)
    return home


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_lpips_missing_weights_error_names_the_file_and_where_to_put_it(empty_torch_home, net):
    with pytest.raises(PluginError) as info:
        _term("lpips", net=net, backbone="pretrained", download=False)
    message = str(info.value)
    assert f"'{_torchvision_file(net)}'" in message
    assert str(empty_torch_home / "hub" / "checkpoints") in message
    assert "backbone_path" in message and "VAEGAN_LPIPS_BACKBONE" in message


@pytest.mark.parametrize("source", ["option-file", "option-folder", "env", "torch-cache"])
def test_lpips_loads_backbone_weights_from_each_source(empty_torch_home, tmp_path, monkeypatch, source):
    import torchvision.models as tvm

    name = _torchvision_file("squeeze")
    state = tvm.squeezenet1_1(weights=None).state_dict()  # stands in for the ImageNet file
    folder = empty_torch_home / "hub" / "checkpoints" if source == "torch-cache" else tmp_path / "weights"
    folder.mkdir(parents=True)
    torch.save(state, folder / name)
    options = {"net": "squeeze", "backbone": "pretrained", "download": False}
    if source == "option-file":
        options["backbone_path"] = str(folder / name)
    elif source == "option-folder":
        options["backbone_path"] = str(folder)
    elif source == "env":
        monkeypatch.setenv("VAEGAN_LPIPS_BACKBONE", str(folder))
    term = _term("lpips", **options)
    loaded = term.network.net
    torch.testing.assert_close(loaded.slice1[0].weight, state["features.0.weight"], rtol=0, atol=0)
    fire = loaded.slice7._modules["12"]  # lpips' slices keep torchvision's feature indices as names
    torch.testing.assert_close(fire.expand3x3.weight, state["features.12.expand3x3.weight"], rtol=0, atol=0)


def test_lpips_bad_paths_and_files_are_clear_errors(empty_torch_home, tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        _term("lpips", backbone="pretrained", backbone_path=str(tmp_path / "nope.pth"))
    broken = tmp_path / _torchvision_file("alex")
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(PluginError, match="cannot read"):
        _term("lpips", backbone="pretrained", backbone_path=str(broken))
    for bad in ({"net": "resnet"}, {"backbone": "imagenet"}, {"min_size": 8}):
        with pytest.raises(ConfigError):
            _term("lpips", **bad)


# ---- SSIM -----------------------------------------------------------------------------------------


def test_ssim_zero_for_identical_images_and_ms_ssim_needs_large_images(digits):
    for options in ({}, {"ms": True, "kernel_size": 3, "betas": [0.3, 0.3, 0.4]}):
        term = _term("ssim", **options)
        assert abs(term(TermInputs(real=digits, output=_output(digits.clone()), step=0)).item()) < 1e-5
    with pytest.raises(ConfigError, match="ms: false"):
        _term("ssim", ms=True)(TermInputs(real=digits, output=_output(digits.clone()), step=0))


def test_ms_ssim_gradient_is_finite_for_anticorrelated_images(digits):
    """With torchmetrics' default normalize="relu", a negative contrast term becomes 0 ** beta, whose
    derivative is infinite; an inverted digit has negative contrast at every scale."""
    recon = (1 - digits).requires_grad_(True)
    value = _term("ssim", ms=True, kernel_size=3, betas=[0.3, 0.3, 0.4])(
        TermInputs(real=digits, output=_output(recon), step=0))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(recon.grad).all() and recon.grad.abs().sum() > 0


# ---- focal frequency ------------------------------------------------------------------------------


def test_focal_frequency_without_focus_is_the_pixel_mse(digits):
    """The orthonormal FFT preserves energy (Parseval), so alpha = 0 (all weights 1) is the MSE."""
    recon = torch.rand_like(digits)
    value = _term("focal_frequency", alpha=0.0)(TermInputs(real=digits, output=_output(recon), step=0))
    torch.testing.assert_close(value, F.mse_loss(recon, digits))
    patched = _term("focal_frequency", alpha=0.0, patch_factor=2)
    torch.testing.assert_close(patched(TermInputs(real=digits, output=_output(recon), step=0)), F.mse_loss(recon, digits))
    with pytest.raises(ConfigError, match="patch_factor"):
        _term("focal_frequency", patch_factor=3)(TermInputs(real=digits, output=_output(recon), step=0))


def test_focal_frequency_is_zero_with_finite_gradient_at_a_perfect_reconstruction(digits):
    recon = digits.clone().requires_grad_(True)
    value = _term("focal_frequency")(TermInputs(real=digits, output=_output(recon), step=0))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(recon.grad).all()


def test_focal_frequency_focuses_on_the_hardest_frequencies():
    """An error made of a weak low frequency and a strong high frequency: relative to the MSE, the
    focal loss's gradient leans further towards the high frequency (the soft edges of a VAE)."""
    x = torch.arange(16.0)
    low = torch.cos(2 * math.pi * x / 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    high = torch.cos(math.pi * x).view(1, 1, 1, 16).expand(1, 1, 16, 16)  # the Nyquist frequency
    real = torch.zeros(1, 1, 16, 16)

    def leaning(term) -> float:
        recon = (0.2 * low + 0.5 * high).requires_grad_(True)
        term(TermInputs(real=real, output=_output(recon), step=0)).backward()
        g = recon.grad
        return float((g * high).sum() / (g * low).sum())

    assert leaning(_term("focal_frequency", alpha=1.0)) > 1.5 * leaning(_term("focal_frequency", alpha=0.0))
