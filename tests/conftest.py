"""Shared fixtures: real MNIST digits committed under tests/fixtures, tiny configs and models, temp dirs.

Tests never read ../shared (a fresh clone has no such folder). ``tiny_spatial``, a generator with a
spatial latent defined in tests/spatial_generator.py, is registered for the whole session, so every
test parametrised over the generators meets a latent that is not a vector.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import spatial_generator

from vaegan.config import DataConfig, ExperimentConfig, ModelConfig, apply_overrides

FIXTURES = Path(__file__).parent / "fixtures"
MNIST_ROOT = FIXTURES  # torchvision layout: FIXTURES/MNIST/raw/*-ubyte (256 train, 128 test digits)

os.environ.setdefault("WANDB_MODE", "offline")  # never try the network from a test
os.environ.setdefault("WANDB_SILENT", "true")

# Everything the suite's libraries and subprocesses would write outside pytest's tmp_path goes into one
# folder, removed when the session ends (pytest_unconfigure): the evaluation classifier's cache, W&B's
# logs and caches, matplotlib's font cache, torch.compile's, and the temporary files of every process
# the tests start (torchrun's torchelastic_*, multiprocessing's pymp-* of processes killed on purpose).
SANDBOX = Path(tempfile.mkdtemp(prefix="vaegan-tests-"))
for _var, _sub in (("VAEGAN_CACHE", "vaegan"), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config"),
                   ("WANDB_DATA_DIR", "wandb-data"), ("MPLCONFIGDIR", "matplotlib"),
                   ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"), ("TMPDIR", "tmp")):
    (SANDBOX / _sub).mkdir()
    os.environ[_var] = str(SANDBOX / _sub)  # TMPDIR: for child processes (this one's tempdir is already set)


def pytest_unconfigure(config) -> None:
    shutil.rmtree(SANDBOX, ignore_errors=True)


@contextlib.contextmanager
def registered(group: str, name: str, target: str):
    """A test plugin registered under ``group``/``name`` (``"module:attr"``) for the ``with`` block; yields the name."""
    from vaegan import registry

    registry.register(group, name, target)
    try:
        yield name
    finally:
        registry._EXTRA.get(group, {}).pop(name, None)
        registry.refresh()


spatial_generator.register()

# A model small enough that a training step takes milliseconds on 2 CPU cores.
TINY = [
    "model.options={channels: [8, 16], norm_groups: 4, latent_dim: 4}",
    "discriminator.options={channels: [8, 16]}",
    "data.limit=64",
    "train.batch_size=16",
    "train.epochs=2",
    "train.log_every=2",
    "train.sample_every=0",
    "train.checkpoint_every=0",
    "train.num_samples=8",
    "train.plot_loss_curves=false",  # tested in test_cli/test_tracking; ~1-3 s per run otherwise
    "losses.1.weight={value: 1.0, warmup: 4}",
    "sampler=null",  # the default 50-component mixture needs 50 images; tests that fit one say so
]


def write_digit_pngs(folder: Path, n: int = 64) -> Path:
    """The first ``n`` committed training digits as grayscale PNG files ``000.png``... in ``folder``
    (created): real files for the image_folder plugin and its data workers."""
    from PIL import Image
    from torchvision.datasets import MNIST

    folder.mkdir(parents=True, exist_ok=True)
    for i, digit in enumerate(MNIST(str(MNIST_ROOT), train=True, download=False).data[:n]):
        Image.fromarray(digit.numpy()).save(folder / f"{i:03d}.png")
    return folder


def tiny_config(output_dir: Path, *overrides: str) -> ExperimentConfig:
    """The default MNIST VAE-GAN, shrunk, reading the committed digits, writing to output_dir."""
    base = ExperimentConfig()
    return apply_overrides(base, [*TINY, f"data.root={MNIST_ROOT}", "data.download=false",
                                  f"train.output_dir={output_dir}", *overrides])


def tiny_generator(name: str = "conv", image_shape=(1, 28, 28), output_range: str = "unit", **options):
    """A small generator plugin ``name`` (the test options of plugin_options.py, then ``options``)."""
    from plugin_options import options_for

    from vaegan import build_generator

    c, h, w = image_shape
    opts = {**options_for("vaegan.generators", name), **options}
    return build_generator(ModelConfig(name=name, image_channels=c, image_size=(h, w), output_range=output_range,
                                       options=opts))


def load_digits(n: int = 8, split: str = "train"):
    """The first ``n`` real MNIST digits of the committed fixtures, (n, 1, 28, 28) in [0, 1]."""
    from vaegan.data import build_dataset, first_batch

    ds = build_dataset(DataConfig(root=str(MNIST_ROOT), split=split, download=False, limit=n), ModelConfig())
    return first_batch(ds, n)


def assert_resume_is_exact(tmp_path: Path, common, stop_at: int) -> None:
    """Train uninterrupted (``a``); train to ``stop_at`` and resume with ``--resume latest`` (``b``):
    the last checkpoints of both hold identical generator, discriminator and EMA weights."""
    import torch
    from safetensors.torch import load_file

    import vaegan
    from vaegan._compat import reset_accelerate_state
    from vaegan.checkpointing import find_checkpoint

    vaegan.build_trainer(tiny_config(tmp_path / "a", *common)).fit()
    reset_accelerate_state()
    vaegan.build_trainer(tiny_config(tmp_path / "b", *common, f"train.max_steps={stop_at}")).fit()
    reset_accelerate_state()
    resumed = vaegan.build_trainer(tiny_config(tmp_path / "b", *common, "train.resume=latest"))
    resumed.fit()
    a, b = (find_checkpoint(tmp_path / run, "latest") for run in ("a", "b"))
    assert a.name == b.name and resumed.state.step > stop_at
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key} differs after resume"


def assert_foreign_weights_refused(model_dir: Path, other, tmp_path: Path) -> None:
    """``model_dir``'s weights replaced by ``other``'s: from_pretrained names both files and refuses."""
    from vaegan import VAE
    from vaegan.errors import CheckpointError

    other.save_pretrained(tmp_path / "other")
    (model_dir / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as info:
        VAE.from_pretrained(model_dir)
    msg = str(info.value)
    assert str(model_dir / "model.safetensors") in msg and "config.json" in msg and "does not fit" in msg


@pytest.fixture(scope="session")
def digits():
    """Eight real MNIST digits (8, 1, 28, 28) in [0, 1]: mostly exact zeros, like real data."""
    return load_digits(8)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy second core."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state (torch, numpy, random), so its result cannot
    depend on which tests ran before it or in which order."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A real run of two steps: its checkpoint and its final/ model (shared by a test module)."""
    import vaegan
    from vaegan._compat import reset_accelerate_state

    out = tmp_path_factory.mktemp("saved") / "run"
    vaegan.build_trainer(tiny_config(out, "train.max_steps=2")).fit()
    reset_accelerate_state()
    return out


@pytest.fixture
def mnist_root() -> Path:
    return MNIST_ROOT


@pytest.fixture
def tiny(tmp_path: Path):
    """A function: ``tiny(*overrides)`` -> a tiny config writing under tmp_path/run."""
    return lambda *overrides: tiny_config(tmp_path / "run", *overrides)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide state; each test builds its own Accelerator from scratch."""
    from vaegan._compat import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()
