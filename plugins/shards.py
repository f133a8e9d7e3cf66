"""The ``webdataset`` dataset plugin: images in WebDataset tar shards, split by rank and by data worker.

A shard is a plain (uncompressed) tar file of samples: consecutive members that share a key, one member per
field, named ``<key>.<extension>`` (``000017.jpg``, ``000017.cls``), as ``webdataset.ShardWriter`` writes them.
``data.options.shards`` names them with a brace pattern (``shards-{000000..000099}.tar``; ``{split}`` is
replaced by ``data.split``), relative to ``data.root`` or absolute.

Every shard's member headers are read once when the dataset is built (no image data): that gives the exact
number of images, catches empty, truncated or compressed shards and samples without an image before training,
and records where each image lies, so that a reader seeks straight to it. Training reads the shards as a
stream (:class:`vaegan_plugins._streaming.ImageStream`): each epoch shuffles the shard order (seeded), gives
reader ``s`` of ``S`` (ranks x data workers) the shards ``s, s + S, ...``, and shuffles their samples in a
buffer of ``shuffle_buffer``; the images are decoded in the data workers by image_folder's decoder
(:meth:`vaegan.data.ImageFolder.decode`: the same resize, crop, flips, channels and value range). A resume
recomputes every reader's position from the trainer's counters and seeks there, reading nothing twice.

Turn a folder of images into shards (``--labels``: each image's subfolder, as an integer class, in ``.cls``):

    python -m vaegan_plugins.shards path/to/images data/shards --per-shard 1000

Example:
    >>> cfg = "data: {name: webdataset, root: data, options: {shards: 'shards-{000000..000009}.tar'}}"  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch import Tensor

from vaegan.data import IMAGE_EXTENSIONS, ImageFolder, check_crop
from vaegan.errors import DataError

from ._streaming import ImageStream, item_seed

__all__ = ["Shard", "ShardImages", "ShardStream", "webdataset", "index_shard", "write_shards"]

logger = logging.getLogger(__name__)

# Extensions (lower case, as webdataset lowercases them) taken as the image when image_key is not given.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar reader skips (__key__-like metadata)


@dataclass
class Shard:
    """One tar shard's index: per sample the name of its image member and where that member's data lies.

    Attributes:
        path: The tar file.
        names: Each sample's image member (``000017.jpg``), in file order.
        image: (N, 2) int64: byte offset and size of each sample's image member.
        label: (N, 2) int64 of the label members, or None when no label key is read.
    """

    path: Path
    names: List[str]
    image: np.ndarray
    label: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.names)

    def head(self, n: int) -> "Shard":
        """The first ``n`` samples (``data.limit``)."""
        label = self.label[:n] if self.label is not None else None
        return Shard(self.path, self.names[:n], self.image[:n], label)


def _split_name(name: str) -> Tuple[Optional[str], Optional[str]]:
    # webdataset's own rule for a member's sample key and extension
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return key, (ext.lower() if ext is not None else None)


def index_shard(path: Path, image_key: Optional[str], label_key: Optional[str],
                skip_unreadable: bool = False) -> Shard:
    """Read a shard's member headers (no data) into a :class:`Shard`.

    Raises:
        DataError: the file is not an uncompressed tar, is truncated, or a sample lacks the image (or label)
            member (with ``skip_unreadable``, such samples are left out with a warning).
    """
    size = path.stat().st_size
    samples: List[Tuple[str, dict]] = []
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": random access needs an uncompressed tar
            while (member := tar.next()) is not None:
                tar.members = []  # keep no TarInfo list: memory stays flat for shards of many members
                if not member.isreg() or _META.match(member.name):
                    continue
                key, ext = _split_name(member.name)
                if key is None:
                    continue
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member '{member.name}' ends past the end of the file")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"Shard '{path}' cannot be read as an uncompressed tar file ({exc}): it is truncated, "
                        "compressed or not a tar. Write it again (python -m vaegan_plugins.shards), decompress it, "
                        "or leave it out of data.options.shards.") from None
    names, image, label = [], [], []
    missing = 0
    for key, members in samples:
        # The image: the named extension, else the sample's first image extension (shards may mix jpg and png).
        ext = image_key if image_key is not None else next((e for e in IMAGE_KEYS if e in members), None)
        absent = ("image" if ext is None else f"'{ext}'" if ext not in members
                  else f"'{label_key}'" if label_key is not None and label_key not in members else None)
        if absent is not None:
            if not skip_unreadable:
                raise DataError(f"Sample '{key}' of shard '{path}' has no {absent} member (its members: "
                                f"{', '.join(sorted(members))}). Set data.options.image_key / label_key to the "
                                "extensions the shards use, write the shard again, or set "
                                "data.options.skip_unreadable: true to leave such samples out.")
            missing += 1
            continue
        names.append(f"{key}.{ext}")
        image.append(members[ext])
        if label_key is not None:
            label.append(members[label_key])
    if missing:
        logger.warning("Shard '%s': %d samples without an image%s member left out (data.options.skip_unreadable).",
                       path, missing, "" if label_key is None else f" or a '{label_key}'")
    return Shard(path, names, _offsets(image), _offsets(label) if label_key is not None else None)


def _offsets(rows: List[Tuple[int, int]]) -> np.ndarray:
    """(offset, size) pairs as an (N, 2) int64 array (compact for shards of many samples)."""
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _read(path: Path, where: np.ndarray) -> bytes:
    offset, size = (int(v) for v in where)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class ShardImages(ImageFolder):
    """Random access to the images of indexed shards (item ``i``: the ``i``-th sample in shard order), decoded
    as :class:`~vaegan.data.ImageFolder` decodes files; items are (image, label) pairs when a label is read."""

    def __init__(self, shards: Sequence[Shard], image_shape: Tuple[int, int, int], value_range: Tuple[float, float],
                 **transform) -> None:
        super().__init__((), image_shape, value_range, **transform)
        self.shards = list(shards)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # (n_shards + 1,)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> Tuple[Shard, int]:
        """The shard and the sample within it of item ``index``."""
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[s], index - int(self.starts[s])

    def _read(self, index: int) -> Union[Tensor, Tuple[Tensor, int]]:
        shard, j = self.locate(index)
        image = self.decode(io.BytesIO(_read(shard.path, shard.image[j])))
        if shard.label is None:
            return image
        text = _read(shard.path, shard.label[j]).decode("utf-8", "replace").strip()
        try:
            return image, int(text)
        except ValueError:
            raise DataError(f"The label of sample '{shard.names[j]}' in shard '{shard.path}' is {text[:40]!r}, not an "
                            "integer class. Point data.options.label_key at an integer field, or leave it unset.") from None

    def _cannot_read(self, index: int, exc: OSError) -> str:
        shard, j = self.locate(index)
        return f"Image '{shard.names[j]}' in shard '{shard.path}' cannot be read ({exc})"


class ShardStream(ImageStream):
    """The training stream over tar shards (see the module's docstring)."""

    def __init__(self, images: ShardImages, name: str, shuffle_buffer: int) -> None:
        super().__init__(images, len(images), name)
        self.shuffle_buffer = int(shuffle_buffer)
        self.describe = (f"in {len(images.shards)} tar shards, read as a stream: shards shuffled per epoch and split "
                         f"by rank and data worker, samples shuffled in a buffer of {self.shuffle_buffer}")

    def _order(self, epoch: int) -> np.ndarray:
        """Shard indices in epoch ``epoch``'s order (the same on every rank)."""
        n = len(self.images.shards)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _bound(self) -> None:
        shards, readers = self.images.shards, self.readers
        if len(shards) < readers:
            raise DataError(
                f"data.options.shards names {len(shards)} shards (with images), but {self.world} processes x "
                f"{max(1, self.workers)} data "
                f"workers make {readers} readers, each of which reads whole shards. Write the data into at least "
                f"{readers} shards (several per reader balance the epoch better), or lower data.num_workers.")
        quotas = [self.quota(k, max(1, self.workers)) for _ in range(self.world) for k in range(max(1, self.workers))]
        parts = np.zeros(readers, dtype=np.int64)
        for i, s in enumerate(self._order(0)):
            parts[i % readers] += len(shards[s])
        repeated = int(np.clip(np.asarray(quotas) - parts, 0, None).sum())
        if repeated and self.rank == 0:
            logger.warning("%s: its %d shards do not split evenly over %d readers (processes x data workers): in "
                           "epoch 0, %d images are read twice and as many wait for another epoch. Shards of equal "
                           "size, in a multiple of %d, give every image once per epoch.", self.name, len(shards),
                           readers, repeated, readers)

    def _items(self, epoch: int, slot: int, slots: int) -> Iterator[int]:
        images = self.images
        mine = self._order(epoch)[slot::slots]
        ids: Iterator[int] = (int(images.starts[s]) + j for s in mine for j in range(len(images.shards[s])))
        if self.shuffle and self.shuffle_buffer > 1:
            import webdataset as wds

            # Over indices, not bytes: a resume replays the buffer without reading the images it skips.
            rng = random.Random(item_seed(self.seed, epoch, slot))
            ids = wds.shuffle(bufsize=self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(ids)
        return iter(ids)


def _shard_paths(root: str, split: str, shards: Union[str, Sequence[str]], skip_unreadable: bool) -> List[Path]:
    from webdataset.shardlists import expand_urls

    patterns = [shards] if isinstance(shards, str) else list(shards)
    names: List[str] = []
    for pattern in patterns:
        names += expand_urls(str(pattern).replace("{split}", split))
    paths = [Path(n) if Path(n).is_absolute() else Path(root) / n for n in names]
    found = [p for p in paths if p.is_file()]
    shown = f"'{patterns[0]}'" if len(patterns) == 1 else f"{patterns}"
    if not found:
        raise DataError(f"No shard of data.options.shards = {shown} exists: its {len(paths)} names (from '{paths[0]}' "
                        f"to '{paths[-1]}') match no file. Set --data-dir (data.root) to the folder that holds the "
                        "shards, or correct the pattern (python -m vaegan_plugins.shards writes shards from a folder).")
    if len(found) < len(paths):
        missing = [str(p) for p in paths if not p.is_file()]
        text = (f"{len(missing)} of the {len(paths)} shards of data.options.shards = {shown} do not exist (the first: "
                f"'{missing[0]}')")
        if not skip_unreadable:
            raise DataError(f"{text}. Copy them there, narrow the pattern to the shards you have, or set "
                            "data.options.skip_unreadable: true to train on the others.")
        logger.warning("%s; training on the %d others (data.options.skip_unreadable).", text, len(found))
    return found


def webdataset(root: str, split: str, download: bool, limit: Optional[int], image_shape: Tuple[int, int, int],
               value_range: Tuple[float, float], shards: Union[str, List[str]], image_key: Optional[str] = None,
               label_key: Optional[str] = None, shuffle_buffer: int = 1000, random_flip: bool = False,
               crop: str = "center", resize: bool = True, skip_unreadable: bool = False,
               max_unreadable: float = 0.01) -> ShardStream:
    """Images in WebDataset tar shards (the ``webdataset`` dataset plugin; ``vaegan[webdataset]``).

    Args:
        shards: A brace pattern (or a list of them) of tar files, relative to ``root`` or absolute;
            ``{split}`` is replaced by ``split``.
        image_key: The image members' extension (``jpg``); default: each sample's first image extension.
        label_key: An integer class member (``cls``): items are then (image, label) pairs.
        shuffle_buffer: Samples each reader shuffles among (after the per-epoch shard shuffle); 0 or 1: off.
        random_flip, crop, resize, skip_unreadable, max_unreadable: as image_folder's. The test split is never
            augmented. ``skip_unreadable`` also leaves out missing and empty shards and samples without an image.

    Raises:
        ValueError: an option value that is not allowed.
        DataError: no shard matches; a shard is missing, empty, truncated, compressed, or has a sample without
            its image or label member.

    Example:
        >>> ds = webdataset("data", "train", False, None, (3, 64, 64), (-1.0, 1.0), shards="s-{0..3}.tar")  # doctest: +SKIP
    """
    for option, value in (("random_flip", random_flip), ("resize", resize), ("skip_unreadable", skip_unreadable)):
        if not isinstance(value, bool):
            raise ValueError(f"{option} must be true or false, got {value!r}.")
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be a number of samples >= 0, got {shuffle_buffer!r}.")
    for option, value in (("image_key", image_key), ("label_key", label_key)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{option} must be a member extension such as 'jpg' or 'cls', got {value!r}.")
    if not isinstance(shards, (str, list)) or not shards:
        raise ValueError(f"shards must be a brace pattern of tar files (or a list of them), got {shards!r}.")
    check_crop(crop)
    paths = _shard_paths(root, split, shards, skip_unreadable)
    index: List[Shard] = []
    total = 0
    for path in paths:
        if limit is not None and total >= limit:
            break
        shard = index_shard(path, image_key and image_key.lower(), label_key and label_key.lower(), skip_unreadable)
        if not len(shard):
            text = f"Shard '{path}' holds no samples (an empty tar: a writer that stopped before its first sample?)"
            if not skip_unreadable:
                raise DataError(f"{text}. Write it again, leave it out of data.options.shards, or set "
                                "data.options.skip_unreadable: true to train without it.")
            logger.warning("%s: left out (data.options.skip_unreadable).", text)
            continue
        if limit is not None:
            shard = shard.head(limit - total)
        index.append(shard)
        total += len(shard)
    if not index:
        raise DataError(f"None of the {len(paths)} shards of data.options.shards = {shards!r} holds a sample with an "
                        "image. Write the shards again (python -m vaegan_plugins.shards).")
    if split == "test":  # evaluation: the same images every time
        random_flip, crop = False, "center"
    images = ShardImages(index, image_shape, value_range, random_flip=random_flip, crop=crop, resize=resize,
                         skip_unreadable=skip_unreadable, max_unreadable=max_unreadable)
    name = f"The shards '{shards}'" if isinstance(shards, str) else f"The shards {shards}"
    logger.info("%s: %d images in %d shards under '%s'.", name, len(images), len(index), root)
    return ShardStream(images, name, shuffle_buffer)


# ---- writing shards ------------------------------------------------------------------------------------


def write_shards(folder: Union[str, Path], out: Union[str, Path], per_shard: int = 1000, prefix: str = "shards",
                 labels: bool = False, seed: Optional[int] = 0) -> List[Path]:
    """Write every image under ``folder`` (as image_folder finds them) into tar shards ``out/<prefix>-NNNNNN.tar``.

    Each sample holds the file's bytes unchanged under its own extension (``.jpg``, ``.png``), keyed by its
    number. Each shard is written under a temporary name and renamed when complete, so a stopped run leaves
    no partial shard under the final name.

    Args:
        per_shard: Samples per shard (equal-sized shards, in a multiple of ranks x workers, make an epoch exact).
        labels: Also write ``.cls``: the index of the image's subfolder among the sorted subfolders.
        seed: Shuffle the images before writing (a shard then holds a sample of the whole folder, as the
            stream's shard-level shuffle expects); None keeps the sorted order.

    Returns:
        The shards written.

    Example:
        >>> write_shards("images", "data", per_shard=1000)  # doctest: +SKIP
    """
    import webdataset as wds

    folder, out = Path(folder), Path(out)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under '{folder}'.")
    classes = sorted({p.parent.relative_to(folder).as_posix() for p in files})
    if seed is not None:
        random.Random(seed).shuffle(files)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []

    def complete(tmp_name: str) -> None:  # the writer's `post` hook: a finished shard gets its final name
        final = out / Path(tmp_name).name[len(".tmp-"):]
        os.replace(tmp_name, final)
        written.append(final)

    with wds.ShardWriter(str(out / f".tmp-{prefix}-%06d.tar"), maxcount=per_shard, post=complete, verbose=0) as sink:
        for i, path in enumerate(files):
            sample = {"__key__": f"{i:09d}", path.suffix.lower().lstrip("."): path.read_bytes()}
            if labels:
                sample["cls"] = str(classes.index(path.parent.relative_to(folder).as_posix())).encode()
            sink.write(sample)
    logger.info("Wrote %d images into %d shards under '%s'.", len(files), len(written), out)
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m vaegan_plugins.shards FOLDER OUT``: a folder of images into tar shards."""
    parser = argparse.ArgumentParser(description="Write a folder of images into WebDataset tar shards for the "
                                                 "`webdataset` dataset plugin.")
    parser.add_argument("folder", help="the images (subfolders are searched)")
    parser.add_argument("out", help="where the shards go (created)")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--prefix", default="shards", help="shard names: PREFIX-000000.tar, ... (default shards)")
    parser.add_argument("--labels", action="store_true", help="write each image's subfolder as an integer .cls")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_shards(args.folder, args.out, args.per_shard, args.prefix, args.labels,
                         None if args.no_shuffle else 0)
    last = len(paths) - 1
    logger.info("Train on them with data.name: webdataset, data.root: %s, data.options.shards: '%s-{000000..%06d}.tar'",
                args.out, args.prefix, last)


if __name__ == "__main__":
    main()
