"""The generator contract (group ``vaegan.generators``), run against every registered generator.

Parametrised over ``registry.available("vaegan.generators")``: the built-in ``conv`` and ``mlp``, the
first-party ``autoencoder_kl`` and ``diffusers_vae`` (spatial latents), the test suite's
``tiny_spatial`` (registered by conftest) and any generator a newly installed package adds. A new
plugin is built with its entry in tests/plugin_options.py (or its defaults) and must pass everything
here; nothing below reads a plugin's internals, only the contract of :class:`vaegan.api.VAE`.

Two freedoms of the contract are honoured: a generator may refuse an image shape it cannot take (with
a ConfigError when it is built; the tests that need that shape are then skipped for it, and
``test_a_refused_image_shape_is_a_config_error`` checks the refusal), and its output activation may
be unbounded (diffusers' identity): ``recon`` is ``activate(recon_logits)`` always, inside the output
range only when ``activate`` bounds it. Architecture specifics of the built-ins are in test_model.py.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import assert_foreign_weights_refused, tiny_generator
from plugin_options import options_for
from torch import nn

from vaegan import build_generator, registry
from vaegan.api import VAE, DiagonalGaussian, VAEOutput
from vaegan.config import to_dict
from vaegan.errors import CheckpointError, ConfigError, DataError, PluginError

GENERATORS = registry.available("vaegan.generators")
SHAPES = ((1, 28, 28), (3, 32, 32), (1, 17, 23), (4, 64, 48))
RANGES = {"unit": (0.0, 1.0), "symmetric": (-1.0, 1.0)}
B = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")

shape_ids = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
every_generator = pytest.mark.parametrize("name", GENERATORS)


def images(shape, output_range="unit", n=B, seed=0) -> torch.Tensor:
    """``n`` random images of ``shape`` spanning the output range."""
    g = torch.Generator().manual_seed(seed)
    low, high = RANGES[output_range]
    return torch.rand(n, *shape, generator=g) * (high - low) + low


def build(name: str, shape=(1, 28, 28), output_range: str = "unit", **options) -> VAE:
    """``tiny_generator``, skipping the test when the plugin refuses this image shape (ConfigError)."""
    try:
        return tiny_generator(name, shape, output_range, **options)
    except ConfigError as exc:
        if options:  # a refused option is a failure, not a shape the plugin cannot take
            raise
        pytest.skip(f"{name} refuses images of shape {shape}: {exc}")


# An unusual shape first (odd, non-square, 3 channels), then ones a constrained generator takes.
ODD_SHAPES = ((3, 17, 23), (3, 16, 24), (1, 16, 24), (1, 28, 28))


def build_odd(name: str, output_range: str = "unit") -> VAE:
    """The generator at the first of ODD_SHAPES it accepts (tests that need some unusual shape, not one)."""
    for shape in ODD_SHAPES:
        try:
            return tiny_generator(name, shape, output_range)
        except ConfigError:
            continue
    pytest.fail(f"{name} refuses every shape of {ODD_SHAPES}")


def assert_in_range(vae: VAE, images: torch.Tensor) -> None:
    """Decoded images lie in the output range when the generator's activation bounds them."""
    low, high = vae.value_range
    extreme = vae.activate(torch.tensor([-1e4, 0.0, 1e4]))
    if extreme.min() >= low and extreme.max() <= high:  # a bounded activation (sigmoid, tanh)
        assert images.float().min() >= low and images.float().max() <= high
    assert torch.isfinite(images.float()).all()


def is_class(name: str) -> bool:
    return isinstance(registry.load("vaegan.generators", name), type)


def encoder_parameters(vae: VAE, x: torch.Tensor):
    """The parameters the posterior depends on (found by autograd, not by module names)."""
    q = vae.encode(x)
    params = list(vae.parameters())
    grads = torch.autograd.grad(q.mean.sum() + q.logvar.sum(), params, allow_unused=True)
    found = [p for p, g in zip(params, grads) if g is not None]
    assert found, "the posterior depends on no parameter"
    return found


def latent(vae: VAE, n: int = B):
    return (n, *vae.latent_shape)


