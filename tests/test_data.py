"""The built-in dataset plugins' specifics, on real files: the committed MNIST digits and folders of
images written here.

What every dataset plugin must do (items of the model's shape in its value range, ``limit``, the test
split, option checking, missing data as a DataError) is tested for all of them in
test_contract_datasets.py; this file holds what only ``mnist``, ``image_folder`` and ``TensorImages`` do.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_generator
from PIL import Image
from plugin_options import pattern, write_image_folder
from torch.utils.data import DataLoader

from vaegan.config import DataConfig, ModelConfig
from vaegan.data import (
    MNIST_FILES,
    TensorImages,
    build_dataset,
    first_batch,
    image_folder,
    mnist,
)
from vaegan.errors import ConfigError, DataError, PluginError


def _mnist(root, **kw) -> DataConfig:
    return DataConfig(name="mnist", root=str(root), download=False, **kw)


# ---- MNIST -----------------------------------------------------------------------------------------


def test_mnist_train_and_test_splits(mnist_root):
    train = build_dataset(_mnist(mnist_root), ModelConfig())
    test = build_dataset(_mnist(mnist_root, split="test"), ModelConfig())
    assert isinstance(train, TensorImages)
    assert len(train) == 256 and len(test) == 128
    x = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    batch = first_batch(train, 256)
    assert batch.shape == (256, 1, 28, 28)
    assert batch.min() == 0.0 and batch.max() == 1.0
    # Real digits: mostly background, some ink; the splits hold different images.
    assert 0.05 < batch.mean() < 0.3
    assert not torch.equal(first_batch(test, 8), batch[:8])
    tiny_generator().check_images(batch, "MNIST")


def test_mnist_symmetric_range(mnist_root):
    unit = build_dataset(_mnist(mnist_root), ModelConfig())
    sym = build_dataset(_mnist(mnist_root), ModelConfig(output_range="symmetric"))
    a, b = first_batch(unit, 32), first_batch(sym, 32)
    assert b.min() == -1.0 and b.max() == 1.0
    torch.testing.assert_close(b, a * 2 - 1)
    tiny_generator(output_range="symmetric").check_images(b)


def test_mnist_items_are_independent_copies(mnist_root):
    ds = build_dataset(_mnist(mnist_root), ModelConfig())
    x = ds[3]
    x.fill_(7.0)
    assert ds[3].max() <= 1.0  # the in-memory uint8 images are untouched


@pytest.mark.parametrize("limit, expected", [(1, 1), (1000, 128)])
def test_mnist_limit_on_the_test_split(mnist_root, limit, expected):
    full = build_dataset(_mnist(mnist_root, split="test"), ModelConfig())
    ds = build_dataset(_mnist(mnist_root, split="test", limit=limit), ModelConfig())
    assert len(ds) == expected and len(ds.labels) == expected
    torch.testing.assert_close(first_batch(ds, expected), first_batch(full, expected))


def test_mnist_factory_called_directly(mnist_root):
    ds = mnist(str(mnist_root), "test", False, 5, (1, 28, 28), (0.0, 1.0))
    assert len(ds) == 5 and ds[4].shape == (1, 28, 28)


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_missing_without_download(tmp_path, split):
    with pytest.raises(DataError) as info:
        build_dataset(_mnist(tmp_path / "empty", split=split), ModelConfig())
    msg = str(info.value)
    raw = tmp_path / "empty" / "MNIST" / "raw"
    assert str(raw) in msg
    for f in MNIST_FILES[split]:
        assert f in msg
    assert "download is off" in msg


def test_mnist_partial_files_raise_data_error(tmp_path, mnist_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    name = MNIST_FILES["train"][0]
    (raw / name).write_bytes((mnist_root / "MNIST" / "raw" / name).read_bytes())  # labels missing
    with pytest.raises(DataError, match=MNIST_FILES["train"][1]):
        build_dataset(_mnist(tmp_path), ModelConfig())


def test_mnist_gz_files_as_the_error_message_suggests(tmp_path, mnist_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (*MNIST_FILES["train"], *MNIST_FILES["test"]):  # torchvision checks all four
        (raw / f"{f}.gz").write_bytes(gzip.compress((mnist_root / "MNIST" / "raw" / f).read_bytes()))
    ds = build_dataset(_mnist(tmp_path), ModelConfig())
    assert len(ds) == 256


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(PluginError, match="image_folder"):
        build_dataset(DataConfig(name="cifar", root=str(tmp_path)), ModelConfig())


# ---- image folders ---------------------------------------------------------------------------------


@pytest.fixture
def png_folder(tmp_path) -> Path:
    return Path(write_image_folder(tmp_path))


def test_image_folder_reads_every_image_file_and_nothing_else(png_folder):
    """Subfolders are searched, extensions match in any case, JPEG/RGBA/grayscale files are read, the
    text file is skipped; the order is sorted, so it is the same on every machine."""
    ds = build_dataset(DataConfig(name="image_folder", root=str(png_folder)),
                       ModelConfig(image_channels=3, image_size=(16, 24)))
    assert [p.relative_to(png_folder).as_posix() for p in ds.files] == [
        "a_rgb.png", "b_gray.png", "d_rgba.png", "e_blue.jpg", "sub/c_rgb.PNG"]
    assert len(ds) == 5
    batch = first_batch(ds, 5)
    assert batch.shape == (5, 3, 16, 24)
    tiny_generator(image_shape=(3, 16, 24)).check_images(batch, "the image folder")


def test_image_folder_channel_conversion(png_folder):
    one = build_dataset(DataConfig(name="image_folder", root=str(png_folder)),
                        ModelConfig(image_channels=1, image_size=(20, 20)))
    three = build_dataset(DataConfig(name="image_folder", root=str(png_folder)),
                          ModelConfig(image_channels=3, image_size=(20, 20)))
    blue_idx = [p.name for p in three.files].index("e_blue.jpg")
    blue = three[blue_idx]
    assert blue[0].max() < 0.1 and blue[1].max() < 0.1 and blue[2].min() > 0.9
    gray_blue = one[blue_idx]
    # PIL's L = 0.299 R + 0.587 G + 0.114 B: pure blue is dark grey.
    assert gray_blue.shape == (1, 20, 20)
    assert 0.05 < gray_blue.mean() < 0.2
    gray_idx = [p.name for p in three.files].index("b_gray.png")
    g3 = three[gray_idx]
    torch.testing.assert_close(g3[0], g3[1])  # a grayscale file read as RGB has equal channels
    torch.testing.assert_close(g3[1], g3[2])


def test_image_folder_uses_split_subfolder_and_limit(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(n):
            pattern((30 + i, 30), "RGB").save(tmp_path / split / f"{i}.png")
    model = ModelConfig(image_channels=3, image_size=(16, 16))
    assert len(build_dataset(DataConfig(name="image_folder", root=str(tmp_path)), model)) == 3
    assert len(build_dataset(DataConfig(name="image_folder", root=str(tmp_path), split="test"), model)) == 2
    assert len(build_dataset(DataConfig(name="image_folder", root=str(tmp_path), limit=2), model)) == 2


def test_image_folder_keeps_aspect_ratio_on_square_targets(tmp_path):
    # A wide white image with a black right half: cropping the centre keeps both halves equally.
    img = Image.new("L", (80, 40), 255)
    img.paste(Image.new("L", (40, 40), 0), (40, 0))
    img.save(tmp_path / "wide.png")
    ds = image_folder(str(tmp_path), "train", False, None, (1, 20, 20), (0.0, 1.0))
    x = ds[0]
    assert x.shape == (1, 20, 20)
    assert x[0, :, :8].min() > 0.9 and x[0, :, 12:].max() < 0.1  # not squashed, not padded


@pytest.mark.parametrize("size, target", [((40, 40), (16, 32)), ((40, 40), (32, 16)), ((60, 20), (10, 40))])
def test_image_folder_non_square_target_is_covered_not_padded(tmp_path, size, target):
    Image.new("RGB", size, (255, 255, 255)).save(tmp_path / "white.png")
    ds = image_folder(str(tmp_path), "train", False, None, (3, *target), (0.0, 1.0))
    x = ds[0]
    assert x.shape == (3, *target)
    assert x.min() > 0.99, f"{(x < 0.5).float().mean():.0%} of the pixels are padding"


def test_image_folder_empty_and_missing(tmp_path):
    model = ModelConfig(image_channels=3, image_size=(16, 16))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(name="image_folder", root=str(empty)), model)
    assert str(empty) in str(info.value) and ".png" in str(info.value)
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("x")
    (only_text / "fake.png").mkdir()  # a folder named like an image is not an image
    with pytest.raises(DataError, match="No images"):
        build_dataset(DataConfig(name="image_folder", root=str(only_text)), model)
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(name="image_folder", root=str(tmp_path / "nowhere")), model)
    assert "does not exist" in str(info.value) and "nowhere" in str(info.value)


@pytest.mark.parametrize("content", [b"this is not a png", b"", "truncated"])
def test_image_folder_corrupt_file(tmp_path, content):
    pattern((20, 20), "RGB").save(tmp_path / "good.png")
    bad = tmp_path / "zz_bad.png"
    if content == "truncated":
        pattern((64, 64), "RGB").save(bad)
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_bytes(content)
    ds = build_dataset(DataConfig(name="image_folder", root=str(tmp_path)),
                       ModelConfig(image_channels=3, image_size=(16, 16)))
    assert ds[0].shape == (3, 16, 16)  # the good file still reads
    with pytest.raises(DataError) as info:
        ds[1]
    assert str(bad) in str(info.value)
    assert "cannot be read" in str(info.value)


def test_image_folder_rejects_two_channels(tmp_path):
    pattern((20, 20), "RGB").save(tmp_path / "a.png")
    with pytest.raises(DataError, match="1, 3 or 4 channels"):
        image_folder(str(tmp_path), "train", False, None, (2, 16, 16), (0.0, 1.0))


def test_tensor_images_validates_and_first_batch_drops_labels():
    with pytest.raises(DataError, match="uint8"):
        TensorImages(torch.zeros(2, 1, 4, 4))
    with pytest.raises(DataError, match="uint8"):
        TensorImages(torch.zeros(2, 4, 4, dtype=torch.uint8))
    ds = TensorImages(torch.full((3, 1, 2, 2), 255, dtype=torch.uint8), (-1.0, 1.0))
    assert ds[0].eq(1.0).all()
    pairs = [(ds[i], i) for i in range(3)]
    assert first_batch(pairs, 2).shape == (2, 1, 2, 2)
    assert first_batch(ds, 10).shape == (3, 1, 2, 2)


# ---- image folder augmentation (data.options: random_flip, crop, resize) ----------------------------------


def _noise(path: Path, size, seed: int = 0) -> torch.Tensor:
    """Write an RGB PNG of (W, H) = ``size`` uniform noise (no symmetry, every window unique); returns it
    as uint8 (3, H, W)."""
    w, h = size
    pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    Image.fromarray(pixels.numpy()).save(path)
    return pixels.permute(2, 0, 1).contiguous()


def _folder(root, hw, split="train", output_range="unit", **options):
    return build_dataset(DataConfig(name="image_folder", root=str(root), split=split, options=options),
                         ModelConfig(image_channels=3, image_size=hw, output_range=output_range))


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


AUGMENTATIONS = [{}, {"random_flip": True}, {"crop": "random"}, {"random_flip": True, "crop": "random"},
                 {"resize": False}, {"resize": False, "crop": "random", "random_flip": True}]


@pytest.mark.parametrize("output_range, low, high", [("unit", 0.0, 1.0), ("symmetric", -1.0, 1.0)])
@pytest.mark.parametrize("options", AUGMENTATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_image_folder_options_keep_shape_and_value_range(png_folder, options, output_range, low, high):
    """Every kind of file (RGB, grayscale, RGBA, JPEG; some smaller than the target, which resize: false
    scales up just enough) comes out (3, 16, 24) in the value range, also batched by a DataLoader."""
    ds = _folder(png_folder, (16, 24), output_range=output_range, **options)
    assert (ds.random_flip, ds.crop, ds.resize) == (options.get("random_flip", False),
                                                    options.get("crop", "center"), options.get("resize", True))
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch.shape == (5, 3, 16, 24) and batch.dtype == torch.float32
    assert batch.min() >= low and batch.max() <= high and batch.max() > batch.min()


def test_image_folder_default_png_output_is_resize_then_center_crop_bit_for_bit(tmp_path):
    """The defaults are what image_folder always did: an antialiased resize of the short side, then
    torchvision's CenterCrop; the JPEG draft never touches a PNG."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    full = _noise(tmp_path / "a.png", (61, 37))
    ds = _folder(tmp_path, (16, 24))
    scale = max(16 / 37, 24 / 61)
    expected = v2.CenterCrop((16, 24))(TF.resize(full, [max(16, math.ceil(37 * scale)), max(24, math.ceil(61 * scale))],
                                                 antialias=True))
    assert torch.equal(_as_uint8(ds[0]), expected)


