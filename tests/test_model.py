"""The VAE: shapes for any image size, output ranges, posterior clamp, gradients, bf16, and
pickle-free save/load with clear errors for broken saves."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vaegan.config import ModelConfig
from vaegan.errors import CheckpointError, ConfigError, DataError
from vaegan.model import VAE, DiagonalGaussian, GroupNorm

ARCHS = ("conv", "mlp")
SHAPES = ((1, 28, 28), (3, 32, 32), (1, 17, 23), (4, 64, 48))
RANGES = {"unit": (0.0, 1.0), "symmetric": (-1.0, 1.0)}
LATENT = 4
B = 3


def tiny_cfg(arch="conv", shape=(1, 28, 28), output_range="unit", **kw) -> ModelConfig:
    params = dict(arch=arch, image_channels=shape[0], image_size=tuple(shape[1:]), latent_dim=LATENT,
                  channels=(8, 16), norm_groups=4, mlp_hidden=(32,), output_range=output_range)
    params.update(kw)
    return ModelConfig(**params)


def images(shape, output_range="unit", n=B, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    low, high = RANGES[output_range]
    return x * (high - low) + low


pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")


# ---- forward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_range", list(RANGES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_finite_and_in_range(arch, shape, output_range):
    vae = VAE(tiny_cfg(arch, shape, output_range))
    x = images(shape, output_range)
    vae.check_images(x)  # the inputs themselves are valid for this model
    out = vae(x)
    assert out.recon.shape == (B, *shape)
    assert out.recon_logits.shape == (B, *shape)
    assert out.z.shape == (B, LATENT)
    assert out.posterior.mean.shape == out.posterior.logvar.shape == (B, LATENT)
    for t in (out.recon, out.recon_logits, out.z, out.posterior.mean, out.posterior.logvar):
        assert torch.isfinite(t).all()
    low, high = RANGES[output_range]
    assert out.recon.min() >= low and out.recon.max() <= high
    # recon is the activation of the logits.
    act = torch.sigmoid(out.recon_logits) if output_range == "unit" else torch.tanh(out.recon_logits)
    torch.testing.assert_close(out.recon, act)
    assert out.perturbed is None and out.perturbation is None and out.prior_samples is None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_extra_outputs(arch, shape):
    vae = VAE(tiny_cfg(arch, shape))
    x = images(shape)
    out = vae(x, perturb_std=0.5, num_prior=5)
    assert out.recon.shape == (B, *shape)
    assert out.perturbed.shape == (B, *shape)
    assert out.perturbation.shape == (B, LATENT)
    assert out.prior_samples.shape == (5, *shape)
    for t in (out.perturbed, out.perturbation, out.prior_samples):
        assert torch.isfinite(t).all()
    assert out.prior_samples.min() >= 0 and out.prior_samples.max() <= 1
    # The perturbation really has std ~ perturb_std and the perturbed decode is decode(z + delta).
    assert 0.0 < out.perturbation.abs().max() < 0.5 * 10
    with torch.no_grad():
        torch.testing.assert_close(out.perturbed, vae.decode(out.z + out.perturbation), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.recon, vae.decode(out.z), atol=1e-5, rtol=1e-4)


def test_forward_only_prior_samples():
    vae = VAE(tiny_cfg())
    out = vae(images((1, 28, 28)), num_prior=2)
    assert out.perturbed is None and out.perturbation is None
    assert out.prior_samples.shape == (2, 1, 28, 28)
    out = vae(images((1, 28, 28)), perturb_std=0.1)
    assert out.prior_samples is None and out.perturbed.shape == (B, 1, 28, 28)


def test_perturbation_scales_with_perturb_std():
    vae = VAE(tiny_cfg())
    x = images((1, 28, 28), n=64)
    small = vae(x, perturb_std=0.01).perturbation.std().item()
    large = vae(x, perturb_std=1.0).perturbation.std().item()
    assert 0.005 < small < 0.02
    assert 0.5 < large < 2.0


# ---- inference helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize("output_range", list(RANGES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_sample_reconstruct_interpolate(arch, shape, output_range):
    vae = VAE(tiny_cfg(arch, shape, output_range)).eval()
    low, high = RANGES[output_range]
    x0, x1 = images(shape, output_range, seed=1), images(shape, output_range, seed=2)

    q = vae.encode(x0)
    assert isinstance(q, DiagonalGaussian)
    assert q.mean.shape == q.logvar.shape == q.std.shape == (B, LATENT)
    assert q.mean.dtype == torch.float32
    assert q.kl().shape == (B, LATENT) and (q.kl() >= 0).all()

    dec = vae.decode(q.mean)
    assert dec.shape == (B, *shape)
    assert vae.decode_logits(q.mean).shape == (B, *shape)

    rec = vae.reconstruct(x0)
    torch.testing.assert_close(rec, dec)  # posterior mean by default
    assert not rec.requires_grad
    assert vae.reconstruct(x0, sample=True).shape == (B, *shape)

    s = vae.sample(6)
    assert s.shape == (6, *shape) and torch.isfinite(s).all()
    assert s.min() >= low and s.max() <= high
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(vae.sample(2, generator=g1), vae.sample(2, generator=g2))
    # Temperature 0 decodes the prior mean.
    torch.testing.assert_close(vae.sample(2, temperature=0.0), vae.decode(torch.zeros(2, LATENT)).expand(2, *shape))

    path = vae.interpolate(x0, x1, steps=5)
    assert path.shape == (B, 5, *shape)
    torch.testing.assert_close(path[:, 0], vae.decode(vae.encode(x0).mean), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(path[:, -1], vae.decode(vae.encode(x1).mean), atol=1e-5, rtol=1e-4)
    mid = 0.5 * (vae.encode(x0).mean + vae.encode(x1).mean)
    torch.testing.assert_close(path[:, 2], vae.decode(mid), atol=1e-5, rtol=1e-4)


def test_last_layer_is_the_decoder_output_weight():
    for arch in ARCHS:
        vae = VAE(tiny_cfg(arch))
        assert vae.last_layer is vae.decoder.out.weight
        assert vae.last_layer.requires_grad


# ---- posterior clamp -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scale", [1e4, -1e4, 1e6])
def test_logvar_clamp_for_extreme_inputs(arch, scale):
    cfg = tiny_cfg(arch, logvar_min=-6.0, logvar_max=3.0)
    vae = VAE(cfg)
    x = torch.full((2, 1, 28, 28), scale)
    q = vae.encode(x)
    assert (q.logvar >= -6.0).all() and (q.logvar <= 3.0).all()
    assert torch.isfinite(q.std).all()
    assert (q.std > 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_logvar_clamp_is_hit_exactly_at_both_ends(arch):
    vae = VAE(tiny_cfg(arch, logvar_min=-30.0, logvar_max=20.0))
    with torch.no_grad():
        vae.encoder.head.weight.zero_()
        vae.encoder.head.bias[LATENT:] = torch.tensor([1e6, -1e6, 25.0, -35.0])
    q = vae.encode(images((1, 28, 28)))
    expected = torch.tensor([20.0, -30.0, 20.0, -30.0]).expand(B, LATENT)
    torch.testing.assert_close(q.logvar, expected)
    assert torch.isfinite(q.kl()).all()
    z = q.rsample()
    assert torch.isfinite(z).all()
    # A huge log-variance also decodes to finite, in-range images.
    out = vae(images((1, 28, 28)))
    assert torch.isfinite(out.recon).all() and out.recon.min() >= 0 and out.recon.max() <= 1


# ---- gradients and precision ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_gives_finite_grads_to_every_parameter(arch):
    vae = VAE(tiny_cfg(arch, (3, 17, 23)))
    x = images((3, 17, 23))
    out = vae(x, perturb_std=0.1, num_prior=2)
    loss = ((out.recon - x) ** 2).mean() + out.posterior.kl().mean() + out.perturbed.mean() + out.prior_samples.mean()
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in vae.encoder.parameters())
    assert vae.last_layer.grad.abs().sum() > 0


@pytest.mark.parametrize("output_range", list(RANGES))
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_forward_on_cpu(arch, output_range):
    vae = VAE(tiny_cfg(arch, (1, 28, 28), output_range))
    x = images((1, 28, 28), output_range)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae(x, perturb_std=0.1, num_prior=2)
    assert out.posterior.mean.dtype == torch.float32  # posterior math in fp32
    assert out.z.dtype == torch.float32
    for t in (out.recon, out.perturbed, out.prior_samples, out.z, out.posterior.logvar):
        assert torch.isfinite(t.float()).all()
    low, high = RANGES[output_range]
    assert out.recon.float().min() >= low and out.recon.float().max() <= high
    loss = out.recon.float().mean() + out.posterior.kl().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


# ---- save / load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_round_trip(tmp_path, arch):
    cfg = tiny_cfg(arch, (3, 17, 23), "symmetric")
    vae = VAE(cfg).eval()
    d = vae.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    # No pickle anywhere: safetensors starts with an 8-byte little-endian header length, then JSON.
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["library"] == "vaegan"
    assert b"\x80\x02" != raw[:2] and not raw.startswith(b"PK")  # not a pickle / torch zip
    assert json.loads((d / "config.json").read_text())["arch"] == arch

    loaded = VAE.from_pretrained(d)
    assert loaded.config == cfg
    loaded.eval()
    x = images((3, 17, 23), "symmetric")
    torch.testing.assert_close(loaded.reconstruct(x), vae.reconstruct(x), rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(loaded.sample(4, generator=g1), vae.sample(4, generator=g2), rtol=0, atol=0)
    for (k1, v1), (k2, v2) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(CheckpointError) as info:
        VAE.from_pretrained(tmp_path / "nowhere")
    assert "config.json" in str(info.value) and "nowhere" in str(info.value)


def test_from_pretrained_missing_weights(tmp_path):
    d = VAE(tiny_cfg()).save_pretrained(tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        VAE.from_pretrained(d)


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.0])
def test_from_pretrained_truncated_safetensors(tmp_path, keep):
    d = VAE(tiny_cfg()).save_pretrained(tmp_path / "m")
    w = d / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError) as info:
        VAE.from_pretrained(d)
    assert str(w) in str(info.value)
    assert "truncated" in str(info.value)


def test_from_pretrained_invalid_json(tmp_path):
    d = VAE(tiny_cfg()).save_pretrained(tmp_path / "m")
    c = d / "config.json"
    c.write_text('{"arch": "conv", ')
    with pytest.raises(CheckpointError) as info:
        VAE.from_pretrained(d)
    assert str(c) in str(info.value) and "JSON" in str(info.value)
    c.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="config.json"):
        VAE.from_pretrained(d)


@pytest.mark.parametrize("text", ["[]", '{"arch": "conv", "nope": 1}'])
def test_from_pretrained_corrupt_config_is_a_checkpoint_error(tmp_path, text):
    d = VAE(tiny_cfg()).save_pretrained(tmp_path / "m")
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json"):
        VAE.from_pretrained(d)


@pytest.mark.parametrize("other", [dict(arch="mlp"), dict(latent_dim=6), dict(channels=(8, 8, 16))])
def test_from_pretrained_weights_of_a_different_architecture(tmp_path, other):
    d = VAE(tiny_cfg()).save_pretrained(tmp_path / "m")
    params = dict(arch="conv", image_channels=1, image_size=(28, 28), latent_dim=LATENT, channels=(8, 16),
                  norm_groups=4, mlp_hidden=(32,))
    params.update(other)
    VAE(ModelConfig(**params)).save_pretrained(tmp_path / "other")
    (d / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as info:
        VAE.from_pretrained(d)
    msg = str(info.value)
    assert str(d / "model.safetensors") in msg and "config.json" in msg
    assert "does not fit" in msg


# ---- input checks ----------------------------------------------------------------------------------


def test_check_images_accepts_valid_batches():
    vae = VAE(tiny_cfg("conv", (3, 32, 32)))
    vae.check_images(images((3, 32, 32)))
    vae.check_images(torch.zeros(1, 3, 32, 32))
    vae.check_images(torch.ones(1, 3, 32, 32))
    sym = VAE(tiny_cfg("conv", (3, 32, 32), "symmetric"))
    sym.check_images(-torch.ones(2, 3, 32, 32))


@pytest.mark.parametrize(
    "x, words",
    [
        (torch.rand(2, 1, 32, 32), ["(1, 32, 32)", "(3, 32, 32)", "image_channels"]),
        (torch.rand(2, 3, 28, 28), ["(3, 28, 28)", "image_size"]),
        (torch.rand(3, 32, 32), ["(3, 32, 32)"]),
        (torch.rand(2, 3, 32, 31), ["(3, 32, 31)"]),
    ],
)
def test_check_images_wrong_shape(x, words):
    vae = VAE(tiny_cfg("conv", (3, 32, 32)))
    with pytest.raises(DataError) as info:
        vae.check_images(x, where="my loader")
    msg = str(info.value)
    assert "my loader" in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_images_non_finite(bad):
    vae = VAE(tiny_cfg())
    x = images((1, 28, 28))
    x[1, 0, 3, 4] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        vae.check_images(x)


@pytest.mark.parametrize(
    "output_range, lo, hi",
    [("unit", -1.0, 1.0), ("unit", 0.0, 255.0), ("symmetric", -1.0, 1.5), ("symmetric", -2.0, 0.0)],
)
def test_check_images_out_of_range(output_range, lo, hi):
    vae = VAE(tiny_cfg(output_range=output_range))
    x = torch.full((2, 1, 28, 28), (lo + hi) / 2)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = lo, hi
    with pytest.raises(DataError) as info:
        vae.check_images(x)
    msg = str(info.value)
    assert output_range in msg and "output_range" in msg
    assert f"{hi:.3g}" in msg


def test_check_images_empty_batch():
    vae = VAE(tiny_cfg())
    try:
        vae.check_images(torch.empty(0, 1, 28, 28))
    except DataError:
        pass


def test_model_config_rejects_bad_architectures():
    with pytest.raises(ConfigError, match="norm_groups"):
        tiny_cfg(channels=(8, 10))
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig(image_size=(0, 28))
    assert math.prod(tiny_cfg(shape=(4, 64, 48)).image_shape) == 4 * 64 * 48


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


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
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
    cfg = tiny_cfg(channels=(8, 16), res_blocks=1)
    torch.manual_seed(0)
    vae = VAE(cfg)
    nhwc = VAE(cfg).to(memory_format=torch.channels_last)
    nhwc.load_state_dict(vae.state_dict())
    x = images((1, 28, 28))
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