def test_every_kind_of_latent_is_in_the_suite():
    """The suite meets a vector latent and a spatial one (conftest registers tiny_spatial)."""
    assert {"conv", "mlp", "tiny_spatial"} <= set(GENERATORS)
    kinds = {len(tiny_generator(name).latent_shape) for name in GENERATORS}
    assert {1, 3} <= kinds


# ---- construction and recorded options -----------------------------------------------------------


@every_generator
def test_built_through_the_registry_with_a_tuple_latent_shape(name):
    vae = build(name)
    assert isinstance(vae, VAE)
    if is_class(name):
        assert isinstance(vae, registry.load("vaegan.generators", name)) and vae.config.name == name
    else:  # a factory plugin builds a registered generator class, whose name the model keeps
        assert vae.config.name in GENERATORS and is_class(vae.config.name)
    assert isinstance(vae.latent_shape, tuple) and all(isinstance(s, int) and s >= 1 for s in vae.latent_shape)
    assert vae.image_shape == (1, 28, 28) and vae.output_range == "unit" and vae.value_range == (0.0, 1.0)
    assert vae.config.image_shape == (1, 28, 28)


@every_generator
def test_config_options_hold_the_resolved_constructor_options(name):
    """``config.options`` is every constructor argument but the shared image fields, defaults filled
    in, as plain (JSON) data: enough to rebuild the very same architecture by name."""
    given = options_for("vaegan.generators", name) if is_class(name) else {}  # a factory's options are its own
    vae = build_odd(name, "symmetric")
    options = vae.config.options
    json.dumps(options)  # plain data
    params = inspect.signature(type(vae).__init__).parameters
    named = {k: p for k, p in params.items() if k not in ("self", "image_shape", "output_range")
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    assert set(named) <= set(options)
    for key, value in given.items():
        assert options[key] == to_dict(value), key
    for key, p in named.items():  # (a factory plugin passes its own values: the class defaults do not apply)
        if is_class(name) and key not in given and p.default is not p.empty:
            assert options[key] == to_dict(p.default), f"{key}: the default was not recorded"
    assert (vae.config.image_shape, vae.config.output_range) == (vae.image_shape, "symmetric")
    rebuilt = build_generator(vae.config)
    assert type(rebuilt) is type(vae) and rebuilt.config == vae.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in vae.state_dict().items()}


@every_generator
def test_an_unknown_option_is_a_config_error_naming_the_plugin_and_its_signature(name):
    """Options are checked against the constructor's signature before anything is built (the metaclass
    that records them must not hide it), and the error shows that signature."""
    params = inspect.signature(registry.load("vaegan.generators", name)).parameters
    assert "image_shape" in params, f"inspect.signature shows {list(params)}, not the constructor's"
    with pytest.raises(ConfigError) as info:
        tiny_generator(name, no_such_option=1)
    msg = str(info.value)
    assert f"Plugin '{name}'" in msg and "no_such_option" in msg
    assert f"Its signature is {name}(image_shape" in msg


def test_a_subclass_that_overrides_forward_is_refused():
    with pytest.raises(TypeError, match="forward"):
        class _OwnForward(VAE):
            def forward(self, x):
                return x


class _Unregistered(VAE):
    """A complete generator that no entry point names."""

    def __init__(self, image_shape, output_range="unit", latent_dim=3, set_latent=True):
        super().__init__(image_shape, output_range)
        c, h, w = self.image_shape
        if set_latent:
            self.latent_shape = (latent_dim,)
        self.enc = nn.Linear(c * h * w, 2 * latent_dim)
        self.dec = nn.Linear(latent_dim, c * h * w)

    def encode(self, x):
        return self.posterior(self.enc(x.flatten(1)))

    def decode_logits(self, z):
        return self.dec(z).view(-1, *self.image_shape)

    @property
    def last_layer(self):
        return self.dec.weight


def test_base_class_rules(tmp_path):
    """VAE itself is not built; a subclass must set latent_shape; its options are recorded; an
    unregistered one cannot be saved (it could not be rebuilt by name)."""
    with pytest.raises(TypeError, match="build_generator"):
        VAE((1, 28, 28))
    with pytest.raises(PluginError, match="latent_shape"):
        _Unregistered((1, 4, 4), set_latent=False)
    vae = _Unregistered((1, 4, 4), latent_dim=2)
    assert vae.config.name == "" and dict(vae.config.options) == {"latent_dim": 2, "set_latent": True}
    assert vae(torch.rand(2, 1, 4, 4)).z.shape == (2, 2)
    with pytest.raises(PluginError, match="not registered"):
        vae.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()


