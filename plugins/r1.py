"""The R1 gradient penalty on real images (Mescheder et al. 2018), optionally lazy (StyleGAN2).

Registered as ``r1`` in ``vaegan.losses``; it is a *discriminator* term, so it goes in ``losses``
like any other and the trainer routes it to the discriminator's optimizer:

.. code-block:: yaml

    losses:
      - {name: r1, weight: 1.0, options: {gamma: 10.0, every: 16}}
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
from einops import reduce
from torch import Tensor

from vaegan.api import LossTerm, Player, TermInputs

__all__ = ["R1Penalty"]


class R1Penalty(LossTerm):
    """``gamma / 2 * E_real[ |grad_x D(x)|^2 ]``, pushing the discriminator to be flat on real data.

    The penalty takes a fresh discriminator forward of ``real.detach().requires_grad_(True)`` (the
    trainable, DDP-wrapped network of the discriminator step), differentiates the summed logits with
    respect to those pixels with ``create_graph=True`` (so the penalty's own gradient reaches the
    discriminator's weights), and squares the gradient in fp32.

    Lazy regularisation (Karras et al. 2020): with ``every=k`` the term returns None (skipped) on
    steps that are not multiples of k and is multiplied by k on the others, so its average strength
    is unchanged while it costs 1/k of the compute.

    Reduction: the squared gradient norm is summed over the pixels of each image and averaged over
    the batch, exactly Mescheder et al.'s R1, so published gamma values carry over. Unlike the
    per-pixel reconstruction terms it is not resolution-free: a norm of the input gradient grows with
    the pixel count (StyleGAN2-ADA's heuristic is gamma = 0.0002 * H * W / batch). For a PatchGAN, the
    per-image critic is the sum of its patch logits.

    Precision: the term disables autocast around its own forward and arithmetic, so the discriminator
    forward, the input gradient and the squared norm are all fp32 even in a bf16/fp16 run (the trainer
    removes Accelerate's autocast wrapper from the prepared discriminator's ``forward``, so the
    ``autocast(enabled=False)`` here is obeyed).

    Args:
        gamma: Penalty strength (multiplies the usual ``/ 2``).
        every: Apply it every ``every`` optimizer steps (1: every step).

    Raises:
        ValueError: gamma not a finite number >= 0, or every < 1.

    Example:
        >>> R1Penalty(gamma=10.0, every=16).every
        16
    """

    player: ClassVar[Player] = "discriminator"
    needs_discriminator: ClassVar[bool] = True

    def __init__(self, gamma: float = 10.0, every: int = 1) -> None:
        super().__init__()
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"r1: gamma must be a finite number >= 0, got {gamma!r}.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"r1: every must be an integer >= 1 (steps between penalties), got {every!r}.")
        self.gamma = float(gamma)
        self.every = every

    def forward(self, inputs: TermInputs) -> Optional[Tensor]:
        """The penalty times ``every`` on active steps, None on the others."""
        if inputs.discriminator is None:
            raise RuntimeError("r1 needs the discriminator; the trainer passes it in the discriminator step")
        if inputs.step % self.every != 0:
            return None
        real = inputs.real.detach().float().requires_grad_(True)  # (B, C, H, W): the point where D is flattened
        # Not inputs.disc("real"): that cached forward is on the original tensor, which does not
        # require a gradient, so no input gradient could be taken from it.
        with torch.autocast(device_type=real.device.type, enabled=False):
            logits = inputs.discriminator(real).logits.float()  # (B, ...) one per image or per patch
            (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)  # (B, C, H, W)
            penalty = reduce(grad.float().pow(2), "b c h w -> b", "sum").mean()
        return 0.5 * self.gamma * self.every * penalty