def test_image_folder_random_flip_flips_about_half_the_time(tmp_path):
    _noise(tmp_path / "a.png", (40, 30))
    plain = _folder(tmp_path, (16, 16))[0]
    ds = _folder(tmp_path, (16, 16), random_flip=True)
    torch.manual_seed(0)
    flips = 0
    for _ in range(200):
        x = ds[0]
        if torch.equal(x, torch.flip(plain, [-1])):
            flips += 1
        else:
            assert torch.equal(x, plain)  # flipped or untouched, nothing else
    assert 70 < flips < 130


def test_image_folder_random_crops_lie_inside_the_resized_image(tmp_path):
    """A 96x48 image scales to 32x16 for a 16x16 target: each random crop is one of its 17 windows (the
    resized image is checked against the full-resolution one), and the windows vary between draws."""
    from torchvision.transforms.v2 import functional as TF

    full = _noise(tmp_path / "wide.png", (96, 48))
    resized = TF.resize(full, [16, 32], antialias=True)
    assert torch.equal(_as_uint8(_folder(tmp_path, (16, 32))[0]), resized)  # the scale image_folder uses
    ds = _folder(tmp_path, (16, 16), crop="random")
    torch.manual_seed(0)
    lefts = []
    for _ in range(50):
        crop = _as_uint8(ds[0])
        matches = [left for left in range(17) if torch.equal(crop, resized[:, :, left:left + 16])]
        assert len(matches) == 1, "a crop that is no window of the resized image"
        lefts.append(matches[0])
    assert len(set(lefts)) >= 8


