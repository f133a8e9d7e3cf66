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


# The download fails the same way with or without a network: every URL goes through a proxy nobody listens on.
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
              "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


@pytest.mark.slow
def test_a_failed_download_is_one_last_line_and_leaves_no_empty_folders(tmp_path):
    """The README's first command without a network, run as the README says (`accelerate config default`
    once, then `accelerate launch --quiet`) and with plain python: vaegan's one paragraph is the last line,
    no traceback, no download warning with URLs, and no empty data/MNIST/raw left behind."""
    env = {**ENV, **NO_NETWORK, "HF_HOME": str(tmp_path / "hf")}
    config = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "config", "default"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert config.returncode == 0, config.stderr
    runs = {
        "python": ([sys.executable, str(RECIPE)], 2),  # vaegan's status for a mistake
        "accelerate": ([sys.executable, "-m", "accelerate.commands.launch", "--quiet", str(RECIPE)], 1),  # Accelerate's
    }
    for name, (cmd, status) in runs.items():
        work = tmp_path / name
        work.mkdir()
        proc = subprocess.run([*cmd, "--output-dir", str(work / "out")], capture_output=True, text=True, env=env,
                              cwd=work, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == status, (name, proc.stderr[-3000:])
        assert lines[-1].startswith("vaegan: error: MNIST (train split) is not in 'data/MNIST/raw' and could not "
                                    "be downloaded (download failed: "), (name, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr and "http" not in proc.stderr and "WARNING" not in proc.stderr, name
        assert sorted(p.name for p in work.iterdir()) == [], (name, list(work.rglob("*")))  # no data/, no out/


@pytest.mark.slow
def test_accelerate_launch_without_a_config_uses_every_core_on_a_cpu(tmp_path):
    """Accelerate gives its one process OMP_NUM_THREADS=1 when there is no accelerate config; vaegan gives it
    the cores (here 200 -> 450 images/s on 2 cores) and says so in the line that starts training."""
    from vaegan.factory import usable_cores

    cores = usable_cores()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # no accelerate config
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", str(RECIPE), "--data-dir",
                           str(MNIST_ROOT), "--output-dir", str(tmp_path / "out"), "--max-steps", "2", *TINY,
                           "data.download=false"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"on 1 process(es) (cpu, {cores} thread{'s' * (cores != 1)})" in proc.stderr, proc.stderr[-3000:]


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
