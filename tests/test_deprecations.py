"""Every name, call and file of vaegan 0.1 that moved keeps working, with a DeprecationWarning naming the
new form (the promise to users and plugin authors); config keys are in test_config.py."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, tiny_config
from safetensors.torch import load_file

import vaegan

# old module -> old name -> (new module, new name). Written out, so removing a shim fails here.
OLD_PATHS = {
    "vaegan.model": {"VAE": ("vaegan.api", "VAE"), "VAEOutput": ("vaegan.api", "VAEOutput"),
                     "DiagonalGaussian": ("vaegan.api", "DiagonalGaussian"),
                     "CONFIG_NAME": ("vaegan.generator", "CONFIG_NAME"), "WEIGHTS_NAME": ("vaegan.generator", "WEIGHTS_NAME")},
    "vaegan.objective": {"LossTerm": ("vaegan.api", "LossTerm"), "AdversarialLoss": ("vaegan.api", "AdversarialLoss"),
                         "TermInputs": ("vaegan.api", "TermInputs"),
                         "DiscriminatorOutput": ("vaegan.api", "DiscriminatorOutput"), "Player": ("vaegan.api", "Player"),
                         "build_plugin": ("vaegan.registry", "build_plugin")},
    "vaegan.discriminators": {"Discriminator": ("vaegan.api", "Discriminator"),
                              "DiscriminatorOutput": ("vaegan.api", "DiscriminatorOutput")},
    "vaegan.commands": {"preview_grids": ("vaegan.previews", "preview_grids"),
                        **{n: ("vaegan.images", n) for n in ("OUTPUT_SUFFIXES", "check_output", "to_uint8", "save_images",
                                                              "save_reconstructions", "save_interpolations")}},
    "vaegan.trainer": {"Player": ("vaegan.step", "PlayerModule")},
    "vaegan.guards": {n: ("vaegan.preemption", n) for n in ("GracefulStop", "stopped", "EXIT_CODES", "CONTINUE")},
    "vaegan.checkpoint_checks": {n: ("vaegan.checkpointing", n) for n in ("safe_torch_load", "verify_checkpoint")},
    "vaegan.generator": {"check_finite": ("vaegan.files", "check_finite")},
    "vaegan.generator": {"check_finite": ("vaegan.files", "check_finite")},
}
CASES = [(m, n) for m, names in OLD_PATHS.items() for n in names]


@pytest.mark.parametrize("module, name", CASES, ids=[f"{m}.{n}" for m, n in CASES])
def test_old_import_paths_resolve_with_a_warning_naming_the_new_one(module, name):
    new_module, new_name = OLD_PATHS[module][name]
    with pytest.warns(DeprecationWarning, match=f"{module}.{name} is deprecated; import it from {new_module}.*"
                                                 r"removed in vaegan 0\.6"):
        old = getattr(importlib.import_module(module), name)
    assert old is getattr(importlib.import_module(new_module), new_name)
    with pytest.warns(DeprecationWarning):  # `from module import name` goes through the same hook
        exec(f"from {module} import {name}", {})


def test_every_registered_shim_is_listed_here():
    from vaegan._deprecation import MOVED

    for module in OLD_PATHS:
        importlib.import_module(module)
    assert {m: set(n) for m, n in MOVED.items()} == {m: set(n) for m, n in OLD_PATHS.items()}


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        vaegan.objective.Nope  # noqa: B018


def test_a_0_1_plugin_written_against_the_old_paths_still_trains(tiny):
    """A third-party loss written for 0.1 (`from vaegan.objective import LossTerm, Player, TermInputs`)."""
    with pytest.warns(DeprecationWarning):
        from vaegan.objective import LossTerm, TermInputs

    class OldStyle(LossTerm):
        player = "generator"

        def forward(self, inputs: TermInputs) -> torch.Tensor:
            return (inputs.output.recon - inputs.real).abs().mean()

    import sys
    import types

    sys.modules["old_style_plugin"] = types.SimpleNamespace(OldStyle=OldStyle)
    vaegan.registry.register("vaegan.losses", "old_style", "old_style_plugin:OldStyle")
    try:
        trainer = vaegan.build_trainer(tiny("losses=[{name: bce}, {name: kl}, {name: old_style}]", "train.max_steps=2"))
        trainer.fit()
        assert "g/old_style" in trainer.history[-1]
    finally:
        vaegan.registry._EXTRA["vaegan.losses"].pop("old_style")
        vaegan.registry.refresh()
        del sys.modules["old_style_plugin"]


def test_vae_of_a_model_config_builds_the_generator(tmp_path):
    cfg = vaegan.ModelConfig(options={"channels": [8, 16], "norm_groups": 4, "latent_dim": 4})
    with pytest.warns(DeprecationWarning, match=r"build_generator.* will be removed in vaegan 0\.6\.$"):
        model = vaegan.VAE(cfg)
    assert isinstance(model, vaegan.VAE) and type(model).__name__ == "ConvVAE" and model.latent_shape == (4,)
    with pytest.raises(TypeError, match="base class"):
        vaegan.VAE((1, 28, 28))


def test_build_model_and_the_0_1_trainer_constructor(tiny):
    cfg = tiny("train.max_steps=2")
    with pytest.warns(DeprecationWarning, match="build_generator"):
        model = vaegan.build_model(cfg)
    dataset = vaegan.data.build_dataset(cfg.data, cfg.model)
    with pytest.warns(DeprecationWarning, match=r"build_trainer.* will be removed in vaegan 0\.6\.$"):
        trainer = vaegan.Trainer(cfg, model, vaegan.Objective.from_config(cfg), dataset, vaegan.build_discriminator(cfg))
    assert trainer.fit().is_dir() and trainer.state.step == 2


@pytest.mark.parametrize("name, new", [("gen", "generator.module"), ("disc", "discriminator.module"),
                                       ("disc_net", "disc_net"), ("g_opt", "generator.optimizer"),
                                       ("d_opt", "discriminator.optimizer"), ("g_sched", "generator.scheduler"),
                                       ("d_sched", "discriminator.scheduler"), ("objective", "objective"),
                                       ("ema", "ema"), ("guard", "guard")])
def test_trainer_attributes_that_moved_to_the_step(tiny, name, new):
    trainer = vaegan.build_trainer(tiny())
    with pytest.warns(DeprecationWarning, match=f"Trainer.{name} is deprecated; use trainer.train_step.{new}"):
        old = getattr(trainer, name)
    expected = trainer.train_step
    for part in new.split("."):
        expected = getattr(expected, part)
    assert old is expected


def test_trainer_step_methods_without_the_step_argument(tiny):
    trainer = vaegan.build_trainer(tiny())
    step = trainer.train_step
    x = vaegan.data.first_batch(trainer.loader.dataset, 16)
    out = step.generator.module(x, **step.objective.forward_kwargs(16))
    with pytest.warns(DeprecationWarning, match="discriminator_backward"):
        d_loss, _, _ = trainer.discriminator_backward(x, out)
    with pytest.warns(DeprecationWarning, match="generator_backward"):
        g_loss, _ = trainer.generator_backward(x, out)
    assert torch.isfinite(d_loss) and torch.isfinite(g_loss)
    with pytest.raises(AttributeError):
        trainer.no_such_thing  # noqa: B018


# ---- files written by vaegan 0.1 --------------------------------------------------------------------


LEGACY_RUN = FIXTURES / "v0_1_run"  # a 2-step run of the tiny config, written by vaegan 0.1.0


def test_a_final_folder_written_by_0_1_loads_and_samples():
    model = vaegan.VAE.from_pretrained(LEGACY_RUN / "final")  # silent: the reader has nothing to fix
    assert type(model).__name__ == "ConvVAE" and model.config.name == "conv" and model.latent_shape == (4,)
    assert model.config.options["channels"] == [8, 16] and "mlp_hidden" not in model.config.options
    saved = load_file(str(LEGACY_RUN / "final" / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert torch.isfinite(model.sample(4)).all()


def test_vaegan_commands_read_a_0_1_run(tmp_path, capsys):
    from vaegan.cli import main

    assert main(["sample", "--model", str(LEGACY_RUN), "--num", "4", "--out", str(tmp_path / "s.npz")]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out


def test_a_checkpoint_written_by_0_1_resumes(tmp_path):
    """Its config.yaml uses the 0.1 model keys and its files the 0.1 layout; the resumed run goes on."""
    out = tmp_path / "run"
    shutil.copytree(LEGACY_RUN / "checkpoints", out / "checkpoints")
    with pytest.warns(DeprecationWarning, match="0.1's keys"):
        old_cfg = vaegan.load_config(LEGACY_RUN / "config.yaml")
    assert dict(old_cfg.model.options) == {"latent_dim": 4, "channels": [8, 16], "res_blocks": 0, "norm_groups": 4,
                                           "logvar_min": -30.0, "logvar_max": 20.0}
    trainer = vaegan.build_trainer(tiny_config(out, "data.limit=32", "train.max_steps=4", "train.resume=latest"))
    trainer.fit()
    assert trainer.state.step == 4
    ckpt = LEGACY_RUN / "checkpoints" / "step_00000002"
    first = load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(v, first[k]) for k, v in trainer.train_step.generator.module.state_dict().items())
    assert vaegan.VAE.from_pretrained(Path(trainer.output_dir) / "final").config.name == "conv"


def test_every_old_form_names_the_release_that_removes_it():
    """0.1's config keys and attributes and every moved name say when they go (vaegan._deprecation.REMOVED_IN)."""
    import warnings

    from vaegan._deprecation import REMOVED_IN

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = vaegan.ExperimentConfig.from_dict({"model": {"arch": "mlp", "latent_dim": 4}})
        cfg.model.arch, cfg.model.latent_dim  # noqa: B018 - the deprecated attributes
        importlib.import_module("vaegan.guards").GracefulStop  # noqa: B018
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(messages) >= 4 and all(m.endswith(f"will be removed in vaegan {REMOVED_IN}.") for m in messages), messages


def test_faults_save_after_fault_is_the_trainers_method_now(tiny):
    from vaegan.errors import DataError
    from vaegan.faults import save_after_fault

    trainer = vaegan.build_trainer(tiny("train.max_steps=2"))
    trainer.fit()
    with pytest.warns(DeprecationWarning, match=r"use trainer\.save_after_fault\(exc\).*vaegan 0\.6"):
        error = save_after_fault(trainer, DataError("Image 'x.png' cannot be read."))
    assert isinstance(error, DataError) and "The last completed step, 2, is saved under" in str(error)
