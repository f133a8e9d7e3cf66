"""Options that let every registered plugin run inside the test suite, keyed by (group, name).

Plugins not listed run with their defaults ({}), so a newly installed plugin is still tested. Entries
exist only where the defaults cannot work here or are needlessly slow on 2 CPU cores:

- ``lpips``: the pretrained ImageNet backbone cannot be downloaded on these machines; ``backbone:
  random`` is the explicit opt-in to an untrained network that exercises the same code path.
- generators and discriminators: narrow widths keep a training step in milliseconds.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

__all__ = ["TEST_OPTIONS", "options_for"]

TEST_OPTIONS: Dict[Tuple[str, str], Dict[str, Any]] = {
    ("vaegan.generators", "conv"): {"channels": [8, 16], "norm_groups": 4, "latent_dim": 4},
    ("vaegan.generators", "mlp"): {"hidden": [32], "latent_dim": 4},
    ("vaegan.losses", "lpips"): {"backbone": "random"},
    ("vaegan.discriminators", "simple"): {"channels": [8, 16]},
    ("vaegan.discriminators", "patchgan"): {"base_width": 8, "n_layers": 2},
    ("vaegan.discriminators", "dcgan"): {"base_width": 8},
}


def options_for(group: str, name: str) -> Dict[str, Any]:
    """A fresh copy of the test options of plugin ``name`` in ``group`` ({} when none are needed)."""
    return dict(TEST_OPTIONS.get((group, name), {}))
