"""Bad input is refused before any long work starts, with one paragraph that says what to do.

Every item of the list is provoked twice: through the Python API (the exception type and message,
nothing written to the output directory) and through the recipe as a user runs it (exit status 2,
no traceback, nothing written). The recipe processes all run side by side (fixture ``recipe_runs``).
Corrupt, truncated and foreign checkpoints and saved models are refused naming the file, and never
leave a half-loaded trainer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import MNIST_ROOT, TINY, tiny_config

import vaegan
from vaegan import registry
from vaegan.checkpointing import find_checkpoint
from vaegan.data import TensorImages
from vaegan.errors import CheckpointError, ConfigError, DataError, PluginError, VaeganError

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "vaegan_mnist.py"
PLUGIN_MODULE = "vaegan_bad_pixels_test_plugin"


PLUGIN_SOURCE = """
import torch
from pathlib import Path


def bad_pixels(root, split, download, limit, image_shape, value_range):
    # The last part of ``root`` names the fault: nan, range (0..255 floats), empty.
    low, high = value_range
    x = torch.rand(64, *image_shape) * (high - low) + low  # (N, C, H, W)
    kind = Path(root).name
    if kind == "nan":
        x[3, 0, 5, 5] = float("nan")
    elif kind == "range":
        x = x * 255.0  # the classic: forgot to divide by 255
    elif kind == "empty":
        x = x[:0]
    return list(x)
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """A real third-party distribution (dist-info on the path) with a dataset plugin, ``bad_pixels``,
    whose images have the faults a float-producing dataset plugin can have."""
    site = tmp_path_factory.mktemp("site")
    (site / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    info = site / "vaegan_bad_pixels-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vaegan-bad-pixels\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[vaegan.datasets]\nbad_pixels = {PLUGIN_MODULE}:bad_pixels\n")
    return site


@pytest.fixture
def bad_pixels_plugin(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)
    registry.refresh()
    yield
    registry.refresh()


# The items of the issue: (id, overrides, exception type, text the paragraph must contain).
CASES = [
    ("channels", ["model.image_channels=3"], DataError, "expects (C, H, W) = (3, 28, 28)"),
    ("size", ["model.image_size=[32, 32]"], DataError, "expects (C, H, W) = (1, 32, 32)"),
    ("nan_pixels", ["data.name=bad_pixels", "data.root={tmp}/nan"], DataError, "NaN or infinite pixels"),
    ("out_of_range", ["data.name=bad_pixels", "data.root={tmp}/range"], DataError, "Rescale the data"),
    ("empty_dataset", ["data.name=bad_pixels", "data.root={tmp}/empty"], DataError, "is empty"),
    ("batch_too_large", ["data.limit=10"], DataError, "Lower train.batch_size"),
    ("no_mnist_files", ["data.root={tmp}/nowhere"], DataError, "train-images-idx3-ubyte"),
    ("empty_image_folder", ["data.name=image_folder", "data.root={tmp}"], DataError, "No images"),
    ("unknown_key", ["model.latent=8"], ConfigError, "Unknown key(s) ['latent']"),
    ("wrong_type", ["train.batch_size=many"], ConfigError, "'train.batch_size' must be an integer"),
    ("wrong_choice", ["train.mixed_precision=fp8"], ConfigError, "one of 'no', 'fp16', 'bf16'"),
    ("negative_weight", ["losses.0.weight=-0.5"], ConfigError, "finite number >= 0"),
    ("infinite_weight", ["losses.1.weight={value: .inf, warmup: 4}"], ConfigError, "finite number"),
    ("nan_weight", ["adversarial.weight=.nan"], ConfigError, "finite number"),
    ("unknown_loss", ["losses=[{name: bce}, {name: klx}]"], PluginError, "Installed in 'vaegan.losses'"),
    ("bad_max_time", ["train.max_time=soon"], ConfigError, "'train.max_time' must be a duration"),
    ("uncatchable_warning_signal", ["train.warning_signal=KILL"], ConfigError, "a signal a process can catch"),
    ("too_deep_discriminator", ["discriminator.options={channels: [8, 8, 8, 8, 8]}"], ConfigError,
     "needs images of at least 32x32"),
]


