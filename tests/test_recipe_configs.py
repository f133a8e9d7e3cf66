"""The YAML configs shipped under recipes/configs: each one loads and builds, two of them train, and
the resolved config of a run is saved next to every checkpoint and in final/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MNIST_ROOT
from PIL import Image
from plugin_options import options_for, tiny_diffusers_folder

import vaegan
from vaegan.cli import main
from vaegan.objective import Objective

CONFIGS = sorted((Path(__file__).parents[1] / "recipes" / "configs").glob("*.yaml"))


def test_the_expected_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"vaegan_mnist.yaml", "plain_vae_mnist.yaml", "rgb_folder_32.yaml",
                                         "rgb_folder_64.yaml", "ldm_kl_f4.yaml", "sd_vae_finetune.yaml"}


def offline(cfg: vaegan.ExperimentConfig) -> vaegan.ExperimentConfig:
    """What these machines lack, supplied as a user without a network would: LPIPS with an untrained
    backbone (the test options), and a local diffusers folder for diffusers_vae."""
    overrides = [f"losses.{i}.options.{k}={v}" for i, t in enumerate(cfg.losses)
                 for k, v in options_for("vaegan.losses", t.name).items()]
    if cfg.model.name == "diffusers_vae":
        overrides.append(f"model.options.pretrained={tiny_diffusers_folder(cfg.model.image_channels)}")
    return vaegan.apply_overrides(cfg, overrides)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_builds(path):
    """Every plugin it names resolves, its options are accepted, and the model fits the image size."""
    cfg = offline(vaegan.load_config(path))
    model = vaegan.build_generator(cfg.model)
    disc = vaegan.build_discriminator(cfg)
    objective = Objective.from_config(cfg)
    x = torch.rand(2, *cfg.model.image_shape) * (model.value_range[1] - model.value_range[0]) + model.value_range[0]
    with torch.no_grad():
        out = model(x)
        assert out.recon.shape == x.shape
        if disc is not None:
            assert disc(out.recon).logits.shape[0] == 2
    assert objective.needs_discriminator == (disc is not None)


def _colour_digits(folder: Path, n: int) -> None:
    """Real digits from the fixtures, tinted with seeded random colours, as RGB PNG files."""
    from torchvision.datasets import MNIST

    digits = MNIST(root=str(MNIST_ROOT), train=True, download=False).data[:n]  # (n, 28, 28) uint8
    colours = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    rgb = (digits[:, None].float() * (0.3 + 0.7 * colours)).round().to(torch.uint8)  # (n, 3, 28, 28)
    folder.mkdir(parents=True)
    for i, img in enumerate(rgb):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"digit_{i:03d}.png")


def test_plain_vae_config_trains(tmp_path):
    out = tmp_path / "plain"
    rc = main(["train", str(CONFIGS[0].parent / "plain_vae_mnist.yaml"), "--data-dir", str(MNIST_ROOT),
               "--output-dir", str(out), "--max-steps", "2", "--batch-size", "8", "data.download=false",
               "data.limit=32", "train.log_every=1"])
    assert rc == 0
    cfg = vaegan.load_config(out / "config.yaml")
    assert cfg.discriminator is None and cfg.adversarial is None
    assert [t.name for t in cfg.losses] == ["mse", "kl"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"g/mse", "g/kl"} <= set(rows[-1]) and not any(k.startswith("d/") or k == "lr/d" for k in rows[-1])
    assert vaegan.VAE.from_pretrained(out / "final").sample(2).shape == (2, 1, 28, 28)


@pytest.mark.slow
def test_rgb_folder_config_trains_and_saves_its_config_everywhere(tmp_path):
    images = tmp_path / "images"
    _colour_digits(images / "train", 16)
    out = tmp_path / "rgb"
    rc = main(["train", str(CONFIGS[0].parent / "rgb_folder_32.yaml"), "--data-dir", str(images),
               "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--checkpoint-every", "1",
               "data.num_workers=0", "train.num_samples=4", "train.checkpoints_total_limit=2",
               "sampler.options.n_components=4"])  # 16 images: the recipe's 50 components would be refused
    assert rc == 0
    cfg = vaegan.load_config(out / "config.yaml")
    assert cfg.model.image_shape == (3, 32, 32) and cfg.data.name == "image_folder"
    saved = [out / "config.yaml", out / "final" / "training_config.yaml",
             out / "checkpoints" / "step_00000001" / "config.yaml", out / "checkpoints" / "step_00000002" / "config.yaml"]
    for path in saved:  # the resolved config (flags and overrides applied), reloadable as it was
        assert vaegan.load_config(path) == cfg, path
    model = vaegan.VAE.from_pretrained(out / "final")
    assert (out / "final" / "samplers" / "gmm" / "sampler.json").is_file()  # fitted to the folder's images
    samples = model.sample(2)
    assert samples.shape == (2, 3, 32, 32) and samples.min() >= -1 and samples.max() <= 1


def _readme_train_commands():
    """Each `vaegan train recipes/configs/X.yaml ... KEY=VALUE` command of the README's code blocks (continued
    lines joined), as (config path, overrides)."""
    import re
    import shlex

    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        for part in line.split("vaegan train ")[1:]:
            words = shlex.split(part.split("#")[0])
            if words and words[0].startswith("recipes/configs/"):
                commands.append((words[0], [w for w in words[1:] if "=" in w and not w.startswith("-")]))
    return commands


def test_the_readme_train_commands_are_found():
    """The parametrisation below would pass on an empty list: the README's commands, the offline one included."""
    commands = _readme_train_commands()
    assert len(commands) >= 4 and ("recipes/configs/ldm_kl_f4.yaml", ["losses.1.options.net=vgg_st"]) in commands


@pytest.mark.slow  # builds each recipe's LPIPS networks (about 1 s each)
@pytest.mark.parametrize("config, overrides", _readme_train_commands())
def test_every_train_command_of_the_readme_loads_and_builds(config, overrides):
    """The README's commands name keys and plugins that exist (its offline ST-LPIPS variant included)."""
    overrides = [o for o in overrides if "path/to" not in o]  # a placeholder the user fills in
    cfg = vaegan.load_config(Path(__file__).parents[1] / config, overrides)
    if any("vgg_st" in o for o in overrides):
        Objective.from_config(cfg)  # offline as it stands: the shift-tolerant weights ship in a wheel
    else:
        Objective.from_config(offline(cfg))
