"""The LDM / SD KL autoencoder (``autoencoder_kl``), checked against the real diffusers package: exact
conversion both ways, the exported folder, decoder-only fine-tuning from a diffusers folder, the
scaling factor and the model card, image sizes it cannot take, and the error without diffusers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_resume_is_exact, tiny_config
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from plugin_options import TINY_DIFFUSERS, tiny_diffusers_folder
from safetensors.torch import load_file
from vaegan_plugins.autoencoder_kl import AutoencoderKL
from vaegan_plugins.diffusers_io import from_diffusers, options_from_diffusers, to_diffusers

import vaegan
from vaegan.errors import ConfigError, PluginError
from vaegan.latent_stats import compute_latent_stats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (options, image shape): f = 1, 2, 4, 8; square and not; SD-like, SD3/Flux-like (no quant convs), no attention.
ARCHITECTURES = {
    "f1": ({"block_out_channels": [8], "latent_channels": 2}, (3, 8, 12)),
    "f2-sd": ({"block_out_channels": [8, 16], "latent_channels": 4}, (3, 16, 24)),
    "f4-no-quant-convs": ({"block_out_channels": [8, 16, 16], "latent_channels": 16, "use_quant_conv": False,
                           "use_post_quant_conv": False}, (1, 32, 16)),
    "f8-no-attention": ({"block_out_channels": [8, 8, 16, 16], "latent_channels": 4,
                         "mid_block_add_attention": False, "layers_per_block": 2}, (3, 32, 64)),
}
COMMON = {"norm_num_groups": 4, "layers_per_block": 1}


def ours(name: str) -> AutoencoderKL:
    options, shape = ARCHITECTURES[name]
    return AutoencoderKL(shape, "symmetric", **{**COMMON, **options}).eval()


def images(shape, n=2, seed=0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_shapes_and_finiteness(name):
    model = ours(name)
    options, (c, h, w) = ARCHITECTURES[name]
    f = 2 ** (len(options["block_out_channels"]) - 1)
    assert model.downsampling_factor == f and model.latent_shape == (options["latent_channels"], h // f, w // f)
    x = images((c, h, w))
    out = model(x, num_prior=2)
    assert out.recon.shape == x.shape and out.z.shape == (2, *model.latent_shape)
    assert out.prior_samples.shape == (2, c, h, w)
    assert all(torch.isfinite(t).all() for t in (out.recon, out.z, out.prior_samples))
    torch.testing.assert_close(out.recon, out.recon_logits)  # identity output, diffusers' convention


@pytest.mark.parametrize("size", [(30, 32), (32, 34), (17, 17)])
def test_an_image_size_the_depth_cannot_take_is_refused_before_training(tiny, size):
    with pytest.raises(ConfigError) as info:
        vaegan.build_trainer(tiny("model.name=autoencoder_kl", "model.options={block_out_channels: [8, 8, 16], "
                                  "norm_num_groups: 4}", f"model.image_size=[{size[0]}, {size[1]}]"))
    msg = str(info.value)
    assert "f = 4" in msg and f"{size[0]}x{size[1]}" in msg and "model.image_size" in msg


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_to_diffusers_gives_the_same_outputs_for_the_same_input_and_noise(name):
    model = ours(name)
    ae = to_diffusers(model)
    x = images(model.image_shape)
    with torch.no_grad():
        q = model.encode(x)
        dist = ae.encode(x).latent_dist
        torch.testing.assert_close(q.mean, dist.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.logvar, dist.logvar, rtol=1e-5, atol=1e-6)
        eps = torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(1))
        z = q.mean + q.std * eps
        torch.testing.assert_close(model.decode(z), ae.decode(dist.mean + dist.std * eps).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.reconstruct(x), ae(x).sample, rtol=1e-5, atol=1e-5)  # both use the mean
    assert set(ae.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_from_diffusers_gives_the_same_weights_and_outputs(name):
    options, shape = ARCHITECTURES[name]
    levels = len(options["block_out_channels"])
    torch.manual_seed(3)
    ae = DiffusersAutoencoderKL(in_channels=shape[0], out_channels=shape[0],
                                down_block_types=["DownEncoderBlock2D"] * levels,
                                up_block_types=["UpDecoderBlock2D"] * levels, **{**COMMON, **options}).eval()
    model = from_diffusers(ae, shape).eval()
    assert all(torch.equal(v, ae.state_dict()[k]) for k, v in model.state_dict().items())
    x = images(shape, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(x), ae(x).sample, rtol=1e-5, atol=1e-5)
    assert options_from_diffusers(dict(ae.config))["block_out_channels"] == options["block_out_channels"]


def test_an_architecture_diffusers_cannot_load_or_vaegan_does_not_implement_is_refused():
    with pytest.raises(ConfigError, match="output_activation: identity"):
        to_diffusers(AutoencoderKL((3, 8, 8), block_out_channels=[8], norm_num_groups=4, output_activation="tanh"))
    with pytest.raises(ConfigError, match="act_fn"):
        options_from_diffusers({**TINY_DIFFUSERS, "act_fn": "relu"})
    with pytest.raises(ConfigError, match="DownEncoderBlock2D"):
        options_from_diffusers({**TINY_DIFFUSERS, "down_block_types": ["SomethingElse2D"] * 2})


def test_the_saved_model_holds_a_diffusers_folder_that_reconstructs_like_vaegan(tmp_path):
    model = ours("f2-sd")
    d = model.save_pretrained(tmp_path / "m")
    assert (d / "diffusers" / "config.json").is_file() and (d / "diffusers" / "diffusion_pytorch_model.safetensors").is_file()
    ae = DiffusersAutoencoderKL.from_pretrained(str(d / "diffusers")).eval()
    x = images(model.image_shape)
    with torch.no_grad():
        torch.testing.assert_close(ae(x).sample, vaegan.VAE.from_pretrained(d).reconstruct(x), rtol=1e-5, atol=1e-5)
    assert ae.config.scaling_factor == 1.0  # never estimated: diffusers needs a number


def test_without_diffusers_the_error_says_how_to_install_it_and_vaegan_files_are_still_written(
        tmp_path, monkeypatch, tiny, caplog, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the package were not installed: import fails
    d = ours("f1").save_pretrained(tmp_path / "m")
    assert (d / "model.safetensors").is_file() and not (d / "diffusers").exists()
    assert any("pip install 'vaegan[diffusers]'" in r.getMessage() for r in caplog.records)
    with pytest.raises(PluginError, match=r"pip install 'vaegan\[diffusers\]'"):
        vaegan.build_trainer(tiny("model.name=diffusers_vae", f"model.options.pretrained={tmp_path}"))
    from vaegan.cli import main

    assert main(["train", str(Path(__file__).parents[1] / "recipes" / "configs" / "sd_vae_finetune.yaml"),
                 "--data-dir", str(tmp_path), "losses=[{name: l1}]"]) == 2  # (LPIPS has no weights offline)
    err = capsys.readouterr().err
    assert err.startswith("vaegan: error: ") and err.count("\n") == 1 and "vaegan[diffusers]" in err


def test_a_folder_that_is_not_a_diffusers_vae_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(PluginError) as info:
        vaegan.build_trainer(tiny("model.name=diffusers_vae", f"model.options.pretrained={tmp_path / 'nowhere'}"))
    assert "nowhere" in str(info.value) and "diffusion_pytorch_model.safetensors" in str(info.value)
    with pytest.raises(ConfigError, match="pretrained"):
        vaegan.build_trainer(tiny("model.name=diffusers_vae"))


DECODER_ONLY = ("model.name=diffusers_vae", "model.output_range=symmetric", "losses=[{name: l1}, {name: kl, weight: 1.0e-6}]",
                "adversarial.fake=reconstruction", "train.max_steps=3", "train.checkpoint_every=3")


def _split(state, prefixes=("encoder.", "quant_conv.")):
    frozen = {k: v for k, v in state.items() if k.startswith(prefixes)}
    return frozen, {k: v for k, v in state.items() if k not in frozen}


def test_decoder_only_fine_tuning_leaves_the_encoder_bit_equal_everywhere(tiny):
    folder = Path(tiny_diffusers_folder(1))
    original = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    trainer = vaegan.build_trainer(tiny(*DECODER_ONLY, f"model.options={{pretrained: {folder}, trainable: decoder}}"))
    step = trainer.train_step
    trained = {id(p) for g in step.generator.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in trainer.model.encoder.parameters())
    assert all(id(p) in trained for p in trainer.model.decoder.parameters())
    final = trainer.fit()
    out = Path(trainer.output_dir)
    saved = {
        "final (EMA)": load_file(str(final / "model.safetensors")),
        "final/raw": load_file(str(final / "raw" / "model.safetensors")),
        "final/diffusers": load_file(str(final / "diffusers" / "diffusion_pytorch_model.safetensors")),
        "checkpoint": {k[len("net."):]: v for k, v in load_file(str(out / "checkpoints" / "step_00000003" / "model.safetensors")).items()
                       if k.startswith("net.")},
    }
    before_frozen, before_decoder = _split(original)
    for where, state in saved.items():
        frozen, decoder = _split(state)
        assert frozen.keys() == before_frozen.keys(), where
        for key, value in frozen.items():
            assert torch.equal(value, before_frozen[key]), f"{where}: {key} moved"
        assert any(not torch.equal(v, before_decoder[k]) for k, v in decoder.items()), f"{where}: the decoder did not train"
    model = vaegan.VAE.from_pretrained(final)
    assert model.config.name == "autoencoder_kl" and model.config.options["trainable"] == "decoder"
    ae = DiffusersAutoencoderKL.from_pretrained(str(final / "diffusers")).eval()
    x = vaegan.data.first_batch(trainer.loader.dataset, 4)
    with torch.no_grad():
        torch.testing.assert_close(ae(x).sample, model.reconstruct(x), rtol=1e-5, atol=1e-5)


def test_full_fine_tuning_trains_the_encoder_too(tiny):
    folder = tiny_diffusers_folder(1)
    original = load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))
    final = vaegan.build_trainer(tiny(*DECODER_ONLY, f"model.options={{pretrained: {folder}, trainable: all}}")).fit()
    frozen, _ = _split(load_file(str(final / "raw" / "model.safetensors")))
    assert any(not torch.equal(v, original[k]) for k, v in frozen.items())


def test_the_scaling_factor_is_estimated_and_the_model_card_says_how_to_load_it(tiny):
    overrides = ("model.name=autoencoder_kl", "model.output_range=symmetric", "model.options={block_out_channels: "
                 "[8, 16], norm_num_groups: 4, layers_per_block: 1, latent_channels: 2}", "train.max_steps=2",
                 "train.estimate_scaling_factor=32", "eval.every=2", "eval.num_samples=16", "eval.nll_images=4",
                 "eval.nll_samples=2", "eval.lpips=false", "eval.limit=16")
    trainer = vaegan.build_trainer(tiny(*overrides))
    final = trainer.fit()
    config = json.loads((final / "config.json").read_text())
    model = vaegan.VAE.from_pretrained(final)
    stats = compute_latent_stats(model, trainer.loader.dataset, 32)  # train.estimate_scaling_factor's numbers
    expected, std = stats.scaling_factor, stats.std
    assert config["options"]["scaling_factor"] == pytest.approx(expected, rel=1e-9) and std > 0
    assert config["options"]["shift_factor"] == pytest.approx(stats.shift_factor, rel=1e-9)
    # The sample-based estimate of old agrees to the noise of its draws.
    assert vaegan.export.estimate_scaling_factor(model, trainer.loader.dataset, 32)[0] == pytest.approx(expected, rel=0.02)
    assert json.loads((final / "diffusers" / "config.json").read_text())["scaling_factor"] == pytest.approx(expected)
    card = (final / "README.md").read_text()
    assert "`autoencoder_kl` generator" in card and "1 / std of posterior samples of 32 training images" in card
    assert "VAE.from_pretrained" in card and "AutoencoderKL.from_pretrained" in card and "psnr" in card



@pytest.mark.parametrize("shift", [None, 0.0609])
def test_the_model_card_normalises_latents_as_pipelines_do(tiny, tmp_path, shift):
    """SD3/Flux-style VAEs have a shift: the card's diffusers line must subtract it before scaling."""
    cfg = tiny("model.name=autoencoder_kl", "model.output_range=symmetric",
               "model.options={block_out_channels: [8, 16], norm_num_groups: 4, layers_per_block: 1, "
               f"latent_channels: 2, scaling_factor: 1.5305, shift_factor: {'null' if shift is None else shift}}}")
    model = vaegan.build_generator(cfg.model)
    model.save_pretrained(tmp_path)
    card = vaegan.export.write_model_card(tmp_path, cfg, model, steps=1, images_seen=8).read_text()
    line = next(ln for ln in card.splitlines() if ln.startswith("latents = "))
    if shift is None:
        assert line.startswith("latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor")
    else:
        assert line.startswith("latents = (vae.encode(x).latent_dist.sample() - vae.config.shift_factor) * "
                               "vae.config.scaling_factor") and "shift 0.0609" in line


