"""Datasets: MNIST through torchvision and a folder of images of any kind, as dataset plugins.

A dataset plugin (group ``vaegan.datasets``) is a :class:`vaegan.api.DatasetFactory`: a callable
``factory(root=, split=, download=, limit=, image_shape=, value_range=, **options)`` returning a
map-style dataset whose items are float tensors (C, H, W) in ``value_range`` (or ``(image, label)``
pairs); ``options`` is the config's ``data.options``, checked against its signature.

Small datasets are held in memory as one uint8 tensor (:class:`TensorImages`): no per-item PIL
decoding in the training loop.

``image_folder`` takes augmentation options (``data.options``): ``random_flip``, ``crop: random`` and
``resize: false`` (crop at full resolution). They apply to the training split only; the test split is
always centre-cropped and never flipped. Random draws use torch's RNG, seeded per DataLoader worker.

Example:
    >>> ds = build_dataset(DataConfig(root="data"), ModelConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import logging
import math
import multiprocessing
import re
import shutil
from pathlib import Path
from typing import BinaryIO, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from . import registry
from .config import DataConfig, ModelConfig
from .errors import ConfigError, DataError, PluginError

__all__ = ["TensorImages", "ImageFolder", "mnist", "image_folder", "build_dataset", "describe_dataset", "first_batch",
           "image_of", "check_crop", "is_stream", "prepare_stream", "resume_batches"]

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


CROPS = ("center", "random")


def check_crop(crop: str) -> None:
    """Refuse a ``crop`` option other than ``"center"`` or ``"random"`` (``ValueError``; the registry reports it as
    a ConfigError): a dataset plugin calls it before listing or indexing any file."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(repr(c) for c in CROPS)}, got {crop!r}.")


