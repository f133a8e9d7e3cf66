"""Options that let every registered plugin run inside the test suite, keyed by (group, name).

Plugins not listed run with their defaults ({}), so a newly installed plugin is still tested. Entries
exist only where the defaults cannot work here or are needlessly slow on 2 CPU cores:

- ``lpips``: the pretrained ImageNet backbone cannot be downloaded on these machines; ``backbone:
  random`` is the explicit opt-in to an untrained network that exercises the same code path.
- generators and discriminators: narrow widths keep a training step in milliseconds.
- ``diffusers_vae`` starts from a diffusers AutoencoderKL folder: a tiny one (1 channel, f = 2, built
  from a config dict with the real diffusers package, as diffusers' own tests do) is written once per
  test session; it is trained fully (``trainable: all``) so the contract's gradient checks apply.

Dataset plugins also need data to read: :func:`dataset_setup` says, per plugin, which image shapes it
is tested at and how its test data is put in place (the committed MNIST digits; a folder of PNGs
written to a temporary folder). A dataset plugin not listed gets an empty temporary folder as
``data.root`` (so one that needs no files, a synthetic dataset say, is tested as it is).
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Union

__all__ = ["TEST_OPTIONS", "options_for", "DatasetSetup", "DATASET_SETUP", "dataset_setup", "pattern",
           "write_image_folder", "write_tar_shards", "write_arrow_dataset"]

FIXTURES = Path(__file__).parent / "fixtures"

# The tiny diffusers AutoencoderKL of the session: 1-channel images, widths 8/16 (f = 2), a 3-channel latent
# (unlike the autoencoder_kl test options below, so the two never take each other's weights).
TINY_DIFFUSERS = {"in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1,
                  "latent_channels": 3, "norm_num_groups": 4, "sample_size": 28,
                  "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}


@functools.lru_cache(maxsize=None)
def tiny_diffusers_folder(channels: int = 1) -> str:
    """A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) for images
    of ``channels`` channels, written once per session."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="vaegan-test-diffusers-")) / f"tiny-vae-{channels}ch"
    config = {**TINY_DIFFUSERS, "in_channels": channels, "out_channels": channels}
    AutoencoderKL(**config).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


@functools.lru_cache(maxsize=None)
def tiny_ldm_file(channels: int = 1) -> str:
    """A single-file LDM VAE (``vae.safetensors``, vaegan_plugins.ldm_checkpoint) of a tiny autoencoder_kl for
    ``channels``-channel images (widths 8/16, a 3-channel latent, 4 groups in its metadata), written once."""
    import torch
    from vaegan_plugins.autoencoder_kl import AutoencoderKL
    from vaegan_plugins.ldm_checkpoint import save_ldm

    torch.manual_seed(0)
    model = AutoencoderKL((channels, 28, 28), "symmetric", block_out_channels=[8, 16], layers_per_block=1,
                          latent_channels=3, norm_num_groups=4)
    return str(save_ldm(model, Path(tempfile.mkdtemp(prefix="vaegan-test-ldm-")) / f"vae-{channels}ch.safetensors"))


TEST_OPTIONS: Dict[Tuple[str, str], Union[Dict[str, Any], Callable[[], Dict[str, Any]]]] = {
    ("vaegan.generators", "conv"): {"channels": [8, 16], "norm_groups": 4, "latent_dim": 4},
    ("vaegan.generators", "mlp"): {"hidden": [32], "latent_dim": 4},
    ("vaegan.generators", "autoencoder_kl"): {"block_out_channels": [8, 16], "layers_per_block": 1,
                                              "latent_channels": 2, "norm_num_groups": 4},
    ("vaegan.generators", "diffusers_vae"): lambda: {"pretrained": tiny_diffusers_folder(), "trainable": "all"},
    ("vaegan.generators", "ldm_vae"): lambda: {"pretrained": tiny_ldm_file(), "trainable": "all"},
    ("vaegan.losses", "lpips"): {"backbone": "random"},
    ("vaegan.discriminators", "simple"): {"channels": [8, 16]},
    ("vaegan.discriminators", "patchgan"): {"base_width": 8, "n_layers": 2},
    ("vaegan.discriminators", "dcgan"): {"base_width": 8},
    ("vaegan.samplers", "gmm"): {"n_components": 3},
    ("vaegan.samplers", "two_stage"): {"hidden": 32, "epochs": 2},
    ("vaegan.datasets", "webdataset"): {"shards": "shards-{000000..000002}.tar"},  # write_tar_shards's
}


