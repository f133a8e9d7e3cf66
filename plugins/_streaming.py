"""Streams of images split across ranks and data workers, with an exact resume: what the ``webdataset`` and
streamed ``hf_datasets`` dataset plugins share.

A stream is an ``IterableDataset`` that the trainer iterates (:func:`vaegan.data.is_stream`); it also has
``__len__`` and ``__getitem__`` (an :class:`~vaegan.data.ImageFolder` over the same data, ``images``) for the
few images that previews, checks and the sampler fit read. One epoch, with R ranks of W data workers each
(S = R x max(W, 1) readers):

- every rank yields ``len(dataset) // (batch x R)`` batches: the trainer's epoch, the same on every rank, so
  no rank waits in an all-reduce for one that ran out of data;
- reader ``s = rank x W + worker`` reads only its own part of the data (a subclass's :meth:`ImageStream._items`
  splits shards, or rows, by ``s``) and yields exactly the batches the DataLoader takes from it (worker ``k``
  gives the rank's batches ``k, k + W, ...``), so each rank sees the images of its readers and no other rank
  sees them in that epoch;
- a part shorter than its quota is read again from its start (those images are repeated in the epoch), a
  longer one is cut (its last images wait for another epoch's order): with parts of equal size (shards of
  equal size, in a multiple of S) every image is seen exactly once;
- random augmentation (``crop: random``, ``random_flip``) draws from torch's RNG seeded by (seed, epoch,
  reader, position), so it depends neither on the worker processes nor on a resume;
- a resume at batch ``b`` of epoch ``e`` (:meth:`ImageStream.start_at`) makes each reader skip the items it had
  yielded, in the epoch's order: the same batches follow as in the uninterrupted run. The same data order
  needs the same processes and ``data.num_workers`` as the interrupted run (they decide the readers).

The epoch and the resume point reach the worker processes through shared memory: with persistent workers
the dataset object in a worker is a copy made when the workers started.
"""

from __future__ import annotations

import logging
import multiprocessing
from itertools import islice
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vaegan.data import ImageFolder
from vaegan.errors import DataError

__all__ = ["ImageStream", "item_seed"]

logger = logging.getLogger(__name__)


