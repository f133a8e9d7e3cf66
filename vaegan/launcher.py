"""A command under a launcher (``torchrun``, ``accelerate launch``): its Accelerator, and the process group's end.

The ``vaegan`` commands and the recipes use these; nothing here imports torch or Accelerate until called, so
``vaegan --help`` stays fast.

Example:
    >>> accelerator = launched_accelerator()  # None in a plain single process  # doctest: +SKIP
    >>> try:
    ...     ...  # the work, split over accelerator.num_processes
    ... finally:
    ...     shutdown_distributed()  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Optional

__all__ = ["launched_accelerator", "shutdown_distributed"]


def launched_accelerator() -> Optional[Any]:
    """An ``accelerate.Accelerator`` when a launcher started several processes (torchrun / ``accelerate launch``:
    ``WORLD_SIZE`` > 1), so that a command splits its work over them; else None (one process, nothing to set up).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        return Accelerator()
    return None


def shutdown_distributed() -> None:
    """Destroy the process group, if any, before the interpreter exits.

    Left to static destructors at exit, gloo's threads can abort the process ("terminate called
    without an active exception") after training has finished; the script that owns the run ends it.
    The trainer's DDP modules hold the process group too: a run's objects no longer referenced (reference
    cycles included) are collected first, and once more after the group is destroyed, so that nothing of
    gloo is left for the interpreter's shutdown (1 in 3 two-process runs aborted at exit without it).
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
