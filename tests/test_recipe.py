"""The MNIST recipe as a user runs it: `accelerate launch recipes/vaegan_mnist.py` and plain python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MNIST_ROOT, TINY

import vaegan

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "vaegan_mnist.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=kw.pop("cwd", ROOT), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [
    [sys.executable],
    [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
     "--mixed_precision", "bf16", "--dynamo_backend", "no"],
], ids=["python", "accelerate-launch-bf16"])
def test_recipe_trains_and_writes_a_loadable_model(tmp_path, launcher):
    out = tmp_path / "out"
    proc = _run([*launcher, str(RECIPE), "--data-dir", str(MNIST_ROOT), "--output-dir", str(out),
                 "--max-steps", "3", "--batch-size", "16", "--lr", "3e-4", *TINY[:-2], "data.download=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = vaegan.VAE.from_pretrained(out / "final")
    assert model.sample(2).shape == (2, 1, 28, 28)
    cfg = vaegan.load_config(out / "config.yaml")
    assert cfg.optim_g.lr == cfg.optim_d.lr == 3e-4 and cfg.train.max_steps == 3
    if "accelerate" in " ".join(launcher):
        assert cfg.train.mixed_precision is None  # not in the config: taken from the launcher
        assert "mixed precision bf16 on 1 process" in proc.stderr


@pytest.mark.slow
def test_recipe_refuses_missing_data_with_one_paragraph(tmp_path):
    proc = _run([sys.executable, str(RECIPE), "--data-dir", str(tmp_path / "nowhere"), "--output-dir",
                 str(tmp_path / "out"), "data.download=false"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "MNIST" in proc.stderr and "train-images-idx3-ubyte" in proc.stderr and "vaegan: error:" in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written before the data is known to be good"


@pytest.mark.slow
def test_recipe_rejects_unknown_keys(tmp_path):
    proc = _run([sys.executable, str(RECIPE), "--output-dir", str(tmp_path), "train.epoch=3"])
    assert proc.returncode == 2 and "Unknown key(s) ['epoch']" in proc.stderr and "epochs" in proc.stderr


def test_shipped_config_equals_builtin_defaults():
    """recipes/configs/vaegan_mnist.yaml documents the recipe's defaults, the conv generator's options
    included; they must not drift apart."""
    import dataclasses

    shipped = vaegan.load_config(ROOT / "recipes" / "configs" / "vaegan_mnist.yaml")
    defaults = vaegan.ExperimentConfig()
    assert dataclasses.replace(shipped, model=dataclasses.replace(shipped.model, options={})) == defaults
    assert dict(shipped.model.options) == dict(vaegan.build_generator(defaults.model).config.options)