def item_seed(*keys: int) -> int:
    """A 32-bit seed mixed from integers (seed, epoch, reader, position): independent streams for each."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class ImageStream(IterableDataset):
    """Base class of the stream datasets (see the module's docstring for what an epoch is).

    Subclasses implement :meth:`_items` (one pass over a reader's part, as items cheap to skip: a global
    index, or an undecoded row) and, when the items are not indices into ``images``, :meth:`_image`.

    Args:
        images: The same data with random access (and the decoder): item ``i`` of the stream's index order.
        length: Images in an epoch, all ranks together.
        name: What the messages call the data (a shard pattern, a dataset path).
    """

    random_access = True  # images[i] costs the same for any i (False: read in order from the start)

    def __init__(self, images: ImageFolder, length: int, name: str) -> None:
        self.images = images
        self.length = int(length)
        self.name = name
        self.describe = "read as a stream split by rank and data worker"  # subclasses say more
        # What the trainer reads to log data/unreadable_images (the same counters as an image folder's).
        self.skip_unreadable = images.skip_unreadable
        self.unreadable = images.unreadable
        self.rank, self.world, self.batch_size, self.workers, self.seed = 0, 1, 1, 0, 0
        self.shuffle = False  # index order until bound to a training loader
        # [epoch, epoch of a resume, batches of that epoch already trained, set_epoch armed the main process's
        # next iteration]: shared with the data workers.
        self._position = multiprocessing.Array("q", [0, -1, 0, 0])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.images[index]

    def summary(self) -> str:
        """What the run's first ``Data:`` line adds (vaegan.data.describe_dataset): how it is read."""
        return self.describe

    # ---- the stream protocol (vaegan.data.is_stream) --------------------------------------------------
    def bind(self, rank: int, world: int, batch_size: int, workers: int, seed: int) -> None:
        """Make this the training stream of rank ``rank`` of ``world``, read by ``workers`` data workers (0: the
        main process) in batches of ``batch_size``, shuffled from ``seed``.

        Raises:
            DataError: the data cannot be split into that many readers.
        """
        self.rank, self.world, self.batch_size, self.workers, self.seed = rank, world, batch_size, workers, seed
        self.shuffle = True
        if self.length < batch_size * world:
            raise DataError(f"{self.name} holds {self.length} images but one step needs {batch_size * world} "
                            "(batch_size x processes). Lower train.batch_size or add data.")
        self._bound()

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration reads (DataLoaderShard calls it before each epoch)."""
        self._position[0], self._position[3] = int(epoch), 1

    def start_at(self, epoch: int, batches: int) -> None:
        """Resume: in epoch ``epoch``, start after its first ``batches`` batches (this rank's)."""
        self._position[1], self._position[2] = int(epoch), int(batches)

    @property
    def readers(self) -> int:
        """How many readers split the data: ranks x data workers (the main process counts as one)."""
        return self.world * max(1, self.workers)

    def quota(self, worker: int, workers: int) -> int:
        """Items worker ``worker`` of ``workers`` (0 of 1: the main process) yields in an epoch."""
        batches = self.length // (self.batch_size * self.world)  # per rank, as the trainer counts an epoch
        return len(range(worker, batches, max(1, workers))) * self.batch_size

    # ---- iteration -------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, resumed_epoch, resumed_batches, armed = self._position[:]
        if info is None and self.shuffle:
            if self.workers > 0 or not armed:
                # Not the training loader (which reads in its workers, or calls set_epoch first): a plain DataLoader,
                # such as the one that encodes the images for a sampler fit, gets every image in index order, the
                # same on every rank.
                yield from (self.images[i] for i in range(len(self.images)))
                return
            self._position[3] = 0
        role, done = worker, 0
        if resumed_epoch == epoch:
            # The DataLoader takes the first batch from worker 0, but batch `resumed_batches` of the uninterrupted
            # run came from worker resumed_batches % W: worker k plays that run's worker (k + resumed_batches) % W,
            # past the batches it had given.
            role = (worker + resumed_batches) % workers
            done = len(range(role, resumed_batches, workers)) * self.batch_size
        slot, slots = self.rank * workers + role, self.world * workers
        items = _Ahead(self._repeat(epoch, slot, slots))
        items.skip(done)
        for position in range(done, self.quota(role, workers)):
            item = items.next()
            # Seeded for this item alone; the caller's RNG (the main process's, with no workers) is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(item_seed(self.seed, epoch, slot, position))  # the CPU RNG alone
                image = self._image(item, items)
            yield image

    def _repeat(self, epoch: int, slot: int, slots: int) -> Iterator[Any]:
        """Reader ``slot``'s part, read again from its start as often as its quota needs."""
        while True:
            n = 0
            for item in self._items(epoch, slot, slots):
                n += 1
                yield item
            if n == 0:
                raise DataError(f"Reader {slot} of {slots} (processes x data workers) got no data from {self.name}: "
                                "there is too little of it to split that many ways. Lower data.num_workers, or "
                                "split the data into more shards.")

    def _items(self, epoch: int, slot: int, slots: int) -> Iterator[Any]:  # pragma: no cover - abstract
        """One pass over reader ``slot`` of ``slots``'s part of the data, in epoch ``epoch``'s order."""
        raise NotImplementedError

    def _image(self, item: Any, ahead: "_Ahead") -> Any:
        """The training item (image, or (image, label)) of ``item``; ``ahead`` holds the items after it (for a
        stream without random access to replace an unreadable image). Default: ``item`` indexes ``images``,
        which replaces an unreadable image by the next readable one in index order itself."""
        return self.images[item]

    def _bound(self) -> None:
        """Hook: check and prepare the split into :attr:`readers` parts (after :meth:`bind`)."""


class _Ahead:
    """An iterator with a look-ahead: ``next()``, ``skip(n)`` and ``peek(i)`` (the i-th item after the current)."""

    def __init__(self, source: Iterator[Any]) -> None:
        self.source = source
        self.buffer: list = []

    def next(self) -> Any:
        return self.buffer.pop(0) if self.buffer else next(self.source)

    def skip(self, n: int) -> None:
        kept = min(n, len(self.buffer))
        del self.buffer[:kept]
        for _ in islice(self.source, n - kept):
            pass

    def peek(self, i: int) -> Optional[Any]:
        """The ``i``-th upcoming item (0: the next), or None past the end."""
        while len(self.buffer) <= i:
            try:
                self.buffer.append(next(self.source))
            except StopIteration:
                return None
        return self.buffer[i]
