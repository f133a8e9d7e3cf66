"""Latent samplers (group ``vaegan.samplers``), parametrised over every installed one: fit, sample, save,
load, refuse what they cannot serve; and the ways a user reaches them (training, the CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import MNIST_ROOT, tiny_config, tiny_generator
from plugin_options import options_for

import vaegan
from vaegan import registry
from vaegan.cli import main as cli
from vaegan.errors import CheckpointError, ConfigError, PluginError
from vaegan.samplers import (
    LatentSampler,
    build_sampler,
    default_sampler_name,
    fit_sampler,
    load_sampler,
    sample_latents,
    save_sampler,
    saved_samplers,
)

SAMPLERS = registry.available("vaegan.samplers")
SHAPES = [(4,), (2, 3, 3)]  # a vector latent and a spatial one


def _latents(shape, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, *shape, generator=g) * 3
    return centres[torch.arange(n) % 3] + 0.3 * torch.randn(n, *shape, generator=g)  # three clusters


def _fitted(name, shape):
    sampler = build_sampler(name, shape, options_for("vaegan.samplers", name))
    summary = sampler.fit(_latents(shape), seed=0)
    return sampler, summary


@pytest.mark.parametrize("shape", SHAPES, ids=["vector", "spatial"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_fits_samples_and_is_restored_exactly(name, shape, tmp_path):
    sampler, summary = _fitted(name, shape)
    assert isinstance(sampler, LatentSampler) and isinstance(summary, dict)
    z = sampler.sample(7, generator=torch.Generator().manual_seed(1))
    assert z.shape == (7, *shape) and z.dtype == torch.float32 and torch.isfinite(z).all()
    again = sampler.sample(7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, again)  # seeded
    assert not torch.equal(z, sampler.sample(7, generator=torch.Generator().manual_seed(2)))
    save_sampler(sampler, tmp_path)
    assert default_sampler_name(tmp_path) == name and saved_samplers(tmp_path) == (name,)
    loaded = load_sampler(tmp_path, latent_shape=shape)
    assert type(loaded) is type(sampler) and loaded.options == sampler.options
    assert torch.equal(loaded.sample(7, generator=torch.Generator().manual_seed(1)), z)  # the same draws
    assert not (tmp_path / "samplers" / name / "sampler.json").read_text().count("pickle")
    record = json.loads((tmp_path / "samplers" / name / "sampler.json").read_text())
    assert record["name"] == name and record["latent_shape"] == list(shape)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_refuses_a_model_with_another_latent_shape(name, tmp_path):
    sampler, _ = _fitted(name, (4,))
    save_sampler(sampler, tmp_path)
    with pytest.raises(CheckpointError, match=r"fitted to latents of shape \(4,\).*\(6,\).*fit-sampler"):
        load_sampler(tmp_path, name, latent_shape=(6,))
    model = tiny_generator(latent_dim=6)
    with pytest.raises(ConfigError, match="shape"):
        sample_latents(model, 2, sampler=sampler)


def test_normal_sampler_draws_what_the_model_prior_draws():
    model = tiny_generator()
    normal = load_sampler("/nonexistent-is-fine-for-normal", "normal", latent_shape=model.latent_shape)
    a = sample_latents(model, 5, generator=torch.Generator().manual_seed(3), sampler=normal, temperature=0.5)
    b = model.sample_prior(5, generator=torch.Generator().manual_seed(3)) * 0.5
    assert torch.equal(a, b)


def test_gmm_recovers_a_known_mixture():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-6.0, 0.0], [5.0, 5.0], [0.0, -7.0]])
    stds = torch.tensor([0.5, 1.0, 0.3])
    weights = torch.tensor([0.5, 0.3, 0.2])
    comp = torch.multinomial(weights, 6000, replacement=True, generator=g)
    x = means[comp] + stds[comp, None] * torch.randn(6000, 2, generator=g)
    gmm = build_sampler("gmm", (2,), {"n_components": 3, "covariance_type": "full"})
    gmm.fit(x)
    order = [int(torch.cdist(m[None], gmm.means.double().float()).argmin()) for m in means]
    assert sorted(order) == [0, 1, 2]
    assert torch.allclose(gmm.means[order], means, atol=0.1)
    assert torch.allclose(gmm.weights[order], weights, atol=0.03)
    cov = gmm.scales[order] @ gmm.scales[order].transpose(1, 2)  # (3, 2, 2)
    assert torch.allclose(cov, torch.diag_embed(stds[:, None].expand(3, 2) ** 2), atol=0.1)
    draws = gmm.sample(20000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(draws.mean(0), weights @ means, atol=0.1)
    assert gmm.log_prob(means).isfinite().all()


def test_too_large_a_sampler_is_refused_before_fitting():
    with pytest.raises(ConfigError, match="covariance_type: diag"):
        build_sampler("gmm", (16, 32, 32), {"n_components": 50})
    assert build_sampler("gmm", (16, 32, 32), {"n_components": 50, "covariance_type": "diag"}).scales.shape == (50, 16384)


def test_unknown_sampler_and_bad_options_are_refused():
    with pytest.raises(PluginError, match="No samplers plugin named 'nope'.*gmm"):
        build_sampler("nope", (4,))
    with pytest.raises(ConfigError, match="n_components"):
        build_sampler("gmm", (4,), {"n_components": 0})
    with pytest.raises(ConfigError, match="cannot take options"):
        build_sampler("gmm", (4,), {"components": 3})


def test_unfitted_sampler_neither_samples_nor_saves(tmp_path):
    gmm = build_sampler("gmm", (4,), {"n_components": 2})
    with pytest.raises(RuntimeError, match="not been fitted"):
        gmm.sample(2)
    with pytest.raises(RuntimeError, match="not been fitted"):
        save_sampler(gmm, tmp_path)


def test_corrupt_sampler_files_are_refused(tmp_path):
    sampler, _ = _fitted("gmm", (4,))
    folder = save_sampler(sampler, tmp_path)
    (folder / "sampler.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_sampler(tmp_path, "gmm", latent_shape=(4,))
    (tmp_path / "samplers" / "samplers.json").write_text("{")
    with pytest.raises(CheckpointError, match="samplers.json"):
        default_sampler_name(tmp_path)


def test_fit_sampler_encodes_posterior_means(digits):
    from vaegan.data import TensorImages

    model = tiny_generator().eval()
    sampler, record = fit_sampler(model, TensorImages((digits * 255).round().to(torch.uint8)), "gmm",
                                  {"n_components": 2})
    assert record["images"] == 8 and record["posterior"] == "mean"
    with torch.no_grad():
        means = model.encode(digits).mean
    assert torch.allclose(sampler.means.mean(0), means.mean(0), atol=0.2)


def test_training_fits_the_configured_sampler_and_makes_it_the_default(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", "train.max_steps=2", "sampler={name: gmm, options: {n_components: 2}}")
    final = vaegan.build_trainer(cfg).fit()
    assert default_sampler_name(final) == "gmm"
    record = json.loads((final / "samplers" / "gmm" / "sampler.json").read_text())
    assert record["fitted_on"]["images"] == 64 and record["fitted_on"]["dataset"] == "mnist"
    assert (tmp_path / "run" / "samples" / "final_samples.png").is_file()
    assert (tmp_path / "run" / "samples" / "final_samples_gmm.png").is_file()
    card = (final / "README.md").read_text()
    assert "Default sampler: `gmm`" in card and "model.decode(sampler.sample(4))" in card
    code = card.split("```python\n")[1].split("```")[0]  # the card's "Load it" snippet runs as written
    exec(compile(code, "README.md", "exec"), {})
    out = tmp_path / "s.npz"
    assert cli(["sample", "--model", str(tmp_path / "run"), "--num", "6", "--out", str(out)]) == 0
    assert "the 'gmm' sampler" in capsys.readouterr().out
    assert cli(["sample", "--model", str(tmp_path / "run"), "--num", "6", "--out", str(out), "--sampler",
                "normal"]) == 0
    assert "N(0, I)" in capsys.readouterr().out
    # From Python as from the CLI: a loaded model (in eval mode) samples from its folder's default sampler.
    model = vaegan.VAE.from_pretrained(final)
    assert not model.training

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    with torch.no_grad():
        gmm = load_sampler(final, "gmm", model.latent_shape)
        assert torch.equal(model.sample(6, generator=seeded()), model.decode(gmm.sample(6, generator=seeded())))
        prior = model.decode(model.sample_prior(6, generator=seeded()))
        assert torch.equal(model.sample(6, generator=seeded(), sampler="normal"), prior)
    with pytest.raises(CheckpointError, match="two_stage"):
        model.sample(2, sampler="two_stage")  # not fitted in that folder


@pytest.mark.parametrize("sampler, words", [
    ("{name: gmm, options: {n_components: -1}}", ["n_components", "sampler: null"]),
    ("{name: gmm, options: {n_components: 100}}", ["at least 100 training images", "64", "sampler: null"]),
    ("{name: gmm, limit: 8, options: {n_components: 10}}", ["at least 10", "would see 8"]),
    ("{name: nope}", ["No samplers plugin named 'nope'"]),
])
def test_a_bad_sampler_in_a_config_fails_before_training(tmp_path, sampler, words):
    with pytest.raises((ConfigError, PluginError)) as info:
        vaegan.build_trainer(tiny_config(tmp_path / "run", f"sampler={sampler}"))
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not (tmp_path / "run").exists()


def test_fit_sampler_command_reads_the_training_data_and_refuses_bad_input(saved_run, tmp_path, capsys):
    assert cli(["fit-sampler", "--model", str(saved_run), "--sampler", "gmm", "--option", "n_components=2",
                "--option", "covariance_type=diag", "--no-default"]) == 0
    out = capsys.readouterr().out
    assert "64 posterior means of the train split" in out and "default" not in out.split("saved it to")[1]
    assert default_sampler_name(saved_run / "final") == "normal"
    record = json.loads((saved_run / "final" / "samplers" / "gmm" / "sampler.json").read_text())
    assert record["options"] == {"n_components": 2, "covariance_type": "diag"}
    for argv, words in [
        (["--sampler", "nope"], "No samplers plugin named 'nope'"),
        (["--sampler", "gmm", "--option", "n_components"], "KEY=VALUE"),
        (["--sampler", "gmm", "--option", "n_components=0"], "n_components"),
    ]:
        assert cli(["fit-sampler", "--model", str(saved_run), *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert cli(["sample", "--model", str(saved_run), "--out", str(tmp_path / "x.png"), "--sampler", "two_stage"]) == 2
    err = capsys.readouterr().err
    assert "No fitted 'two_stage' sampler" in err and "vaegan fit-sampler" in err and err.count("\n") == 1


def test_eval_and_interpolate_use_the_sampler(saved_run, tmp_path, capsys):
    assert cli(["fit-sampler", "--model", str(saved_run), "--sampler", "gmm", "--option", "n_components=2",
                "--overwrite"]) == 0
    out = tmp_path / "eval.json"
    assert cli(["eval", "--model", str(saved_run), "--data-dir", str(MNIST_ROOT), "--num-samples", "32",
                "--nll-images", "4", "--nll-samples", "2", "--lpips", "off", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["protocol"]["sampler"] == "gmm (temperature 1)"
    strips = {}
    for name in ("gmm", "normal"):  # the random end points come from the sampler
        out = tmp_path / f"i_{name}.npz"
        assert cli(["interpolate", "--model", str(saved_run), "--out", str(out), "--num-pairs", "2",
                    "--sampler", name]) == 0
        strips[name] = np.load(out)["images"]
    assert cli(["interpolate", "--model", str(saved_run), "--out", str(tmp_path / "i.npz"), "--num-pairs", "2"]) == 0
    assert np.array_equal(np.load(tmp_path / "i.npz")["images"], strips["gmm"])  # the folder's default
    assert not np.array_equal(strips["gmm"], strips["normal"])
    capsys.readouterr()


class BrokenFit(LatentSampler):
    """A sampler whose fit always fails (a numerical failure in a third-party plugin, say)."""

    def fit_latents(self, latents, seed):
        raise RuntimeError("the fit diverged")

    def draw(self, n, generator, temperature):  # pragma: no cover - never fitted
        raise AssertionError


def test_a_failed_fit_at_the_end_of_training_keeps_the_model(tmp_path, caplog):
    registry.register("vaegan.samplers", "broken_fit", "test_samplers:BrokenFit")
    cfg = tiny_config(tmp_path / "run", "train.max_steps=2", "sampler.name=broken_fit")
    trainer = vaegan.build_trainer(cfg)
    final = trainer.fit()
    assert (final / "model.safetensors").is_file() and (final / "README.md").is_file()
    assert trainer.sampler is None and saved_samplers(final) == () and default_sampler_name(final) == "normal"
    assert "the fit diverged" in caplog.text and "vaegan fit-sampler" in caplog.text
    assert (tmp_path / "run" / "samples" / "final_samples.png").is_file()


def test_evaluations_during_training_draw_from_the_runs_sampler(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.max_steps=2", "sampler={name: gmm, options: {n_components: 2}}",
                      "eval={every: 1, num_samples: 16, nll_images: 4, nll_samples: 2, classifier: false, "
                      "lpips: false, limit: 16}")
    final = vaegan.build_trainer(cfg).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    used = "gmm (temperature 1.5)"  # the recipe's default temperature, during training and at the end
    assert [r["step"] for r in rows] == [1, 2, 2] and all(r["protocol"]["sampler"] == used for r in rows)
    assert json.loads((final / "eval.json").read_text())["protocol"]["sampler"] == used


def test_a_samplers_temperature_is_saved_and_is_its_default(tmp_path):
    sampler, _ = _fitted("gmm", (4,))
    sampler.temperature = 1.5
    save_sampler(sampler, tmp_path)
    loaded = load_sampler(tmp_path, "gmm", latent_shape=(4,))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert loaded.temperature == 1.5
    assert torch.equal(loaded.sample(5, generator=g()), sampler.sample(5, generator=g(), temperature=1.5))
    assert not torch.equal(loaded.sample(5, generator=g()), loaded.sample(5, generator=g(), temperature=1.0))
    model = tiny_generator()
    assert torch.equal(sample_latents(model, 3, generator=g()), model.sample_prior(3, generator=g()))


def test_fit_sampler_never_replaces_a_fitted_sampler_unasked(saved_run, capsys):
    """The reported loss: `--no-default` with the default's name replaced a mixture that was still the default."""
    import hashlib

    fit = ["fit-sampler", "--model", str(saved_run), "--sampler", "gmm", "--option", "n_components=2"]
    assert cli([*fit, "--overwrite"]) == 0  # the folder's default now (whatever the earlier tests left)
    weights = saved_run / "final" / "samplers" / "gmm" / "sampler.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    capsys.readouterr()
    assert cli([*fit, "--no-default", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a fitted 'gmm' sampler, fitted to 64 images of the train split and is the folder's default" \
        in err and "--overwrite" in err and err.count("\n") == 1
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
    assert cli([*fit, "--seed", "3", "--overwrite"]) == 0
    assert hashlib.sha256(weights.read_bytes()).hexdigest() != before


def _edit_sampler(folder, record=None, tensor=None):
    from safetensors.torch import load_file, save_file

    if record is not None:
        path = folder / "samplers" / "gmm" / "sampler.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **record}))
    if tensor is not None:
        path = folder / "samplers" / "gmm" / "sampler.safetensors"
        state = load_file(str(path))
        tensor(state)
        save_file(state, str(path))


@pytest.mark.parametrize("record, tensor, words", [
    ({"temperature": "hot"}, None, "has temperature 'hot', not a finite number >= 0"),
    ({"temperature": -1.0}, None, "has temperature -1.0, not a finite number >= 0"),
    ({"options": {"n_components": 0}}, None, "holds options the 'gmm' sampler refuses"),
    (None, lambda s: s[sorted(k for k in s if s[k].is_floating_point())[0]].fill_(float("nan")), "non-finite values"),
    (None, lambda s: s["fitted"].zero_(), "says it was never fitted (fitted: false)"),
    (None, lambda s: s["weights"].mul_(-1), "cannot be sampled from: its mixture weights must be >= 0 and sum to 1"),
    (None, lambda s: s["weights"].zero_(), "its mixture weights must be >= 0 and sum to 1, got [0.0"),
    (None, lambda s: s["scales"].zero_(), "its scales (standard deviations, or the Cholesky factors' diagonals)"),
])
def test_a_saved_sampler_with_bad_values_is_refused_in_one_paragraph(tmp_path, record, tensor, words):
    sampler, _ = _fitted("gmm", (4,))
    save_sampler(sampler, tmp_path)
    _edit_sampler(tmp_path, record, tensor)
    with pytest.raises(CheckpointError) as info:
        load_sampler(tmp_path, "gmm", latent_shape=(4,))
    assert words in str(info.value) and "\n" not in str(info.value)