class ImageFolder(Dataset):
    """Every image file under a folder (recursively), converted to C channels and cut to (H, W).

    Images are decoded on access (use ``data.num_workers`` to parallelise). With ``resize`` (the
    default) an image is scaled, keeping its aspect ratio, so that its short side covers the target,
    then cropped; without it the crop is cut from the full-resolution image (an image smaller than the
    target is scaled up just enough to cover it). Nothing is ever padded.

    Random augmentation (``crop="random"``, ``random_flip``) draws from torch's global RNG, which the
    DataLoader seeds per worker from its own generator, so a seeded run sees the same crops and flips
    every time. :func:`image_folder` turns it off for the test split.

    A JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself
    (``PIL.Image.draft``; never below twice the size it is resized to, so the antialiased resize still
    does the final filtering); every other format is decoded in full, so its output is exactly that of
    a full-resolution resize. ``jpeg_draft=False`` turns this off.

    Args:
        files: The image files, in item order.
        image_shape: (C, H, W) of the items; C is 1 (L), 3 (RGB) or 4 (RGBA).
        value_range: (low, high) that uint8 0 and 255 map to.
        random_flip: Flip each item horizontally with probability 1/2.
        crop: ``"center"`` or ``"random"``: where the (H, W) window is cut from the (resized) image.
        resize: Scale the short side to cover (H, W) before cropping; False crops at full resolution.
        jpeg_draft: Let the JPEG decoder downscale large JPEGs while decoding (see above).
        skip_unreadable: A file that cannot be read (deleted, truncated, a network file system's hiccup) is
            replaced by the next readable one, with a warning, instead of stopping training; the reads that
            failed are counted in :attr:`unreadable` (shared by the data workers; logged as
            ``data/unreadable_images``).
        max_unreadable: With ``skip_unreadable``, the fraction of reads that may fail (after 100 reads) before
            a :class:`DataError` stops training anyway: a folder that lost most of its files must not train on
            the few left.
        listing: Where the files were found and what was left out ("under 'photos/train'; 2 other files
            skipped (.txt)"), said first by :meth:`summary`.
    """

    def __init__(self, files: Sequence[Path], image_shape: Tuple[int, int, int], value_range: Tuple[float, float],
                 random_flip: bool = False, crop: str = "center", resize: bool = True,
                 jpeg_draft: bool = True, skip_unreadable: bool = False, max_unreadable: float = 0.01,
                 listing: str = "") -> None:
        from torchvision.transforms import v2

        self.files = list(files)
        self.listing = listing  # where the files were found and what the listing left out, for summary()
        c, h, w = image_shape
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        if c not in modes:
            raise DataError(f"Image folders can be read as 1, 3 or 4 channels, but the model wants {c}.")
        check_crop(crop)
        self.mode = modes[c]
        self.value_range = value_range
        self.size = (h, w)
        self.random_flip = bool(random_flip)
        self.crop = crop
        self.resize = bool(resize)
        self.jpeg_draft = bool(jpeg_draft)
        self.to_tensor = v2.PILToTensor()
        self.skip_unreadable, self.max_unreadable = bool(skip_unreadable), float(max_unreadable)
        # Shared memory when skipping: the data workers count into the main process's numbers.
        self.reads = multiprocessing.Value("q", 0) if self.skip_unreadable else None
        self.unreadable = multiprocessing.Value("q", 0) if self.skip_unreadable else None

    def __len__(self) -> int:
        return len(self.files)

    def summary(self, survey: int = 2000) -> str:
        """What reading the folder does to its images, from the headers of the first ``survey`` files (PIL reads
        no pixels for this): their sizes, how many are resized and converted to the model's mode, how many
        cannot be read. The run's start logs it, so a folder of mixed images holds no quiet surprise.

        Example:
            >>> ImageFolder(files, (3, 64, 64), (0.0, 1.0)).summary()  # doctest: +SKIP
            "under 'photos'; sizes 20x20 to 300x200: 96 resized to cover 64x64, 31 converted to RGB (L 20, P 11)"
        """
        from collections import Counter

        from PIL import Image

        files = self.files[:survey]
        sizes, modes, unreadable = [], Counter(), []
        for path in files:
            try:
                with Image.open(path) as img:
                    sizes.append(img.size)  # (W, H)
                    modes[img.mode] += 1
            except OSError:
                unreadable.append(path.name)
        h, w = self.size
        of = f"of the first {len(files)}: " if len(files) < len(self.files) else ""
        parts = [self.listing] if self.listing else []
        if sizes:
            small = min(sizes, key=lambda s: s[0] * s[1])
            large = max(sizes, key=lambda s: s[0] * s[1])
            resized = sum(self._cover(h0, w0) != (h0, w0) for w0, h0 in sizes)
            span = f"{small[0]}x{small[1]}" + (f" to {large[0]}x{large[1]}" if large != small else "")
            parts.append(f"{of}sizes (W x H) {span}: {resized} resized to cover {w}x{h}"
                         + ("" if self.resize else " (resize: false scales only the images smaller than that)"))
            other = {m: n for m, n in sorted(modes.items()) if m != self.mode}
            if other:
                parts.append(f"{sum(other.values())} converted to {self.mode} ("
                             + ", ".join(f"{m} {n}" for m, n in other.items()) + ")")
        if unreadable:
            what = ("skipped when read (data.options.skip_unreadable)" if self.skip_unreadable
                    else "stop training when read; set data.options.skip_unreadable: true to skip them")
            parts.append(f"{len(unreadable)} cannot be read ({', '.join(unreadable[:3])}"
                         f"{', ...' if len(unreadable) > 3 else ''}): they {what}")
        return "; ".join(parts)

    def _cover(self, h0: int, w0: int) -> Tuple[int, int]:
        """The size (H1, W1) that ``(h0, w0)`` is scaled to: its aspect ratio, covering (H, W) exactly."""
        h, w = self.size
        if not self.resize and h0 >= h and w0 >= w:
            return h0, w0
        scale = max(h / h0, w / w0)
        return max(h, math.ceil(h0 * scale)), max(w, math.ceil(w0 * scale))

    def _offsets(self, h1: int, w1: int) -> Tuple[int, int]:
        """Top-left corner of the (H, W) window in an (h1, w1) image: centred, or drawn with torch."""
        h, w = self.size
        if self.crop == "random":
            top = int(torch.randint(h1 - h + 1, ()).item())
            left = int(torch.randint(w1 - w + 1, ()).item())
            return top, left
        # The same rounding as torchvision's CenterCrop.
        return int(round((h1 - h) / 2.0)), int(round((w1 - w) / 2.0))

    def __getitem__(self, index: int) -> Tensor:
        if not self.skip_unreadable:
            try:
                return self._read(index)
            except OSError as exc:  # PIL's UnidentifiedImageError is an OSError too
                raise DataError(f"{self._cannot_read(index, exc)}; restore, replace or delete the file (or set "
                                "data.options.skip_unreadable: true to skip such files).") from None
        for attempt in range(len(self)):  # len(self): subclasses read other sources (tar shards, Arrow tables)
            with self.reads.get_lock():
                self.reads.value += 1
            try:
                return self._read((index + attempt) % len(self))
            except OSError as exc:
                self._skipped(self._cannot_read((index + attempt) % len(self), exc))
        raise DataError(f"None of the {len(self)} images can be read any more; restore the image folder.")

    def _skipped(self, reason: str) -> None:
        """Count a read that failed under ``skip_unreadable`` and warn; raise when too many failed."""
        with self.unreadable.get_lock():
            self.unreadable.value += 1
            failed, reads = self.unreadable.value, self.reads.value
        if reads >= 100 and failed > self.max_unreadable * reads:
            raise DataError(f"{failed} of the last {reads} image reads failed (the last: {reason}), more than "
                            f"data.options.max_unreadable = {self.max_unreadable:g} allows: the folder lost "
                            "too many files to go on. Restore the images, or raise max_unreadable.") from None
        logger.warning("%s: skipped (data.options.skip_unreadable), the next image is used instead.", reason)

    def _cannot_read(self, index: int, exc: OSError) -> str:
        return f"Image '{self.files[index]}' cannot be read ({exc})"

    def _read(self, index: int) -> Tensor:
        return self.decode(self.files[index])

    def decode(self, source: Union[str, Path, BinaryIO]) -> Tensor:
        """One image (a path or a binary file object) as an item: converted, resized, cropped and flipped as
        this folder's images are (the dataset plugins that read tar shards or Arrow tables use it too).

        Raises:
            OSError: the image cannot be read (PIL's UnidentifiedImageError included).
        """
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        (h, w) = self.size
        with Image.open(source) as img:  # an OSError (missing, truncated, not an image) is handled by the caller
            w0, h0 = img.size
            h1, w1 = self._cover(h0, w0)
            if (h1, w1) == (h0, w0):  # no resize: crop first, so only the window is converted
                top, left = self._offsets(h1, w1)
                pixels = self.to_tensor(img.crop((left, top, left + w, top + h)).convert(self.mode))
                resized = None
            else:
                if self.jpeg_draft and img.format == "JPEG":
                    # Decode at 1/s scale (s = 2, 4, 8), never below twice the size it is resized to.
                    img.draft(None, (2 * w1, 2 * h1))
                pixels = self.to_tensor(img.convert(self.mode))  # uint8 (C, H0', W0')
                resized = TF.resize(pixels, [h1, w1], antialias=True)
        if resized is not None:
            top, left = self._offsets(h1, w1)
            pixels = resized[:, top:top + h, left:left + w]
        if self.random_flip and torch.rand(()).item() < 0.5:
            pixels = pixels.flip(-1)
        return _to_range(pixels, self.value_range)


