"""A third-party plugin package (examples/vaegan-plugin-example) installed with pip: its generator
(``resmlp``), loss term (``gradient_difference``) and discriminator (``mlp``) are found by name, listed
with their distribution, trained with (through the API and the CLI), saved and loaded back, run
through vaegan's contract suites, and refused when third-party plugins are disabled.

The package is pip-installed for real (``--no-deps --no-build-isolation --no-index``: offline, a few
seconds) into a private ``--target`` folder that the tests put on ``sys.path``, rather than into the
shared environment: other test sessions running at the same time in the same environment must not
see (or lose) its plugins half-way through, and nothing needs uninstalling afterwards. Every test
that uses the installed package is marked ``slow``; the first two tests import the generator from
the source tree and run in the fast suite.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_ROOT, load_digits

import vaegan
from vaegan import cli, registry
from vaegan.config import ModelConfig
from vaegan.errors import ConfigError, PluginError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "vaegan-plugin-example"
PACKAGE = "vaegan_plugin_example"
PLUGINS = {"vaegan.generators": "resmlp", "vaegan.losses": "gradient_difference", "vaegan.discriminators": "mlp"}
# The contract suites, one per group (parametrised over registry.available(group)), and the test file
# of each example plugin's group.
CONTRACT_SUITES = ["test_contract_generators.py", "test_contract_losses.py", "test_contract_adversarial.py",
                   "test_contract_discriminators.py", "test_contract_datasets.py"]
SUITE_OF = {"resmlp": "test_contract_generators.py", "gradient_difference": "test_contract_losses.py",
            "mlp": "test_contract_discriminators.py"}
RESMLP = {"latent_dim": 4, "width": 32, "depth": 1}  # milliseconds per step on 2 CPU cores
RESMLP_DEFAULTS = {"latent_dim": 16, "width": 256, "depth": 2, "expansion": 2, "logvar_min": -30.0, "logvar_max": 20.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _forget_example_modules() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
        del sys.modules[name]


@pytest.fixture
def source_tree(monkeypatch):
    """The example's modules imported from examples/.../src (no install, no registry entry)."""
    _forget_example_modules()
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    yield importlib.import_module(f"{PACKAGE}.generators")
    monkeypatch.undo()
    _forget_example_modules()


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """The folder pip installed the example package into (its code and its .dist-info)."""
    work = tmp_path_factory.mktemp("example_plugin")
    source = work / "source"  # pip builds in the source tree: build a copy, keep the repo clean
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--quiet", "--target", str(site), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site


@pytest.fixture
def example(installed_example, monkeypatch) -> Path:
    """The example package importable and visible to the registry for one test, then gone."""
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)
    _forget_example_modules()  # nothing imported from elsewhere (the source tree) may stand in for it
    monkeypatch.syspath_prepend(str(installed_example))
    registry.refresh()
    yield installed_example
    monkeypatch.undo()
    _forget_example_modules()
    registry.refresh()


def _distribution_name(site: Path) -> str:
    (info,) = site.glob("*.dist-info")
    return metadata.PathDistribution(info).metadata["Name"]


