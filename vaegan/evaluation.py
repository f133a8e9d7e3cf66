"""Evaluate a trained VAE: reconstruction, likelihood, sample quality, detail and diversity.

Protocol (written into every result as ``protocol``):

- reconstructions of the evaluation split, from the posterior mean, clamped to the value range (what a saved
  image holds): MSE, PSNR and SSIM over all images
  (torchmetrics, data range = the model's output range);
- LPIPS distance of the reconstructions (the ``lpips`` plugin) when the backbone's weights are local, and
  the shift-tolerant LPIPS (``st_lpips``: the plugin's ``net: alex_st``) when stlpips-pytorch is installed,
  a different network, so its numbers are never compared with LPIPS ones;
- likelihood on the first ``nll_images`` images: negative ELBO and the IWAE bound with ``nll_samples``
  importance samples, in nats per image and bits per dimension, Bernoulli on inputs binarised at the
  middle of the range (or the decoder's Gaussian with a given log-variance);
- ``num_samples`` generated images (latents drawn from ``seed``: the prior's, or a fitted sampler's)
  against the evaluation split: Fréchet distance in the penultimate (128-d) layer of a small classifier
  trained once on the whole *training* split (never limited: :mod:`vaegan.classifier`) and cached;
  sharpness and high-frequency ratios; class histogram and
  the classifier's mean confidence; precision/recall (k = 3) in the same feature space.

Everything is correct under DDP: each rank takes every ``world``-th image (no padding duplicates) and
every ``world``-th generated latent, each image's importance noise has its own seed, and the torchmetrics
states are reduced across ranks, so 1 and N processes give the same numbers (up to float summation order).

Example:
    >>> results = evaluate(VAE.from_pretrained("outputs/vaegan_mnist/final"), DataConfig(root="data"),
    ...                    EvalConfig(num_samples=10000))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import Dataset

from . import registry
from .classifier import (  # noqa: F401  (DigitClassifier, load_or_train_classifier: public here since 0.1)
    CLASSIFIER_VERSION,
    DigitClassifier,
    Features,
    classifier_for,
    default_cache_dir,
    load_or_train_classifier,
)
from .config import DataConfig, EvalConfig, ModelConfig
from .data import TensorImages, build_dataset, describe_dataset, image_of
from .errors import PluginError
from .files import dumps_json, write_text_atomic
from .generator import VAE
from .metrics import (
    ClassHistogram,
    HighFrequencyRatio,
    LikelihoodBounds,
    PrecisionRecall,
    SharpnessRatio,
    importance_noise,
)
from .progress import Phase
from .samplers import LatentSampler, sample_latents

__all__ = ["DigitClassifier", "load_or_train_classifier", "EvalResources", "prepare_evaluation", "evaluate",
           "default_cache_dir"]

logger = logging.getLogger(__name__)


# metric key -> (the lpips plugin's net, why it may be absent)
_PERCEPTUAL = {"lpips": ("alex", "the backbone's ImageNet weights are not available locally (see the lpips plugin)"),
               "st_lpips": ("alex_st", "the shift-tolerant weights are not installed (pip install \"vaegan[stlpips]\")")}


def _lpips_for(wanted: Optional[bool], key: str = "lpips") -> Tuple[Optional[nn.Module], Optional[str]]:
    """The ``lpips`` loss plugin as the distance of metric ``key`` (never downloaded), or why not."""
    if wanted is False:
        return None, f"off (eval.{key}: false)"
    net, missing = _PERCEPTUAL[key]
    try:
        return registry.load("vaegan.losses", "lpips")(net=net, download=False).eval(), None
    except PluginError as exc:
        if wanted:  # asked for explicitly: say what is missing and how to fix it
            raise
        logger.info("%s distance skipped: %s", key, exc)
        return None, f"skipped: {missing}"


INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception (TF port)
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS


def _inception_fid():
    """torchmetrics' Inception FID (2048-d pool features), refusing clearly when it cannot run offline."""
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception network comes from it)
    except ImportError:
        raise PluginError(
            "eval.inception needs the torch-fidelity package, which provides the FID Inception network: "
            "pip install 'vaegan[inception]' (or pip install torch-fidelity), or turn eval.inception off "
            "(the classifier FD needs no download)."
        ) from None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not weights.is_file():
        raise PluginError(
            f"eval.inception needs the FID Inception weights '{weights}', which are not there. Download "
            f"{INCEPTION_URL} on a machine with internet and copy it there (set TORCH_HOME to move the cache), "
            "or turn eval.inception off."
        )
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False)


