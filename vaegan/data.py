"""Datasets: MNIST through torchvision and a folder of images of any kind, as dataset plugins.

A dataset plugin (group ``vaegan.datasets``) is a :class:`vaegan.api.DatasetFactory`: a callable
``factory(root=, split=, download=, limit=, image_shape=, value_range=, **options)`` returning a
map-style dataset whose items are float tensors (C, H, W) in ``value_range`` (or ``(image, label)``
pairs); ``options`` is the config's ``data.options``, checked against its signature.

Small datasets are held in memory as one uint8 tensor (:class:`TensorImages`): no per-item PIL
decoding in the training loop.

Example:
    >>> ds = build_dataset(DataConfig(root="data"), ModelConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import logging
import math
import shutil
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import registry
from .config import DataConfig, ModelConfig
from .errors import DataError, PluginError

__all__ = ["TensorImages", "ImageFolder", "mnist", "image_folder", "build_dataset", "first_batch"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _to_range(x: Tensor, value_range: Tuple[float, float]) -> Tensor:
    low, high = value_range
    return x.float().div_(255.0).mul_(high - low).add_(low)


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W); items are floats in ``value_range``."""

    def __init__(self, images: Tensor, value_range: Tuple[float, float] = (0.0, 1.0), labels: Optional[Tensor] = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"TensorImages needs a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}.")
        self.images = images
        self.value_range = value_range
        self.labels = labels  # (N,) class labels when known; used by evaluation, not by training

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return _to_range(self.images[index], self.value_range)

    def __getitems__(self, indices: Sequence[int]) -> List[Tensor]:
        """A batch's items from one indexing op and one conversion (the DataLoader calls this instead of
        B ``__getitem__`` calls); returned as views, so any ``collate_fn`` still works."""
        batch = _to_range(self.images[torch.as_tensor(indices, device=self.images.device)], self.value_range)
        return list(batch.unbind(0))  # (C, H, W) views of one (B, C, H, W) tensor

    def to(self, device: Union[str, torch.device]) -> "TensorImages":
        """The same images on ``device`` (e.g. the GPU: batches are then cut there, with no copies)."""
        labels = self.labels.to(device) if self.labels is not None else None
        return TensorImages(self.images.to(device), self.value_range, labels)


class ImageFolder(Dataset):
    """Every image file under a folder (recursively), converted to C channels and resized to (H, W).

    Images are decoded on access (use ``data.num_workers`` to parallelise); their aspect ratio is
    kept by resizing the short side and centre-cropping.
    """

    def __init__(self, files: Sequence[Path], image_shape: Tuple[int, int, int], value_range: Tuple[float, float]) -> None:
        from torchvision.transforms import v2

        self.files = list(files)
        c, h, w = image_shape
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        if c not in modes:
            raise DataError(f"Image folders can be read as 1, 3 or 4 channels, but the model wants {c}.")
        self.mode = modes[c]
        self.value_range = value_range
        self.size = (h, w)
        self.to_tensor = v2.PILToTensor()
        self.crop = v2.CenterCrop((h, w))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        from torchvision.transforms.v2 import functional as TF

        try:
            with Image.open(path) as img:
                pixels = self.to_tensor(img.convert(self.mode))  # uint8 (C, H0, W0)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"Image '{path}' cannot be read ({exc}); delete or replace the file.") from None
        # Scale so the image covers the target (keeping its aspect ratio), then centre-crop: no padding.
        (h, w), (h0, w0) = self.size, pixels.shape[-2:]
        scale = max(h / h0, w / w0)
        resized = TF.resize(pixels, [max(h, math.ceil(h0 * scale)), max(w, math.ceil(w0 * scale))], antialias=True)
        return _to_range(self.crop(resized), self.value_range)


def mnist(root: str, split: str, download: bool, limit: Optional[int], image_shape: Tuple[int, int, int],
          value_range: Tuple[float, float]) -> TensorImages:
    """MNIST digits (1, 28, 28) from ``root`` in torchvision's layout, downloaded when missing.

    Raises:
        DataError: the files are missing and cannot be downloaded (the message says where to put them).
    """
    from torchvision.datasets import MNIST

    train = split == "train"
    raw = Path(root) / "MNIST" / "raw"
    all_files = [f for pair in MNIST_FILES.values() for f in pair]  # torchvision checks all four
    for name in all_files:  # torchvision reads only extracted files; accept the .gz too
        packed = raw / f"{name}.gz"
        if not (raw / name).is_file() and packed.is_file():
            with gzip.open(packed, "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    try:
        ds = MNIST(root=root, train=train, download=False)
    except RuntimeError:
        ds = None
        if download:
            try:
                ds = MNIST(root=root, train=train, download=True)
            except Exception as exc:  # URLError, HTTPError, timeouts: all mean "no network here"
                logger.warning("MNIST download failed: %s", exc)
        if ds is None:
            files = ", ".join(all_files)
            raise DataError(
                f"MNIST ({split} split) is not in '{raw}' and could not be downloaded"
                f"{'' if download else ' (download is off)'}. Put the files {files} (or their .gz "
                f"versions) in '{raw}', or point --data-dir at the folder that contains MNIST/raw."
            ) from None
    images = ds.data[:limit].unsqueeze(1).contiguous()  # (N, 1, 28, 28) uint8
    return TensorImages(images, value_range, labels=ds.targets[:limit].clone())


def image_folder(root: str, split: str, download: bool, limit: Optional[int], image_shape: Tuple[int, int, int],
                 value_range: Tuple[float, float]) -> ImageFolder:
    """All images under ``root/split`` if that folder exists, else under ``root``."""
    base = Path(root)
    if (base / split).is_dir():
        base = base / split
    if not base.is_dir():
        raise DataError(f"Image folder '{base}' does not exist. Set --data-dir (data.root) to a folder of images.")
    files: List[Path] = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) were found under '{base}'. Point data.root at a folder "
            "that contains image files (subfolders are searched)."
        )
    return ImageFolder(files[:limit], image_shape, value_range)


def build_dataset(data: DataConfig, model: ModelConfig) -> Dataset:
    """Build the dataset plugin ``data.name`` (with ``data.options``) for a model; fails fast if it is empty.

    Raises:
        DataError: missing, unreadable or empty data.
        PluginError: unknown dataset name, or a factory that returns no dataset.
        ConfigError: an option the factory does not accept.
    """
    ds = registry.build_plugin("vaegan.datasets", data.name, dict(data.options), root=data.root, split=data.split,
                               download=data.download, limit=data.limit, image_shape=model.image_shape,
                               value_range=model.value_range)
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise PluginError(f"Dataset plugin '{data.name}' returned a {type(ds).__name__}, not a map-style dataset "
                          "(it needs __len__ and __getitem__).")
    if len(ds) == 0:
        raise DataError(f"The '{data.name}' dataset at '{data.root}' ({data.split}) is empty.")
    return ds


def first_batch(dataset: Dataset, n: int) -> Tensor:
    """The first ``n`` images of a dataset as one (n, C, H, W) batch (labels dropped)."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    return torch.stack(items)
