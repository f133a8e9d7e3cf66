"""The ``hf_datasets`` dataset plugin: images in a Hugging Face ``datasets`` dataset, map-style or streamed.

Where the data comes from (``data.options.path``, relative to ``data.root`` or absolute; default: the root):

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``datasets.load_from_disk``
  (memory-mapped Arrow, nothing is copied);
- any other local folder or file (Parquet, Arrow, JSON lines, an image folder): ``datasets.load_dataset``;
- otherwise a Hugging Face Hub id (``user/name``, with ``subset``), when ``data.download`` is true and the
  network allows.

``image_column`` holds the images (an ``Image`` feature, bytes, or file paths), ``label_column`` an optional
integer class (items are then (image, label) pairs). Images are decoded by image_folder's decoder
(:meth:`vaegan.data.ImageFolder.decode`): the same resize, crop, flips, channels and value range.

Map-style (the default) is an Arrow table read by index: the trainer's sampler shuffles it and splits it
across ranks, and a resume is exact as for an image folder. ``streaming: true`` reads it as
``datasets.IterableDataset`` instead (shards in order, no random reads: what a network file system or the Hub
wants): each epoch ``IterableDataset.shuffle`` shuffles the shard order and a buffer of ``shuffle_buffer`` rows,
and ``datasets.distributed.split_dataset_by_node`` gives each of the ranks x data workers its own part
(:class:`vaegan_plugins._streaming.ImageStream` says what an epoch is). A resume recomputes every reader's
position from the trainer's counters and skips the rows before it without decoding them.

Turn a folder of images into a dataset (``--labels``: each image's subfolder as an integer ``label``):

    python -m vaegan_plugins.hf_datasets path/to/images data/my_images

Example:
    >>> cfg = "data: {name: hf_datasets, root: data/my_images, options: {image_column: image}}"  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

from torch import Tensor

from vaegan.data import IMAGE_EXTENSIONS, ImageFolder, check_crop
from vaegan.errors import DataError

from ._streaming import ImageStream

__all__ = ["ArrowImages", "RowImages", "HFStream", "hf_datasets", "write_dataset"]

logger = logging.getLogger(__name__)

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk leaves in the folder (a dict, or one split)


def _source(cell: Any, row: Optional[int], base: Optional[Path]) -> Union[io.BytesIO, str]:
    """A cell of the image column as something PIL opens: bytes, or a file path (relative to ``base``)."""
    if isinstance(cell, dict):  # an Image feature read with decode=False: {"bytes": ..., "path": ...}
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return io.BytesIO(cell)
    if isinstance(cell, str) and cell:
        return cell if base is None or Path(cell).is_absolute() else str(base / cell)
    raise OSError(f"{'a row' if row is None else f'row {row}'} holds no image ({type(cell).__name__})")


class RowImages(ImageFolder):
    """Items from rows of a table (anything indexable returning dicts): image_folder's decoder on the image cell,
    with the label cell as an int when a label column is named."""

    def __init__(self, rows: Any, image_column: str, label_column: Optional[str], base: Optional[Path],
                 image_shape: Tuple[int, int, int], value_range: Tuple[float, float], **transform) -> None:
        super().__init__((), image_shape, value_range, **transform)
        self.rows, self.image_column, self.label_column, self.base = rows, image_column, label_column, base

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, row: dict, index: Optional[int] = None) -> Union[Tensor, Tuple[Tensor, int]]:
        """The item of one row (``index``: its number, for messages; None in a stream)."""
        image = self.decode(_source(row[self.image_column], index, self.base))
        if self.label_column is None:
            return image
        label = row[self.label_column]
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{'A row' if index is None else f'Row {index}'} of column '{self.label_column}' "
                            f"(data.options.label_column) holds "
                            f"{label!r}, not an integer class. Name an integer column, or leave label_column unset.")
        return image, label

    def _read(self, index: int) -> Union[Tensor, Tuple[Tensor, int]]:
        return self.item(self.rows[index], index)

    def _cannot_read(self, index: int, exc: OSError) -> str:
        return f"The image of row {index} (column '{self.image_column}') cannot be read ({exc})"


class ArrowImages(RowImages):
    """Random access to a ``datasets.Dataset`` (memory-mapped Arrow): the map-style ``hf_datasets`` dataset."""


class _Head:
    """The first rows of a stream, read in order as far as asked and kept (undecoded) for random access."""

    def __init__(self, stream: Any, length: int) -> None:
        self.stream, self.length = stream, length
        self.rows: List[dict] = []
        self._it: Optional[Iterator[dict]] = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if self._it is None:
            self._it = iter(self.stream)
        while len(self.rows) <= index:
            try:
                self.rows.append(next(self._it))
            except StopIteration:
                raise IndexError(f"the stream ended after {len(self.rows)} rows") from None
        return self.rows[index]

    def __getstate__(self) -> dict:  # data workers get the rows read so far, not the open iterator
        return {**self.__dict__, "_it": None}


class HFStream(ImageStream):
    """The training stream over a ``datasets.IterableDataset`` (see the module's docstring).

    Args:
        images: Random access for previews and checks: the Arrow table of a local dataset, else the stream's
            first rows (read in order: ``random_access`` is then False).
        stream: The rows, images undecoded; or None to stream ``images``'s Arrow table.
        shuffle_buffer: Rows each reader shuffles among (``IterableDataset.shuffle``'s buffer).
    """

    def __init__(self, images: RowImages, length: int, name: str, stream: Any, shuffle_buffer: int) -> None:
        super().__init__(images, length, name)
        self.stream, self.shuffle_buffer = stream, int(shuffle_buffer)
        self.random_access = stream is None
        self._iterable = stream
        self.describe = (f"streamed ({'an Arrow table' if stream is None else 'read in order, no random access'}): "
                         f"split_dataset_by_node per rank and data worker, rows shuffled in a buffer of "
                         f"{self.shuffle_buffer}")

    def _bound(self) -> None:
        if self.stream is None:  # a local table: as many equal shards as readers (x 8: a finer shard shuffle)
            table = self.images.rows
            self._iterable = table.to_iterable_dataset(num_shards=max(1, min(len(table), self.readers * 8)))
        else:
            self._iterable = self.stream
        # Shard order and a row buffer, reshuffled every epoch (set_epoch) from the same seed on every rank.
        self._iterable = self._iterable.shuffle(seed=self.seed, buffer_size=max(1, self.shuffle_buffer))

    def _items(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        from datasets.distributed import split_dataset_by_node

        source = self._iterable
        if source is None:  # never bound: index order, for the dataset contract and plain DataLoaders
            source = self.images.rows.to_iterable_dataset() if self.stream is None else self.stream
        part = split_dataset_by_node(source, rank=slot, world_size=slots)
        part.set_epoch(epoch)
        # .iter(): this split is the whole split; iterating the dataset itself inside a DataLoader worker would
        # split it across the workers once more.
        for batch in part.iter(batch_size=64):
            names = list(batch)
            yield from (dict(zip(names, values)) for values in zip(*batch.values()))

    def _image(self, item: dict, ahead) -> Any:
        images = self.images
        try:
            return images.item(item)
        except OSError as exc:
            reason = f"An image of {self.name} (column '{images.image_column}') cannot be read ({exc})"
            if not images.skip_unreadable:
                raise DataError(f"{reason}; repair the dataset, or set data.options.skip_unreadable: true to skip "
                                "such images.") from None
            images._skipped(reason)
        for i in range(1000):  # the next readable row of this reader's stream stands in (not consumed)
            upcoming = ahead.peek(i)
            try:
                return images.item(upcoming)
            except OSError:
                continue
        raise DataError(f"1000 images in a row of {self.name} cannot be read; repair the dataset.")


def _location(root: str, path: Optional[str]) -> Tuple[Path, Optional[str]]:
    """The local path the data would be at, and the hub id to try when nothing is there."""
    if path is None:
        return Path(root), None
    local = Path(path) if Path(path).is_absolute() else Path(root) / path
    return local, (path if not Path(path).is_absolute() else None)


def _pick_split(loaded: Any, split: str, where: str) -> Any:
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in loaded:
            raise DataError(f"The dataset at {where} has no '{split}' split (its splits: {', '.join(loaded)}). Set "
                            "data.split to one of them, or save the split under that name.")
        return loaded[split]
    return loaded  # one split saved on its own: used for train and test alike, as an image folder is


def _load(root: str, split: str, download: bool, path: Optional[str], subset: Optional[str], streaming: bool):
    """(dataset, where, the folder relative image paths start from)."""
    import datasets

    local, hub = _location(root, path)
    try:
        if local.is_dir() and any((local / name).is_file() for name in _SAVED):
            loaded = datasets.load_from_disk(str(local))  # memory-mapped: kept for random access when streamed
            return _pick_split(loaded, split, f"'{local}'"), f"'{local}'", local
        if local.exists():
            builder = BUILDERS.get(local.suffix.lower()) if local.is_file() else None
            args = (builder,) if builder else (str(local),)
            kwargs = {"data_files": str(local)} if builder else {}
            loaded = datasets.load_dataset(*args, subset, streaming=streaming, **kwargs)
            return _pick_split(loaded, split, f"'{local}'"), f"'{local}'", local if local.is_dir() else local.parent
    except DataError:
        raise
    except Exception as exc:  # datasets' own errors: a folder it cannot read, files of mixed formats
        raise DataError(f"The dataset at '{local}' cannot be loaded by the datasets library ({type(exc).__name__}: "
                        f"{str(exc)[:300]}). Point data.options.path (or data.root) at a folder written by "
                        "save_to_disk, or at Parquet/Arrow files.") from None
    if hub is None or not download:
        why = "" if hub is None else f" ('{hub}' is read as a Hugging Face Hub id only with data.download: true)"
        raise DataError(f"No dataset at '{local}'{why}. Set --data-dir (data.root) or data.options.path to a folder "
                        "written by Dataset.save_to_disk, or to Parquet/Arrow files (python -m "
                        "vaegan_plugins.hf_datasets makes one from a folder of images).")
    try:
        loaded = datasets.load_dataset(hub, subset, streaming=streaming)
    except Exception as exc:  # no network, no such dataset, a gated one
        raise DataError(f"The Hugging Face Hub dataset '{hub}' cannot be loaded ({type(exc).__name__}: "
                        f"{str(exc)[:300]}). Check the id and the network, or download it once and point "
                        "data.options.path at the local copy.") from None
    return _pick_split(loaded, split, f"'{hub}' (Hub)"), f"'{hub}'", None


def hf_datasets(root: str, split: str, download: bool, limit: Optional[int], image_shape: Tuple[int, int, int],
                value_range: Tuple[float, float], path: Optional[str] = None, image_column: str = "image",
                label_column: Optional[str] = None, streaming: bool = False, subset: Optional[str] = None,
                num_images: Optional[int] = None, shuffle_buffer: int = 1000, random_flip: bool = False,
                crop: str = "center", resize: bool = True, skip_unreadable: bool = False,
                max_unreadable: float = 0.01) -> Union[ArrowImages, HFStream]:
    """Images of a Hugging Face dataset (the ``hf_datasets`` dataset plugin; ``vaegan[hf]``).

    Args:
        path: Where the dataset is (relative to ``root`` or absolute; default ``root``), or a Hub id.
        image_column: The column of images (``Image`` feature, bytes or file paths).
        label_column: An integer class column: items are then (image, label) pairs.
        streaming: Read it as an ``IterableDataset`` split across ranks and workers (see the module's docstring).
        subset: The dataset's configuration name (``load_dataset(path, subset)``), for data files and the Hub.
        num_images: The images of an epoch, for a stream whose metadata does not say (Parquet files, some Hub
            datasets); each rank then reads ``num_images / processes`` per epoch.
        shuffle_buffer: Rows each reader of a stream shuffles among.
        random_flip, crop, resize, skip_unreadable, max_unreadable: as image_folder's. The test split is never
            augmented.

    Raises:
        ValueError: an option value that is not allowed.
        DataError: no dataset there, no such split or column, a column of something else than images, or a
            stream of unknown length without ``num_images``.

    Example:
        >>> ds = hf_datasets("data/my_images", "train", False, None, (3, 64, 64), (-1.0, 1.0))  # doctest: +SKIP
    """
    for option, value in (("random_flip", random_flip), ("resize", resize), ("skip_unreadable", skip_unreadable),
                          ("streaming", streaming)):
        if not isinstance(value, bool):
            raise ValueError(f"{option} must be true or false, got {value!r}.")
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be a number of rows >= 0, got {shuffle_buffer!r}.")
    if num_images is not None and (not isinstance(num_images, int) or num_images < 1):
        raise ValueError(f"num_images must be a positive number of images, got {num_images!r}.")
    if not isinstance(image_column, str) or not image_column:
        raise ValueError(f"image_column must be a column name, got {image_column!r}.")
    check_crop(crop)
    try:
        import datasets
    except ImportError:
        raise DataError("The hf_datasets dataset plugin needs the datasets library: pip install 'vaegan[hf]'.") from None

    ds, where, base = _load(root, split, download, path, subset, streaming)
    columns = list(ds.column_names or (ds.features or {}))
    if not columns and not isinstance(ds, datasets.Dataset):  # a stream that does not declare its columns
        columns = list(next(iter(ds), {}))
    for option, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and columns and column not in columns:
            raise DataError(f"The dataset at {where} ({split} split) has no column '{column}' (its columns: "
                            f"{', '.join(columns)}). Set data.options.{option} to the column that holds the "
                            f"{'images' if option == 'image_column' else 'integer classes'}.")
    feature = (ds.features or {}).get(image_column)
    if isinstance(feature, datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decoded by vaegan, in the workers
    elif feature is not None and getattr(feature, "dtype", None) not in ("binary", "large_binary", "string",
                                                                         "large_string"):
        raise DataError(f"Column '{image_column}' of the dataset at {where} holds {feature}, not images (an Image "
                        "feature, bytes or file paths). Set data.options.image_column to the image column.")
    keep = [c for c in (image_column, label_column) if c is not None]
    ds = ds.select_columns(keep)
    if split == "test":  # evaluation: the same images every time
        random_flip, crop = False, "center"
    transform = dict(random_flip=random_flip, crop=crop, resize=resize, skip_unreadable=skip_unreadable,
                     max_unreadable=max_unreadable)
    name = f"The dataset at {where} ({split} split)"
    if isinstance(ds, datasets.Dataset):  # an Arrow table: map-style, or streamed from the table
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        if len(ds) == 0:
            raise DataError(f"{name} is empty.")
        images = ArrowImages(ds, image_column, label_column, base, image_shape, value_range, **transform)
        logger.info("%s: %d images%s.", name, len(ds), ", streamed" if streaming else "")
        return HFStream(images, len(ds), name, None, shuffle_buffer) if streaming else images
    # A stream without random access (data files or the Hub, streaming: true).
    info = getattr(ds, "info", None)
    known = info.splits[split].num_examples if info is not None and info.splits and split in info.splits else None
    length = num_images or known
    if limit is not None:
        ds, length = ds.take(limit), min(limit, length or limit)
    if not length:
        raise DataError(f"{name} is streamed and does not say how many images it holds, which an epoch needs. Set "
                        "data.options.num_images to its number of images (each rank reads num_images / processes "
                        "per epoch), or load it map-style (streaming: false).")
    images = RowImages(_Head(ds, length), image_column, label_column, base, image_shape, value_range, **transform)
    logger.info("%s: %d images, streamed in order.", name, length)
    return HFStream(images, length, name, ds, shuffle_buffer)


# ---- writing a dataset ---------------------------------------------------------------------------------


def write_dataset(folder: Union[str, Path], out: Union[str, Path], labels: bool = False,
                  max_shard_size: str = "500MB") -> int:
    """Save every image under ``folder`` (as image_folder finds them) as a dataset at ``out`` (``save_to_disk``):
    an ``image`` column holding each file's bytes unchanged (and ``label``: the index of its subfolder).

    Returns:
        The number of images saved.

    Example:
        >>> write_dataset("images", "data/my_images")  # doctest: +SKIP
    """
    import datasets

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under '{folder}'.")
    classes = sorted({p.parent.relative_to(folder).as_posix() for p in files})
    features = {"image": datasets.Image()}
    if labels:
        features["label"] = datasets.ClassLabel(names=classes)

    def rows() -> Iterator[dict]:
        for p in files:
            row = {"image": {"bytes": p.read_bytes(), "path": p.relative_to(folder).as_posix()}}
            if labels:
                row["label"] = classes.index(p.parent.relative_to(folder).as_posix())
            yield row

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=out.parent) as cache:  # not the user's HF cache
        ds = datasets.Dataset.from_generator(rows, features=datasets.Features(features), cache_dir=cache)
        ds.save_to_disk(str(out), max_shard_size=max_shard_size)
    logger.info("Saved %d images to '%s'.", len(ds), out)
    return len(ds)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m vaegan_plugins.hf_datasets FOLDER OUT``: a folder of images into a saved dataset."""
    parser = argparse.ArgumentParser(description="Save a folder of images as a Hugging Face dataset for the "
                                                 "`hf_datasets` dataset plugin.")
    parser.add_argument("folder", help="the images (subfolders are searched)")
    parser.add_argument("out", help="the dataset folder to write (save_to_disk)")
    parser.add_argument("--labels", action="store_true", help="a `label` column: each image's subfolder")
    parser.add_argument("--max-shard-size", default="500MB", help="Arrow file size (default 500MB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_dataset(args.folder, args.out, args.labels, args.max_shard_size)
    logger.info("Train on it with data.name: hf_datasets, data.root: %s", args.out)


if __name__ == "__main__":
    main()
