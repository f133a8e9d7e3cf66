"""The feature classifier behind vaegan's Fréchet distance, class histogram and precision/recall.

A small CNN trained once on the dataset's whole *training* split (whatever ``eval.limit`` or
``data.limit`` say, so every evaluation of a dataset measures in the same feature space) and cached under
a key made of dataset, split, image shape, size and a content hash (never a bare file name).

Example:
    >>> clf = load_or_train_classifier(DataConfig(root="data"), ModelConfig())  # doctest: +SKIP
    >>> clf.features(images).shape  # doctest: +SKIP
    torch.Size([64, 128])
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from .files import save_safetensors
from .config import DataConfig, ModelConfig
from .data import TensorImages, build_dataset
from .errors import DataError

__all__ = ["CLASSIFIER_VERSION", "DigitClassifier", "Features", "load_or_train_classifier", "classifier_for",
           "default_cache_dir"]

logger = logging.getLogger(__name__)


CLASSIFIER_VERSION = "v2"  # v2: batch 32, 4 epochs (96.5% MNIST test accuracy from 12,000 training digits)


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
    trained_on: Optional[int] = None  # training images, set by load_or_train_classifier

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


class Features(nn.Module):
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
                             epochs: int = 4, seed: int = 0) -> DigitClassifier:
    """The feature classifier for ``data``'s *training* split, trained once and cached.

    Raises:
        DataError: the dataset has no labels (only labelled in-memory datasets such as MNIST do).
    """
    # Always the whole training split, whatever limits the evaluated split (eval.limit, `vaegan eval --limit`)
    # or the run's data (data.limit): the feature space must not depend on how much is evaluated.
    train_cfg = dataclasses.replace(data, split="train", limit=None)
    ds = build_dataset(train_cfg, model)
    if not isinstance(ds, TensorImages) or ds.labels is None:
        raise DataError(
            f"The '{data.name}' dataset has no class labels, so vaegan cannot train its feature classifier. "
            "Use a labelled dataset (mnist) or evaluate without classifier metrics (classifier=False)."
        )
    # The recipe's version is part of the name: changing how the classifier is trained invalidates old files.
    path = Path(cache_dir or default_cache_dir()) / f"classifier-{CLASSIFIER_VERSION}-e{epochs}-{_dataset_key(ds, train_cfg)}.safetensors"
    clf = DigitClassifier(tuple(ds.images.shape[1:]))
    clf.trained_on = len(ds)  # images it learnt from: written into every evaluation's protocol
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
    # atomic, per-process temporary name: concurrent ranks/processes never read a half-written file
    save_safetensors({k: v.contiguous() for k, v in clf.state_dict().items()}, path)
    return clf


def _fit_classifier(clf: DigitClassifier, ds: TensorImages, labels: Tensor, opt, epochs: int, gen) -> None:
    for _ in range(epochs):
        for idx in torch.randperm(len(ds), generator=gen).split(32):
            x = ds[idx]  # (b, C, H, W) floats in the value range
            loss = F.cross_entropy(clf(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def classifier_for(data: DataConfig, model_config: ModelConfig, ds: Dataset, wanted: Optional[bool],
                    cache_dir: Optional[Path], accelerator) -> Optional[DigitClassifier]:
    """The cached feature classifier, or None when ``wanted`` is False (or None and ``ds`` has no labels)."""
    if wanted is False or (wanted is None and getattr(ds, "labels", None) is None):
        if wanted is None:
            logger.info("The '%s' dataset has no labels: classifier metrics (FD, histogram, precision/recall) "
                        "are skipped.", data.name)
        return None
    if accelerator is None:
        return load_or_train_classifier(data, model_config, cache_dir)
    with accelerator.main_process_first():  # rank 0 trains and caches it; the others then load the file
        return load_or_train_classifier(data, model_config, cache_dir)
