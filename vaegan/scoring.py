"""Per-image scores of a trained VAE(-GAN): likelihood bounds, reconstruction error, KL, discriminator logit.

What ``vaegan score`` writes, one row per image in dataset order, for anomaly detection (a low
likelihood or a large reconstruction error marks an image unlike the training data) and for looking
at which images a model fits worst:

- ``neg_elbo_nats`` and ``nll_nats``: the negative ELBO and the importance-weighted bound on -log p(x)
  (K samples; Burda et al. 2016), and both in bits per dimension;
- ``recon_nats`` and ``kl_nats``: the ELBO's two parts (E_q[-log p(x|z)] and KL(q(z|x) || N(0, I)));
- ``recon_mse``: mean squared error of the reconstruction from the posterior mean, over pixels;
- ``disc_logit``: the trained discriminator's mean logit (higher: more like real images), when the
  run saved one (``final/discriminator``).

The bounds are those of :func:`vaegan.evaluation.evaluate` image for image: the same likelihood, the
same binarisation and the same per-image importance noise (:func:`vaegan.metrics.importance_noise`),
so their mean is the evaluation's ``neg_elbo_nats`` / ``nll_nats`` on the same images. Under several
processes each scores every ``world``-th image and the rows are gathered back into dataset order.

Example:
    >>> scores = score(load_model("outputs/vaegan_mnist"), dataset, num_samples=100)  # doctest: +SKIP
    >>> save_scores("scores.csv", scores)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .errors import ConfigError, VaeganError
from .evaluation import _batches
from .generator import VAE
from .metrics import LikelihoodBounds, importance_noise
from .progress import Phase

__all__ = ["SCORE_SUFFIXES", "check_scores_output", "score", "save_scores"]

SCORE_SUFFIXES = (".csv", ".npz")


def check_scores_output(path: Union[str, Path]) -> str:
    """The lower-case suffix of ``path`` when it is .csv or .npz.

    Raises:
        ConfigError: any other extension (checked before any work is done).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SCORE_SUFFIXES:
        raise ConfigError(f"--out '{path}' must end in .csv (one row per image, one column per score) or .npz (one "
                          "array per score, one entry per image).")
    return suffix


@torch.no_grad()
def score(model: VAE, dataset: Dataset, *, num_samples: int = 100, likelihood: str = "bernoulli",
          logvar: Optional[Tensor] = None, seed: int = 0, batch_size: int = 256,
          discriminator: Optional[nn.Module] = None, accelerator=None, progress: bool = True,
          hint: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Score every image of ``dataset``; call it on every process under a launcher.

    Args:
        model: The generator (the EMA one, usually); put in eval mode.
        dataset: Images (or (image, label) pairs) in the model's shape and value range.
        num_samples: K importance samples per image.
        likelihood: ``"bernoulli"`` (inputs binarised) or ``"gaussian"`` (with ``logvar``).
        seed: Seed of the per-image importance noise (that of ``evaluate``'s ``eval.seed``).
        discriminator: A trained discriminator for ``disc_logit`` (None: no such column).
        accelerator: An ``accelerate.Accelerator`` to split the images over processes.
        progress: Show progress on the local main process (a bar on a terminal, else log lines with the time
            left; :mod:`vaegan.progress`).
        hint: Said with the first progress line (the CLI names its flags for a shorter run).

    Returns:
        ``index`` and, per score, a float64 array (N,) in dataset order (``label`` too when the dataset
        has labels), on every process.

    Raises:
        DataError: images that do not fit the model.
    """
    device = accelerator.device if accelerator is not None else model.device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    model.to(device).eval()
    if discriminator is not None:
        discriminator.to(device).eval()
    bounds = LikelihoodBounds(model, num_samples, likelihood, logvar)
    low, high = model.value_range
    rows: Dict[str, list] = {}
    mine = torch.arange(rank, len(dataset), world)  # type: ignore[arg-type]
    phase = Phase("score", total=len(mine), unit="img", enabled=progress, hint=hint)
    for idx, x in _batches(dataset, mine, batch_size):
        if not rows:
            model.check_images(x, "the dataset")
        x = x.to(device)
        noise = importance_noise(seed, idx, num_samples, model.latent_shape).to(device)  # (K, b, *latent_shape)
        r = bounds.per_image(x, noise)
        recon = model.reconstruct(x).float().clamp(low, high)
        part = {"index": idx.double(), "neg_elbo_nats": -r["elbo"], "nll_nats": -r["log_px_iwae"],
                "recon_nats": -r["recon_ll"], "kl_nats": r["kl"],
                "recon_mse": (recon - x.float()).pow(2).flatten(1).mean(1)}
        if discriminator is not None:
            part["disc_logit"] = discriminator(x).logits.float().flatten(1).mean(1)  # a PatchGAN map: its mean
        for key, value in part.items():
            rows.setdefault(key, []).append(value.double().cpu())
        phase.update(len(idx))
    phase.close()
    local = {k: torch.cat(v).numpy() for k, v in rows.items()}
    if world > 1:
        from accelerate.utils import gather_object

        parts = [p for p in gather_object([local]) if p]
        local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(local["index"], kind="stable")
    out = {k: v[order] for k, v in local.items()}
    out["index"] = out["index"].astype(np.int64)
    bits = 1.0 / (math.prod(model.image_shape) * math.log(2.0))
    out["neg_elbo_bits_per_dim"] = out["neg_elbo_nats"] * bits
    out["nll_bits_per_dim"] = out["nll_nats"] * bits
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        out["label"] = np.asarray(labels)[out["index"]].astype(np.int64)
    return out


COLUMNS = ("index", "label", "neg_elbo_nats", "nll_nats", "neg_elbo_bits_per_dim", "nll_bits_per_dim", "recon_nats",
           "kl_nats", "recon_mse", "disc_logit")


def save_scores(path: Union[str, Path], scores: Dict[str, np.ndarray]) -> Path:
    """Write scores as CSV (a header, one row per image) or NPZ (one array per score).

    Raises:
        ConfigError: another extension. VaeganError: the file cannot be written.
    """
    path = Path(path)
    suffix = check_scores_output(path)
    names = [c for c in COLUMNS if c in scores] + sorted(set(scores) - set(COLUMNS))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npz":
            np.savez(path, **{k: scores[k] for k in names})
        else:
            with open(path, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(names)
                for i in range(len(scores["index"])):
                    writer.writerow([int(scores[k][i]) if scores[k].dtype.kind == "i" else repr(float(scores[k][i]))
                                     for k in names])
    except OSError as exc:
        raise VaeganError(f"Cannot write '{path}': {exc}. Choose another --out path.") from None
    return path