def mnist(root: str, split: str, download: bool, limit: Optional[int], image_shape: Tuple[int, int, int],
          value_range: Tuple[float, float], classes: Optional[Sequence[int]] = None) -> TensorImages:
    """MNIST digits (1, 28, 28) from ``root`` in torchvision's layout, downloaded when missing.

    Args:
        classes: Keep only these digits (``data.options.classes``; e.g. all but one for the one-class-out
            anomaly protocol); ``limit`` then counts the kept digits.

    Raises:
        DataError: the files are missing and cannot be downloaded (the message says where to put them).
        ConfigError: a class that is not a digit 0-9.
    """
    if classes is not None and (not classes or any(int(c) != c or not 0 <= c <= 9 for c in classes)):
        raise ConfigError(f"data.options.classes must list digits 0-9 to keep, got {list(classes)}.")
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
        ds, why = None, " (download is off)"
        if download:
            made = [p for p in (Path(root), Path(root) / "MNIST", raw) if not p.exists()]  # removed if left empty
            try:
                ds = MNIST(root=root, train=train, download=True)
            except Exception as exc:  # URLError, HTTPError, timeouts: all mean "no network here"
                logger.debug("MNIST download failed: %s", exc)  # the error below says it in one line
                why = f" (download failed: {_first_reason(exc)})"
                for folder in reversed(made):  # a failed download leaves no empty MNIST/raw behind
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
        if ds is None:
            files = ", ".join(all_files)
            raise DataError(
                f"MNIST ({split} split) is not in '{raw}' and could not be downloaded{why}. Put the files "
                f"{files} (or their .gz versions) in '{raw}', or point --data-dir at the folder that contains "
                "MNIST/raw."
            ) from None
    images, labels = ds.data, ds.targets
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(sorted({int(c) for c in classes})))
        images, labels = images[keep], labels[keep]
    images = images[:limit].unsqueeze(1).contiguous()  # (N, 1, 28, 28) uint8
    return TensorImages(images, value_range, labels=labels[:limit].clone())


