"""Latent statistics (vaegan.latent_stats): the closed-form moments against brute force and against posterior
draws, exact under two real processes (torchrun, Accelerate MULTI_CPU over gloo), and what a run leaves:
the model's options, the diffusers config, final/latent_stats.json, the card, and `vaegan encode --scaled`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from latent_stats_worker import N_IMAGES, RecordingImages, tiny_model
from safetensors import safe_open

import vaegan
from vaegan.errors import DataError
from vaegan.latent_stats import (LATENT_STATS_FILE, compute_latent_stats, load_latent_stats, save_latent_stats,
                                 store_latent_stats)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORKER = Path(__file__).parent / "latent_stats_worker.py"


def _brute_force(model, data, n):
    x = torch.stack([data[i] for i in range(n)])
    with torch.no_grad():
        q = model.encode(x)
    mu, var = q.mean.double(), q.logvar.double().exp()  # (n, c, h, w)
    second = mu.square() + var
    channel_mean = mu.mean((0, 2, 3))
    channel_std = (second.mean((0, 2, 3)) - channel_mean.square()).sqrt()
    return q, float(mu.mean()), float((second.mean() - mu.mean().square()).sqrt()), channel_mean, channel_std


def test_the_moments_are_those_of_posterior_samples_in_closed_form_whatever_the_batch_size():
    model, data = tiny_model(), RecordingImages()
    stats = compute_latent_stats(model, data, N_IMAGES, batch_size=3)
    q, mean, std, channel_mean, channel_std = _brute_force(model, data, N_IMAGES)
    rel = 1e-6  # one batch of 7 against batches of 3: an fp32 conv's last bits depend on the batch
    assert stats.images == N_IMAGES and stats.posterior == "sample"
    assert stats.mean == pytest.approx(mean, rel=rel) and stats.std == pytest.approx(std, rel=rel)
    assert stats.shift_factor == stats.mean and stats.scaling_factor == pytest.approx(1 / std, rel=rel)
    torch.testing.assert_close(torch.tensor(stats.channel_mean, dtype=torch.float64), channel_mean, rtol=rel, atol=0)
    torch.testing.assert_close(torch.tensor(stats.channel_std, dtype=torch.float64), channel_std, rtol=rel, atol=0)
    # What the closed form stands for: the std of many draws z ~ q(z|x) (400 draws: within 1 %).
    g = torch.Generator().manual_seed(0)
    draws = q.mean + q.std * torch.randn((400, *q.mean.shape), generator=g)  # (400, n, c, h, w)
    assert float(draws.double().std()) == pytest.approx(stats.std, rel=0.01)
    assert compute_latent_stats(model, data, N_IMAGES, batch_size=1).std == pytest.approx(stats.std, rel=rel)
    means_only = compute_latent_stats(model, data, N_IMAGES, posterior="mean")
    assert means_only.std == pytest.approx(float(q.mean.double().std(unbiased=False)), rel=1e-9)
    assert means_only.std < stats.std  # the posterior's own variance is left out


def test_the_statistics_round_trip_through_their_file_and_bad_input_is_refused(tmp_path):
    stats = compute_latent_stats(tiny_model(), RecordingImages(), 4)
    path = save_latent_stats(stats, tmp_path / LATENT_STATS_FILE)
    saved = json.loads(path.read_text())
    assert saved["scaling_factor"] == stats.scaling_factor and saved["normalise"]["global"].startswith("(z - shift")
    assert load_latent_stats(path) == stats
    with pytest.raises(DataError, match="cannot be read as latent statistics"):
        load_latent_stats(tmp_path / "missing.json")
    with pytest.raises(DataError, match="need images"):
        compute_latent_stats(tiny_model(), RecordingImages(), 0)


@pytest.mark.slow
def test_two_processes_each_encode_their_share_and_get_the_one_process_statistics(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and "MULTI_CPU" in r["distributed_type"] for r in ranks)
    assert sorted(ranks[0]["read"]) == [0, 2, 4, 6] and sorted(ranks[1]["read"]) == [1, 3, 5]  # each image once
    # batch_size 1: one image per forward, as on each rank (an fp32 conv's last bits depend on the batch)
    one = compute_latent_stats(tiny_model(), RecordingImages(), N_IMAGES, batch_size=1).to_dict()
    for r in ranks:
        got = r["stats"]
        assert got["images"] == N_IMAGES
        for key in ("mean", "std", "scaling_factor", "shift_factor"):
            assert got[key] == pytest.approx(one[key], rel=1e-12), key
        assert got["channel_mean"] == pytest.approx(one["channel_mean"], rel=1e-12)
        assert got["channel_std"] == pytest.approx(one["channel_std"], rel=1e-12)


@pytest.mark.slow
def test_a_run_stores_them_everywhere_and_encode_scaled_applies_shift_and_scale(tiny, tmp_path, capsys):
    overrides = ("model.name=autoencoder_kl", "model.output_range=symmetric", "model.options={block_out_channels: "
                 "[8, 16], norm_num_groups: 4, layers_per_block: 1, latent_channels: 2}", "train.max_steps=1",
                 "train.estimate_scaling_factor=24", "eval.every=0")
    trainer = vaegan.build_trainer(tiny(*overrides))
    final = trainer.fit()
    model = vaegan.VAE.from_pretrained(final)
    expected = compute_latent_stats(model, trainer.loader.dataset, 24)
    options = json.loads((final / "config.json").read_text())["options"]
    assert options["scaling_factor"] == pytest.approx(expected.scaling_factor, rel=1e-9)
    assert options["shift_factor"] == pytest.approx(expected.shift_factor, rel=1e-9)
    assert options["latents_mean"] == pytest.approx(list(expected.channel_mean), rel=1e-9)
    assert options["latents_std"] == pytest.approx(list(expected.channel_std), rel=1e-9)
    diffusers = json.loads((final / "diffusers" / "config.json").read_text())
    assert diffusers["scaling_factor"] == pytest.approx(expected.scaling_factor, rel=1e-9)
    assert diffusers["shift_factor"] == pytest.approx(expected.shift_factor, rel=1e-9)
    assert diffusers.get("latents_mean") is None  # SDXL pipelines would combine it with scaling_factor: twice
    assert load_latent_stats(final / LATENT_STATS_FILE).std == pytest.approx(expected.std, rel=1e-9)
    card = (final / "README.md").read_text()
    assert "## Latent statistics (`latent_stats.json`)" in card and "latents = (z - mean) / std" in card
    assert "1 / std of posterior samples of 24 training images" in card and "ldm/vae.safetensors" in card
    from vaegan.cli import main

    from conftest import MNIST_ROOT  # noqa: I001  (the tiny config's digits)

    args = ["encode", "--model", str(final), "--data-dir", str(MNIST_ROOT), "--limit", "5"]
    assert main([*args, "--out", str(tmp_path / "z.safetensors")]) == 0
    assert main([*args, "--scaled", "--out", str(tmp_path / "zs.safetensors")]) == 0
    with safe_open(str(tmp_path / "z.safetensors"), "pt") as f, safe_open(str(tmp_path / "zs.safetensors"), "pt") as g:
        z, zs, meta = f.get_tensor("latents"), g.get_tensor("latents"), g.metadata()
    torch.testing.assert_close(zs, (z - options["shift_factor"]) * options["scaling_factor"])
    assert float(meta["shift_factor"]) == pytest.approx(options["shift_factor"])
    assert "scaled by" in capsys.readouterr().out


def test_a_generator_with_only_some_of_the_options_gets_those(tmp_path):
    from conftest import tiny_generator

    stats = compute_latent_stats(tiny_model(), RecordingImages(), 4)
    conv = tiny_generator("conv")
    assert store_latent_stats(conv, stats) == () and "scaling_factor" not in conv.config.options
    kl = tiny_model()
    assert set(store_latent_stats(kl, stats)) == {"scaling_factor", "shift_factor", "latents_mean", "latents_std"}
    assert kl.scaling_factor == stats.scaling_factor and kl.config.options["latents_std"] == list(stats.channel_std)


def test_the_old_store_function_still_works_with_a_warning_naming_the_new_one():
    from vaegan.export import estimate_and_store_scaling_factor

    kl = tiny_model()
    with pytest.warns(DeprecationWarning, match="use vaegan.latent_stats.estimate_and_store"):
        notes = estimate_and_store_scaling_factor((kl,), RecordingImages(), 4)
    assert kl.config.options["scaling_factor"] > 0 and "1 / std" in notes[0]
