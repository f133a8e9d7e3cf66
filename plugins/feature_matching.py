"""Feature matching on discriminator features: the "learned similarity" of Larsen et al. (2016).

Registered as ``feature_matching`` in ``vaegan.losses``:

.. code-block:: yaml

    losses:
      - {name: kl}
      - {name: feature_matching, weight: 1.0, options: {layers: [-1]}}
"""

from __future__ import annotations

from typing import ClassVar, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vaegan.api import LossTerm, Player, TermInputs
from vaegan.errors import ConfigError

__all__ = ["FeatureMatching"]


class FeatureMatching(LossTerm):
    """Mean squared difference between the discriminator's features of real images and of their
    reconstructions (a Gaussian likelihood in feature space, Larsen et al.'s ``L_llike^Dis_l``).

    A *generator* term: it reads ``inputs.disc("recon")``, the reconstructions with their full
    gradient path, so it trains encoder and decoder (as in Larsen et al.), while the discriminator is
    frozen during the generator step and is never trained by it. Real features carry no gradient.

    Reduction: each chosen layer's squared difference is averaged over its elements (batch, channels
    and positions), then the layers are averaged, so the weight means the same at any image size and
    for any number of layers. Computed in fp32.

    Args:
        layers: Indices into the discriminator's ``features`` (negative counts from the end);
            None uses them all. Larsen et al. use one deep layer (``[-1]``).

    Raises:
        ValueError: ``layers`` is empty or not a list of integers.
        ConfigError: (at the first step) an index beyond the discriminator's features.

    Example:
        >>> FeatureMatching(layers=[-1]).layers
        (-1,)
    """

    player: ClassVar[Player] = "generator"
    needs_discriminator: ClassVar[bool] = True

    def __init__(self, layers: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if layers is not None:
            integers = all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            if isinstance(layers, (str, bytes)) or not integers:
                raise ValueError(f"feature_matching: layers must be a list of integer indices, got {layers!r}.")
            if len(layers) == 0:
                raise ValueError("feature_matching: layers must name at least one layer (or be null for all).")
        self.layers = None if layers is None else tuple(layers)

    def _select(self, features: Sequence[Tensor]) -> List[int]:
        n = len(features)
        if n == 0:
            raise ConfigError(
                "feature_matching needs a discriminator that returns intermediate features "
                "(DiscriminatorOutput.features is empty). Choose another discriminator."
            )
        if self.layers is None:
            return list(range(n))
        bad = [i for i in self.layers if not -n <= i < n]
        if bad:
            raise ConfigError(
                f"feature_matching: layers {bad} do not exist; the discriminator returns {n} feature "
                f"maps, so indices must be in [{-n}, {n - 1}]."
            )
        return [i % n for i in self.layers]

    def forward(self, inputs: TermInputs) -> Tensor:
        """Average over the chosen layers of the per-element squared feature difference."""
        real = inputs.disc("real").features
        recon = inputs.disc("recon").features
        chosen = self._select(real)
        with torch.autocast(device_type=inputs.real.device.type, enabled=False):
            per_layer = [F.mse_loss(recon[i].float(), real[i].detach().float()) for i in chosen]
            return torch.stack(per_layer).mean()