def test_image_folder_without_resize_crops_the_full_resolution_image(tmp_path):
    full = _noise(tmp_path / "a.png", (60, 40))
    ds = _folder(tmp_path, (16, 16), crop="random", resize=False)
    torch.manual_seed(0)
    corners = set()
    for _ in range(30):
        crop = _as_uint8(ds[0])
        found = [(t, l) for t in range(40 - 16 + 1) for l in range(60 - 16 + 1)
                 if torch.equal(crop, full[:, t:t + 16, l:l + 16])]
        assert len(found) == 1, "a crop that is no window of the full-resolution image"
        corners.add(found[0])
    assert len({t for t, _ in corners}) > 3 and len({l for _, l in corners}) > 3
    centre = _as_uint8(_folder(tmp_path, (16, 16), resize=False)[0])
    assert torch.equal(centre, full[:, 12:28, 22:38])  # CenterCrop's rounding
    # An image smaller than the target is scaled up just enough to cover it, as with resize: true.
    assert torch.equal(_folder(tmp_path, (48, 48), resize=False)[0], _folder(tmp_path, (48, 48))[0])


@pytest.mark.parametrize("resize", [True, False])
def test_image_folder_test_split_is_never_augmented(tmp_path, resize):
    for i in range(3):
        _noise(tmp_path / f"{i}.png", (50, 30), seed=i)
    test = _folder(tmp_path, (16, 16), split="test", random_flip=True, crop="random", resize=resize)
    assert (test.random_flip, test.crop, test.resize) == (False, "center", resize)
    reference = first_batch(_folder(tmp_path, (16, 16), resize=resize), 3)  # train split, no augmentation
    for _ in range(5):
        assert torch.equal(first_batch(test, 3), reference)


