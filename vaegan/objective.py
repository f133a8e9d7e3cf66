"""The training objective: named, weighted loss terms, each feeding exactly one player.

A *term* is a :class:`~vaegan.api.LossTerm` plugin (group ``vaegan.losses``) that maps a
:class:`~vaegan.api.TermInputs` to a scalar. Its class attribute ``player`` says whose optimizer its gradient feeds: the generator (the
VAE) or the discriminator. The :class:`Objective` sums each player's terms with their scheduled
weights, and returns the total plus a named breakdown for logging.

Reductions (so that a weight means the same at any image size): reconstruction-like terms are means
over pixels and batch (nats or squared units *per pixel*); the KL is summed over latent dimensions and
divided by the number of pixels, so ``bce`` + ``kl`` at weight 1 is exactly the negative ELBO per pixel;
adversarial terms are means over images (and patches).

Example:
    >>> cfg = ExperimentConfig()
    >>> objective = Objective.from_config(cfg)
    >>> sorted(objective.generator_terms)
    ['adversarial', 'bce', 'kl']
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import api, registry
from ._deprecation import deprecated_names
from .config import AdversarialConfig, ExperimentConfig
from .errors import ConfigError, PluginError
from .schedules import Schedule

__all__ = ["Objective", "adaptive_weight"]


class _GeneratorAdversarial(api.LossTerm):
    """The generator's half of an :class:`AdversarialLoss` pair."""

    player: ClassVar[api.Player] = "generator"
    needs_discriminator: ClassVar[bool] = True

    def __init__(self, pair: api.AdversarialLoss) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, inputs: api.TermInputs) -> Tensor:
        return self.pair.generator_loss(inputs.disc("fake").logits.float())


class _DiscriminatorAdversarial(api.LossTerm):
    """The discriminator's half of an :class:`AdversarialLoss` pair."""

    player: ClassVar[api.Player] = "discriminator"
    needs_discriminator: ClassVar[bool] = True

    def __init__(self, pair: api.AdversarialLoss) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, inputs: api.TermInputs) -> Tensor:
        return self.pair.discriminator_loss(inputs.disc("real").logits.float(), inputs.disc("fake").logits.float())