# ---- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_range", list(RANGES))
@shape_ids
@every_generator
def test_forward_shapes_finite_and_in_range(name, shape, output_range):
    vae = build(name, shape, output_range)
    x = images(shape, output_range)
    vae.check_images(x)  # the inputs themselves are valid for this model
    out = vae(x)
    assert isinstance(out, VAEOutput) and isinstance(out.posterior, DiagonalGaussian)
    assert out.recon.shape == out.recon_logits.shape == (B, *shape)
    assert out.z.shape == out.posterior.mean.shape == out.posterior.logvar.shape == latent(vae)
    for t in (out.recon, out.recon_logits, out.z, out.posterior.mean, out.posterior.logvar):
        assert torch.isfinite(t).all()
    assert_in_range(vae, out.recon)
    torch.testing.assert_close(out.recon, vae.activate(out.recon_logits))  # recon = activate(logits)
    assert out.perturbed is None and out.perturbation is None and out.prior_samples is None
    assert out.recon_decoder_only is None


@shape_ids
@every_generator
def test_forward_extra_decodes(name, shape):
    vae = build(name, shape)
    x = images(shape)
    out = vae(x, perturb_std=0.5, num_prior=5, decoder_only=True)
    assert out.recon.shape == out.perturbed.shape == out.recon_decoder_only.shape == (B, *shape)
    assert out.perturbation.shape == latent(vae)
    assert out.prior_samples.shape == (5, *shape)
    for t in (out.perturbed, out.perturbation, out.prior_samples, out.recon_decoder_only):
        assert torch.isfinite(t).all()
    assert_in_range(vae, out.prior_samples)
    assert 0.0 < out.perturbation.abs().max() < 0.5 * 10
    with torch.no_grad():  # each extra decode is the decode of its latent
        torch.testing.assert_close(out.perturbed, vae.decode(out.z + out.perturbation), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.recon, vae.decode(out.z), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.recon_decoder_only, out.recon, atol=1e-6, rtol=1e-5)


@every_generator
def test_the_decoder_only_copy_carries_no_encoder_gradient(name):
    vae = build_odd(name)
    x = images(vae.image_shape)
    encoder = encoder_parameters(vae, x)
    out = vae(x, decoder_only=True)
    (to_z,) = torch.autograd.grad(out.recon_decoder_only.sum(), out.z, retain_graph=True, allow_unused=True)
    # (Decoded in one batch with z, so autograd may connect it: the gradient must be exactly zero.)
    assert to_z is None or not to_z.any(), "recon_decoder_only passes a gradient to the encoder's z"
    out.recon_decoder_only.square().sum().backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in encoder), "an encoder weight got a gradient"
    assert vae.last_layer.grad is not None and vae.last_layer.grad.abs().sum() > 0
    vae.zero_grad(set_to_none=True)
    out.recon.square().sum().backward()  # the plain reconstruction does reach the encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)


@every_generator
def test_forward_with_only_prior_samples_or_only_a_perturbation(name):
    vae = build(name)
    out = vae(images((1, 28, 28)), num_prior=2)
    assert out.perturbed is None and out.perturbation is None and out.recon_decoder_only is None
    assert out.prior_samples.shape == (2, 1, 28, 28)
    out = vae(images((1, 28, 28)), perturb_std=0.1)
    assert out.prior_samples is None and out.perturbed.shape == (B, 1, 28, 28)


@every_generator
def test_perturbation_scales_with_perturb_std(name):
    vae = build(name)
    x = images((1, 28, 28), n=64)
    small = vae(x, perturb_std=0.01).perturbation.std().item()
    large = vae(x, perturb_std=1.0).perturbation.std().item()
    assert 0.005 < small < 0.02
    assert 0.5 < large < 2.0


# ---- inference helpers -----------------------------------------------------------------------------


