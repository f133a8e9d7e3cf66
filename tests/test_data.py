"""Dataset plugins on real files: the committed MNIST digits and folders of PNGs written here."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from PIL import Image

from vaegan.config import DataConfig, ModelConfig
from vaegan.data import MNIST_FILES, TensorImages, build_dataset, first_batch, image_folder, mnist
from vaegan.errors import DataError, PluginError
from vaegan.model import VAE


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
    VAE(ModelConfig(channels=(8, 16), norm_groups=4, latent_dim=4)).check_images(batch, "MNIST")


def test_mnist_symmetric_range(mnist_root):
    unit = build_dataset(_mnist(mnist_root), ModelConfig())
    sym = build_dataset(_mnist(mnist_root), ModelConfig(output_range="symmetric"))
    a, b = first_batch(unit, 32), first_batch(sym, 32)
    assert b.min() == -1.0 and b.max() == 1.0
    torch.testing.assert_close(b, a * 2 - 1)
    VAE(ModelConfig(channels=(8, 16), norm_groups=4, latent_dim=4, output_range="symmetric")).check_images(b)


def test_mnist_items_are_independent_copies(mnist_root):
    ds = build_dataset(_mnist(mnist_root), ModelConfig())
    x = ds[3]
    x.fill_(7.0)
    assert ds[3].max() <= 1.0  # the in-memory uint8 images are untouched


@pytest.mark.parametrize("limit, split, expected", [(10, "train", 10), (1, "test", 1), (1000, "train", 256)])
def test_mnist_limit(mnist_root, limit, split, expected):
    full = build_dataset(_mnist(mnist_root, split=split), ModelConfig())
    ds = build_dataset(_mnist(mnist_root, split=split, limit=limit), ModelConfig())
    assert len(ds) == expected
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


def _pattern(size, mode):
    """A real image with structure (a gradient plus a bright square), not a constant."""
    w, h = size
    img = Image.linear_gradient("L").resize((w, h)).convert(mode)
    box = Image.new(mode, (max(1, w // 4), max(1, h // 4)), 255 if mode == "L" else (255, 64, 0))
    img.paste(box, (w // 3, h // 3))
    return img


@pytest.fixture
def png_folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    _pattern((40, 30), "RGB").save(root / "a_rgb.png")
    _pattern((17, 50), "L").save(root / "b_gray.png")
    _pattern((64, 64), "RGB").save(root / "sub" / "c_rgb.PNG")  # subfolders, upper-case extension
    _pattern((33, 33), "RGBA").save(root / "d_rgba.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "e_blue.jpg", quality=95)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("size", [(28, 28), (16, 24), (32, 20)])
@pytest.mark.parametrize("output_range", ["unit", "symmetric"])
def test_image_folder_shapes_and_range(png_folder, channels, size, output_range):
    model = ModelConfig(image_channels=channels, image_size=size, output_range=output_range,
                        channels=(8, 16), norm_groups=4, latent_dim=4)
    ds = build_dataset(DataConfig(name="image_folder", root=str(png_folder)), model)
    assert len(ds) == 5  # the .txt file is skipped, the subfolder searched
    batch = first_batch(ds, len(ds))
    assert batch.shape == (5, channels, *size) and batch.dtype == torch.float32
    low = 0.0 if output_range == "unit" else -1.0
    assert batch.min() >= low and batch.max() <= 1.0
    assert batch.max() > batch.min()
    VAE(model).check_images(batch, "the image folder")


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
            _pattern((30 + i, 30), "RGB").save(tmp_path / split / f"{i}.png")
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
    _pattern((20, 20), "RGB").save(tmp_path / "good.png")
    bad = tmp_path / "zz_bad.png"
    if content == "truncated":
        _pattern((64, 64), "RGB").save(bad)
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
    _pattern((20, 20), "RGB").save(tmp_path / "a.png")
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
