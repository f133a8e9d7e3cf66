"""Building blocks shared by the first-party discriminators: normalisation layers chosen by name,
optional spectral normalisation, and the spatial-size arithmetic used to reject images that are too
small for a network's depth before any tensor is allocated.

Private: plugin authors should depend on :mod:`vaegan.api`, not on this module.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Dict, Tuple

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from vaegan.errors import ConfigError
from vaegan.model import GroupNorm  # nn.GroupNorm that stays fast on channels_last bf16 CPU input

__all__ = ["NORMS", "make_norm", "maybe_spectral", "conv_out", "spatial_sizes", "min_side", "check_norm",
           "check_positive_int"]

logger = logging.getLogger(__name__)

# GroupNorm splits channels into gcd(channels, 32) groups, so every width works (a width of 8 gives
# 8 groups of one channel, i.e. instance-norm-like statistics with affine parameters).
_MAX_GROUPS = 32

# Normalisation by name: a registry, not an if/elif chain. "batch" is plain BatchNorm2d: under DDP
# its *batch* statistics are per process (DDP re-broadcasts rank 0's running statistics at every
# forward, so they do not silently diverge, but they are rank 0's alone); converting it with
# torch.nn.SyncBatchNorm.convert_sync_batchnorm is the trainer's job. Group/instance/none need no
# running statistics at all and are the DDP-safe choices.
NORMS: Dict[str, Callable[[int], nn.Module]] = {
    "batch": lambda c: nn.BatchNorm2d(c),
    "instance": lambda c: nn.InstanceNorm2d(c, affine=True),
    "group": lambda c: GroupNorm(math.gcd(c, _MAX_GROUPS), c),
    "none": lambda c: nn.Identity(),
}


def check_norm(norm: str, owner: str) -> None:
    """Raise ConfigError unless ``norm`` names an entry of :data:`NORMS`; warn about BatchNorm
    in a multi-process run (``WORLD_SIZE`` > 1, as set by torchrun and ``accelerate launch``)."""
    if norm not in NORMS:
        raise ConfigError(f"{owner}: norm must be one of {sorted(NORMS)}, got {norm!r}.")
    if norm == "batch" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logger.warning(
            "%s uses BatchNorm in a %s-process run: each process normalises with its own batch "
            "statistics. Prefer norm: group, instance or none, or convert the discriminator with "
            "torch.nn.SyncBatchNorm.convert_sync_batchnorm before training.", owner, os.environ["WORLD_SIZE"])


def check_positive_int(value: object, name: str, owner: str) -> int:
    """``value`` as an int >= 1, or ConfigError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}: {name} must be an integer >= 1, got {value!r}.")
    return value


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer ``norm`` (a key of :data:`NORMS`) for ``channels`` channels."""
    return NORMS[norm](channels)


def maybe_spectral(module: nn.Module, enabled: bool) -> nn.Module:
    """Wrap a conv/linear layer in spectral normalisation (Miyato et al. 2018) when ``enabled``."""
    return _spectral_norm(module) if enabled else module


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis (0 or less: the input is too small)."""
    if size + 2 * padding < kernel:
        return 0
    return (size + 2 * padding - kernel) // stride + 1


def spatial_sizes(hw: Tuple[int, int], layers: Tuple[Tuple[int, int, int], ...]) -> Tuple[Tuple[int, int], ...]:
    """(H, W) after each of ``layers`` given as (kernel, stride, padding); a size <= 0 means too small."""
    sizes = []
    h, w = hw
    for kernel, stride, padding in layers:
        h, w = conv_out(h, kernel, stride, padding), conv_out(w, kernel, stride, padding)
        sizes.append((h, w))
        if min(h, w) < 1:
            break
    return tuple(sizes)


def min_side(layers: Tuple[Tuple[int, int, int], ...], limit: int = 1 << 16) -> int:
    """The smallest side length for which every layer of ``layers`` has a non-empty output."""
    side = 1
    while side < limit and min(min(hw) for hw in spatial_sizes((side, side), layers)) < 1:
        side += 1
    return side
