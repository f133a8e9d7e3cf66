"""The plugin contracts: every base class and protocol a vaegan plugin implements, in one place.

| group | implement | built as |
| --- | --- | --- |
| ``vaegan.generators`` | a :class:`VAE` subclass | ``cls(image_shape=(C, H, W), output_range=..., **options)`` |
| ``vaegan.losses`` | a :class:`LossTerm` subclass | ``cls(**options)`` (plus ``image_shape`` if it names it) |
| ``vaegan.adversarial`` | an :class:`AdversarialLoss` subclass | ``cls(**options)`` |
| ``vaegan.discriminators`` | a :class:`Discriminator` subclass | ``cls(image_shape=(C, H, W), **options)`` |
| ``vaegan.datasets`` | a :class:`DatasetFactory` | ``factory(root=, split=, download=, limit=, image_shape=, value_range=, **options)`` |
| ``vaegan.samplers`` | a :class:`LatentSampler` subclass | ``cls(latent_shape=(...), **options)`` |

``options`` is the config's ``options:`` mapping, checked against the constructor's signature before
anything is built (:func:`vaegan.registry.build_plugin`). docs/plugins.md walks through each contract
with a complete example. Import from here: the names below are the stable plugin API.

Example:
    >>> class Zero(LossTerm):
    ...     player = "generator"
    ...     def forward(self, inputs: TermInputs) -> Tensor:
    ...         return inputs.output.recon.sum() * 0.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Literal, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

from torch import Tensor, nn
from torch.utils.data import Dataset

from .generator import VAE, DiagonalGaussian, VAEOutput
from .samplers import LatentSampler

__all__ = [
    "Player",
    "VAE",
    "VAEOutput",
    "DiagonalGaussian",
    "DiscriminatorOutput",
    "Discriminator",
    "TermInputs",
    "LossTerm",
    "AdversarialLoss",
    "DatasetFactory",
    "LatentSampler",
]

Player = Literal["generator", "discriminator"]
"""Whose optimizer a loss term's gradient feeds."""


class DiscriminatorOutput(NamedTuple):
    """What a discriminator returns: logits (B, ...) and intermediate feature maps."""

    logits: Tensor
    features: Tuple[Tensor, ...] = ()


class Discriminator(nn.Module):
    """Base class of discriminators (group ``vaegan.discriminators``): ``forward(x) -> DiscriminatorOutput``.

    Logits may have any shape with a leading batch dimension (one per image, or a PatchGAN map);
    ``features`` are intermediate maps (what feature matching compares: return at least one). A
    constructor that cannot take ``image_shape`` (too small for its depth) raises
    :class:`~vaegan.errors.ConfigError` with the smallest size it takes.

    Args:
        image_shape: (C, H, W) of the images it judges.
    """

    def __init__(self, image_shape: Tuple[int, int, int]) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)

    def forward(self, x: Tensor) -> DiscriminatorOutput:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class TermInputs:
    """Everything a loss term may read for one micro-batch.

    ``discriminator`` is the module the current step may call: during the discriminator step the
    trainable (DDP-wrapped) discriminator; during the generator step the same network frozen
    (``requires_grad=False``), so generator terms can never change it. ``fake`` is what the
    discriminator is shown as generated images: detached during the discriminator step.
    """

    real: Tensor  # (B, C, H, W), in value_range
    output: VAEOutput
    step: int
    value_range: Tuple[float, float] = (0.0, 1.0)
    fake: Optional[Tensor] = None  # (B', C, H, W): what the adversarial loss shows D as generated
    discriminator: Optional[Callable[[Tensor], DiscriminatorOutput]] = None
    last_layer: Optional[Tensor] = None  # the decoder's last weight (adaptive GAN weight)
    _cache: Dict[str, DiscriminatorOutput] = field(default_factory=dict, repr=False)

    def disc(self, which: Literal["real", "fake", "recon"]) -> DiscriminatorOutput:
        """The discriminator's output, computed once per step, on ``real`` images, on the adversarial
        ``fake`` images, or on ``recon`` (the reconstructions with their full gradient path, for
        feature matching).

        Raises:
            RuntimeError: the term needs a discriminator but the step has none.
        """
        if self.discriminator is None:
            raise RuntimeError("this term needs a discriminator, but none is configured")
        images = {"real": self.real, "fake": self.fake, "recon": self.output.recon}[which]
        if which == "recon" and images is self.fake:
            which = "fake"  # the same tensor: one forward serves both
        if which not in self._cache:
            self._cache[which] = self.discriminator(images)
        return self._cache[which]

    def computed(self) -> Dict[str, DiscriminatorOutput]:
        """The discriminator outputs computed so far (for logging mean logits)."""
        return dict(self._cache)


class LossTerm(nn.Module):
    """Base class of every loss term plugin (group ``vaegan.losses``).

    Subclasses set ``player`` and implement :meth:`forward`. Constructor keyword arguments are the
    term's options (YAML ``options:``). A term may own parameters (e.g. a learned log-variance):
    they are trained by its player's optimizer and saved in checkpoints.

    Class attributes:
        player: ``"generator"`` or ``"discriminator"``: the only optimizer its gradient reaches.
        needs_discriminator: True when :meth:`forward` calls ``inputs.disc(...)``.
        perturb_std: > 0 asks the generator forward for a decode of a perturbed latent.
    """

    player: ClassVar[Player] = "generator"
    needs_discriminator: ClassVar[bool] = False
    perturb_std: float = 0.0

    def forward(self, inputs: TermInputs) -> Optional[Tensor]:  # pragma: no cover - abstract
        """Return the unweighted scalar loss for this micro-batch, or None to skip this step
        (a lazy regulariser that runs every k steps, for instance)."""
        raise NotImplementedError


class AdversarialLoss(nn.Module):
    """Base class of GAN loss pairs (group ``vaegan.adversarial``), on raw logits."""

    def generator_loss(self, fake_logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Loss the generator minimises, from the discriminator's logits on fakes."""
        raise NotImplementedError

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:  # pragma: no cover
        """Loss the discriminator minimises."""
        raise NotImplementedError


@runtime_checkable
class DatasetFactory(Protocol):
    """A dataset plugin (group ``vaegan.datasets``): a callable that returns a map-style dataset.

    vaegan calls it with keywords: ``root``, ``split`` (``"train"`` or ``"test"``), ``download``,
    ``limit`` (first N images or None), ``image_shape`` (C, H, W) and ``value_range`` (low, high),
    plus the config's ``data.options``. Items are float tensors (C, H, W) in ``value_range``, or
    ``(image, label)`` pairs. Raise :class:`~vaegan.errors.DataError` for missing or unreadable data.
    Keep small datasets in memory as :class:`vaegan.data.TensorImages` (batched indexing, evaluation
    labels); stream large ones.
    """

    def __call__(self, *, root: str, split: str, download: bool, limit: Optional[int],
                 image_shape: Tuple[int, int, int], value_range: Tuple[float, float]) -> Dataset:  # pragma: no cover
        ...
