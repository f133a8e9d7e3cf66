"""The single-file LDM layout (vaegan_plugins.ldm_checkpoint), against real files and the real diffusers package:
key-by-key round trip for 4- and 16-channel VAEs, diffusers' own ``from_single_file`` reading the exported file,
the ``ldm_vae`` generator as a training start, and files of other layouts refused in one paragraph."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import load_file, save_file
from vaegan_plugins.autoencoder_kl import AutoencoderKL
from vaegan_plugins.ldm_checkpoint import (LAYOUTS, LDM_DIR, LDM_FILE, ldm_state_dict, pretrained_ldm_vae, read_ldm,
                                           save_ldm)

import vaegan
from vaegan.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (3, 16, 16)
# SD-style (4 channels, quant convs) and SD3/Flux-style (16 channels, none), three levels (f = 4).
STYLES = {
    "sd-4ch": {"latent_channels": 4},
    "flux-16ch": {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False},
}


def model(style: str, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(SHAPE, "symmetric", block_out_channels=[8, 16, 16], layers_per_block=1, norm_num_groups=4,
                         scaling_factor=0.5, shift_factor=0.1, **STYLES[style]).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("style", list(STYLES))
def test_every_key_round_trips_and_has_the_ldm_name_and_shape(style, tmp_path):
    ae = model(style)
    path = save_ldm(ae, tmp_path / "vae.safetensors")
    file = load_file(str(path))
    c = ae.latent_shape[0]
    # The names ComfyUI / A1111 look for, in the LDM's order: decoder.up.0 is the highest resolution.
    assert file["encoder.down.0.block.0.norm1.weight"].shape == (8,)
    assert file["encoder.down.1.block.0.nin_shortcut.weight"].shape == (16, 8, 1, 1)
    assert "encoder.down.2.downsample.conv.weight" not in file and "encoder.down.1.downsample.conv.weight" in file
    assert file["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)  # a 1x1 conv, not a Linear
    assert file["decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    assert file["encoder.norm_out.weight"].shape == (16,) and file["encoder.conv_out.weight"].shape[0] == 2 * c
    assert "decoder.up.2.upsample.conv.weight" in file and "decoder.up.0.upsample.conv.weight" not in file
    assert file["decoder.up.0.block.0.nin_shortcut.weight"].shape == (8, 16, 1, 1)  # 16 -> 8 at full resolution
    assert ("quant_conv.weight" in file) == ("post_quant_conv.weight" in file) == (style == "sd-4ch")
    # Key by key: the same values as the model's own parameters, and nothing else.
    expected = ldm_state_dict(ae)
    assert file.keys() == expected.keys() and len(file) == len(ae.state_dict())
    for key, value in expected.items():
        assert torch.equal(file[key], value), key
    back = pretrained_ldm_vae(SHAPE, pretrained=str(path), trainable="all")
    assert back.config.name == "autoencoder_kl" and back.config.options == ae.config.options
    for key, value in ae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    torch.testing.assert_close(back.reconstruct(images()), ae.reconstruct(images()), rtol=0, atol=0)


@pytest.mark.parametrize("style", list(STYLES))
def test_diffusers_from_single_file_reads_the_exported_file_offline_and_reconstructs_as_vaegan(style, tmp_path):
    final = model(style).save_pretrained(tmp_path / "final")  # what a run leaves in final/
    path = final / LDM_DIR / LDM_FILE
    assert path.is_file() and (final / "diffusers" / "config.json").is_file()
    ae = DiffusersAutoencoderKL.from_single_file(str(path), config=str(final / "diffusers"), local_files_only=True)
    ours = vaegan.VAE.from_pretrained(final)
    for key, value in ours.state_dict().items():  # diffusers' own conversion gives back the same tensors
        assert torch.equal(ae.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(ae.eval()(images()).sample, ours.reconstruct(images()), rtol=1e-5, atol=1e-5)
    assert ae.config.latent_channels == ours.latent_shape[0] and ae.config.scaling_factor == 0.5


def test_the_vae_inside_a_whole_sd_checkpoint_is_read_and_the_file_metadata_restores_the_groups(tmp_path):
    ae = model("sd-4ch")
    whole = {f"first_stage_model.{k}": v for k, v in ldm_state_dict(ae).items()}
    whole["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 2)  # the UNet's keys are ignored
    save_file(whole, str(tmp_path / "sd.safetensors"))
    back = pretrained_ldm_vae(SHAPE, pretrained=str(tmp_path / "sd.safetensors"), norm_num_groups=4)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ae.state_dict().items())
    assert back.config.options["trainable"] == "decoder" and back.config.options["scaling_factor"] is None
    # vaegan's own file keeps what no shape tells (the groups) and the normalisation; an option overrides it.
    state, meta = read_ldm(save_ldm(ae, tmp_path / "vae.safetensors"))
    assert meta["norm_num_groups"] == 4 and meta["shift_factor"] == 0.1
    assert pretrained_ldm_vae(SHAPE, pretrained=str(tmp_path / "vae.safetensors"),
                              scaling_factor=0.25).config.options["scaling_factor"] == 0.25


def _diffusers_layout(path, tmp_path):
    from vaegan_plugins.diffusers_io import save_diffusers

    folder = save_diffusers(model("sd-4ch"), tmp_path / "d")
    (folder / "diffusion_pytorch_model.safetensors").rename(path)


def _random_keys(path, tmp_path):
    save_file({"layer.weight": torch.ones(3), "other": torch.zeros(2)}, str(path))


def _truncated(path, tmp_path):
    save_ldm(model("sd-4ch"), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _non_finite(path, tmp_path):
    state = ldm_state_dict(model("sd-4ch"))
    state["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(path))


@pytest.mark.parametrize("make, words", [
    (_diffusers_layout, "diffusers AutoencoderKL state dict"),
    (_random_keys, "it holds layer.weight, other"),
    (_truncated, "not a readable safetensors file"),
    (_non_finite, "1 of the 216 values of 'decoder.conv_out.weight'"),
], ids=["diffusers-state-dict", "random-keys", "truncated", "non-finite"])
def test_a_file_of_another_layout_is_one_paragraph_naming_the_layouts_understood(make, words, tmp_path):
    path = tmp_path / "vae.safetensors"
    make(path, tmp_path)
    with pytest.raises(CheckpointError) as info:
        pretrained_ldm_vae(SHAPE, pretrained=str(path))
    message = str(info.value)
    assert words in message and LAYOUTS in message and "diffusers_vae" in message and "\n" not in message


def test_a_pickle_checkpoint_and_a_preset_or_option_that_contradicts_the_file_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="only .safetensors files are read"):
        pretrained_ldm_vae(SHAPE, pretrained=str(tmp_path / "vae.ckpt"))
    path = str(save_ldm(model("flux-16ch"), tmp_path / "vae.safetensors"))
    with pytest.raises(ConfigError, match=r"latent_channels = 16 \(the preset sd says 4\)"):
        pretrained_ldm_vae(SHAPE, pretrained=path, preset="sd")
    with pytest.raises(ConfigError, match=r"has block_out_channels = \[8, 16, 16\] \(the option says \[8, 16\]\)"):
        pretrained_ldm_vae(SHAPE, pretrained=path, block_out_channels=[8, 16])
    with pytest.raises(ConfigError, match="presets are sd, sdxl, sd3, flux"):
        pretrained_ldm_vae(SHAPE, pretrained=path, preset="sd15")
    with pytest.raises(ConfigError, match="was made for 3-channel images"):
        pretrained_ldm_vae((1, 16, 16), pretrained=path)
    with pytest.raises(ConfigError, match="divisible by norm_num_groups"):
        pretrained_ldm_vae(SHAPE, pretrained=path, norm_num_groups=3)


def test_training_starts_from_the_single_file_and_its_final_folder_holds_one_again(tmp_path):
    torch.manual_seed(0)
    start = AutoencoderKL((1, 28, 28), "symmetric", block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
                          norm_num_groups=4)
    path = save_ldm(start, tmp_path / "start.safetensors")
    cfg = tiny_config(tmp_path / "run", "model.name=ldm_vae", "model.output_range=symmetric",
                      f"model.options={{pretrained: {path}}}", "losses=[{name: l1}, {name: kl, weight: 1.0e-6}]",
                      "adversarial.fake=reconstruction", "train.max_steps=2", "train.checkpoint_every=2")
    trainer = vaegan.build_trainer(cfg)
    for key, value in start.state_dict().items():  # the run starts from the file's weights
        assert torch.equal(trainer.model.state_dict()[key].cpu(), value), key
    final = trainer.fit()
    saved = json.loads((final / "config.json").read_text())
    assert saved["name"] == "autoencoder_kl" and saved["options"]["trainable"] == "decoder"
    trained = load_file(str(final / LDM_DIR / LDM_FILE))
    assert all(torch.equal(trained[k], v) for k, v in ldm_state_dict(start).items() if k.startswith("encoder."))
    assert any(not torch.equal(trained[k], v) for k, v in ldm_state_dict(start).items() if k.startswith("decoder."))
