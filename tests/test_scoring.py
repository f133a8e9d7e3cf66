"""Per-image scores (`vaegan score`, vaegan.scoring): the evaluation's bounds image for image, every column,
both file formats, and the same numbers under a real 2-process run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MNIST_ROOT, tiny_generator

from vaegan.cli import main as cli
from vaegan.config import DataConfig, EvalConfig, ModelConfig
from vaegan.data import build_dataset
from vaegan.evaluation import evaluate
from vaegan.export import load_discriminator
from vaegan.scoring import save_scores, score

DATA = DataConfig(root=str(MNIST_ROOT), split="test", download=False)


def test_scores_average_to_the_evaluations_bounds(tmp_path):
    model = tiny_generator()
    ds = build_dataset(DataConfig(**{**DATA.__dict__, "limit": 24}), ModelConfig())
    scores = score(model, ds, num_samples=6, seed=3, batch_size=10)
    assert list(scores["index"]) == list(range(24)) and list(scores["label"]) == ds.labels.tolist()
    r = evaluate(model, DATA, EvalConfig(limit=24, nll_images=24, nll_samples=6, seed=3, num_samples=16,
                                         classifier=False, lpips=False))
    assert scores["neg_elbo_nats"].mean() == pytest.approx(r["neg_elbo_nats"], rel=1e-6)
    assert scores["nll_nats"].mean() == pytest.approx(r["nll_nats"], rel=1e-6)
    assert scores["kl_nats"].mean() == pytest.approx(r["kl_nats"], rel=1e-6)
    assert scores["nll_bits_per_dim"].mean() == pytest.approx(r["nll_bits_per_dim"], rel=1e-6)
    assert scores["recon_mse"].mean() == pytest.approx(r["mse"], rel=1e-5)  # equal image sizes: mean of means
    assert np.allclose(scores["neg_elbo_nats"], scores["recon_nats"] + scores["kl_nats"])
    assert (scores["nll_nats"] <= scores["neg_elbo_nats"] + 1e-3).mean() > 0.9  # the IWAE bound is tighter
    # an image's numbers do not depend on the batch it is in
    again = score(model, ds, num_samples=6, seed=3, batch_size=7)
    assert np.array_equal(again["nll_nats"], scores["nll_nats"])


def test_score_command_writes_csv_and_npz_with_the_discriminator_logit(saved_run, tmp_path, capsys):
    disc = load_discriminator(saved_run / "final")
    assert disc is not None and not disc.training
    for suffix in (".csv", ".npz"):
        out = tmp_path / f"scores{suffix}"
        assert cli(["score", "--model", str(saved_run), "--data-dir", str(MNIST_ROOT), "--limit", "20",
                    "--nll-samples", "4", "--out", str(out)]) == 0
        assert "wrote scores of 20 images" in capsys.readouterr().out
    with open(tmp_path / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    arrays = np.load(tmp_path / "scores.npz")
    assert len(rows) == 20 and set(rows[0]) == set(arrays.files)
    for column in ("index", "label", "neg_elbo_nats", "nll_nats", "neg_elbo_bits_per_dim", "nll_bits_per_dim",
                   "recon_nats", "kl_nats", "recon_mse", "disc_logit"):
        assert arrays[column].shape == (20,), column
        assert np.allclose([float(r[column]) for r in rows], arrays[column]), column
    with torch.no_grad():  # the logit column is the saved discriminator's, on the images as they are
        ds = build_dataset(DataConfig(**{**DATA.__dict__, "limit": 20}), ModelConfig())
        logits = disc(ds[torch.arange(20)]).logits.flatten(1).mean(1)
    assert np.allclose(arrays["disc_logit"], logits.double().numpy(), atol=1e-5)


def test_score_refuses_bad_input_in_one_paragraph(saved_run, tmp_path, capsys):
    for argv, words in [
        (["--out", str(tmp_path / "s.txt")], ".csv"),
        (["--out", str(tmp_path / "s.csv"), "--data-dir", str(tmp_path / "nowhere")], "MNIST"),
    ]:
        base = ["score", "--model", str(saved_run), "--data-dir", str(MNIST_ROOT)]
        assert cli(base + argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "s.csv").exists()


def test_scores_of_a_plain_vae_have_no_discriminator_column(tmp_path):
    model_dir = tiny_generator().save_pretrained(tmp_path / "m")
    assert load_discriminator(model_dir) is None
    out = tmp_path / "s.npz"
    assert cli(["score", "--model", str(model_dir), "--data-dir", str(MNIST_ROOT), "--limit", "4",
                "--nll-samples", "2", "--out", str(out)]) == 0
    assert "disc_logit" not in np.load(out).files
    save_scores(tmp_path / "again.csv", score(tiny_generator(), build_dataset(
        DataConfig(**{**DATA.__dict__, "limit": 2}), ModelConfig()), num_samples=2))
    assert (tmp_path / "again.csv").read_text().startswith("index,label,neg_elbo_nats")


@pytest.mark.slow
def test_scores_are_identical_on_two_processes(saved_run, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    results = {}
    for n in (1, 2):
        out = tmp_path / f"scores{n}.npz"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                               "-m", "vaegan.cli", "score", "--model", str(saved_run), "--data-dir", str(MNIST_ROOT),
                               "--limit", "21", "--nll-samples", "4", "--batch-size", "4", "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[n] = np.load(out)
    assert list(results[2]["index"]) == list(range(21))  # gathered back into dataset order
    for key in results[1].files:
        assert np.allclose(results[2][key], results[1][key], rtol=1e-5, atol=1e-6), key