@every_generator
def test_sample_prior(name):
    vae = build(name)
    z = vae.sample_prior(5)
    assert z.shape == (5, *vae.latent_shape) and z.dtype == torch.float32 and torch.isfinite(z).all()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    torch.testing.assert_close(vae.sample_prior(3, generator=g1), vae.sample_prior(3, generator=g2), rtol=0, atol=0)
    assert vae.sample_prior(2, dtype=torch.float64).dtype == torch.float64
    assert not torch.equal(vae.sample_prior(3), vae.sample_prior(3))


@pytest.mark.parametrize("output_range", list(RANGES))
@shape_ids
@every_generator
def test_encode_decode_sample_reconstruct_interpolate(name, shape, output_range):
    vae = build(name, shape, output_range).eval()
    x0, x1 = images(shape, output_range, seed=1), images(shape, output_range, seed=2)

    q = vae.encode(x0)
    assert isinstance(q, DiagonalGaussian)
    assert q.mean.shape == q.logvar.shape == q.std.shape == q.kl().shape == latent(vae)
    assert q.mean.dtype == torch.float32
    assert (q.kl() >= 0).all()

    dec = vae.decode(q.mean)
    assert dec.shape == vae.decode_logits(q.mean).shape == (B, *shape)
    assert_in_range(vae, dec)

    rec = vae.reconstruct(x0)
    torch.testing.assert_close(rec, dec)  # posterior mean by default
    assert not rec.requires_grad
    assert vae.reconstruct(x0, sample=True).shape == (B, *shape)

    s = vae.sample(6)
    assert s.shape == (6, *shape) and torch.isfinite(s).all()
    assert_in_range(vae, s)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(vae.sample(2, generator=g1), vae.sample(2, generator=g2))
    # Temperature 0 decodes the prior mean.
    torch.testing.assert_close(vae.sample(2, temperature=0.0), vae.decode(torch.zeros(latent(vae, 2))))

    path = vae.interpolate(x0, x1, steps=5)
    assert path.shape == (B, 5, *shape)
    torch.testing.assert_close(path[:, 0], vae.decode(vae.encode(x0).mean), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(path[:, -1], vae.decode(vae.encode(x1).mean), atol=1e-5, rtol=1e-4)
    mid = 0.5 * (vae.encode(x0).mean + vae.encode(x1).mean)
    torch.testing.assert_close(path[:, 2], vae.decode(mid), atol=1e-5, rtol=1e-4)


@every_generator
def test_last_layer_is_a_trained_decoder_weight(name):
    vae = build(name)
    assert isinstance(vae.last_layer, nn.Parameter) and vae.last_layer.requires_grad
    assert any(p is vae.last_layer for p in vae.parameters())
    vae.decode(torch.randn(latent(vae, 2))).sum().backward()
    assert vae.last_layer.grad is not None and vae.last_layer.grad.abs().sum() > 0


# ---- posterior clamp --------------------------------------------------------------------------------


@every_generator
def test_logvar_clamp_when_the_encoder_explodes(name):
    """Encoder weights scaled by 1e3 push the log-variance far past both ends of the clamp: it stays in
    ``logvar_range``, the std stays finite and positive, and the huge latent still decodes in range."""
    vae = build(name)
    x = images((1, 28, 28))
    encoder = encoder_parameters(vae, x)
    with torch.no_grad():
        for p in encoder:
            p.mul_(1e3)
    lo, hi = vae.logvar_range
    q = vae.encode(x)
    assert (q.logvar >= lo).all() and (q.logvar <= hi).all()
    assert (q.logvar == hi).any() or (q.logvar == lo).any(), "the clamp was never reached: scale further"
    assert torch.isfinite(q.std).all() and (q.std > 0).all()
    assert torch.isfinite(q.kl()).all() and torch.isfinite(q.rsample()).all()
    out = vae(x)
    assert_in_range(vae, out.recon)


# ---- gradients and precision -----------------------------------------------------------------------


@every_generator
def test_backward_gives_finite_grads_to_every_parameter(name):
    vae = build_odd(name)
    x = images(vae.image_shape)
    out = vae(x, perturb_std=0.1, num_prior=2, decoder_only=True)
    loss = (((out.recon - x) ** 2).mean() + out.posterior.kl().mean() + out.perturbed.mean()
            + out.prior_samples.mean() + out.recon_decoder_only.mean())
    loss.backward()
    for pname, p in vae.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in encoder_parameters(vae, x))
    assert vae.last_layer.grad.abs().sum() > 0


