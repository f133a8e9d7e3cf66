"""The evaluation pipeline end to end, and identical results under a real 2-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaegan import VAE, ModelConfig
from vaegan.config import DataConfig
from vaegan.evaluation import DigitClassifier, evaluate, load_or_train_classifier

from conftest import MNIST_ROOT

DATA = DataConfig(root=str(MNIST_ROOT), split="test", download=False)
TINY_MODEL = ModelConfig(channels=(8, 16), norm_groups=4, latent_dim=4)


def test_classifier_is_cached_by_dataset_key(tmp_path):
    a = load_or_train_classifier(DATA, TINY_MODEL, tmp_path, epochs=1)
    files = list(tmp_path.glob("classifier-*.safetensors"))
    assert len(files) == 1 and "mnist-train-1x28x28-n256-" in files[0].name  # never a bare file name
    mtime = files[0].stat().st_mtime_ns
    b = load_or_train_classifier(DATA, TINY_MODEL, tmp_path, epochs=1)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    limited = DataConfig(**{**DATA.__dict__, "limit": 128})
    load_or_train_classifier(limited, TINY_MODEL, tmp_path, epochs=1)
    assert len(list(tmp_path.glob("classifier-*.safetensors"))) == 2  # other data, other key


def test_identical_images_give_perfect_scores(tmp_path):
    """A 'model' that reconstructs perfectly: PSNR inf, SSIM 1; real vs real features: FD ~ 0."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from vaegan.data import build_dataset, first_batch
    from vaegan.evaluation import _Features

    x = first_batch(build_dataset(DATA, TINY_MODEL), 128)
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    assert peak_signal_noise_ratio(x, x, data_range=1.0) == float("inf")
    assert float(structural_similarity_index_measure(x, x, data_range=1.0)) == pytest.approx(1.0)
    fid = FrechetInceptionDistance(feature=_Features(DigitClassifier().eval()))
    fid.update(x, real=True)
    fid.update(x, real=False)
    assert abs(float(fid.compute())) < 1e-2


def test_evaluate_writes_every_metric(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "eval.json"
    r = evaluate(VAE(TINY_MODEL), DATA, num_samples=64, nll_images=8, nll_samples=4, batch_size=32,
                 cache_dir=tmp_path, output=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    for key in ("mse", "psnr", "ssim", "sharpness_ratio", "high_frequency_ratio", "nll_nats", "nll_bits_per_dim",
                "neg_elbo_nats", "kl_nats", "recon_nats", "fd_classifier", "class_entropy", "precision", "recall"):
        assert isinstance(r[key], float) and r[key] == r[key], key  # present and not NaN
    assert r["protocol"]["num_samples"] == 64 and r["protocol"]["likelihood"].startswith("bernoulli")


def test_evaluation_is_identical_on_two_processes(tmp_path):
    """Each rank takes every second image and the states are reduced: the dataset-level metrics equal
    a one-process run exactly (up to float summation order)."""
    torch.manual_seed(0)
    model_dir = VAE(TINY_MODEL).save_pretrained(tmp_path / "model")
    load_or_train_classifier(DATA, TINY_MODEL, tmp_path, epochs=1)  # cache it once for both runs
    worker = Path(__file__).parent / "ddp_eval_worker.py"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "VAEGAN_CACHE": str(tmp_path)}
    results = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}.json"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                               str(worker), str(model_dir), str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[n] = json.loads(out.read_text())
    assert results[2]["protocol"]["processes"] == 2
    for key in ("mse", "psnr", "ssim"):  # sample-based metrics use per-rank seeds, so they differ
        assert results[2][key] == pytest.approx(results[1][key], rel=1e-5), key