def options_for(group: str, name: str) -> Dict[str, Any]:
    """A fresh copy of the test options of plugin ``name`` in ``group`` ({} when none are needed)."""
    options = TEST_OPTIONS.get((group, name), {})
    return dict(options() if callable(options) else options)


# ---- dataset plugins ---------------------------------------------------------------------------------


def pattern(size: Tuple[int, int], mode: str):
    """A PIL image (W, H) = ``size`` with structure (a gradient plus a bright square), not a constant."""
    from PIL import Image

    w, h = size
    img = Image.linear_gradient("L").resize((w, h)).convert(mode)
    box = Image.new(mode, (max(1, w // 4), max(1, h // 4)), 255 if mode == "L" else (255, 64, 0))
    img.paste(box, (w // 3, h // 3))
    return img


def write_image_folder(root: Path) -> str:
    """Five images of every kind under ``root/imgs``: RGB, grayscale, RGBA, a JPEG, one in a subfolder with
    an upper-case extension; plus a text file that is not an image. Returns the folder."""
    from PIL import Image

    folder = Path(root) / "imgs"
    (folder / "sub").mkdir(parents=True)
    pattern((40, 30), "RGB").save(folder / "a_rgb.png")
    pattern((17, 50), "L").save(folder / "b_gray.png")
    pattern((64, 64), "RGB").save(folder / "sub" / "c_rgb.PNG")
    pattern((33, 33), "RGBA").save(folder / "d_rgba.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(folder / "e_blue.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    return str(folder)


def write_tar_shards(root: Path) -> str:
    """write_image_folder's five images (every mode and size) as three WebDataset tar shards ``shards-00000N.tar``
    (2, 2 and 1 samples, with a ``.cls`` label), written by webdataset's own ShardWriter. Returns ``root``."""
    import pytest

    wds = pytest.importorskip("webdataset", reason="the webdataset package is not installed (vaegan[webdataset])")

    folder = Path(write_image_folder(Path(root) / "source"))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    with wds.ShardWriter(str(Path(root) / "shards-%06d.tar"), maxcount=2, verbose=0) as sink:
        for i, path in enumerate(files):
            sink.write({"__key__": f"{i:06d}", path.suffix.lower().lstrip("."): path.read_bytes(), "cls": str(i).encode()})
    return str(root)


def write_arrow_dataset(root: Path) -> str:
    """write_image_folder's five images as a saved Hugging Face dataset (``save_to_disk``: an ``image`` column of
    file bytes and an integer ``label``) at ``root/arrow``; returns that folder."""
    import pytest

    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed (vaegan[hf])")

    folder = Path(write_image_folder(Path(root) / "source"))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    rows = {"image": [{"bytes": p.read_bytes(), "path": p.name} for p in files], "label": list(range(len(files)))}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(Path(root) / "arrow"))
    return str(Path(root) / "arrow")


@dataclass(frozen=True)
class DatasetSetup:
    """How the dataset contract runs one dataset plugin.

    Attributes:
        image_shapes: The (C, H, W) shapes it is built for (a plugin with a fixed shape lists only that).
        prepare: Puts the plugin's test data under an empty temporary folder; returns ``data.root``.
    """

    image_shapes: Tuple[Tuple[int, int, int], ...] = ((1, 28, 28), (3, 16, 24))
    prepare: Callable[[Path], str] = str


DATASET_SETUP: Dict[str, DatasetSetup] = {
    "mnist": DatasetSetup(image_shapes=((1, 28, 28),), prepare=lambda tmp: str(FIXTURES)),  # committed digits
    "image_folder": DatasetSetup(image_shapes=((1, 28, 28), (3, 16, 24), (4, 32, 20)), prepare=write_image_folder),
    "webdataset": DatasetSetup(image_shapes=((1, 28, 28), (3, 16, 24)), prepare=write_tar_shards),
    "hf_datasets": DatasetSetup(image_shapes=((1, 28, 28), (3, 16, 24)), prepare=write_arrow_dataset),
}


def dataset_setup(name: str) -> DatasetSetup:
    """The test setup of dataset plugin ``name`` (an empty folder and two shapes when none is listed)."""
    return DATASET_SETUP.get(name, DatasetSetup())