def _overrides(case: List[str], tmp: Path) -> List[str]:
    return [o.replace("{tmp}", str(tmp)) for o in case]


@pytest.mark.parametrize("name, overrides, error, text", CASES, ids=[c[0] for c in CASES])
def test_python_api_refuses_bad_input(tmp_path, bad_pixels_plugin, name, overrides, error, text):
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        vaegan.build_trainer(tiny_config(out, *_overrides(overrides, tmp_path)))
    message = str(info.value)
    assert text in message and isinstance(info.value, VaeganError)
    assert "\n" not in message.strip(), "one paragraph"
    assert not out.exists(), "nothing may be written before the input is known to be good"


def test_non_finite_pixels_fail_fast_even_when_not_in_the_first_images(tiny):
    """The trainer checks a sample spread over the whole dataset, not just its first batch."""
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    data = list(TensorImages(images))
    data[50] = data[50].clone()
    data[50][0, 3, 3] = float("inf")
    cfg = tiny()
    with pytest.raises(DataError, match="NaN or infinite"):
        vaegan.build_trainer(cfg, dataset=data)


@pytest.mark.parametrize("group", registry.GROUPS)
def test_unknown_plugin_name_lists_the_installed_ones(tiny, group):
    override = {"vaegan.generators": "model.name=nope",
                "vaegan.losses": "losses=[{name: nope}]", "vaegan.adversarial": "adversarial.name=nope",
                "vaegan.discriminators": "discriminator.name=nope", "vaegan.datasets": "data.name=nope",
                "vaegan.samplers": "sampler.name=nope"}[group]
    with pytest.raises(PluginError) as info:
        vaegan.build_trainer(tiny(override))
    assert "'nope'" in str(info.value)
    assert all(name in str(info.value) for name in registry.available(group))


@pytest.mark.parametrize("name", registry.available("vaegan.discriminators"))
def test_every_discriminator_refuses_images_too_small_for_its_depth(name):
    """A 2x2 image: a plugin either refuses it at construction with a ConfigError, or really handles it
    (never a shape error deep inside a convolution at the first training step)."""
    from vaegan.registry import build_plugin

    try:
        disc = build_plugin("vaegan.discriminators", name, {}, image_shape=(1, 2, 2))
    except ConfigError as exc:
        assert "2x2" in str(exc) or "image" in str(exc)
        return
    assert disc(torch.rand(2, 1, 2, 2)).logits.shape[0] == 2