def _epoch(ds, seed: int) -> torch.Tensor:
    loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=2, generator=torch.Generator().manual_seed(seed))
    return torch.cat(list(loader))


def test_image_folder_augmentation_is_reproducible_across_dataloader_workers(tmp_path):
    """Crops and flips are drawn from torch's RNG, which the DataLoader seeds in every worker from its
    generator: the same seed gives the same augmented batches, another seed other ones (no shuffling
    here, so any difference is the augmentation)."""
    for i in range(8):
        _noise(tmp_path / f"{i}.png", (40, 40), seed=i)
    ds = _folder(tmp_path, (16, 16), random_flip=True, crop="random")
    a, b, c = _epoch(ds, 0), _epoch(ds, 0), _epoch(ds, 1)
    assert a.shape == (8, 3, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, first_batch(_folder(tmp_path, (16, 16)), 8))  # it did augment


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("options, words", [
    ({"crop": "middle"}, ["crop", "'center'", "'random'", "'middle'"]),
    ({"crop": "centre"}, ["crop", "'center'", "'random'"]),
    ({"random_flip": "yes"}, ["random_flip", "true or false", "'yes'"]),
    ({"resize": 1}, ["resize", "true or false"]),
])
def test_image_folder_bad_option_values_are_config_errors(png_folder, split, options, words):
    """Checked on both splits (the test split ignores augmentation, but a typo is still a typo)."""
    with pytest.raises(ConfigError) as info:
        _folder(png_folder, (16, 16), split=split, **options)
    msg = str(info.value)
    assert "Plugin 'image_folder'" in msg
    for word in words:
        assert word in msg