class Objective(nn.Module):
    """Weighted sums of the generator's and the discriminator's loss terms.

    Args:
        terms: ``(key, term, schedule)`` triples; each term's ``player`` decides its side.
        disc_start: First step at which discriminator terms run.

    Raises:
        PluginError: a term whose ``player`` is neither side.
    """

    def __init__(self, terms: List[Tuple[str, api.LossTerm, Schedule]], disc_start: int = 0,
                 adversarial: Optional[AdversarialConfig] = None) -> None:
        super().__init__()
        self.adversarial = adversarial
        self.generator_terms = nn.ModuleDict()
        self.discriminator_terms = nn.ModuleDict()
        self.schedules: Dict[str, Schedule] = {}
        for key, term, schedule in terms:
            side = {"generator": self.generator_terms, "discriminator": self.discriminator_terms}.get(term.player)
            if side is None:
                raise PluginError(f"Loss term '{key}' declares player={term.player!r}; use 'generator' or 'discriminator'.")
            side[key] = term
            self.schedules[key] = schedule
        self.disc_start = disc_start

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "Objective":
        """Build every term named in ``config`` (``losses`` plus the adversarial pair)."""
        terms: List[Tuple[str, api.LossTerm, Schedule]] = []
        for tc in config.losses:
            term = registry.build_plugin("vaegan.losses", tc.name, dict(tc.options),
                                         optional_context={"image_shape": config.model.image_shape})
            terms.append((tc.key, term, tc.weight))
        disc_start = 0
        adv: Optional[AdversarialConfig] = config.adversarial
        if adv is not None:
            pair = registry.build_plugin("vaegan.adversarial", adv.name, dict(adv.options))
            terms.append(("adversarial", _GeneratorAdversarial(pair), adv.weight))
            terms.append(("discriminator", _DiscriminatorAdversarial(pair), Schedule.constant(1.0)))
            disc_start = adv.disc_start
        keys = [k for k, _, _ in terms]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"Loss term keys {keys} collide with the adversarial terms; set a 'label'.")
        return cls(terms, disc_start, adv)

    def resolve(self, total_steps: int) -> None:
        """Turn schedules given as a fraction of training into steps (the trainer calls this)."""
        self.schedules = {k: s.resolve(total_steps) for k, s in self.schedules.items()}

    # ---- what the trainer asks ---------------------------------------------------------------
    @property
    def needs_discriminator(self) -> bool:
        return any(t.needs_discriminator for t in self.generator_terms.values()) or len(self.discriminator_terms) > 0

    def forward_kwargs(self, batch_size: int) -> Dict[str, object]:
        """Extra outputs the generator forward must produce for these terms."""
        kwargs: Dict[str, object] = {
            "perturb_std": max([t.perturb_std for t in self.generator_terms.values()], default=0.0)}
        adv = self.adversarial
        if adv is not None:
            kwargs["num_prior"] = batch_size if adv.fake in ("prior", "both") else 0
            kwargs["decoder_only"] = adv.fake in ("reconstruction", "both") and not adv.train_encoder
            if adv.fake == "aggregate":
                kwargs.update(num_aggregate=batch_size, bandwidth=adv.bandwidth)
        return kwargs

    def fakes(self, output: api.VAEOutput, for_discriminator: bool) -> Optional[Tensor]:
        """The images the adversarial loss treats as generated, (B', C, H, W).

        For the discriminator they are detached (no gradient can reach the generator). For the
        generator, reconstructions come from ``decode(z.detach())`` unless ``train_encoder``, so the
        GAN gradient trains the decoder only (Larsen et al. 2016).
        """
        adv = self.adversarial
        if adv is None:
            return None
        recon = output.recon
        if not for_discriminator and output.recon_decoder_only is not None:
            recon = output.recon_decoder_only
        parts = {"reconstruction": [recon], "prior": [output.prior_samples], "both": [recon, output.prior_samples],
                 "aggregate": [output.aggregate_samples]}[adv.fake]
        if any(p is None for p in parts):
            raise RuntimeError(f"adversarial.fake: {adv.fake} needs generated images the forward did not make: call "
                               "the generator with **objective.forward_kwargs(batch_size)")
        images = parts[0] if len(parts) == 1 else torch.cat(parts)
        return images.detach() if for_discriminator else images

    def discriminator_active(self, step: int) -> bool:
        return len(self.discriminator_terms) > 0 and step >= self.disc_start

    def generator_uses_discriminator(self, step: int) -> bool:
        return any(t.needs_discriminator and self._runs(k, t, step) for k, t in self.generator_terms.items())

    def weight(self, key: str, step: int) -> float:
        return self.schedules[key](step)

    def _runs(self, key: str, term: api.LossTerm, step: int) -> bool:
        # A term with weight 0 is skipped (no wasted compute before the GAN starts) unless it owns
        # trainable parameters: DDP expects a gradient for every parameter at every step.
        has_params = any(p.requires_grad for p in term.parameters())
        return has_params or self.schedules[key](step) != 0.0

    # ---- the losses ----------------------------------------------------------------------------
    def _values(self, terms: nn.ModuleDict, inputs: api.TermInputs) -> Dict[str, Tensor]:
        values: Dict[str, Tensor] = {}
        for key, term in terms.items():
            if self._runs(key, term, inputs.step):
                value = term(inputs)
                if value is not None:
                    values[key] = value.float()  # weights and sums in fp32 under autocast
        return values

    def _total(self, values: Dict[str, Tensor], step: int, scale: Optional[Dict[str, Tensor]] = None) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=next(iter(values.values())).device) if values else torch.zeros(())
        for key, value in values.items():
            weight = self.schedules[key](step) * (scale[key] if scale and key in scale else 1.0)
            total = total + weight * value
        return total

    def generator_loss(self, inputs: api.TermInputs) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Total generator loss and its unweighted parts (detached), keyed by term.

        With ``adversarial.adaptive``, the adversarial term's weight is multiplied by the ratio of the
        gradient norms of the other terms and of the adversarial term at ``inputs.last_layer``
        (logged as ``adaptive_weight``).
        """
        values = self._values(self.generator_terms, inputs)
        parts = {k: v.detach() for k, v in values.items()}
        scale: Dict[str, Tensor] = {}
        adv = self.adversarial
        if adv is not None and adv.adaptive and "adversarial" in values:
            if inputs.last_layer is None:
                raise RuntimeError("adversarial.adaptive needs TermInputs.last_layer")
            rest = {k: v for k, v in values.items() if k != "adversarial"}
            scale["adversarial"] = adaptive_weight(self._total(rest, inputs.step), values["adversarial"],
                                                   inputs.last_layer, adv.adaptive_eps, adv.adaptive_max)
            parts["adaptive_weight"] = scale["adversarial"]
        return self._total(values, inputs.step, scale), parts

    def discriminator_loss(self, inputs: api.TermInputs) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Total discriminator loss and its unweighted parts (detached), keyed by term."""
        values = self._values(self.discriminator_terms, inputs)
        return self._total(values, inputs.step), {k: v.detach() for k, v in values.items()}


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor, eps: float = 1e-4,
                    max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive weight: |grad rec| / (|grad adv| + eps) at ``last_layer``, clamped, detached.

    Computed in fp32; a non-finite ratio (an fp16 overflow, say) gives 0 for that step, so the
    adversarial term is skipped rather than poisoning the update. A zero adversarial gradient gives
    ``min(|grad rec| / eps, max_weight)``, finite.

    Example:
        >>> w = torch.ones(3, requires_grad=True)
        >>> round(float(adaptive_weight((2 * w).sum(), w.sum(), w)), 3)
        2.0
    """
    def norm(loss: Tensor) -> Tensor:
        if not loss.requires_grad:
            return torch.zeros((), device=last_layer.device)
        (grad,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
        return torch.zeros((), device=last_layer.device) if grad is None else torch.linalg.vector_norm(grad.float())

    ratio = norm(rec_loss) / (norm(adv_loss) + eps)
    ratio = torch.where(torch.isfinite(ratio), ratio.clamp(0.0, max_weight), torch.zeros_like(ratio))
    return ratio.detach()


# vaegan 0.1 defined the plugin contracts here; they live in vaegan.api now (build_plugin in the registry).
__getattr__ = deprecated_names(__name__, {
    "LossTerm": "vaegan.api:LossTerm", "AdversarialLoss": "vaegan.api:AdversarialLoss",
    "TermInputs": "vaegan.api:TermInputs", "DiscriminatorOutput": "vaegan.api:DiscriminatorOutput",
    "Player": "vaegan.api:Player", "build_plugin": "vaegan.registry:build_plugin",
})
