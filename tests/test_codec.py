"""The codec use of a trained VAE: `vaegan encode` (images -> a latents file) and `vaegan decode` (back).

Three models: the 2-step trained conv run of conftest (a vector latent), an untrained ``tiny_spatial`` and
an untrained tiny ``autoencoder_kl`` with ``scaling_factor`` set (spatial latents). Everything runs
through ``vaegan.cli.main`` in this process, on the first test digits of the committed MNIST fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_ROOT, tiny_generator
from safetensors import safe_open
from safetensors.torch import save_file

from vaegan import codec, commands
from vaegan.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is fastest

LIMIT = ["--data-dir", str(MNIST_ROOT), "--split", "test", "--limit", "12"]
SCALING = 0.5  # a power of two: scaling and unscaling are exact, so the images must be identical


@pytest.fixture(scope="module")
def models(saved_run, tmp_path_factory) -> dict:
    """name -> model folder: conv (vector latent (4,)), tiny_spatial (2, 7, 7), autoencoder_kl (2, 14, 14)."""
    root = tmp_path_factory.mktemp("codec")
    torch.manual_seed(0)
    tiny_generator("tiny_spatial").save_pretrained(root / "spatial")
    tiny_generator("autoencoder_kl", output_range="symmetric", scaling_factor=SCALING).save_pretrained(root / "kl")
    return {"conv": saved_run, "tiny_spatial": root / "spatial", "autoencoder_kl": root / "kl"}


def _npz(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["images"]


def _read(path: Path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _error(capsys, argv) -> str:
    capsys.readouterr()  # what earlier commands said ("encode: 12 images of the test split ...")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaegan: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_help_says_what_the_command_does_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "Example:" in text and f"vaegan {command}" in text.split("Example:")[1] and "--model" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert command in capsys.readouterr().out


@pytest.mark.parametrize("name", ["conv", "tiny_spatial", "autoencoder_kl"])
def test_encode_then_decode_equals_reconstruct_pixel_for_pixel(models, name, tmp_path, capsys):
    model_dir, z = models[name], tmp_path / "z.safetensors"
    assert main(["encode", "--model", str(model_dir), *LIMIT, "--batch-size", "5", "--out", str(z)]) == 0
    assert main(["decode", "--model", str(model_dir), "--latents", str(z), "--batch-size", "5",
                 "--out", str(tmp_path / "d.npz")]) == 0
    assert main(["reconstruct", "--model", str(model_dir), *LIMIT, "--batch-size", "5",
                 "--out", str(tmp_path / "r.npz")]) == 0
    decoded, recon = _npz(tmp_path / "d.npz"), _npz(tmp_path / "r.npz")
    assert decoded.dtype == np.uint8 and decoded.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(decoded, recon)

    tensors, meta = _read(z)
    model = commands.load_model(model_dir)
    shape = (12, *model.latent_shape)
    assert tensors["latents"].shape == shape and tensors["latents"].dtype == torch.float32
    assert tensors["logvar"].shape == shape and tensors["logvar"].dtype == torch.float32
    assert meta["model"] == str(commands.resolve_model_dir(model_dir).resolve())
    assert meta["generator"] == name and json.loads(meta["latent_shape"]) == list(model.latent_shape)
    assert (meta["scaled"], meta["split"], meta["count"], meta["posterior"]) == ("false", "test", "12", "mean")
    assert f"wrote 12 latents {model.latent_shape}" in capsys.readouterr().out


def test_decode_png_is_a_grid_of_the_same_pixels(models, tmp_path):
    from PIL import Image

    z = tmp_path / "z.safetensors"
    assert main(["encode", "--model", str(models["tiny_spatial"]), *LIMIT, "--out", str(z)]) == 0
    for out in ("d.npz", "d.png"):
        assert main(["decode", "--model", str(models["tiny_spatial"]), "--latents", str(z), "--out",
                     str(tmp_path / out)]) == 0
    images = _npz(tmp_path / "d.npz")
    with Image.open(tmp_path / "d.png") as img:
        grid = np.asarray(img.convert("L"))
    pad, nrow = 2, 4  # make_grid's padding; ceil(sqrt(12)) images per row
    for i in range(12):
        r, c = divmod(i, nrow)
        top, left = pad + r * 30, pad + c * 30
        np.testing.assert_array_equal(grid[top:top + 28, left:left + 28], images[i, 0])


def test_a_png_holds_a_readable_grid_unless_num_asks_and_encode_names_its_split(models, tmp_path, capsys):
    from PIL import Image

    from vaegan.cli_handlers import GRID_IMAGES

    z = tmp_path / "z.safetensors"
    many = ["--data-dir", str(MNIST_ROOT), "--split", "test", "--limit", str(GRID_IMAGES + 6)]
    assert main(["encode", "--model", str(models["tiny_spatial"]), *many, "--out", str(z)]) == 0
    err = capsys.readouterr().err
    assert f"encode: {GRID_IMAGES + 6} images of the test split of 'mnist'" in err and "--split train" in err

    def decoded(out: str, *flags) -> str:
        assert main(["decode", "--model", str(models["tiny_spatial"]), "--latents", str(z), "--out",
                     str(tmp_path / out), *flags]) == 0
        return capsys.readouterr().out

    said = decoded("all.png")  # 70 latents: the grid holds the first 64 and says so
    assert f"wrote {GRID_IMAGES} of the {GRID_IMAGES + 6} images" in said and "--num" in said
    with Image.open(tmp_path / "all.png") as img:
        assert img.size == (8 * 30 + 2, 8 * 30 + 2)  # 8 x 8 cells of 28 px and make_grid's padding
    assert "wrote 3 of the 70 images" in decoded("three.png", "--num", "3")
    assert "wrote 70 images" in decoded("all.npz")  # an array takes every latent
    assert _npz(tmp_path / "all.npz").shape[0] == GRID_IMAGES + 6


def test_sample_is_seeded_and_independent_of_the_batch_size(models, tmp_path):
    def encode(*flags) -> dict:
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.safetensors"
        assert main(["encode", "--model", str(models["tiny_spatial"]), *LIMIT, "--out", str(out), *flags]) == 0
        return _read(out)

    (a, meta), (b, _), (c, _), (mean, _) = (encode("--sample", "--seed", "3", "--batch-size", "4"),
                                             encode("--sample", "--seed", "3", "--batch-size", "12"),
                                             encode("--sample", "--seed", "4"), encode())
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["logvar"], b["logvar"])
    assert not torch.equal(a["latents"], c["latents"]) and not torch.equal(a["latents"], mean["latents"])
    assert torch.equal(a["logvar"], mean["logvar"])  # the posterior's, whatever was drawn from it
    eps = (a["latents"] - mean["latents"]) / torch.exp(0.5 * mean["logvar"])
    assert abs(float(eps.mean())) < 0.2 and 0.8 < float(eps.std()) < 1.2  # N(0, I) noise
    assert (meta["posterior"], meta["seed"]) == ("sample", "3")


def test_scaled_latents_decode_to_the_same_images(models, tmp_path, capsys):
    kl, plain, scaled = models["autoencoder_kl"], tmp_path / "plain.safetensors", tmp_path / "scaled.safetensors"
    assert main(["encode", "--model", str(kl), *LIMIT, "--out", str(plain)]) == 0
    assert main(["encode", "--model", str(kl), *LIMIT, "--scaled", "--out", str(scaled)]) == 0
    (p, _), (s, meta) = _read(plain), _read(scaled)
    assert torch.equal(s["latents"], p["latents"] * SCALING)
    torch.testing.assert_close(s["logvar"], p["logvar"] + 2 * np.log(SCALING))
    assert meta["scaled"] == "true" and float(meta["scaling_factor"]) == SCALING and meta["shift_factor"] == "0.0"
    bare = tmp_path / "bare.safetensors"  # the scaled latents without vaegan's metadata: --unscale says what they are
    save_file({"latents": s["latents"]}, str(bare))
    for name, latents, flags in (("plain", plain, []), ("scaled", scaled, []), ("unscale", bare, ["--unscale"])):
        assert main(["decode", "--model", str(kl), "--latents", str(latents), "--out", str(tmp_path / f"{name}.npz"),
                     *flags]) == 0
    assert "unscaled by 0.5" in capsys.readouterr().out
    np.testing.assert_array_equal(_npz(tmp_path / "scaled.npz"), _npz(tmp_path / "plain.npz"))
    np.testing.assert_array_equal(_npz(tmp_path / "unscale.npz"), _npz(tmp_path / "plain.npz"))


def test_scaling_with_a_shift_from_python(digits):
    model = tiny_generator("autoencoder_kl", output_range="unit", scaling_factor=0.25, shift_factor=0.125).eval()
    z, logvar = codec.encode(model, torch.utils.data.TensorDataset(digits), batch_size=3)
    zs, _ = codec.encode(model, torch.utils.data.TensorDataset(digits), batch_size=8, scaled=True)
    torch.testing.assert_close(zs, (z - 0.125) * 0.25)
    plain, unscaled = codec.decode(model, z), codec.decode(model, zs, scaling=codec.scaling_of(model))
    assert plain.dtype == torch.uint8 and plain.shape == (8, 1, 28, 28)
    assert int((plain.int() - unscaled.int()).abs().max()) <= 1  # float rounding of the shift


def test_scaling_needs_a_scaling_factor(models, tmp_path, capsys):
    out = tmp_path / "z.safetensors"
    err = _error(capsys, ["encode", "--model", str(models["conv"]), *LIMIT, "--scaled", "--out", str(out)])
    assert "no scaling factor set" in err and "'conv' generator has no scaling_factor option" in err
    assert not out.exists()
    tiny_generator("autoencoder_kl", output_range="symmetric").save_pretrained(tmp_path / "unscaled_kl")
    err = _error(capsys, ["encode", "--model", str(tmp_path / "unscaled_kl"), *LIMIT, "--scaled", "--out", str(out)])
    assert "config.json" in err and "model.options.scaling_factor" in err and "1 / std" in err
    assert main(["encode", "--model", str(tmp_path / "unscaled_kl"), *LIMIT, "--out", str(out)]) == 0
    err = _error(capsys, ["decode", "--model", str(tmp_path / "unscaled_kl"), "--latents", str(out), "--unscale",
                          "--out", str(tmp_path / "d.npz")])
    assert "no scaling factor set" in err and not (tmp_path / "d.npz").exists()


def test_latents_of_another_model_are_refused_naming_both_shapes(models, tmp_path, capsys):
    z = tmp_path / "conv.safetensors"
    assert main(["encode", "--model", str(models["conv"]), *LIMIT, "--out", str(z)]) == 0
    err = _error(capsys, ["decode", "--model", str(models["tiny_spatial"]), "--latents", str(z),
                          "--out", str(tmp_path / "d.png")])
    assert "(4,)" in err and "(2, 7, 7)" in err and "another model" in err
    assert not (tmp_path / "d.png").exists()


def test_unreadable_latents_files_and_outputs_are_refused_before_any_work(models, tmp_path, capsys):
    nowhere = str(tmp_path / "no-model")  # never loaded: every check below comes first
    good = tmp_path / "good.safetensors"
    assert main(["encode", "--model", str(models["tiny_spatial"]), *LIMIT, "--out", str(good)]) == 0
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-10])
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"z": torch.zeros(2, 4)}, str(tmp_path / "other.safetensors"))

    def decode(latents: str, out: str = "d.npz") -> str:
        return _error(capsys, ["decode", "--model", nowhere, "--latents", latents, "--out", str(tmp_path / out)])

    assert "does not exist" in decode(str(tmp_path / "missing.safetensors"))
    for name in ("truncated", "garbage"):
        assert "cannot be read as a safetensors file" in decode(str(tmp_path / f"{name}.safetensors"))
    err = decode(str(tmp_path / "other.safetensors"))
    assert "no tensor 'latents'" in err and "['z']" in err
    err = decode(str(good), out="d.jpg")
    assert "'.jpg'" in err and ".png or .npz" in err
    err = _error(capsys, ["encode", "--model", nowhere, *LIMIT, "--out", str(tmp_path / "z.npz")])
    assert ".safetensors" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.safetensors", "good.safetensors",
                                                          "other.safetensors", "truncated.safetensors"]


def test_suggested_scaling_factor_is_one_over_the_std(models, tmp_path, capsys):
    z = tmp_path / "z.safetensors"
    assert main(["encode", "--model", str(models["autoencoder_kl"]), *LIMIT, "--out", str(z)]) == 0
    tensors, meta = _read(z)
    z = tensors["latents"].numpy().astype(np.float64).ravel()
    std = np.sqrt(((z - z.mean()) ** 2).sum() / (z.size - 1))  # latent diffusion's rule: scaling factor = 1 / std
    assert float(meta["std"]) == pytest.approx(std, rel=1e-9)
    assert float(meta["suggested_scaling_factor"]) == pytest.approx(1 / std, rel=1e-9)
    assert f"suggested scaling factor 1/std = {meta['suggested_scaling_factor']}" in capsys.readouterr().out


@pytest.mark.parametrize("tensors, metadata, words", [
    ({"latents": torch.tensor([[0.0, float("nan")], [float("inf"), 1.0]])}, None, "2 of the 4 values of 'latents' are NaN or inf"),
    ({"latents": torch.zeros(2, 2), "logvar": torch.full((2, 2), float("nan"))}, None, "4 of the 4 values of 'logvar'"),
    ({"latents": torch.zeros(2, 2)}, {"scaled": "true", "scaling_factor": "0"}, "scaled by 0.0 (shift 0.0)"),
    ({"latents": torch.zeros(2, 2)}, {"scaled": "true", "scaling_factor": "NaN"}, "scaled by nan"),
])
def test_latents_with_non_finite_values_or_a_zero_scaling_factor_are_refused(tmp_path, tensors, metadata, words):
    from vaegan.errors import DataError

    path = tmp_path / "z.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(DataError) as info:
        codec.load_latents(path)
    assert words in str(info.value) and "\n" not in str(info.value)
