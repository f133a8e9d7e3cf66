"""Moved into :mod:`vaegan.checkpointing` (0.5): the checks of a checkpoint's files before a restore belong with
the checkpoints. The old names resolve there with a DeprecationWarning; this module goes in 0.6."""

from ._deprecation import deprecated_names

__getattr__ = deprecated_names(__name__, {name: f"vaegan.checkpointing:{name}"
                                          for name in ("safe_torch_load", "verify_checkpoint")})
