"""The dataset contract (group ``vaegan.datasets``), run against every registered dataset plugin.

Parametrised over ``registry.available("vaegan.datasets")``; tests/plugin_options.py says per plugin
which image shapes to ask for and how to put its test data in place (the committed MNIST digits, a
folder of PNGs written to tmp_path), so a new dataset plugin is tested for free. Everything is built
through :func:`vaegan.data.build_dataset`, as training builds it. MNIST and image-folder specifics are
in test_data.py.
"""

from __future__ import annotations

import pytest
import torch
from plugin_options import dataset_setup, options_for
from torch.utils.data import DataLoader

from vaegan import registry
from vaegan.api import DatasetFactory
from vaegan.config import DataConfig, ModelConfig
from vaegan.data import build_dataset, first_batch, image_of
from vaegan.errors import ConfigError, DataError

DATASETS = registry.available("vaegan.datasets")
RANGES = {"unit": (0.0, 1.0), "symmetric": (-1.0, 1.0)}
SHAPED = [pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
          for name in DATASETS for shape in dataset_setup(name).image_shapes]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(name, root, shape=None, output_range="unit", **data):
    c, h, w = shape or dataset_setup(name).image_shapes[0]
    options = data.pop("options", options_for("vaegan.datasets", name))
    config = DataConfig(name=name, root=str(root), download=False, options=options, **data)
    return build_dataset(config, ModelConfig(image_channels=c, image_size=(h, w), output_range=output_range))


_image = image_of  # an item is an image, or an (image, label) pair


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_plugin_is_a_dataset_factory(name):
    assert isinstance(registry.load("vaegan.datasets", name), DatasetFactory)


@pytest.mark.parametrize("output_range", list(RANGES))
@pytest.mark.parametrize("name, shape", SHAPED)
def test_items_are_float_images_of_the_model_shape_in_the_value_range(tmp_path, name, shape, output_range):
    ds = _build(name, dataset_setup(name).prepare(tmp_path), shape, output_range)
    assert hasattr(ds, "__len__") and hasattr(ds, "__getitem__"), "not a map-style dataset"
    assert len(ds) > 0
    low, high = RANGES[output_range]
    for i in range(min(len(ds), 8)):
        x = _image(ds[i])
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32, f"item {i}: {type(x)}"
        assert tuple(x.shape) == shape, f"item {i} has shape {tuple(x.shape)}"
        assert torch.isfinite(x).all() and x.min() >= low and x.max() <= high, f"item {i} leaves {low, high}"
    batch = first_batch(ds, 8)
    assert batch.shape == (min(len(ds), 8), *shape)
    assert batch.max() > batch.min(), "constant images"
    loaded = _image(next(iter(DataLoader(ds, batch_size=2))))  # the training loader's default collation
    torch.testing.assert_close(loaded, batch[:2])


@pytest.mark.parametrize("name", DATASETS)
def test_limit_keeps_the_first_images(tmp_path, name):
    root = dataset_setup(name).prepare(tmp_path)
    full = _build(name, root)
    assert len(full) > 2, "the test data of this plugin is too small to test data.limit"
    limited = _build(name, root, limit=2)
    assert len(limited) == 2
    torch.testing.assert_close(first_batch(limited, 2), first_batch(full, 2))
    assert len(_build(name, root, limit=len(full) + 100)) == len(full)


@pytest.mark.parametrize("name", DATASETS)
def test_test_split_builds(tmp_path, name):
    shape = dataset_setup(name).image_shapes[0]
    ds = _build(name, dataset_setup(name).prepare(tmp_path), shape, split="test")
    assert len(ds) > 0 and tuple(_image(ds[0]).shape) == shape


@pytest.mark.parametrize("name", DATASETS)
def test_unknown_option_is_a_config_error_naming_the_plugin_and_its_signature(tmp_path, name):
    root = dataset_setup(name).prepare(tmp_path)
    with pytest.raises(ConfigError) as info:
        _build(name, root, options={**options_for("vaegan.datasets", name), "no_such_option": 1})
    msg = str(info.value)
    assert f"Plugin '{name}'" in msg and "no_such_option" in msg
    assert f"Its signature is {name}(" in msg and "root" in msg and "value_range" in msg


@pytest.mark.parametrize("name", DATASETS)
def test_missing_data_builds_or_is_a_data_error(tmp_path, name):
    """A root without the plugin's data is a DataError saying what is missing (never a bare OSError or
    RuntimeError), unless the plugin needs no files at all."""
    try:
        ds = _build(name, tmp_path / "nowhere")
    except DataError as exc:
        assert str(tmp_path / "nowhere") in str(exc)
        return
    assert len(ds) > 0