@pytest.mark.parametrize("output_range", list(RANGES))
@every_generator
def test_bf16_autocast_forward_on_cpu(name, output_range):
    vae = build(name, (1, 28, 28), output_range)
    x = images((1, 28, 28), output_range)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae(x, perturb_std=0.1, num_prior=2, decoder_only=True)
    assert out.posterior.mean.dtype == out.posterior.logvar.dtype == torch.float32  # posterior math in fp32
    assert out.z.dtype == torch.float32
    for t in (out.recon, out.perturbed, out.prior_samples, out.recon_decoder_only, out.z, out.posterior.logvar):
        assert torch.isfinite(t.float()).all()
    assert_in_range(vae, out.recon)
    loss = out.recon.float().mean() + out.posterior.kl().mean()
    loss.backward()
    grads = [p.grad for p in vae.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---- input checks ----------------------------------------------------------------------------------


@every_generator
def test_check_images_accepts_valid_batches(name):
    vae = build(name, (3, 32, 32))
    vae.check_images(images((3, 32, 32)))
    vae.check_images(torch.zeros(1, 3, 32, 32))
    vae.check_images(torch.ones(1, 3, 32, 32))
    build(name, (3, 32, 32), "symmetric").check_images(-torch.ones(2, 3, 32, 32))


@pytest.mark.parametrize(
    "x, words",
    [
        (torch.rand(2, 1, 32, 32), ["(1, 32, 32)", "(3, 32, 32)", "image_channels"]),
        (torch.rand(2, 3, 28, 28), ["(3, 28, 28)", "image_size"]),
        (torch.rand(3, 32, 32), ["(3, 32, 32)"]),
        (torch.rand(2, 3, 32, 31), ["(3, 32, 31)"]),
    ],
    ids=["channels", "size", "no-batch-dim", "width"],
)
@every_generator
def test_check_images_wrong_shape(name, x, words):
    vae = build(name, (3, 32, 32))
    with pytest.raises(DataError) as info:
        vae.check_images(x, where="my loader")
    msg = str(info.value)
    assert "my loader" in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@every_generator
def test_check_images_non_finite(name, bad):
    vae = build(name)
    x = images((1, 28, 28))
    x[1, 0, 3, 4] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        vae.check_images(x)


@pytest.mark.parametrize(
    "output_range, lo, hi",
    [("unit", -1.0, 1.0), ("unit", 0.0, 255.0), ("symmetric", -1.0, 1.5), ("symmetric", -2.0, 0.0)],
)
@every_generator
def test_check_images_out_of_range(name, output_range, lo, hi):
    vae = build(name, output_range=output_range)
    x = torch.full((2, 1, 28, 28), (lo + hi) / 2)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = lo, hi
    with pytest.raises(DataError) as info:
        vae.check_images(x)
    msg = str(info.value)
    assert output_range in msg and "output_range" in msg
    assert f"{hi:.3g}" in msg


@every_generator
def test_check_images_empty_batch(name):
    vae = build(name)
    with pytest.raises(DataError, match="empty batch") as info:
        vae.check_images(torch.empty(0, 1, 28, 28), where="my loader")
    assert "my loader" in str(info.value)


# ---- save / load -----------------------------------------------------------------------------------


@every_generator
def test_save_pretrained_round_trip(tmp_path, name):
    vae = build_odd(name, "symmetric").eval()
    d = vae.save_pretrained(tmp_path / "saved")
    files = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors"} <= files  # (a plugin may add a folder in another format)
    assert all((d / f).is_dir() for f in files - {"config.json", "model.safetensors"})
    # No pickle anywhere: safetensors starts with an 8-byte little-endian header length, then JSON.
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["library"] == "vaegan" and header["__metadata__"]["generator"] == vae.config.name
    assert raw[:2] != b"\x80\x02" and not raw.startswith(b"PK")  # not a pickle / torch zip
    saved = json.loads((d / "config.json").read_text())
    assert saved["name"] == vae.config.name and saved["options"] == to_dict(vae.config.options)
    c, h, w = vae.image_shape
    assert (saved["image_channels"], saved["image_size"], saved["output_range"]) == (c, [h, w], "symmetric")

    loaded = VAE.from_pretrained(d)
    assert type(loaded) is type(vae) and loaded.config == vae.config
    assert type(vae).from_pretrained(d).config == vae.config  # the plugin's own class loads it too
    loaded.eval()
    x = images(vae.image_shape, "symmetric")
    torch.testing.assert_close(loaded.reconstruct(x), vae.reconstruct(x), rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(loaded.sample(4, generator=g1), vae.sample(4, generator=g2), rtol=0, atol=0)
    assert list(vae.state_dict()) == list(loaded.state_dict())
    for k, v in vae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(CheckpointError) as info:
        VAE.from_pretrained(tmp_path / "nowhere")
    assert "config.json" in str(info.value) and "nowhere" in str(info.value)


@pytest.fixture
def saved(tmp_path, request):
    """A tiny generator ``request.param`` saved under tmp_path/m."""
    return build(request.param).save_pretrained(tmp_path / "m")


saved_generator = pytest.mark.parametrize("saved", GENERATORS, indirect=True)


@saved_generator
def test_from_pretrained_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        VAE.from_pretrained(saved)


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.0])
@saved_generator
def test_from_pretrained_truncated_safetensors(saved, keep):
    w = saved / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError) as info:
        VAE.from_pretrained(saved)
    assert str(w) in str(info.value)
    assert "truncated" in str(info.value)