def _plugins_table(capsys) -> dict:
    assert cli.main(["plugins"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        name, group, dist, status = line.split(None, 3)
        rows[(group, name)] = (dist, status)
    return rows


def _from(site: Path, obj: object) -> bool:
    """Whether ``obj``'s class was imported from the installed copy under ``site``."""
    module = sys.modules[type(obj).__module__]
    return Path(module.__file__).resolve().is_relative_to(site.resolve())


# ---- the generator, from the source tree (fast) -----------------------------------------------------
@pytest.mark.parametrize("image_shape, output_range", [((1, 28, 28), "unit"), ((3, 17, 9), "symmetric")])
def test_resmlp_meets_the_generator_contract_from_the_source_tree(source_tree, image_shape, output_range):
    ResMLPVAE = source_tree.ResMLPVAE
    assert "forward" not in ResMLPVAE.__dict__  # the base class's template method does the forward
    torch.manual_seed(0)
    vae = ResMLPVAE(image_shape, output_range, **RESMLP)
    assert isinstance(vae, vaegan.VAE) and vae.latent_shape == (4,)
    assert dict(vae.config.options) == {**RESMLP_DEFAULTS, **RESMLP}  # recorded for save_pretrained
    for block in [m for m in vae.modules() if isinstance(m, source_tree.ResidualBlock)]:
        h = torch.randn(3, 32)
        assert torch.equal(block(h), h)  # every block starts as the identity
    low, high = vae.value_range
    x = torch.rand(5, *image_shape) * (high - low) + low
    out = vae(x, perturb_std=0.1, num_prior=3, decoder_only=True)
    assert out.recon.shape == x.shape and out.z.shape == (5, 4) and out.prior_samples.shape == (3, *image_shape)
    assert out.recon_decoder_only.shape == out.perturbed.shape == x.shape
    assert out.recon.min() >= low and out.recon.max() <= high
    out.recon.mean().backward()
    assert all(p.grad is not None for p in vae.encoder.parameters())
    assert vae.last_layer is vae.out.weight and vae.last_layer.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae(x)
    assert out.posterior.mean.dtype == torch.float32 and torch.isfinite(out.recon.float()).all()
    assert vae.interpolate(x[:2], x[2:4], steps=5).shape == (2, 5, *image_shape)


def test_resmlp_refuses_bad_options(source_tree):
    ResMLPVAE = source_tree.ResMLPVAE
    for bad in ({"latent_dim": 0}, {"width": 2.5}, {"depth": -1}, {"expansion": True}, {"logvar_min": "low"},
                {"logvar_max": float("nan")}):
        with pytest.raises(ValueError, match="resmlp: " + next(iter(bad))):
            ResMLPVAE((1, 28, 28), **bad)
    with pytest.raises(ConfigError, match="min < max"):
        ResMLPVAE((1, 28, 28), logvar_min=1.0, logvar_max=0.0)


# ---- the installed package (slow: pip install) ------------------------------------------------------
@pytest.mark.slow
def test_the_installed_metadata_is_the_packages_own(example):
    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert _distribution_name(example) == declared["name"]
    for group, name in PLUGINS.items():
        assert declared["entry-points"][group][name]
        assert name in registry.available(group)


@pytest.mark.slow
def test_vaegan_plugins_lists_them_with_their_distribution(example, capsys):
    rows = _plugins_table(capsys)
    dist = _distribution_name(example)
    for group, name in PLUGINS.items():
        assert rows[(group, name)] == (dist, "ok")
    assert rows[("vaegan.generators", "conv")][0] == "vaegan"
    assert rows[("vaegan.discriminators", "patchgan")][0] == "vaegan"


@pytest.mark.slow
def test_trains_with_all_three_selected_by_name_and_loads_back(example, tiny):
    cfg = tiny("model.name=resmlp", f"model.options={RESMLP}",  # options after the name: it empties them
               "discriminator.name=mlp", "discriminator.options={hidden: 32}",
               "losses=[{name: bce}, {name: kl}, {name: gradient_difference, weight: 0.5, options: {alpha: 1.0}}]",
               "train.max_steps=3")
    trainer = vaegan.build_trainer(cfg)
    step = trainer.train_step
    assert type(step.model).__name__ == "ResMLPVAE" and _from(example, step.model)
    assert _from(example, step.disc_net) and _from(example, step.objective.generator_terms["gradient_difference"])
    g0 = [p.detach().clone() for p in step.model.parameters()]
    d0 = [p.detach().clone() for p in step.disc_net.parameters()]
    final = trainer.fit()
    last = trainer.history[-1]
    assert "g/gradient_difference" in last and all(math.isfinite(v) for v in last.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, step.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, step.disc_net.parameters()))

    for folder, trained in ((final, trainer.ema_model), (final / "raw", trainer.model)):
        loaded = vaegan.VAE.from_pretrained(folder)  # rebuilt by name through the registry
        assert type(loaded).__name__ == "ResMLPVAE" and _from(example, loaded)
        assert loaded.config.name == "resmlp" and dict(loaded.config.options) == {**RESMLP_DEFAULTS, **RESMLP}
        state = trained.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
        samples = loaded.sample(4, generator=torch.Generator().manual_seed(0))
        assert samples.shape == (4, 1, 28, 28) and torch.isfinite(samples).all()
        assert 0 <= samples.min() and samples.max() <= 1
        digits = load_digits(4)
        assert torch.equal(loaded.reconstruct(digits), trained.eval().reconstruct(digits))


@pytest.mark.slow
def test_the_cli_trains_and_samples_with_the_generator(example, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", str(ROOT / "recipes" / "configs" / "plain_vae_mnist.yaml"), "--data-dir", str(MNIST_ROOT),
                     "--output-dir", str(out), "--max-steps", "2", "--batch-size", "16", "--sample-every", "0",
                     "--checkpoint-every", "0", "data.download=false", "data.limit=64", "train.num_samples=4",
                     "train.plot_loss_curves=false", "model.name=resmlp", f"model.options={RESMLP}"])
    assert code == 0, capsys.readouterr().err
    assert '"name": "resmlp"' in (out / "final" / "config.json").read_text()
    samples = tmp_path / "samples.npz"
    assert cli.main(["sample", "--model", str(out), "--num", "6", "--out", str(samples), "--device", "cpu"]) == 0
    assert np.load(samples)["images"].shape == (6, 1, 28, 28)
    recons = tmp_path / "recons.npz"
    assert cli.main(["reconstruct", "--model", str(out), "--data-dir", str(MNIST_ROOT), "--limit", "8",
                     "--out", str(recons), "--device", "cpu"]) == 0
    assert np.load(recons)["images"].shape == (8, 1, 28, 28)