def test_image_folder_decodes_large_jpegs_at_reduced_scale(tmp_path, monkeypatch):
    """A JPEG far larger than needed is decoded at 1/s scale (PIL's draft, never below twice the resized
    size); the result is the full decode's up to resampling differences."""
    from PIL import JpegImagePlugin

    pattern((512, 384), "RGB").save(tmp_path / "big.jpg", quality=95)
    scales = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    ds = _folder(tmp_path, (32, 32))
    fast = ds[0]
    assert scales == [4]  # 512x384 -> 128x96, resized to 43x32
    ds.jpeg_draft = False
    full = ds[0]
    assert scales == [4] and fast.shape == full.shape == (3, 32, 32)
    assert (fast - full).abs().mean() < 2 / 255


def test_mnist_classes_option_keeps_only_those_digits(mnist_root):
    from vaegan.errors import ConfigError

    cfg = DataConfig(root=str(mnist_root), download=False, options={"classes": [0, 1, 2, 3, 4, 5, 6, 8, 9]}, limit=50)
    ds = build_dataset(cfg, ModelConfig())
    everything = build_dataset(DataConfig(root=str(mnist_root), download=False), ModelConfig())
    assert len(ds) == 50 and 7 not in ds.labels.tolist()
    kept = everything.labels != 7
    assert torch.equal(ds.images, everything.images[kept][:50])  # the same digits, in file order
    for bad in ([], [10], [1.5]):
        with pytest.raises(ConfigError, match="data.options.classes"):
            build_dataset(DataConfig(root=str(mnist_root), download=False, options={"classes": bad}), ModelConfig())


def test_the_run_start_says_what_reading_a_mixed_folder_does(tmp_path, caplog):
    """Sizes, resizes, mode conversions, skipped and unreadable files, and a missing split folder: said once at
    the start of the run (build_trainer), before any training."""
    import logging

    import numpy as np
    from conftest import tiny_config

    from vaegan import build_trainer
    from vaegan.data import describe_dataset

    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (size, mode) in enumerate([((20, 20), "L"), ((300, 200), "RGB"), ((28, 28), "RGBA"), ((100, 80), "P"),
                                      ((28, 28), "L"), ((28, 28), "L")]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(
            folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"not a png")
    data = DataConfig(name="image_folder", root=str(folder))
    line = describe_dataset(data, build_dataset(data, ModelConfig(image_channels=1, image_size=(28, 28))))
    assert line.startswith(f"Data: 7 images in the train split of 'image_folder' at '{folder}'")
    assert "no train/ and test/ subfolders: both splits read these images" in line
    assert "1 other file skipped (.txt" in line and "sizes (W x H) 20x20 to 300x200: 3 resized to cover 28x28" in line
    assert "3 converted to L (P 1, RGB 1, RGBA 1)" in line
    assert "1 cannot be read (broken.png)" in line and "skip_unreadable: true" in line

    (folder / "broken.png").unlink()
    with caplog.at_level(logging.INFO, logger="vaegan.factory"):
        build_trainer(tiny_config(tmp_path / "run", "data.name=image_folder", f"data.root={folder}", "data.limit=4",
                                  "train.batch_size=2"))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Data: ")]
    assert len(said) == 1 and "the first 4 of 6 (data.limit)" in said[0] and "converted to L" in said[0], said
