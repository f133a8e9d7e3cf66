"""Evaluate a trained VAE: reconstruction, likelihood, sample quality, detail and diversity.

Protocol (written into every result as ``protocol``):

- reconstructions of the evaluation split, from the posterior mean: MSE, PSNR and SSIM over all images
  (torchmetrics, data range = the model's output range);
- likelihood on the first ``nll_images`` images: negative ELBO and the IWAE bound with ``nll_samples``
  importance samples, in nats per image and bits per dimension, Bernoulli on inputs binarised at the
  middle of the range (or the decoder's Gaussian with a given log-variance);
- ``num_samples`` prior samples (seeded per rank) against the evaluation split: Fréchet distance in the
  penultimate (128-d) layer of a small classifier trained once on the *training* split and cached under a
  key made of dataset, split, image shape, size and a content hash (never a bare file name); sharpness
  and high-frequency ratios; class histogram; precision/recall (k = 3) in the same feature space.

Everything is correct under DDP: each rank takes every ``world``-th image (no padding duplicates) and the
torchmetrics states are reduced across ranks.

Example:
    >>> results = evaluate(VAE.from_pretrained("outputs/vaegan_mnist/final"), DataConfig(root="data"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from .config import DataConfig, ModelConfig
from .data import TensorImages, build_dataset
from .errors import DataError
from .metrics import ClassHistogram, HighFrequencyRatio, LikelihoodBounds, PrecisionRecall, SharpnessRatio
from .model import VAE

__all__ = ["DigitClassifier", "load_or_train_classifier", "evaluate", "default_cache_dir"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$VAEGAN_CACHE`` or ``~/.cache/vaegan``."""
    return Path(os.environ.get("VAEGAN_CACHE", Path.home() / ".cache" / "vaegan"))