@saved_generator
def test_from_pretrained_invalid_json(saved):
    c = saved / "config.json"
    c.write_text('{"name": "conv", ')
    with pytest.raises(CheckpointError) as info:
        VAE.from_pretrained(saved)
    assert str(c) in str(info.value) and "JSON" in str(info.value)
    c.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="config.json"):
        VAE.from_pretrained(saved)


@pytest.mark.parametrize("edit", ["list", "unknown-key", "unknown-option"])
@saved_generator
def test_from_pretrained_corrupt_config_is_a_checkpoint_error(saved, edit):
    c = saved / "config.json"
    config = json.loads(c.read_text())
    if edit == "list":
        c.write_text("[]")
    elif edit == "unknown-key":
        c.write_text(json.dumps({**config, "nope": 1}))
    else:
        c.write_text(json.dumps({**config, "options": {**config["options"], "nope": 1}}))
    with pytest.raises(CheckpointError, match="config.json") as info:
        VAE.from_pretrained(saved)
    assert "nope" in str(info.value) or edit == "list"


@saved_generator
def test_from_pretrained_of_a_generator_that_is_not_installed(saved):
    c = saved / "config.json"
    c.write_text(json.dumps({**json.loads(c.read_text()), "name": "no_such_generator"}))
    with pytest.raises(PluginError, match="no_such_generator"):
        VAE.from_pretrained(saved)


@pytest.mark.parametrize("other", ["image_channels", "another_generator"])
@every_generator
def test_from_pretrained_weights_of_a_different_architecture(tmp_path, name, other):
    d = build(name).save_pretrained(tmp_path / "m")
    if other == "image_channels":
        theirs = build(name, (3, 28, 28))
    else:
        theirs = build(next(n for n in GENERATORS if n != name))
    assert_foreign_weights_refused(d, theirs, tmp_path)


@every_generator
def test_from_pretrained_through_another_plugin_class_is_refused(tmp_path, name):
    if not is_class(name):
        pytest.skip(f"{name} is a factory: from_pretrained is a method of generator classes")
    cls = registry.load("vaegan.generators", name)
    other = next(n for n in GENERATORS if is_class(n) and not issubclass(registry.load("vaegan.generators", n), cls))
    d = tiny_generator(other).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=f"'{other}' generator"):
        cls.from_pretrained(d)


@every_generator
def test_a_refused_image_shape_is_a_config_error(name):
    """Every shape of the suite either builds or is refused when the generator is built, with a
    ConfigError that names the size (never a shape error at the first training step)."""
    for shape in SHAPES:
        try:
            vae = tiny_generator(name, shape)
        except ConfigError as exc:
            assert "x".join(map(str, shape[1:])) in str(exc) or str(shape[0]) in str(exc), str(exc)
            continue
        assert vae(images(shape)).recon.shape == (B, *shape)