def _first_reason(exc: BaseException) -> str:
    """The innermost cause of a failed download in a few words (``Name or service not known``)."""
    text = str(exc)
    inner = re.findall(r"<urlopen error (?:\[Errno [-\d]+\] )?([^>]+)>", text)
    return (inner[-1] if inner else text.splitlines()[0] if text else type(exc).__name__)[:200]


def image_folder(root: str, split: str, download: bool, limit: Optional[int], image_shape: Tuple[int, int, int],
                 value_range: Tuple[float, float], random_flip: bool = False, crop: str = "center",
                 resize: bool = True, skip_unreadable: bool = False, max_unreadable: float = 0.01) -> ImageFolder:
    """All images under ``root/split`` if that folder exists, else under ``root``.

    Options (``data.options``): ``random_flip`` (flip horizontally with probability 1/2), ``crop``
    (``"center"`` or ``"random"``: where the (H, W) window is cut), ``resize`` (false: crop from the
    full-resolution image, as LDM trains on patches of large photos), ``skip_unreadable`` and
    ``max_unreadable`` (see :class:`ImageFolder`). The test split is never
    augmented, whatever the options say: it is centre-cropped and not flipped, so evaluation sees the
    same images every time (``resize`` still applies: it sets the scale, not a random draw).

    Raises:
        ValueError: an option value that is not allowed (the registry reports it as a ConfigError).
        DataError: the folder is missing or holds no images.
    """
    for option, value in (("random_flip", random_flip), ("resize", resize), ("skip_unreadable", skip_unreadable)):
        if not isinstance(value, bool):
            raise ValueError(f"{option} must be true or false, got {value!r}.")
    if not (isinstance(max_unreadable, (int, float)) and 0 <= max_unreadable < 1):
        raise ValueError(f"max_unreadable must be a fraction in [0, 1), got {max_unreadable!r}.")
    check_crop(crop)  # before the folder is listed: a bad option is reported first
    base = Path(root)
    if (base / split).is_dir():
        base = base / split
    if not base.is_dir():
        raise DataError(f"Image folder '{base}' does not exist. Set --data-dir (data.root) to a folder of images.")
    found = [p for p in base.rglob("*") if p.is_file()]
    files: List[Path] = sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) were found under '{base}'. Point data.root at a folder "
            "that contains image files (subfolders are searched)."
        )
    if split == "test":  # evaluation: the same images every time
        random_flip, crop = False, "center"
    return ImageFolder(files[:limit], image_shape, value_range, random_flip=random_flip, crop=crop, resize=resize,
                       skip_unreadable=skip_unreadable, max_unreadable=max_unreadable,
                       listing=_listing(base, split, len(files), [p for p in found if p.suffix.lower()
                                                                   not in IMAGE_EXTENSIONS], limit))


def _listing(base: Path, split: str, images: int, others: Sequence[Path], limit: Optional[int]) -> str:
    """"under 'photos/train'; 2 other files skipped (.txt, .json)": what :meth:`ImageFolder.summary` says first."""
    text = f"under '{base}'"
    if base.name != split:
        text += " (no train/ and test/ subfolders: both splits read these images)"
    if limit is not None and limit < images:
        text += f"; the first {limit} of {images} (data.limit)"
    if others:
        kinds = sorted({p.suffix.lower() or p.name for p in others})
        text += (f"; {len(others)} other file{'s' * (len(others) != 1)} skipped ({', '.join(kinds[:5])}"
                 f"{', ...' if len(kinds) > 5 else ''}; images are {', '.join(IMAGE_EXTENSIONS)})")
    return text


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


