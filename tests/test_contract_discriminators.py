"""The discriminator contract (group ``vaegan.discriminators``), run against every registered one.

Parametrised over ``registry.available("vaegan.discriminators")`` with the narrow widths of
tests/plugin_options.py: a newly installed discriminator is tested for free. PatchGAN/DCGAN specifics
(minimum sizes, norms, spectral norm, the patch map) are in test_plugins.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from plugin_options import options_for

import vaegan
from vaegan import registry
from vaegan.api import Discriminator, DiscriminatorOutput
from vaegan.errors import ConfigError
from vaegan.registry import build_plugin

DISCRIMINATORS = registry.available("vaegan.discriminators")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")


def _disc(name: str, image_shape, **extra) -> Discriminator:
    disc = build_plugin("vaegan.discriminators", name, {**options_for("vaegan.discriminators", name), **extra},
                        image_shape=tuple(image_shape))
    assert isinstance(disc, Discriminator)
    return disc


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (2, 40, 48)], ids=["mnist", "rgb32", "2ch-40x48"])
@pytest.mark.parametrize("name", DISCRIMINATORS)
def test_discriminator_contract(name, shape, precision):
    """Logits with a leading batch dimension, at least one feature map (for feature matching), finite
    values and finite gradients for every input size, in fp32 and under bf16 autocast on the CPU."""
    disc = _disc(name, shape)
    assert tuple(disc.image_shape) == shape
    x = torch.rand(3, *shape)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = disc(x)
    assert isinstance(out, DiscriminatorOutput)
    assert out.logits.shape[0] == 3 and torch.isfinite(out.logits.float()).all()
    assert out.features, f"{name} exposes no features for feature matching"
    assert all(f.shape[0] == 3 and torch.isfinite(f.float()).all() for f in out.features)
    out.logits.float().mean().backward()
    grads = [p.grad for p in disc.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", DISCRIMINATORS)
def test_discriminator_on_a_one_pixel_image_works_or_raises_config_error(name):
    """Never a cryptic conv RuntimeError: a size a discriminator cannot take is a ConfigError."""
    try:
        disc = _disc(name, (1, 1, 1))
    except ConfigError:
        return
    out = disc(torch.rand(2, 1, 1, 1))
    assert out.logits.shape[0] == 2 and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", DISCRIMINATORS)
def test_discriminator_unknown_option_is_a_config_error_with_the_signature(name):
    with pytest.raises(ConfigError) as info:
        _disc(name, (1, 28, 28), no_such_option=1)
    msg = str(info.value)
    assert f"'{name}'" in msg and "no_such_option" in msg and "signature" in msg and "image_shape" in msg


@pytest.mark.parametrize("name", DISCRIMINATORS)
def test_discriminator_trains_end_to_end(tiny, name):
    options = json.dumps(options_for("vaegan.discriminators", name))
    trainer = vaegan.build_trainer(tiny(f"discriminator.name={name}", f"discriminator.options={options}",
                                        "train.max_steps=2"))
    net = trainer.train_step.disc_net
    assert isinstance(net, registry.load("vaegan.discriminators", name))
    d0 = [p.detach().clone() for p in net.parameters()]
    trainer.fit()
    assert trainer.history
    for row in trainer.history:
        assert all(math.isfinite(v) for v in row.values()), row
    assert "d/discriminator" in trainer.history[-1]
    assert any(not torch.equal(a, b) for a, b in zip(d0, net.parameters()))