def test_empty_dataset_given_to_the_trainer_directly(tiny):
    cfg = tiny()
    empty = TensorImages(torch.zeros(0, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(DataError, match="empty"):
        vaegan.build_trainer(cfg, dataset=empty)


# ---- checkpoints and saved models ------------------------------------------------------------------




def _copy_run(saved_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


def _snapshot(trainer) -> Dict[str, torch.Tensor]:
    states = {"gen": trainer.train_step.generator.module.state_dict(), "disc": trainer.train_step.discriminator.module.state_dict(), "ema": trainer.train_step.ema.state_dict(),
              "g_opt": trainer.train_step.generator.optimizer.state_dict()["state"]}
    flat = {}
    for owner, state in states.items():
        for key, value in state.items():
            for k, v in (value.items() if isinstance(value, dict) else [("", value)]):
                if isinstance(v, torch.Tensor):
                    flat[f"{owner}.{key}.{k}"] = v.detach().clone()
    return flat


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign_optimizer(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    first = next(iter(state["state"].values()))
    first["exp_avg"] = torch.zeros(3, 3)  # a parameter shape this model does not have
    torch.save(state, path)


CORRUPTIONS = {
    "truncated_model": ("model.safetensors", _truncate, "truncated"),
    "truncated_discriminator": ("model_1.safetensors", _truncate, "truncated"),
    "truncated_ema": ("ema.safetensors", _truncate, "truncated"),
    "garbage_optimizer": ("optimizer.bin", lambda p: p.write_bytes(os.urandom(2000)), "cannot be loaded safely"),
    "foreign_optimizer_state": ("optimizer_1.bin", _foreign_optimizer, "another architecture"),
    "missing_trainer_state": ("trainer_state.json", lambda p: p.unlink(), "is missing"),
    "corrupt_trainer_state": ("trainer_state.json", lambda p: p.write_text('{"step": "two"'), "is corrupt"),
    "missing_model": ("model.safetensors", lambda p: p.unlink(), "is missing"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused_naming_the_file_and_nothing_is_loaded(saved_run, tmp_path, name):
    file, corrupt, text = CORRUPTIONS[name]
    out = _copy_run(saved_run, tmp_path)
    ckpt = find_checkpoint(out, "latest")
    corrupt(ckpt / file)
    trainer = vaegan.build_trainer(tiny_config(out, "train.max_steps=4", "train.seed=1", "train.resume=auto"))
    before, state = _snapshot(trainer), trainer.state
    with pytest.raises(CheckpointError) as info:
        trainer.load_checkpoint(ckpt)
    assert str(ckpt / file) in str(info.value) and text in str(info.value)
    after = _snapshot(trainer)
    assert trainer.state is state and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed resume changed the trainer"


def test_checkpoint_of_another_architecture_is_refused(saved_run, tmp_path):
    out = _copy_run(saved_run, tmp_path)
    trainer = vaegan.build_trainer(tiny_config(out, "model.options.latent_dim=8", "train.resume=latest"))
    before = _snapshot(trainer)
    with pytest.raises(CheckpointError, match="does not fit this run's architecture") as info:
        trainer.fit()
    assert "model.safetensors" in str(info.value) and "net.decoder.fc.weight" in str(info.value)
    after = _snapshot(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_load_failing_after_verification_puts_the_trainer_back(saved_run, tmp_path):
    """scheduler.bin is a valid, safe pickle of the wrong thing: Accelerate has already loaded the models
    and optimizers when it fails, and the trainer must be restored to its state before the resume."""
    out = _copy_run(saved_run, tmp_path)
    ckpt = find_checkpoint(out, "latest")
    torch.save({"not": "a scheduler"}, ckpt / "scheduler.bin")
    trainer = vaegan.build_trainer(tiny_config(out, "train.seed=1", "train.resume=auto"))
    before = _snapshot(trainer)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="put back as it was"):
        trainer.load_checkpoint(ckpt)
    after = _snapshot(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)


FINAL_CORRUPTIONS = {
    "truncated_weights": ("model.safetensors", _truncate, "truncated"),
    "garbage_config": ("config.json", lambda p: p.write_text("{not json"), "not valid JSON"),
    "other_architecture": ("config.json", lambda p: p.write_text(p.read_text().replace('"latent_dim": 4', '"latent_dim": 9')),
                           "does not fit"),
    "unknown_config_key": ("config.json", lambda p: p.write_text(p.read_text().replace('"latent_dim"', '"latent_dims"')),
                           "latent_dims"),
    "missing_weights": ("model.safetensors", lambda p: p.unlink(), "is missing"),
}


@pytest.mark.parametrize("name", list(FINAL_CORRUPTIONS))
def test_corrupt_final_model_is_refused_naming_the_file(saved_run, tmp_path, name):
    file, corrupt, text = FINAL_CORRUPTIONS[name]
    final = _copy_run(saved_run, tmp_path) / "final"
    corrupt(final / file)
    with pytest.raises(CheckpointError) as info:
        vaegan.VAE.from_pretrained(final)
    assert str(final / file) in str(info.value) and text in str(info.value)


# ---- the same through the recipe, as a user runs it ------------------------------------------------

RECIPE_CASES = [(name, overrides, text) for name, overrides, _, text in CASES] + [
    ("truncated_checkpoint", ["--resume", "latest"], "truncated"),
]

# Runs recipes/vaegan_mnist.py once per case in ONE fresh interpreter (runpy, as `python recipe.py` does),
# recording its exit status and stderr: a process per case would spend ~4 s of CPU each on imports.
# tests/test_recipe.py runs the recipe as separate processes.
DRIVER = """
import contextlib, io, json, logging, runpy, sys, traceback
from vaegan._compat import reset_accelerate_state
logging.basicConfig(stream=sys.__stderr__)  # later basicConfig calls (the recipe's) are no-ops
cases_file, results_file = sys.argv[1:3]
cases, results = json.load(open(cases_file)), {}
for name, argv in cases.items():
    err, code = io.StringIO(), None
    sys.argv = argv
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = "uncaught exception"
    reset_accelerate_state()
    results[name] = {"rc": code, "stderr": err.getvalue()}
json.dump(results, open(results_file, "w"))
"""


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory, plugin_site, saved_run) -> Dict[str, Dict[str, object]]:
    base = tmp_path_factory.mktemp("recipe")
    cases, outs = {}, {}
    for name, overrides, _ in RECIPE_CASES:
        work = base / name
        work.mkdir()
        out = outs[name] = work / "out"
        if name == "truncated_checkpoint":
            shutil.copytree(saved_run / "checkpoints", out / "checkpoints")
            _truncate(find_checkpoint(out, "latest") / "model.safetensors")
        cases[name] = [str(RECIPE), "--data-dir", str(MNIST_ROOT), "--output-dir", str(out), *TINY,
                       "data.download=false", *_overrides(overrides, work)]
    (base / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(plugin_site)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(base / "cases.json"), str(base / "results.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((base / "results.json").read_text())
    for name in results:
        results[name]["out"] = outs[name]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, text", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_refuses_bad_input_with_one_paragraph(recipe_runs, name, overrides, text):
    run = recipe_runs[name]
    assert run["rc"] == 2, run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"]
    errors = [line for line in run["stderr"].splitlines() if line.startswith("vaegan: error:")]
    assert len(errors) == 1 and text in errors[0], run["stderr"][-3000:]
    out = run["out"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    if name == "truncated_checkpoint":  # only the checkpoints that were there before
        assert all(p.startswith("checkpoints") for p in written), written
    else:
        assert written == [], written


def test_a_model_config_that_does_not_fit_its_weights_is_refused_before_any_allocation(saved_run, tmp_path):
    """image_size 100000 in config.json: the shapes come from the safetensors header and a meta-device build."""
    import resource
    import shutil
    import time

    final = tmp_path / "final"
    shutil.copytree(saved_run / "final", final)
    cfg = json.loads((final / "config.json").read_text())
    cfg["image_size"] = [100000, 100000]
    (final / "config.json").write_text(json.dumps(cfg))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        vaegan.VAE.from_pretrained(final)
    assert time.perf_counter() - t0 < 5 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB
    msg = str(info.value)
    assert "does not fit the architecture" in msg and "file [784, 4], config [10000000000, 4]" in msg and "\n" not in msg


def test_non_finite_model_weights_are_refused_naming_the_tensor(saved_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    final = tmp_path / "final"
    shutil.copytree(saved_run / "final", final)
    state = load_file(str(final / "model.safetensors"))
    key = sorted(state)[0]
    state[key].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    save_file(state, str(final / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"holds non-finite values: 3 of the {state[key].numel()} values of "
                                              rf"'{re.escape(key)}' are NaN or inf"):
        vaegan.VAE.from_pretrained(final)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_a_scaling_factor_of_zero_or_not_finite_is_refused(value):
    from vaegan_plugins.autoencoder_kl import AutoencoderKL

    with pytest.raises(ConfigError, match="scaling_factor must be a finite number > 0 or null"):
        AutoencoderKL((3, 16, 16), "symmetric", block_out_channels=[8, 8], norm_num_groups=4, scaling_factor=value)
