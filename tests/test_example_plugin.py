"""A third-party plugin package (examples/vaegan-plugin-example) installed with pip, found by name,
listed with its distribution, trained with, tested by the parametrised plugin tests, and refused
when third-party plugins are disabled.

The package is pip-installed for real (``--no-deps --no-build-isolation --no-index``: offline, a few
seconds) into a private ``--target`` folder that the tests put on ``sys.path``, rather than into the
shared environment: other test sessions running at the same time in the same environment must not
see (or lose) its plugins half-way through, and nothing needs uninstalling afterwards.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

import vaegan
from vaegan import cli, registry
from vaegan.errors import PluginError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "vaegan-plugin-example"
PLUGINS = {"vaegan.losses": "gradient_difference", "vaegan.discriminators": "mlp"}


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
    monkeypatch.syspath_prepend(str(installed_example))
    registry.refresh()
    yield installed_example
    monkeypatch.undo()
    for name in [m for m in sys.modules if m.split(".")[0] == "vaegan_plugin_example"]:
        del sys.modules[name]
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


def test_the_installed_metadata_is_the_packages_own(example):
    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert _distribution_name(example) == declared["name"]
    for group, name in PLUGINS.items():
        assert declared["entry-points"][group][name]
        assert name in registry.available(group)


def test_vaegan_plugins_lists_them_with_their_distribution(example, capsys):
    rows = _plugins_table(capsys)
    dist = _distribution_name(example)
    for group, name in PLUGINS.items():
        assert rows[(group, name)] == (dist, "ok")
    assert rows[("vaegan.discriminators", "patchgan")][0] == "vaegan"


def test_trains_with_both_selected_by_name(example, tiny):
    cfg = tiny("discriminator.name=mlp", "discriminator.options={hidden: 32}",
               "losses=[{name: bce}, {name: kl}, {name: gradient_difference, weight: 0.5, options: {alpha: 1.0}}]",
               "train.max_steps=3")
    trainer = vaegan.build_trainer(cfg)
    assert type(trainer.train_step.disc_net).__module__ == "vaegan_plugin_example.discriminators"
    assert type(trainer.train_step.objective.generator_terms["gradient_difference"]).__module__ == "vaegan_plugin_example.losses"
    d0 = [p.detach().clone() for p in trainer.train_step.disc_net.parameters()]
    final = trainer.fit()
    last = trainer.history[-1]
    assert "g/gradient_difference" in last and all(math.isfinite(v) for v in last.values())
    assert any(not torch.equal(a, b) for a, b in zip(d0, trainer.train_step.disc_net.parameters()))
    assert torch.isfinite(vaegan.VAE.from_pretrained(final).sample(4)).all()


def test_disabling_third_party_plugins_refuses_them(example, tiny, monkeypatch, capsys):
    monkeypatch.setenv(registry.DISABLE_ENV, "1")
    dist = _distribution_name(example)
    for group, name in PLUGINS.items():
        with pytest.raises(PluginError, match=dist):
            registry.load(group, name)
    with pytest.raises(PluginError, match=registry.DISABLE_ENV):
        vaegan.build_trainer(tiny("discriminator.name=mlp", "discriminator.options={}"))
    rows = _plugins_table(capsys)
    assert all(rows[(group, name)] == (dist, "disabled") for group, name in PLUGINS.items())
    assert rows[("vaegan.losses", "lpips")] == ("vaegan", "ok")  # vaegan's own still load
    registry.load("vaegan.discriminators", "patchgan")


def test_the_parametrised_plugin_tests_pick_it_up(installed_example):
    """What docs/plugins.md promises a plugin author: install the package, run vaegan's tests."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_example), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop(registry.DISABLE_ENV, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_plugins.py"),
           "-k", "gradient_difference or mlp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 10, summary  # forward/backward x 4, trainer routing, discriminator contract x 6, ...
