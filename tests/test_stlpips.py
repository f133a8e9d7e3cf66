"""The shift-tolerant LPIPS (``lpips`` plugin, ``net: alex_st | vgg_st``; vaegan_plugins._stlpips).

Real networks and the real weight files of the stlpips-pytorch wheel; the reference is the package's own
``stlpips.LPIPS`` forward (its modules need IPython and torchsummary, in the dev extra).
"""

from __future__ import annotations

import socket
import sys

import pytest
import torch

import vaegan
from vaegan.api import TermInputs
from vaegan.errors import ConfigError, PluginError
from vaegan.registry import build_plugin

pytest.importorskip("stlpips_pytorch", reason="the stlpips extra is not installed: pip install 'vaegan[stlpips]'")

from vaegan_plugins import _stlpips  # noqa: E402
from vaegan_plugins.perceptual import LPIPSLoss, st_lpips_problem  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")
NETS = ["alex", "vgg"]


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails, as on a machine without a network."""
    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _pair(size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(4, 3, size, size, generator=g) * 2 - 1
    return a, (a + 0.3 * torch.randn(4, 3, size, size, generator=g)).clamp(-1, 1)


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("size", [32, 45])
def test_distance_equals_the_packages_own_forward(net, size, no_network):
    pytest.importorskip("IPython", reason="the package's modules import IPython")
    pytest.importorskip("torchsummary", reason="the package's modules import torchsummary")
    from stlpips_pytorch import stlpips

    reference = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False).eval()
    term = LPIPSLoss(net=f"{net}_st")
    a, b = _pair(size)
    with torch.no_grad():
        expected = reference(a, b).flatten()  # (B,)
        got = term.distance(a, b, value_range=(-1.0, 1.0))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float(expected.min()) > 0  # a real, non-trivial distance


@pytest.mark.parametrize("net", NETS)
def test_every_tensor_of_the_weights_file_is_loaded(net):
    state = torch.load(_stlpips.weights_file(net), map_location="cpu", weights_only=True)
    model = LPIPSLoss(net=f"{net}_st").network
    mine = model.state_dict()
    assert len(mine) == len(state)  # 20 (alex) / 37 (vgg) tensors, every one used
    for key, value in state.items():
        if key.startswith("lin"):
            key = f"lins.{key[3]}.weight"
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0)


def test_gradients_reach_the_generator_in_a_training_step(tiny, no_network):
    """A real trainer step with ST-LPIPS as the only reconstruction term moves the decoder."""
    # MNIST digits: one channel repeated to three, 28 px upsampled to min_size 32.
    cfg = tiny("losses=[{name: lpips, options: {net: alex_st}}, {name: kl}]", "discriminator=null",
               "adversarial=null", "train.max_steps=1")
    trainer = vaegan.build_trainer(cfg)
    term = trainer.train_step.objective.generator_terms["lpips"]
    assert term.net_name == "alex_st" and not list(term.parameters())  # frozen, in no optimizer
    model = trainer.model
    x = torch.rand(4, 1, 28, 28)
    out = model(x)
    loss = term(TermInputs(real=x, output=out, step=0, value_range=model.value_range))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("net", NETS)
def test_gradient_is_finite_at_identical_and_constant_images(net):
    term = LPIPSLoss(net=f"{net}_st")
    real = _pair()[0]
    for fake in (real.clone(), torch.full_like(real, -1.0)):
        fake.requires_grad_(True)
        value = term.distance(fake, real, (-1.0, 1.0)).mean()
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(fake.grad).all()


def test_pinned_in_eval_and_fp32_under_autocast():
    term = LPIPSLoss(net="alex_st")
    term.train()
    assert not any(m.training for m in term.network.modules())
    a, b = _pair()
    plain = term.distance(a, b, (-1.0, 1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = term.distance(a, b, (-1.0, 1.0))
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


def test_pooled_features_are_the_last_map_averaged():
    model = LPIPSLoss(net="vgg_st").network
    x = _pair()[0]
    feats = model.pooled_features(x)
    assert feats.shape == (4, 512) and torch.isfinite(feats).all()
    torch.testing.assert_close(feats, model.net(model.scaling_layer(x))[-1].mean(dim=(2, 3)))


def test_min_size_is_measured_and_checked():
    assert (_stlpips.min_side("alex"), _stlpips.min_side("vgg")) == (21, 18)
    model = _stlpips.ShiftTolerantLPIPS("alex")
    with pytest.raises(RuntimeError):
        model.net(torch.zeros(1, 3, 20, 20))  # what min_side guards against
    with pytest.raises(ConfigError, match=">= 21"):
        build_plugin("vaegan.losses", "lpips", {"net": "alex_st", "min_size": 20})
    # Below min_size the images are upsampled, so tiny images still get a distance.
    term = LPIPSLoss(net="alex_st")
    a, b = _pair(size=8)
    assert term.distance(a, b, (-1.0, 1.0)).shape == (4,)


def test_bad_weight_files_are_clear_errors(tmp_path):
    broken = tmp_path / "alex_shift_tolerant.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(PluginError, match="cannot read the shift-tolerant weights"):
        LPIPSLoss(net="alex_st", st_weights_path=str(broken))
    with pytest.raises(PluginError, match="does not fit the shift-tolerant vgg"):
        LPIPSLoss(net="vgg_st", st_weights_path=str(_stlpips.weights_file("alex")))
    with pytest.raises(PluginError, match="does not exist"):
        LPIPSLoss(net="alex_st", st_weights_path=str(tmp_path / "nowhere"))
    # A folder holding the file works, as for the torchvision backbones.
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "alex_shift_tolerant.pth").write_bytes(_stlpips.weights_file("alex").read_bytes())
    assert LPIPSLoss(net="alex_st", st_weights_path=str(folder)).network.lins[0].weight.abs().sum() > 0


class _HidePackage:
    """A meta-path finder that makes ``stlpips_pytorch`` look uninstalled (as a fresh environment is)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == _stlpips.PACKAGE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def test_without_the_extra_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_HidePackage(), *sys.meta_path])
    for key in [k for k in sys.modules if k.split(".")[0] == _stlpips.PACKAGE]:
        monkeypatch.delitem(sys.modules, key)
    with pytest.raises(PluginError) as info:
        build_plugin("vaegan.losses", "lpips", {"net": "vgg_st"})
    message = str(info.value)
    assert 'pip install "vaegan[stlpips]"' in message and "st_weights_path" in message
    assert "\n" not in message  # one paragraph
    assert st_lpips_problem("alex") is not None
    # eval's default (auto) skips the metric with a note instead of failing
    from vaegan.evaluation import _lpips_for

    net, note = _lpips_for(None, "st_lpips")
    assert net is None and "vaegan[stlpips]" in note


def test_missing_vgg_weights_error_names_the_offline_option(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("VAEGAN_LPIPS_BACKBONE", raising=False)
    with pytest.raises(PluginError) as info:
        LPIPSLoss(net="vgg", download=False)
    assert "net: alex_st or vgg_st" in str(info.value) and "not LPIPS" in str(info.value)
