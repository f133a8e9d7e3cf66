"""The ``vaegan`` command end to end: train (console script), sample, reconstruct, interpolate, plugins.

One tiny model is trained once for the module through the installed console script; the other
commands run through ``vaegan.cli.main`` (the console script's entry point) in this process.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_ROOT, TINY, tiny_generator
from PIL import Image

import vaegan
from vaegan import commands
from vaegan.cli import main
from vaegan.images import to_uint8
from vaegan.previews import LABEL_HEIGHT

ROOT = Path(__file__).parents[1]
VAEGAN = [shutil.which("vaegan")] if shutil.which("vaegan") else [sys.executable, "-m", "vaegan.cli"]
COMMANDS = ["train", "sample", "reconstruct", "interpolate", "plugins"]
PAD = 2  # torchvision.utils.make_grid's default padding, used for every .png grid


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny MNIST VAE-GAN trained with `vaegan train` (EMA on, so final/ and final/raw differ)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = subprocess.run(
        [*VAEGAN, "train", str(ROOT / "recipes" / "configs" / "vaegan_mnist.yaml"), "--data-dir", str(MNIST_ROOT),
         "--output-dir", str(out), "--max-steps", "4", "train.ema_decay=0.5", *TINY, "data.download=false",
         "train.plot_loss_curves=true"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def test_digits() -> torch.Tensor:
    from torchvision.datasets import MNIST

    return MNIST(root=str(MNIST_ROOT), train=False, download=False).data  # (128, 28, 28) uint8


def _npz(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _grid_shape(n: int, nrow: int, h: int = 28, w: int = 28):
    rows = math.ceil(n / nrow)
    return rows * (h + PAD) + PAD, nrow * (w + PAD) + PAD


def _cell(grid: np.ndarray, index: int, nrow: int, h: int = 28, w: int = 28) -> np.ndarray:
    r, c = divmod(index, nrow)
    top, left = PAD + r * (h + PAD), PAD + c * (w + PAD)
    return grid[top:top + h, left:left + w, 0]  # grayscale grids repeat the channel


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaegan: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- help ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_what_each_command_does_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "Example:" in text and f"vaegan {command}" in text.split("Example:")[1]
    assert "--model" in text if command in ("sample", "reconstruct", "interpolate") else True
    if command == "train":  # its config is the positional CONFIG.yaml: --config (the recipe's) is not offered too
        assert "CONFIG.yaml" in text and "--config" not in text


# Imported by `import vaegan` or `vaegan --help` they cost seconds (torch alone about 1.2 s here): only the
# commands that compute import them (docs/benchmarks.md, "Start-up").
HEAVY = ("torch", "torchvision", "torchmetrics", "accelerate", "lpips", "wandb", "sklearn", "scipy", "matplotlib",
         "diffusers", "PIL", "numpy", "safetensors", "einops", "tqdm")


@pytest.mark.parametrize("code", [
    "import vaegan; vaegan.ExperimentConfig(); vaegan.load_config",
    "import sys, runpy; sys.argv = ['vaegan', '--help']\ntry: runpy.run_module('vaegan.cli', run_name='__main__')\n"
    "except SystemExit: pass",
    "import sys, runpy; sys.argv = ['vaegan', 'train', '--help']\ntry: runpy.run_module('vaegan.cli', "
    "run_name='__main__')\nexcept SystemExit: pass",
], ids=["import vaegan", "vaegan --help", "vaegan train --help"])
def test_import_and_help_load_no_heavy_module(code):
    probe = f"{code}\nimport sys\nprint('MODULES', sorted({{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out.split("MODULES ", 1)[1]))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_lazy_names_resolve_to_their_modules_and_typos_still_fail():
    from vaegan.trainer import Trainer

    assert vaegan.Trainer is Trainer and "Trainer" in dir(vaegan) and vaegan.metrics.__name__ == "vaegan.metrics"
    assert all(getattr(vaegan, name) is not None for name in vaegan.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'Trainr'"):
        vaegan.Trainr


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in COMMANDS)


# ---- sample -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sample_npz_and_png_hold_the_same_pixels(run_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(run_dir), "--num", "10", "--seed", "3", "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["sample", "--model", str(run_dir), "--num", "10", "--seed", "3", "--batch-size", "3",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert "wrote 10 samples" in capsys.readouterr().out
    images = _npz(tmp_path / "s.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28)
    expected = commands.sample(commands.load_model(run_dir), 10, seed=3)  # the Python API, EMA weights
    np.testing.assert_array_equal(images, expected.numpy())
    captioned = _png(tmp_path / "s.png")
    band, grid = captioned[:LABEL_HEIGHT], captioned[LABEL_HEIGHT:]  # "samples: N(0, I) prior" over the grid
    assert band.min() < 100 and band.max() == 255
    nrow = math.ceil(math.sqrt(10))
    assert grid.shape[:2] == _grid_shape(10, nrow)
    for i in range(10):  # batch size 3 drew the very same images
        np.testing.assert_array_equal(_cell(grid, i, nrow), images[i, 0])


@pytest.mark.slow
def test_reconstruct_png_holds_a_readable_grid_and_says_what_it_read(run_dir, tmp_path, capsys):
    from vaegan.cli_handlers import GRID_IMAGES

    out = tmp_path / "r.png"
    assert main(["reconstruct", "--model", str(run_dir), "--data-dir", str(MNIST_ROOT), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "reconstruct: " in captured.err and "of the test split of 'mnist'" in captured.err
    assert f"wrote {GRID_IMAGES} reconstructions" in captured.out and "--limit" in captured.out
    grid = _png(out)[LABEL_HEIGHT:]
    assert grid.shape[:2] == _grid_shape(2 * GRID_IMAGES, 16)  # input | reconstruction pairs, 8 per row


@pytest.mark.slow
def test_reconstruct_reads_the_data_as_the_model_was_trained(run_dir, tmp_path):
    """The training run's data.options (here MNIST's classes) are kept: the images are the trained kind."""
    import yaml
    from torchvision.datasets import MNIST

    model = tmp_path / "sevens"
    shutil.copytree(run_dir / "final", model)
    cfg_file = model / "training_config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["data"]["options"] = {"classes": [7]}
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["reconstruct", "--model", str(model), "--data-dir", str(MNIST_ROOT), "--limit", "5",
                 "--out", str(tmp_path / "r.npz")]) == 0
    test = MNIST(root=str(MNIST_ROOT), train=False, download=False)
    sevens = test.data[test.targets == 7][:5].numpy()  # (5, 28, 28)
    np.testing.assert_array_equal(_npz(tmp_path / "r.npz")["inputs"][:, 0], sevens)


def test_fit_sampler_help_gives_the_split_it_fits():
    from vaegan.cli import _parser

    fit = _parser().parse_args(["fit-sampler", "--model", "m", "--sampler", "gmm"])
    assert fit.split == "train"
    sub = next(a for a in _parser()._actions if a.dest == "command").choices
    assert "default: train" in sub["fit-sampler"].format_help() and "default: test" in sub["encode"].format_help()


@pytest.mark.slow
def test_sample_seed_temperature_and_raw_weights(run_dir, tmp_path):
    def draw(*flags) -> np.ndarray:
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.npz"
        assert main(["sample", "--model", str(run_dir / "final"), "--num", "4", "--out", str(out), *flags]) == 0
        return _npz(out)["images"]

    base = draw("--seed", "0")
    assert not np.array_equal(base, draw("--seed", "1"))
    cold = draw("--temperature", "0")  # every latent is the prior mean: identical images
    assert all(np.array_equal(cold[0], img) for img in cold)
    raw = draw("--seed", "0", "--raw")
    assert not np.array_equal(base, raw)
    np.testing.assert_array_equal(raw, commands.sample(vaegan.VAE.from_pretrained(run_dir / "final" / "raw"), 4).numpy())


# ---- reconstruct --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_reconstruct_mnist_test_split_in_dataset_order(run_dir, tmp_path, test_digits):
    out = tmp_path / "r.npz"
    assert main(["reconstruct", "--model", str(run_dir), "--data-dir", str(MNIST_ROOT), "--split", "test",
                 "--limit", "20", "--batch-size", "7", "--out", str(out)]) == 0
    data = _npz(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(data["inputs"][:, 0], test_digits[:20].numpy())  # the split, in order
    model = commands.load_model(run_dir)
    expected = to_uint8(model.reconstruct(test_digits[:20, None].float() / 255), model.value_range)
    np.testing.assert_array_equal(data["images"], expected.numpy())


@pytest.mark.slow
def test_reconstruct_reads_any_dataset_plugin(run_dir, tmp_path, test_digits):
    """The same digits as PNG files through the image_folder plugin give the same reconstructions."""
    folder = tmp_path / "digits" / "test"
    folder.mkdir(parents=True)
    for i, digit in enumerate(test_digits[:12]):
        Image.fromarray(digit.numpy()).save(folder / f"{i:03d}.png")
    argv = ["reconstruct", "--model", str(run_dir), "--split", "test", "--limit", "12"]
    assert main([*argv, "--dataset", "image_folder", "--data-dir", str(tmp_path / "digits"),
                 "--out", str(tmp_path / "folder.npz")]) == 0
    assert main([*argv, "--data-dir", str(MNIST_ROOT), "--out", str(tmp_path / "mnist.npz")]) == 0  # trained on mnist
    folder_run, mnist_run = _npz(tmp_path / "folder.npz"), _npz(tmp_path / "mnist.npz")
    np.testing.assert_array_equal(folder_run["inputs"], mnist_run["inputs"])
    np.testing.assert_array_equal(folder_run["images"], mnist_run["images"])


@pytest.mark.slow
def test_reconstruct_png_shows_input_reconstruction_pairs(run_dir, tmp_path):
    assert main(["reconstruct", "--model", str(run_dir), "--data-dir", str(MNIST_ROOT), "--limit", "10",
                 "--out", str(tmp_path / "r.png")]) == 0
    assert main(["reconstruct", "--model", str(run_dir), "--data-dir", str(MNIST_ROOT), "--limit", "10",
                 "--out", str(tmp_path / "r.npz")]) == 0
    labelled, data = _png(tmp_path / "r.png"), _npz(tmp_path / "r.npz")
    band, grid = labelled[:LABEL_HEIGHT], labelled[LABEL_HEIGHT:]  # "real", "recon" over the columns
    assert grid.shape[:2] == _grid_shape(20, 16) and band.min() < 100 and band.max() == 255
    for column in range(2):  # text over each of the first two columns
        assert band[:, PAD + column * 30:(column + 1) * 30].min() < 100
    for i in range(10):
        np.testing.assert_array_equal(_cell(grid, 2 * i, 16), data["inputs"][i, 0])
        np.testing.assert_array_equal(_cell(grid, 2 * i + 1, 16), data["images"][i, 0])


# ---- interpolate -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_interpolate_between_random_latents(run_dir, tmp_path):
    assert main(["interpolate", "--model", str(run_dir), "--num-pairs", "3", "--steps", "5", "--seed", "2",
                 "--out", str(tmp_path / "i.npz")]) == 0
    assert main(["interpolate", "--model", str(run_dir), "--num-pairs", "3", "--steps", "5", "--seed", "2",
                 "--out", str(tmp_path / "i.png")]) == 0
    strips = _npz(tmp_path / "i.npz")["images"]
    assert strips.dtype == np.uint8 and strips.shape == (3, 5, 1, 28, 28)
    grid = _png(tmp_path / "i.png")
    assert grid.shape[:2] == _grid_shape(15, 5)  # one strip per row
    np.testing.assert_array_equal(_cell(grid, 5 + 4, 5), strips[1, 4, 0])


@pytest.mark.slow
def test_interpolate_between_given_dataset_images(run_dir, tmp_path, test_digits):
    argv = ["interpolate", "--model", str(run_dir), "--data-dir", str(MNIST_ROOT), "--indices", "0", "7", "3", "5",
            "--steps", "6"]
    assert main([*argv, "--out", str(tmp_path / "i.npz")]) == 0
    assert main([*argv, "--out", str(tmp_path / "i.png")]) == 0
    data = _npz(tmp_path / "i.npz")
    assert data["images"].shape == (2, 6, 1, 28, 28) and data["inputs"].shape == (2, 2, 1, 28, 28)
    np.testing.assert_array_equal(data["inputs"][:, :, 0], test_digits[torch.tensor([[0, 7], [3, 5]])].numpy())
    model = commands.load_model(run_dir)
    ends = to_uint8(model.reconstruct(test_digits[[0, 3, 7, 5], None].float() / 255), model.value_range)
    np.testing.assert_array_equal(data["images"][:, 0], ends[:2].numpy())  # t = 0: the first image's code
    np.testing.assert_array_equal(data["images"][:, -1], ends[2:].numpy())  # t = 1: the second's
    labelled = _png(tmp_path / "i.png")
    band, grid = labelled[:LABEL_HEIGHT], labelled[LABEL_HEIGHT:]  # "real" over the first and last columns
    assert grid.shape[:2] == _grid_shape(2 * 8, 8)  # real | 6 steps | real
    assert band[:, :30].min() < 100 and band[:, 7 * 30:].min() < 100 and band[:, 60:180].min() == 255
    np.testing.assert_array_equal(_cell(grid, 8 + 7, 8), test_digits[5].numpy())


# ---- plugins, train ----------------------------------------------------------------------------------------------
def test_plugins_still_lists_every_group(capsys):
    assert main(["plugins", "--no-check"]) == 0
    out = capsys.readouterr().out
    for group in vaegan.registry.GROUPS:
        assert all(name in out for name in vaegan.registry.available(group))


@pytest.mark.slow
def test_train_wrote_a_complete_run(run_dir):
    assert vaegan.load_config(run_dir / "config.yaml").train.max_steps == 4
    assert (run_dir / "loss_curves.png").is_file() and (run_dir / "final" / "raw" / "model.safetensors").is_file()
    assert {p.name for p in (run_dir / "samples").iterdir()} >= {
        "final_samples.png", "final_reconstructions.png", "final_interpolations.png"}


# ---- errors: one paragraph, exit status 2 --------------------------------------------------------------------------
def test_missing_model_dir(capsys, tmp_path):
    err = _error(capsys, ["sample", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.png")])
    assert "does not exist" in err and "output directory" in err
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["interpolate", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "i.png")])
    assert "holds no saved vaegan model" in err and "final" in err
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("command", ["sample", "reconstruct", "interpolate"])
def test_unknown_output_extension_is_refused_before_any_work(command, capsys, tmp_path):
    out = tmp_path / "result.jpg"
    extra = ["--data-dir", str(MNIST_ROOT)] if command == "reconstruct" else []
    err = _error(capsys, [command, "--model", str(tmp_path / "not-even-checked"), "--out", str(out), *extra])
    assert "'.jpg'" in err and ".png or .npz" in err
    assert not out.exists()


def test_raw_weights_of_a_model_without_ema(capsys, tmp_path):
    tiny_generator().save_pretrained(tmp_path / "m")
    assert main(["sample", "--model", str(tmp_path / "m"), "--num", "2", "--out", str(tmp_path / "ok.npz")]) == 0
    err = _error(capsys, ["sample", "--model", str(tmp_path / "m"), "--raw", "--out", str(tmp_path / "s.npz")])
    assert "Drop --raw" in err


@pytest.mark.slow
def test_data_errors_are_one_paragraph(run_dir, capsys, tmp_path):
    err = _error(capsys, ["reconstruct", "--model", str(run_dir), "--data-dir", str(tmp_path / "none"),
                          "--out", str(tmp_path / "r.npz")])
    assert "MNIST" in err and "--data-dir" in err
    err = _error(capsys, ["interpolate", "--model", str(run_dir), "--indices", "0", "1", "--out", str(tmp_path / "i.png")])
    assert "--data-dir" in err
    err = _error(capsys, ["interpolate", "--model", str(run_dir), "--data-dir", str(MNIST_ROOT), "--indices", "0",
                          "--out", str(tmp_path / "i.png")])
    assert "pairs" in err


def test_train_errors_are_one_paragraph(capsys, tmp_path):
    assert "needs a config file" in _error(capsys, ["train"])
    assert "does not exist" in _error(capsys, ["train", str(tmp_path / "missing.yaml")])


def test_train_the_mlp_generator_of_the_mnist_recipe_by_name(tmp_path, capsys):
    """`vaegan train recipes/configs/vaegan_mnist.yaml model.name=mlp`: the recipe's conv options do not
    follow the name, and KEY=VALUE overrides may sit on both sides of the flags."""
    out = tmp_path / "mlp"
    assert main(["train", str(ROOT / "recipes" / "configs" / "vaegan_mnist.yaml"), "model.name=mlp",
                 "model.options.hidden=[32]", "--data-dir", str(MNIST_ROOT), "--output-dir", str(out),
                 "--max-steps", "2", "data.limit=64", "data.download=false", "train.sample_every=0",
                 "train.plot_loss_curves=false", "discriminator.options={channels: [8, 16]}"]) == 0
    model = vaegan.VAE.from_pretrained(out / "final")
    assert type(model).__name__ == "MLPVAE" and model.config.name == "mlp"
    assert model.config.options["hidden"] == [32] and model.latent_shape == (16,)
    assert main(["sample", "--model", str(out), "--num", "4", "--out", str(tmp_path / "s.npz")]) == 0


@pytest.mark.slow  # a subprocess
def test_the_command_line_shows_a_plugins_deprecated_import(tmp_path):
    """Python hides DeprecationWarning outside __main__; vaegan's CLI shows its own, so a plugin author sees
    what the contract tests fail on (here a plugin module importing vaegan.model.VAE, vaegan 0.1's path)."""
    (tmp_path / "old_plugin.py").write_text("from vaegan.model import VAE\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from vaegan import cli; cli.show_deprecations()\n"
            "import old_plugin\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "vaegan.model.VAE is deprecated; import it from vaegan.api" in proc.stderr and "old_plugin.py" in proc.stderr


@pytest.mark.slow
def test_data_dir_defaults_to_the_data_the_model_was_trained_on(run_dir, tmp_path, capsys):
    assert main(["reconstruct", "--model", str(run_dir), "--limit", "3", "--out", str(tmp_path / "r.npz")]) == 0
    assert f"of the test split of 'mnist' in {MNIST_ROOT}" in capsys.readouterr().err
    bare = tmp_path / "bare"  # a model folder that says nothing of its data
    shutil.copytree(run_dir / "final", bare)
    (bare / "training_config.yaml").unlink()
    err = _error(capsys, ["encode", "--model", str(bare), "--out", str(tmp_path / "z.safetensors")])
    assert "does not say which data it was trained on" in err and "--data-dir" in err