def test_a_generator_without_a_scaling_option_records_the_estimate_in_the_card(tiny, caplog):
    final = vaegan.build_trainer(tiny("train.max_steps=1", "train.estimate_scaling_factor=16")).fit()
    assert "scaling_factor" not in json.loads((final / "config.json").read_text())["options"]
    assert "recorded here only" in (final / "README.md").read_text()
    assert "AutoencoderKL" not in (final / "README.md").read_text()


@pytest.mark.slow
def test_exact_resume(tmp_path):
    common = ("model.name=autoencoder_kl", "model.output_range=symmetric", "model.options={block_out_channels: [8, 16], "
              "norm_num_groups: 4, layers_per_block: 1, latent_channels: 2}", "adversarial.fake=reconstruction",
              "losses=[{name: l1}, {name: kl, weight: 1.0e-6}]", "adversarial.adaptive=true", "train.epochs=2",
              "train.checkpoint_every=3")
    assert_resume_is_exact(tmp_path, common, stop_at=3)


def test_tiny_config_digits_fit_the_tiny_diffusers_folder():
    """The 1-channel 28x28 digits of the tiny config are what the session's diffusers folder takes."""
    cfg = tiny_config(Path("unused"), "model.name=diffusers_vae", f"model.options.pretrained={tiny_diffusers_folder(1)}")
    assert vaegan.build_generator(cfg.model).latent_shape == (3, 14, 14)
