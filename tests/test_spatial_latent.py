"""Nothing assumes a vector latent: generators with a spatial latent (B, c, h, w) -- the test suite's own
(tests/spatial_generator.py) and the first-party autoencoder_kl (LDM / SD) -- go through training with
every built-in term, every metric of `vaegan eval`, every command, checkpoint + exact resume and a
2-process gloo run. (Every loss term and GAN pair meets them in the contract suites, which are
parametrised over the generators.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_ROOT, assert_resume_is_exact, tiny_config
from spatial_generator import NAME

import vaegan
from vaegan.cli import main as cli

SPATIAL = (f"model.name={NAME}", "model.options={latent_channels: 2, width: 8}")
# (overrides, latent shape) of each spatial generator, for 1 x 28 x 28 digits.
GENERATORS = {
    NAME: (SPATIAL, (2, 7, 7)),
    "autoencoder_kl": (("model.name=autoencoder_kl", "model.options={block_out_channels: [8, 16, 16], "
                        "norm_num_groups: 4, layers_per_block: 1, latent_channels: 2}"), (2, 7, 7)),
}
# Every built-in generator term at once: free bits per latent channel, the smoothness perturbation of a
# latent map, and prior samples (decoded latent maps) as the adversarial fakes next to reconstructions.
TERMS = ("losses=[{name: bce}, {name: kl, options: {free_bits: 0.05}}, {name: smoothness, weight: 0.1}, "
         "{name: gaussian_nll, weight: 0.1}]", "adversarial.fake=both", "adversarial.adaptive=true")
EVAL_SCALARS = ("mse", "psnr", "ssim", "sharpness_ratio", "high_frequency_ratio", "nll_nats", "nll_bits_per_dim",
                "neg_elbo_nats", "kl_nats", "recon_nats", "fd_classifier", "class_entropy", "precision", "recall")


@pytest.fixture(scope="module", params=list(GENERATORS))
def spatial_run(tmp_path_factory, request) -> Path:
    from vaegan._compat import reset_accelerate_state

    overrides, shape = GENERATORS[request.param]
    out = tmp_path_factory.mktemp("spatial") / request.param
    trainer = vaegan.build_trainer(tiny_config(out, *overrides, *TERMS, "train.max_steps=4", "train.checkpoint_every=2",
                                               "train.sample_every=2"))
    assert trainer.model.latent_shape == shape
    trainer.fit()
    reset_accelerate_state()
    return out


def test_training_logs_every_term_and_saves_a_spatial_generator(spatial_run):
    rows = [json.loads(line) for line in (spatial_run / "metrics.jsonl").read_text().splitlines()]
    assert {"g/bce", "g/kl", "g/smoothness", "g/gaussian_nll", "g/adversarial", "g/adaptive_weight",
            "d/discriminator"} <= set(rows[-1])
    assert all(math.isfinite(v) for row in rows for v in row.values())
    model = vaegan.VAE.from_pretrained(spatial_run / "final")
    assert model.config.name == spatial_run.name and model.latent_shape == GENERATORS[spatial_run.name][1]
    assert model.sample_prior(3).shape == (3, *model.latent_shape)
    assert (spatial_run / "samples" / "final_interpolations.png").is_file()
    # No sampler (sampler: null): a spatial latent is sampled by a diffusion model, not N(0, I), so no grid of
    # decoded prior noise is written, at any step.
    written = sorted(p.name for p in (spatial_run / "samples").iterdir())
    assert "final_reconstructions.png" in written and not [n for n in written if "_samples" in n], written


def test_kl_and_free_bits_are_per_latent_channel():
    from vaegan.api import DiagonalGaussian, TermInputs, VAEOutput
    from vaegan.losses.kl import KLDivergence

    mean = torch.zeros(4, 2, 3, 3)
    mean[:, 0] = 1.0  # channel 0: 0.5 nats per element; channel 1: at the prior
    q = DiagonalGaussian(mean, torch.zeros_like(mean))
    real = torch.zeros(4, 1, 6, 6)
    inputs = TermInputs(real=real, output=VAEOutput(recon=real, posterior=q, z=mean), step=0)
    assert float(KLDivergence()(inputs)) == pytest.approx(0.5 * 9 / 36)  # summed over elements, per pixel
    # Free bits of 0.2 nats per element lift channel 1 (0 nats) to 0.2 per element, i.e. 1.8 for its 9 positions.
    assert float(KLDivergence(free_bits=0.2)(inputs)) == pytest.approx((0.5 * 9 + 0.2 * 9) / 36)


def test_every_metric_of_vaegan_eval(spatial_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli(["eval", "--model", str(spatial_run), "--data-dir", str(MNIST_ROOT), "--num-samples", "64",
                "--nll-images", "8", "--nll-samples", "4", "--batch-size", "32", "--lpips", "off",
                "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    for key in EVAL_SCALARS:
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
    assert results["kl_nats"] > 0 and results["nll_nats"] <= results["neg_elbo_nats"] + 1e-3  # IWAE bound is tighter
    assert "nll_nats" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".npz", ".png"])
def test_sample_reconstruct_and_interpolate_commands(spatial_run, tmp_path, suffix):
    model = ["--model", str(spatial_run)]
    assert cli(["sample", *model, "--num", "6", "--out", str(tmp_path / f"s{suffix}")]) == 0
    assert cli(["reconstruct", *model, "--data-dir", str(MNIST_ROOT), "--limit", "5", "--out", str(tmp_path / f"r{suffix}")]) == 0
    assert cli(["interpolate", *model, "--num-pairs", "2", "--steps", "5", "--out", str(tmp_path / f"i{suffix}")]) == 0
    assert cli(["interpolate", *model, "--data-dir", str(MNIST_ROOT), "--indices", "0", "3",
                "--out", str(tmp_path / f"d{suffix}")]) == 0
    if suffix == ".npz":
        shapes = {name: np.load(tmp_path / f"{name}.npz")["images"].shape for name in ("s", "r", "i", "d")}
        assert shapes == {"s": (6, 1, 28, 28), "r": (5, 1, 28, 28), "i": (2, 5, 1, 28, 28), "d": (1, 8, 1, 28, 28)}
    else:
        assert all((tmp_path / f"{name}.png").stat().st_size > 0 for name in ("s", "r", "i", "d"))


def test_interpolation_of_latent_maps_is_elementwise():
    model = vaegan.build_generator(vaegan.ModelConfig(name=NAME))
    z0, z1 = model.sample_prior(2, generator=torch.Generator().manual_seed(0)).chunk(2)
    path = model.decode_path(z0, z1, steps=3)  # (1, 3, C, H, W)
    midpoint = model.decode(0.5 * (z0 + z1))
    torch.testing.assert_close(path[:, 1], midpoint)
    torch.testing.assert_close(path[:, 0], model.decode(z0))


@pytest.mark.slow
def test_checkpoint_and_exact_resume(tmp_path):
    assert_resume_is_exact(tmp_path, (*SPATIAL, *TERMS, "train.epochs=2", "train.checkpoint_every=3"), stop_at=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GENERATORS))
def test_two_processes_end_with_identical_parameters(tmp_path, name):
    from test_distributed import _torchrun

    overrides, shape = GENERATORS[name]
    r0, r1 = _torchrun(tmp_path, *overrides, *TERMS)
    assert r0["world_size"] == 2 and r0["ranks_saw_different_data"]
    for player in ("gen", "disc"):
        assert r0[player] == r1[player], f"{player} differs between ranks"
    assert vaegan.VAE.from_pretrained(tmp_path / "final").latent_shape == shape
