"""The built-in generators ``conv`` and ``mlp``: their own options and layers.

The generator contract (shapes for any image size, output ranges, extra decodes, gradients, bf16,
input checks, save/load and its errors) is tested for every registered generator in
test_contract_generators.py; this file holds only what is specific to vaegan's two architectures:
their options, the layers the clamp and the adaptive weight use, and the channels_last GroupNorm.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_foreign_weights_refused, tiny_generator

from vaegan import build_generator
from vaegan._compat import TorchDispatchMode
from vaegan.api import VAE
from vaegan.config import ModelConfig
from vaegan.errors import ConfigError
from vaegan.model import MLPVAE, ConvVAE, GroupNorm

ARCHS = ("conv", "mlp")
LATENT = 4  # the test options' latent_dim (tests/plugin_options.py)
B = 3


def images(shape=(1, 28, 28), n=B, seed=0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")


def test_direct_construction_records_the_registered_name_and_options(tmp_path):
    """``ConvVAE(...)`` without the registry is still the ``conv`` plugin: it can be saved and reloaded."""
    for cls, name, options in ((ConvVAE, "conv", {"latent_dim": 3, "channels": (8,), "norm_groups": 4}),
                               (MLPVAE, "mlp", {"latent_dim": 3, "hidden": (16,)})):
        vae = cls((1, 12, 10), **options)
        assert vae.config.name == name and vae.latent_shape == (3,)
        assert {k: vae.config.options[k] for k in options} == {k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in options.items()}
        loaded = VAE.from_pretrained(vae.save_pretrained(tmp_path / name))
        assert type(loaded) is cls and loaded.config == vae.config


@pytest.mark.parametrize("arch", ARCHS)
def test_last_layer_is_the_decoder_output_weight(arch):
    vae = tiny_generator(arch)
    assert vae.last_layer is vae.decoder.out.weight
    assert vae.last_layer.requires_grad


# ---- posterior clamp: the logvar_min / logvar_max options ---------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scale", [1e4, -1e4, 1e6])
def test_logvar_clamp_options_for_extreme_inputs(arch, scale):
    vae = tiny_generator(arch, logvar_min=-6.0, logvar_max=3.0)
    assert vae.logvar_range == (-6.0, 3.0)
    q = vae.encode(torch.full((2, 1, 28, 28), scale))
    assert (q.logvar >= -6.0).all() and (q.logvar <= 3.0).all()
    assert torch.isfinite(q.std).all()
    assert (q.std > 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_logvar_clamp_is_hit_exactly_at_both_ends(arch):
    vae = tiny_generator(arch, logvar_min=-30.0, logvar_max=20.0)
    with torch.no_grad():
        vae.encoder.head.weight.zero_()
        vae.encoder.head.bias[LATENT:] = torch.tensor([1e6, -1e6, 25.0, -35.0])
    q = vae.encode(images())
    expected = torch.tensor([20.0, -30.0, 20.0, -30.0]).expand(B, LATENT)
    torch.testing.assert_close(q.logvar, expected)
    assert torch.isfinite(q.kl()).all()
    z = q.rsample()
    assert torch.isfinite(z).all()
    # A huge log-variance also decodes to finite, in-range images.
    out = vae(images())
    assert torch.isfinite(out.recon).all() and out.recon.min() >= 0 and out.recon.max() <= 1


@pytest.mark.parametrize("arch", ARCHS)
def test_logvar_clamp_needs_min_below_max(arch):
    with pytest.raises(ConfigError, match="min < max"):
        tiny_generator(arch, logvar_min=3.0, logvar_max=3.0)


# ---- options ---------------------------------------------------------------------------------------


def test_model_config_rejects_bad_architectures():
    with pytest.raises(ConfigError, match="norm_groups"):
        tiny_generator("conv", channels=[8, 10])
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig(image_size=(0, 28))
    with pytest.raises(ConfigError, match="output_range"):
        tiny_generator("conv", output_range="bytes")
    assert math.prod(ModelConfig(image_channels=4, image_size=(64, 48)).image_shape) == 4 * 64 * 48


@pytest.mark.parametrize("arch, option, value", [
    ("conv", "latent_dim", 0), ("conv", "channels", []), ("conv", "channels", "8,16"), ("conv", "res_blocks", -1),
    ("conv", "norm_groups", 0), ("mlp", "latent_dim", 1.5), ("mlp", "hidden", []), ("mlp", "hidden", [32, 0]),
])
def test_bad_option_values_are_config_errors_naming_the_option(arch, option, value):
    with pytest.raises(ConfigError, match=option):
        tiny_generator(arch, **{option: value})


def test_an_option_of_the_other_architecture_is_refused():
    with pytest.raises(ConfigError) as info:
        build_generator(ModelConfig(name="mlp", options={"channels": [8, 16]}))
    assert "'mlp'" in str(info.value) and "channels" in str(info.value)


@pytest.mark.parametrize("other", [dict(name="mlp"), dict(latent_dim=6), dict(channels=[8, 8, 16])],
                         ids=["mlp", "latent_dim", "channels"])
def test_from_pretrained_weights_of_a_different_architecture(tmp_path, other):
    d = tiny_generator("conv").save_pretrained(tmp_path / "m")
    assert_foreign_weights_refused(d, tiny_generator(**other), tmp_path)


# ---- memory layout -----------------------------------------------------------------------------------
class _NormInputLayouts(TorchDispatchMode):
    """Records the memory layout of every tensor that reaches aten.native_group_norm."""

    def __enter__(self):
        self.layouts = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.native_group_norm.default:
            self.layouts.append("nchw" if args[0].is_contiguous() else "nhwc")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "aot_eager"])
def test_group_norm_normalises_channels_last_input_in_nchw_and_hands_back_both_layouts(compiled):
    """The channels_last plan: the norm computes in NCHW, returns NHWC, and gives its input's gradient
    back in NHWC (no layer before it sees a mixed-layout backward); values equal nn.GroupNorm's."""
    torch.manual_seed(0)
    ours, ref = GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())  # the same parameters under the same keys
    ours, ref = ours.bfloat16(), ref.bfloat16()
    fn = torch.compile(ours, backend="aot_eager") if compiled else ours
    x = torch.randn(2, 16, 5, 7, dtype=torch.bfloat16)
    g = torch.randn(2, 16, 5, 7, dtype=torch.bfloat16)
    x_cl = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.clone().requires_grad_()
    h = x_cl * 1.0  # a non-leaf: a leaf's .grad is re-laid-out by autograd whatever arrives
    arrived = []
    h.register_hook(lambda grad: arrived.append(grad.is_contiguous(memory_format=torch.channels_last)
                                                and not grad.is_contiguous()))
    if compiled:
        y = fn(h)
    else:
        with _NormInputLayouts() as seen:
            y = fn(h)
        assert seen.layouts == ["nchw"]  # the kernel ran on an NCHW copy, not on the NHWC input
    y_ref = ref(x_ref)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, y_ref)
    y.backward(g.contiguous(memory_format=torch.channels_last))
    y_ref.backward(g)
    assert arrived == [True]  # the gradient reached the layer before the norm in NHWC, like its input
    torch.testing.assert_close(x_cl.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(fn(x), y_ref.detach())  # NCHW input: the plain path
    if not compiled:  # fp32 keeps PyTorch's NHWC kernel (faster than the switch in fp32)
        with _NormInputLayouts() as seen:
            GroupNorm(4, 16)(x.float().contiguous(memory_format=torch.channels_last))
        assert seen.layouts == ["nhwc"]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_channels_last_model_matches_nchw_model(bf16):
    torch.manual_seed(0)
    vae = tiny_generator("conv", channels=[8, 16], res_blocks=1)
    nhwc = tiny_generator("conv", channels=[8, 16], res_blocks=1).to(memory_format=torch.channels_last)
    nhwc.load_state_dict(vae.state_dict())
    x = images()
    outs = []
    for model, inp in ((vae, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(inp, num_prior=2).recon_logits
        out.float().square().mean().backward()
        outs.append((out.float(), model.encoder.features[0].weight.grad))
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol)


def test_a_plugin_may_declare_its_own_abstract_base_with_abc():
    """The metaclass that records options is an ABCMeta: `class Base(VAE, abc.ABC)` has no metaclass conflict,
    its abstract methods are enforced, and a concrete subclass records its options as any generator does."""
    import abc

    class Base(VAE, abc.ABC):
        @abc.abstractmethod
        def width(self) -> int: ...

    class Tiny(Base, MLPVAE):
        def width(self) -> int:
            return 8

    with pytest.raises(TypeError, match="abstract"):
        type("Incomplete", (Base, MLPVAE), {})((1, 28, 28))
    model = Tiny((1, 28, 28), hidden=(8,), latent_dim=2)
    assert model.width() == 8 and model.latent_shape == (2,) and model.config.options["latent_dim"] == 2