@dataclasses.dataclass
class EvalResources:
    """What :func:`evaluate` needs besides the model, built once by :func:`prepare_evaluation` (the
    trainer keeps one for all its periodic evaluations)."""

    data: DataConfig  # the evaluated split
    dataset: Dataset
    classifier: Optional[DigitClassifier] = None
    lpips: Optional[nn.Module] = None  # a module with ``distance(a, b, value_range) -> (B,)``
    lpips_note: Optional[str] = None  # why there is no LPIPS distance
    inception: Optional[nn.Module] = None  # torchmetrics' Inception FID metric, when asked for
    st_lpips: Optional[nn.Module] = None  # the shift-tolerant LPIPS, same interface as ``lpips``
    st_lpips_note: Optional[str] = None  # why there is no ST-LPIPS distance


def prepare_evaluation(data: DataConfig, model_config: ModelConfig, config: EvalConfig = EvalConfig(),
                       cache_dir: Optional[Path] = None, accelerator=None) -> EvalResources:
    """Load the evaluated split, the cached feature classifier and the LPIPS network, as ``config`` asks.

    Raises:
        DataError: the split is missing; ``classifier: true`` on a dataset without labels.
        PluginError: ``lpips: true`` without the backbone's weights, ``st_lpips: true`` without stlpips-pytorch.
    """
    data = dataclasses.replace(data, split=config.split, limit=config.limit)
    ds = build_dataset(data, model_config)
    if accelerator is None or accelerator.is_main_process:
        logger.info("Evaluation: %s", describe_dataset(data, ds))
    clf = classifier_for(data, model_config, ds, config.classifier, cache_dir, accelerator)
    lpips, note = _lpips_for(config.lpips)
    st_lpips, st_note = _lpips_for(config.st_lpips, "st_lpips")
    inception = _inception_fid() if config.inception else None
    return EvalResources(data, ds, clf, lpips, note, inception, st_lpips, st_note)


# Why a metric can be undefined on legitimate input; any other non-finite value is reported as it was.
_FD = "a Fréchet distance needs at least 2 images on each side and features that vary (raise --limit / --num-samples)"
UNDEFINED_REASONS = {
    "psnr": "the reconstructions equal the inputs (MSE 0), where PSNR is infinite",
    "sharpness_ratio": "the real images have no Laplacian energy (constant or blank images): a ratio to 0",
    "high_frequency_ratio": "the real images have no high-frequency energy (constant or blank images): a ratio to 0",
    "fd_classifier": _FD, "fid_inception": _FD,
    "precision": "precision and recall need more than k = 3 images on each side (raise --limit / --num-samples)",
    "recall": "precision and recall need more than k = 3 images on each side (raise --limit / --num-samples)",
}


def _frechet(metric: Any) -> float:
    """A Fréchet distance metric's value; NaN (undefined, reported as such) where it has too few images."""
    try:
        return float(metric.compute())
    except (RuntimeError, ValueError):  # torchmetrics: "More than one sample is required ..."
        return float("nan")


def undefined_as_null(results: Dict[str, object]) -> Dict[str, str]:
    """Replace the NaN/inf metrics of ``results`` (in place) by None, with the reason under ``"undefined"``.

    Returns:
        ``{metric: reason}`` (also ``results["undefined"]`` when not empty), each logged as a warning.

    Example:
        >>> r = {"psnr": float("inf"), "ssim": 1.0}
        >>> undefined_as_null(r)["psnr"]
        'the reconstructions equal the inputs (MSE 0), where PSNR is infinite'
        >>> r["psnr"] is None
        True
    """
    undefined = {}
    for key, value in list(results.items()):
        if isinstance(value, float) and not math.isfinite(value):
            undefined[key] = UNDEFINED_REASONS.get(key, f"the value was not finite ({value})")
            results[key] = None
            logger.warning("%s is undefined (null in the results): %s", key, undefined[key])
    if undefined:
        results["undefined"] = undefined
    return undefined


def _batches(ds: Dataset, indices: Tensor, batch_size: int):
    """(global indices, images (b, C, H, W)) in order; labels dropped."""
    for idx in indices.split(batch_size):
        if isinstance(ds, TensorImages):
            yield idx, ds[idx]
        else:
            items = [ds[int(i)] for i in idx]
            yield idx, torch.stack([image_of(it) for it in items])