class DigitClassifier(nn.Module):
    """A small CNN classifier whose penultimate layer is the feature space for Fréchet distances.

    Args:
        image_shape: (C, H, W) of its inputs (images in the VAE's output range).
        num_classes: Output classes.
    """

    num_features = 128  # read by torchmetrics' FrechetInceptionDistance

    def __init__(self, image_shape=(1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        c = image_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N, 128) features of images (N, C, H, W)."""
        return self.body(x.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _Features(nn.Module):
    """The classifier's feature layer as a module, the form torchmetrics' FID accepts."""

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


def _dataset_key(dataset: TensorImages, data: DataConfig) -> str:
    digest = hashlib.sha256(dataset.images.numpy().tobytes()).hexdigest()[:16]
    c, h, w = dataset.images.shape[1:]
    return f"{data.name}-{data.split}-{c}x{h}x{w}-n{len(dataset)}-{digest}"


def load_or_train_classifier(data: DataConfig, model: ModelConfig, cache_dir: Optional[Path] = None,
                             epochs: int = 3, seed: int = 0) -> DigitClassifier:
    """The feature classifier for ``data``'s *training* split, trained once and cached.

    Raises:
        DataError: the dataset has no labels (only labelled in-memory datasets such as MNIST do).
    """
    train_cfg = DataConfig(**{**data.__dict__, "split": "train"})
    ds = build_dataset(train_cfg, model)
    if not isinstance(ds, TensorImages) or ds.labels is None:
        raise DataError(
            f"The '{data.name}' dataset has no class labels, so vaegan cannot train its feature classifier. "
            "Use a labelled dataset (mnist) or evaluate without classifier metrics (classifier=False)."
        )
    path = Path(cache_dir or default_cache_dir()) / f"classifier-{_dataset_key(ds, train_cfg)}.safetensors"
    clf = DigitClassifier(tuple(ds.images.shape[1:]))
    if path.is_file():
        clf.load_state_dict(load_file(str(path)))
        return clf.eval()
    logger.info("Training the feature classifier on %d images (cached at %s)", len(ds), path)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    labels = ds.labels
    with torch.enable_grad():  # also when called from evaluate(), which runs under no_grad
        _fit_classifier(clf, ds, labels, opt, epochs, gen)
    clf.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(tmp))
    os.replace(tmp, path)  # atomic: concurrent ranks/processes never read a half-written file
    return clf


def _fit_classifier(clf: DigitClassifier, ds: TensorImages, labels: Tensor, opt, epochs: int, gen) -> None:
    for _ in range(epochs):
        for idx in torch.randperm(len(ds), generator=gen).split(128):
            x = ds[idx]  # (b, C, H, W) floats in the value range
            loss = F.cross_entropy(clf(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _shard(n: int, rank: int, world: int) -> range:
    return range(rank, n, world)


@torch.no_grad()
def evaluate(model: VAE, data: DataConfig, *, num_samples: int = 10000, nll_images: int = 1000,
             nll_samples: int = 100, likelihood: str = "bernoulli", logvar: Optional[Tensor] = None,
             batch_size: int = 500, classifier: Union[bool, DigitClassifier] = True, seed: int = 0,
             cache_dir: Optional[Path] = None, accelerator=None, output: Optional[Path] = None) -> Dict[str, object]:
    """Compute every metric for ``model`` on ``data`` (its ``split``, typically ``"test"``).

    Args:
        model: The (EMA) generator.
        data: The evaluation split; the classifier is trained on the same dataset's training split.
        num_samples: Prior samples for sample-quality metrics.
        nll_images, nll_samples: Images and importance samples for the likelihood bounds.
        classifier: True to load/train the cached classifier, False to skip classifier metrics, or a
            classifier to use.
        accelerator: For DDP; each rank evaluates its share and metrics are reduced.
        output: When given, the results are written there as JSON (main process).

    Returns:
        A JSON-able dict of metrics plus the protocol.
    """
    # torchmetrics.image only re-exports FID when torch-fidelity is installed; with a custom feature
    # module it is not needed, so import the class from its module.
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.regression import MeanSquaredError

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    model = model.to(device).eval()
    ds: Dataset = build_dataset(data, model.config)
    low, high = model.value_range
    span = high - low

    mse, psnr = MeanSquaredError().to(device), PeakSignalNoiseRatio(data_range=span).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=span).to(device)
    sharp, hf = SharpnessRatio().to(device), HighFrequencyRatio().to(device)
    nll = LikelihoodBounds(model, nll_samples, likelihood, logvar).to(device)
    clf = load_or_train_classifier(data, model.config, cache_dir) if classifier is True else (classifier or None)
    if clf is not None:
        clf = clf.to(device).eval()
        fid = FrechetInceptionDistance(feature=_Features(clf), reset_real_features=False).to(device)
        hist, pr = ClassHistogram().to(device), PrecisionRecall().to(device)

    indices = list(_shard(len(ds), rank, world))
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        x = torch.stack([ds[i] if not isinstance(ds[i], tuple) else ds[i][0] for i in idx]).to(device)
        recon = model.reconstruct(x)
        mse.update(rearrange(recon, "b c h w -> (b c h w)"), rearrange(x, "b c h w -> (b c h w)"))
        psnr.update(recon, x)
        ssim.update(recon, x)
        sharp.update(x, real=True)
        hf.update(x, real=True)
        seen = start  # images of this rank before this batch
        n_nll = max(0, min(len(idx), -(-nll_images // world) - seen))
        if n_nll:
            nll.update(x[:n_nll])
        if clf is not None:
            fid.update(x, real=True)
            pr.update(clf.features(x), real=True)

    gen = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)
    per_rank = -(-num_samples // world)
    for start in range(0, per_rank, batch_size):
        n = min(batch_size, per_rank - start)
        fake = model.sample(n, generator=gen).float()
        sharp.update(fake, real=False)
        hf.update(fake, real=False)
        if clf is not None:
            fid.update(fake, real=False)
            pr.update(clf.features(fake), real=False)
            hist.update(clf(fake))

    results: Dict[str, object] = {
        "mse": float(mse.compute()), "psnr": float(psnr.compute()), "ssim": float(ssim.compute()),
        "sharpness_ratio": float(sharp.compute()), "high_frequency_ratio": float(hf.compute()),
        **{k: float(v) for k, v in nll.compute().items()},
    }
    if clf is not None:
        results["fd_classifier"] = float(fid.compute())
        h = hist.compute()
        results.update({"class_histogram": [round(float(p), 4) for p in h["histogram"]],
                        "class_entropy": float(h["entropy"]), "classes_covered": int(h["classes_covered"])})
        results.update({k: float(v) for k, v in pr.compute().items()})
    results["protocol"] = {
        "split": data.split, "images": len(ds), "num_samples": per_rank * world, "nll_images": min(nll_images, len(ds)),
        "nll_samples": nll_samples, "likelihood": likelihood + (" (inputs binarised)" if likelihood == "bernoulli" else ""),
        "fd_features": "penultimate layer (128-d) of vaegan's classifier trained on the train split" if clf is not None else None,
        "processes": world,
    }
    if output is not None and rank == 0:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2))
    return results
