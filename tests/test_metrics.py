"""Metrics against cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_digits, tiny_generator

from vaegan.metrics import (
    ClassHistogram,
    HighFrequencyRatio,
    LikelihoodBounds,
    PrecisionRecall,
    SharpnessRatio,
    importance_sampled_log_likelihood,
    laplacian_energy,
)


@pytest.fixture(scope="module")
def test_split():
    """The first 128 test test_split: the metrics compare real images with real images."""
    return load_digits(128, split="test")


def _blur(x):
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # 3x3 box blur


@pytest.mark.parametrize("metric", [SharpnessRatio, HighFrequencyRatio])
def test_detail_ratios(metric, test_split):
    same = metric()
    same.update(test_split, real=True)
    same.update(test_split, real=False)
    assert float(same.compute()) == pytest.approx(1.0)
    blurred = metric()
    blurred.update(test_split, real=True)
    blurred.update(_blur(test_split), real=False)
    assert float(blurred.compute()) < 0.6  # a known blur removes most of the fine detail


def test_laplacian_of_a_constant_and_of_a_known_image():
    assert laplacian_energy(torch.full((2, 1, 8, 8), 0.7)).abs().max() == 0
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0  # centre pixel: Laplacian -4 at the only valid position
    assert float(laplacian_energy(x)) == pytest.approx(16.0)


def _coin_flip_vae():
    """A VAE with q(z|x) = N(0, I) = p(z) and p(x|z) = Bernoulli(0.5) per pixel: log p(x) = -D log 2."""
    vae = tiny_generator()
    with torch.no_grad():
        for p in (vae.encoder.head.weight, vae.encoder.head.bias, vae.decoder.out.weight, vae.decoder.out.bias):
            p.zero_()
    return vae.eval()


def test_nll_of_a_model_with_a_known_likelihood(test_split):
    vae = _coin_flip_vae()
    binary = (test_split > 0.5).float()
    r = importance_sampled_log_likelihood(vae, binary, num_samples=20)
    d = binary[0].numel()
    torch.testing.assert_close(r["log_px_iwae"], torch.full((len(binary),), -d * math.log(2)))
    torch.testing.assert_close(r["kl"], torch.zeros(len(binary)))
    metric = LikelihoodBounds(vae, num_samples=5)
    metric.update(test_split)
    out = metric.compute()
    assert float(out["nll_bits_per_dim"]) == pytest.approx(1.0)  # a fair coin per pixel: 1 bit
    assert float(out["neg_elbo_nats"]) == pytest.approx(d * math.log(2))


def test_iwae_bound_is_tighter_than_the_elbo(test_split):
    torch.manual_seed(0)
    vae = tiny_generator().eval()
    r = importance_sampled_log_likelihood(vae, (test_split[:16] > 0.5).float(), num_samples=50)
    assert (r["log_px_iwae"] >= r["elbo"] - 1e-3).float().mean() > 0.9  # up to Monte Carlo noise


def test_class_histogram_and_precision_recall():
    hist = ClassHistogram(num_classes=10)
    hist.update(F.one_hot(torch.arange(100) % 10, 10).float())
    h = hist.compute()
    assert float(h["entropy"]) == pytest.approx(math.log(10)) and int(h["classes_covered"]) == 10
    torch.manual_seed(0)
    real = torch.randn(300, 8)
    pr = PrecisionRecall(k=3)
    pr.update(real, real=True)
    pr.update(real.clone(), real=False)
    assert {k: float(v) for k, v in pr.compute().items()} == {"precision": 1.0, "recall": 1.0}
    collapsed = PrecisionRecall(k=3)
    collapsed.update(real, real=True)
    collapsed.update(real[:1].repeat(300, 1) + 1e-3 * torch.randn(300, 8), real=False)  # mode collapse
    assert float(collapsed.compute()["recall"]) < 0.1