@torch.no_grad()
def evaluate(model: VAE, data: DataConfig, config: EvalConfig = EvalConfig(), *, logvar: Optional[Tensor] = None,
             resources: Optional[EvalResources] = None, cache_dir: Optional[Path] = None, accelerator=None,
             output: Optional[Path] = None, sampler: Optional[LatentSampler] = None,
             progress: bool = True, hint: Optional[str] = None) -> Dict[str, object]:
    """Compute every metric for ``model`` on the ``config.split`` split of ``data``'s dataset.

    The results do not depend on the number of processes: each rank takes every ``world``-th image, the
    generated latents are drawn once from ``config.seed`` and sharded the same way, each image's
    importance-sampling noise is seeded by ``config.seed`` and its number, and the metric states are
    reduced across ranks (call it on every rank).

    Args:
        model: The generator to evaluate (the EMA one, usually).
        data: The training data's config; ``config.split`` and ``config.limit`` pick the evaluated images.
            The feature classifier is trained (once, then cached) on the same dataset's training split.
        config: What to compute and on how many images; see :class:`~vaegan.config.EvalConfig`.
        logvar: The Gaussian log-variance for ``likelihood: gaussian``.
        resources: The split, classifier and LPIPS network from :func:`prepare_evaluation` (built here
            when not given).
        cache_dir: Where the classifier is cached (default ``$VAEGAN_CACHE`` or ``~/.cache/vaegan``).
        accelerator: An ``accelerate.Accelerator`` for multi-process evaluation.
        output: When given, the main process writes the results there as JSON.
        sampler: Where the generated images' latents come from (a fitted :mod:`vaegan.samplers` sampler);
            None: the model's prior, N(0, I).
        progress: Show progress (images evaluated and generated; a bar on a terminal, else a log line with the
            time left, see :mod:`vaegan.progress`) on the local main process; False: none.
        hint: Said with the first progress line (the CLI names its flags for a shorter evaluation).

    Returns:
        A JSON-able dict of metrics and the ``protocol`` they were measured with.

    Raises:
        DataError: missing data; ``classifier: true`` on a dataset without labels.
        PluginError: ``lpips: true`` without the backbone's weights.

    Example:
        >>> evaluate(load_model("outputs/vaegan_mnist"), DataConfig(root="data"), EvalConfig(num_samples=10000))  # doctest: +SKIP
        {'mse': 0.012, 'psnr': 19.1, ..., 'fd_classifier': 25.4, ...}
    """
    # torchmetrics.image only re-exports FID when torch-fidelity is installed; with a custom feature
    # module it is not needed, so import the class from its module.
    from torchmetrics.aggregation import MeanMetric
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.regression import MeanSquaredError

    device = accelerator.device if accelerator is not None else model.device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    was_training = model.training
    model.to(device).eval()
    res = resources or prepare_evaluation(data, model.config, config, cache_dir, accelerator)
    data, ds, clf, lpips = res.data, res.dataset, res.classifier, res.lpips
    low, high = model.value_range
    span = high - low

    mse, psnr = MeanSquaredError().to(device), PeakSignalNoiseRatio(data_range=span).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=span).to(device)
    sharp, hf = SharpnessRatio().to(device), HighFrequencyRatio().to(device)
    nll = LikelihoodBounds(model, config.nll_samples, config.likelihood, logvar).to(device)
    perceptual = {key: (net.to(device), MeanMetric().to(device)) for key, net in
                  (("lpips", lpips), ("st_lpips", res.st_lpips)) if net is not None}
    inception = res.inception.to(device) if res.inception is not None else None
    if inception is not None:
        inception.reset()

    def to_rgb_unit(images: Tensor) -> Tensor:  # what the Inception FID takes: (B, 3, H, W) in [0, 1]
        unit = ((images.float() - low) / span).clamp(0, 1)
        return unit.expand(-1, 3, -1, -1) if unit.shape[1] == 1 else unit[:, :3]

    if clf is not None:
        clf = clf.to(device).eval()
        fid = FrechetInceptionDistance(feature=Features(clf), reset_real_features=False).to(device)
        hist, pr = ClassHistogram().to(device), PrecisionRecall().to(device)

    # Prior latents drawn once for all processes and sharded; each image's importance noise comes from its
    # own seed (importance_noise): 1 and N processes, and `vaegan score`, see the same numbers.
    n_nll = min(config.nll_images, len(ds))
    prior_z = sample_latents(model, config.num_samples, generator=torch.Generator().manual_seed(config.seed),
                             sampler=sampler)  # (S, *latent_shape)

    mine = torch.arange(rank, len(ds), world)
    bar = Phase("eval", total=len(mine) + len(prior_z[rank::world]), unit="img", enabled=progress, hint=hint)
    for idx, x in _batches(ds, mine, config.batch_size):
        bar.update(len(idx))
        x = x.to(device)
        recon = model.reconstruct(x).clamp(low, high)  # what a saved image holds (an identity decoder may overshoot)
        mse.update(rearrange(recon, "b c h w -> (b c h w)"), rearrange(x, "b c h w -> (b c h w)"))
        psnr.update(recon, x)
        ssim.update(recon, x)
        sharp.update(x, real=True)
        hf.update(x, real=True)
        for net, mean in perceptual.values():
            mean.update(net.distance(recon, x, model.value_range))  # (b,)
        keep = idx < n_nll  # this rank's images among the first n_nll
        if keep.any():
            noise = importance_noise(config.seed, idx[keep], config.nll_samples, model.latent_shape)  # (K, b, *latent)
            nll.update(x[keep], noise=noise.to(device))
        if clf is not None:
            fid.update(x, real=True)
            pr.update(clf.features(x), real=True)
        if inception is not None:
            inception.update(to_rgb_unit(x), real=True)

    for z in prior_z[rank::world].split(config.batch_size):
        bar.update(len(z))
        fake = model.decode(z.to(device)).float().clamp(low, high)
        sharp.update(fake, real=False)
        hf.update(fake, real=False)
        if clf is not None:
            fid.update(fake, real=False)
            pr.update(clf.features(fake), real=False)
            hist.update(clf(fake))
        if inception is not None:
            inception.update(to_rgb_unit(fake), real=False)

    bar.close()
    results: Dict[str, object] = {
        "mse": float(mse.compute()), "psnr": float(psnr.compute()), "ssim": float(ssim.compute()),
        "sharpness_ratio": float(sharp.compute()), "high_frequency_ratio": float(hf.compute()),
        **{k: float(v) for k, v in nll.compute().items()},
    }
    results.update({key: float(mean.compute()) for key, (_, mean) in perceptual.items()})
    if inception is not None:
        results["fid_inception"] = _frechet(inception)
    if clf is not None:
        results["fd_classifier"] = _frechet(fid)
        h = hist.compute()
        results.update({"class_histogram": [round(float(p), 4) for p in h["histogram"]],
                        "class_entropy": float(h["entropy"]), "classes_covered": int(h["classes_covered"]),
                        "classifier_confidence": float(h["confidence"])})
        results.update({k: float(v) for k, v in pr.compute().items()})
    model.train(was_training)
    undefined_as_null(results)
    results["protocol"] = {
        "dataset": data.name, "split": data.split, "images": len(ds), "num_samples": config.num_samples,
        "nll_images": n_nll, "nll_samples": config.nll_samples,
        "likelihood": config.likelihood + (" (inputs binarised)" if config.likelihood == "bernoulli" else ""),
        "fd_features": (f"penultimate layer (128-d) of vaegan's classifier, trained on all {clf.trained_on} images "
                        f"of the {data.name} train split (never limited)") if clf is not None else None,
        "limit": config.limit,  # bounds "images" only: num_samples and nll_images are set on their own
        "fid_inception": "torchmetrics FID, Inception-v3 pool3 (2048-d), grey images repeated to RGB" if inception is not None else None,
        "lpips": "mean LPIPS (lpips plugin) of reconstructions vs inputs" if lpips is not None else res.lpips_note,
        "st_lpips": ("mean shift-tolerant LPIPS (lpips plugin, net alex_st, stlpips-pytorch weights) of "
                     "reconstructions vs inputs; not comparable with LPIPS") if res.st_lpips is not None
                    else res.st_lpips_note,
        "sampler": f"{sampler.name} (temperature {sampler.temperature:g})" if sampler is not None
                   else "normal (the model's prior)",
        "seed": config.seed, "processes": world,
    }
    if output is not None and rank == 0:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, dumps_json(results, indent=2))
    return results