def is_stream(dataset: object) -> bool:
    """Whether ``dataset`` is a stream that splits itself across ranks and data workers (the ``webdataset`` and
    streamed ``hf_datasets`` plugins): an ``IterableDataset`` with ``bind``, ``set_epoch`` and ``start_at``.

    Such a dataset also has ``__len__`` (the images of an epoch, all ranks together) and ``__getitem__`` (for the
    previews, checks and sampler fit that read a few images), but training iterates it: each rank and worker
    reads its own shards, and a resume starts where the checkpoint's counters say, reading nothing twice.
    """
    return isinstance(dataset, IterableDataset) and all(hasattr(dataset, m) for m in ("bind", "set_epoch", "start_at"))


def prepare_stream(loader: DataLoader, accelerator) -> DataLoader:
    """Accelerate's device-placing loader for a stream (:func:`is_stream`), without its sharding.

    ``accelerator.prepare`` would either read the whole stream on the main process and send each rank its
    batches, or have every rank read all of it and keep every n-th batch; a stream splits itself instead, so it
    is told its rank, the batch size, the loader's worker count and seed (``bind``) and prepared as if for one
    process.

    Raises:
        DataError: the stream cannot be split that way (fewer shards than ranks x workers).
    """
    from accelerate.data_loader import prepare_data_loader

    loader.dataset.bind(rank=accelerator.process_index, world=accelerator.num_processes,
                        batch_size=loader.batch_size, workers=loader.num_workers, seed=loader.generator.initial_seed())
    return prepare_data_loader(loader, device=accelerator.device, num_processes=1, process_index=0,
                               put_on_device=True, dispatch_batches=False, rng_types=[],
                               non_blocking=accelerator.non_blocking)


def resume_batches(accelerator, loader, epoch: int, batches: int):
    """The loader's batches of ``epoch`` from batch ``batches`` on (a mid-epoch resume).

    A stream is told where to start (``start_at``: its readers seek there, decoding nothing they skip); any other
    loader is skipped by Accelerate (``skip_first_batches``: its sampler drops the indices already seen).
    """
    if is_stream(loader.dataset):
        loader.dataset.start_at(epoch, batches)
        return loader
    return accelerator.skip_first_batches(loader, batches)


def describe_dataset(data: DataConfig, dataset: Dataset) -> str:
    """One line for the start of a run: the images found in ``data.split`` and, for a dataset with a
    ``summary()`` method (an image folder: sizes, resizes, mode conversions, skipped files), what reading them does.

    Example:
        >>> describe_dataset(DataConfig(root="data"), build_dataset(DataConfig(root="data"), ModelConfig()))  # doctest: +SKIP
        "Data: 60000 images in the train split of 'mnist' at 'data'"
    """
    line = f"Data: {len(dataset)} images in the {data.split} split of '{data.name}' at '{data.root}'"
    if data.limit is not None:
        line += f" (data.limit: {data.limit})"
    summary = getattr(dataset, "summary", None)
    if callable(summary):
        try:
            said = summary()
        except Exception as exc:  # noqa: BLE001 - a plugin's summary must never stop a run
            said = f"(its summary() failed: {type(exc).__name__}: {exc})"
        if said:
            line += f", {said}"
    return line


def image_of(item: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """The images of a dataset item or a DataLoader batch: ``item`` itself, or the first element of an
    ``(image, label)`` pair (a dataset plugin may return either; vaegan never trains on labels).

    Example:
        >>> image_of((torch.zeros(1, 2, 2), 7)).shape
        torch.Size([1, 2, 2])
    """
    return item[0] if isinstance(item, (list, tuple)) else item


def first_batch(dataset: Dataset, n: int) -> Tensor:
    """The first ``n`` images of a dataset as one (n, C, H, W) batch (labels dropped)."""
    return torch.stack([image_of(dataset[i]) for i in range(min(n, len(dataset)))])
