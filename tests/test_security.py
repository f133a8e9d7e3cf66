"""Security: no file vaegan loads can run code, third-party plugins can be switched off, and tracker
credentials never reach the output directory or the logs.

The malicious files are real: a pickle whose ``__reduce__`` calls ``os.system`` to create a marker
file, planted in a real checkpoint. A positive control shows that unpickling it *does* run the
command; resuming from it must refuse with :class:`CheckpointError` and the marker must not appear.
"""

from __future__ import annotations

import ast
import importlib
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import vaegan
from vaegan import registry
from vaegan.checkpointing import find_checkpoint, safe_torch_load
from vaegan.errors import CheckpointError, PluginError

ROOT = Path(__file__).parents[1]


class Payload:
    """Unpickling this runs ``touch <marker>`` (what an attacker's file would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))




@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


def _library_sources():
    for folder in ("vaegan", "plugins", "recipes", "benchmarks"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_torch_load_passes_weights_only_true_and_nothing_else_unpickles():
    offenders = []
    for path in _library_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{where} torch.load without weights_only=True")
            if owner in ("pickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads"):
                offenders.append(f"{where} {owner}.{node.func.attr}")
            if owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load"):
                loader = {k.arg: k.value for k in node.keywords}.get("Loader")
                if node.func.attr != "load" or loader is None or ast.unparse(loader) in (
                        "yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader"):
                    offenders.append(f"{where} yaml.{node.func.attr} that can construct objects")
    assert not offenders, offenders


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """Positive control: without weights_only the file runs its command."""
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)  # what an unsafe loader does
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="would run code"):
        safe_torch_load(tmp_path / "evil.bin")
    assert not marker.exists()


def test_accelerate_would_unpickle_a_custom_checkpoint_with_weights_only_false(tmp_path):
    """Why vaegan refuses custom_checkpoint_*.pkl outright: Accelerate's loader runs it."""
    from accelerate import PartialState
    from accelerate.checkpointing import load_custom_state

    PartialState()  # Accelerate's logging needs it
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "custom_checkpoint_0.pkl")
    with pytest.raises(Exception):
        load_custom_state(torch.nn.Linear(1, 1), str(tmp_path), 0)  # the command ran, then load_state_dict failed
    assert marker.exists()


@pytest.mark.parametrize("planted", ["random_states_0.pkl", "optimizer.bin", "optimizer_1.bin", "scheduler.bin",
                                     "scheduler_1.bin", "custom_checkpoint_0.pkl", "scaler.pt", "pytorch_model.bin"])
def test_resume_refuses_a_malicious_pickle_in_a_checkpoint(run_copy, tmp_path, planted):
    marker = tmp_path / "pwned"
    ckpt = find_checkpoint(run_copy, "latest")
    torch.save(Payload(marker), ckpt / planted)
    if planted == "pytorch_model.bin":  # a pickled model instead of safetensors
        (ckpt / "model.safetensors").unlink()
    trainer = vaegan.build_trainer(tiny_config(run_copy, "train.max_steps=4", "train.resume=latest"))
    with pytest.raises(CheckpointError) as info:
        trainer.fit()
    named = "model.safetensors" if planted == "pytorch_model.bin" else planted
    assert str(ckpt / named) in str(info.value)
    assert not marker.exists(), "the malicious pickle ran"
    assert trainer.state.step == 0


def test_final_model_never_unpickles(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    final = run_copy / "final"
    (final / "model.safetensors").unlink()
    torch.save(Payload(marker), final / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        vaegan.VAE.from_pretrained(final)
    assert not marker.exists()


# ---- plugins run code: the switch that limits loading to vaegan's own ------------------------------

EVIL_PLUGIN = '''
from pathlib import Path
import os
Path(os.environ["VAEGAN_TEST_PLUGIN_MARKER"]).touch()  # import-time code of a third-party plugin
from vaegan.api import LossTerm


class Zero(LossTerm):
    def forward(self, inputs):
        return inputs.output.recon.mean() * 0.0
'''


@pytest.fixture
def third_party_plugin(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "tp_evil_vaegan_plugin.py").write_text(EVIL_PLUGIN)
    info = site / "tp_evil_vaegan_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-evil-vaegan-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vaegan.losses]\nevil_zero = tp_evil_vaegan_plugin:Zero\n")
    marker = tmp_path / "plugin-imported"
    monkeypatch.setenv("VAEGAN_TEST_PLUGIN_MARKER", str(marker))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "tp_evil_vaegan_plugin", raising=False)
    importlib.invalidate_caches()
    registry.refresh()
    yield marker
    registry.refresh()


def test_disabling_third_party_plugins_keeps_their_code_from_running(tiny, tmp_path, third_party_plugin, monkeypatch):
    monkeypatch.setenv(registry.DISABLE_ENV, "1")
    assert "evil_zero" in registry.available("vaegan.losses")  # listed from metadata, not imported
    with pytest.raises(PluginError) as info:
        vaegan.build_trainer(tiny("losses=[{name: bce}, {name: evil_zero}]"))
    assert registry.DISABLE_ENV in str(info.value) and "tp-evil-vaegan-plugin" in str(info.value)
    assert not third_party_plugin.exists(), "the disabled plugin's module was imported"
    assert not (tmp_path / "run").exists()
    assert registry.load("vaegan.losses", "bce").__name__ == "BCELoss"  # vaegan's own still load
    # Positive control: with the switch off the plugin's import-time code runs.
    monkeypatch.delenv(registry.DISABLE_ENV)
    registry.load("vaegan.losses", "evil_zero")
    assert third_party_plugin.exists()


# ---- tracker credentials ----------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_api_key_reaches_no_file_and_no_log(tiny, tmp_path, monkeypatch, capfd, caplog):
    key = os.urandom(20).hex()  # 40 hex characters, the shape of a W&B key
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # W&B's run files go under the output directory
    cfg = tiny("train.max_steps=2", "train.report_to=wandb", "train.checkpoint_every=1")
    with caplog.at_level("DEBUG"):
        vaegan.build_trainer(cfg).fit()
    out = Path(cfg.train.output_dir)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files), "no W&B run was written"
    assert [str(p) for p in files if key.encode() in p.read_bytes()] == []
    captured = capfd.readouterr()
    assert key not in captured.out + captured.err
    assert key not in caplog.text