@pytest.mark.slow
def test_disabling_third_party_plugins_refuses_them(example, tiny, tmp_path, monkeypatch, capsys):
    saved = vaegan.build_generator(ModelConfig(name="resmlp", options=RESMLP)).save_pretrained(tmp_path / "saved")
    _forget_example_modules()
    monkeypatch.setenv(registry.DISABLE_ENV, "1")
    dist = _distribution_name(example)
    for group, name in PLUGINS.items():
        with pytest.raises(PluginError, match=dist):
            registry.load(group, name)
    with pytest.raises(PluginError, match=registry.DISABLE_ENV):
        vaegan.build_trainer(tiny("model.name=resmlp", f"model.options={RESMLP}"))
    with pytest.raises(PluginError, match=registry.DISABLE_ENV):
        vaegan.build_trainer(tiny("discriminator.name=mlp", "discriminator.options={}"))
    with pytest.raises(PluginError, match=registry.DISABLE_ENV):
        vaegan.VAE.from_pretrained(saved)  # a saved model cannot run a disabled plugin's code either
    assert cli.main(["sample", "--model", str(saved), "--num", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert registry.DISABLE_ENV in capsys.readouterr().err
    rows = _plugins_table(capsys)
    assert all(rows[(group, name)] == (dist, "disabled") for group, name in PLUGINS.items())
    assert not [m for m in sys.modules if m.split(".")[0] == PACKAGE]  # none of its code ran
    dist_, status = rows[("vaegan.losses", "lpips")]  # vaegan's own still load (offline: weights not cached)
    assert dist_ == "vaegan" and (status == "ok" or status.startswith("needs weights")), status
    assert rows[("vaegan.generators", "mlp")] == ("vaegan", "ok")
    registry.load("vaegan.discriminators", "patchgan")


@pytest.mark.slow
def test_the_contract_suites_pick_them_up(installed_example, tmp_path):
    """What docs/plugins.md promises a plugin author: install the package, run vaegan's contract suites."""
    suites = [ROOT / "tests" / name for name in CONTRACT_SUITES]
    missing = [p.name for p in suites if not p.is_file()]
    assert not missing, f"the contract suites {missing} are missing from tests/"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_example), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop(registry.DISABLE_ENV, None)
    report = tmp_path / "report.xml"
    # `mlp` is also vaegan's own generator: select the discriminator `mlp` by its suite's module name.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *map(str, suites),
           "-k", "resmlp or gradient_difference or (mlp and discriminators)"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = []  # (dotted class name, test id) of every test that passed
    for case in ET.parse(report).getroot().iter("testcase"):
        if all(child.tag in ("system-out", "system-err") for child in case):  # no failure, error or skip
            passed.append((case.get("classname", ""), case.get("name", "")))
    for plugin, suite in SUITE_OF.items():
        ran = [name for classname, name in passed if suite[:-3] in classname.split(".") and plugin in name]
        assert len(ran) >= 2, f"{suite} passed {ran} for the example's '{plugin}'\n{proc.stdout[-2000:]}"
