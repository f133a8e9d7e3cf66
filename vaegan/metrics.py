"""Metrics for detail, fidelity, likelihood and diversity, as torchmetrics ``Metric`` classes.

Every metric keeps sums (or concatenated features) as states with a reduction, so it is correct under
DDP: each rank updates with its shard and ``compute()`` reduces across ranks. Standard pieces come from
torchmetrics (PSNR, SSIM, the Fréchet distance with a custom feature extractor); what torchmetrics does
not have is here.

Example:
    >>> m = SharpnessRatio()
    >>> x = torch.rand(4, 1, 28, 28)
    >>> m.update(x, real=True); m.update(x, real=False)
    >>> float(m.compute())
    1.0
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "laplacian_energy",
    "high_frequency_fraction",
    "SharpnessRatio",
    "HighFrequencyRatio",
    "LikelihoodBounds",
    "ClassHistogram",
    "PrecisionRecall",
    "importance_sampled_log_likelihood",
    "importance_noise",
]

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_energy(images: Tensor) -> Tensor:
    """Mean squared Laplacian of each image, (B,), for images (B, C, H, W) (valid convolution)."""
    c = images.shape[1]
    kernel = _LAPLACIAN.to(images.device, torch.float32).expand(c, 1, 3, 3)
    lap = F.conv2d(images.float(), kernel, groups=c)  # (B, C, H-2, W-2)
    return reduce(lap.pow(2), "b c h w -> b", "mean")


def high_frequency_fraction(images: Tensor, cutoff: float = 0.25) -> Tensor:
    """Fraction of each image's spectral energy (DC removed) above ``cutoff`` x Nyquist radius, (B,)."""
    x = images.float() - images.float().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).mean(dim=1)  # (B, H, W), averaged over channels
    h, w = power.shape[-2:]
    fy = torch.fft.fftfreq(h, device=x.device).abs().view(h, 1) * 2  # 1.0 at Nyquist
    fx = torch.fft.fftfreq(w, device=x.device).abs().view(1, w) * 2
    high = (fy.pow(2) + fx.pow(2)).sqrt() > cutoff
    total = power.sum(dim=(-2, -1)).clamp_min(1e-12)
    return (power * high).sum(dim=(-2, -1)) / total


class _RealFakeMean(Metric):
    """Mean of a per-image statistic over generated images divided by its mean over real ones."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def statistic(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, images: Tensor, real: bool) -> None:
        values = self.statistic(images).double()
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + values.sum())
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + values.numel())

    def compute(self) -> Tensor:
        return (self.fake_sum / self.fake_n) / (self.real_sum / self.real_n)


class SharpnessRatio(_RealFakeMean):
    """Mean squared Laplacian of generated images over that of real ones (1.0: as sharp as the data;
    a plain VAE sits far below, around 0.2-0.3 on MNIST)."""

    def statistic(self, images: Tensor) -> Tensor:
        return laplacian_energy(images)


class HighFrequencyRatio(_RealFakeMean):
    """Spectral energy fraction above ``cutoff`` x Nyquist, generated over real (1.0: as much fine detail)."""

    def __init__(self, cutoff: float = 0.25, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cutoff = cutoff

    def statistic(self, images: Tensor) -> Tensor:
        return high_frequency_fraction(images, self.cutoff)


def _log_likelihood(model, x: Tensor, z: Tensor, likelihood: str, logvar: Optional[Tensor]) -> Tensor:
    """log p(x | z) summed over pixels, (N,). ``x`` (N, C, H, W) repeated to match ``z`` (N, *latent_shape)."""
    logits = model.decode_logits(z).float()
    if likelihood == "bernoulli":
        low, high = model.value_range
        scale = high - low  # logits of the Bernoulli: l for sigmoid, 2l for tanh
        target = (x.float() - low) / (high - low)
        ll = -F.binary_cross_entropy_with_logits(scale * logits, target, reduction="none")
    else:
        lv = (logvar if logvar is not None else torch.zeros(1, device=x.device)).float().view(1, -1, 1, 1)
        mean = model.activate(logits)
        ll = -0.5 * ((x.float() - mean).pow(2) * torch.exp(-lv) + lv + math.log(2 * math.pi))
    return reduce(ll, "n c h w -> n", "sum")


def importance_noise(seed: int, indices: Tensor, num_samples: int, latent_shape: Tuple[int, ...]) -> Tensor:
    """Standard-normal draws (K, B, *latent_shape) for the images numbered ``indices``.

    Image ``i``'s K draws come from a generator of its own, seeded from ``(seed, i)``, so an image's
    bound does not depend on the batch it is in, the process that scores it or how many images are
    scored: :func:`vaegan.evaluation.evaluate` and :func:`vaegan.scoring.score` agree image for image.

    Example:
        >>> importance_noise(0, torch.tensor([3, 5]), 4, (2,)).shape
        torch.Size([4, 2, 2])
    """
    out = torch.empty(num_samples, len(indices), *latent_shape)
    for j, i in enumerate(indices.tolist()):
        key = hashlib.sha256(f"vaegan-importance:{seed}:{i}".encode()).digest()[:8]
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little"))
        out[:, j] = torch.randn(num_samples, *latent_shape, generator=gen)
    return out


@torch.no_grad()
def importance_sampled_log_likelihood(model, x: Tensor, num_samples: int = 100, likelihood: str = "bernoulli",
                                      logvar: Optional[Tensor] = None, chunk: int = 50,
                                      noise: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Per-image ELBO parts and the IWAE estimate of log p(x) (Burda et al. 2016), in nats.

    Args:
        model: A :class:`vaegan.VAE`.
        x: Images (B, C, H, W); binarise them first for a Bernoulli likelihood.
        num_samples: K importance samples from q(z|x).
        likelihood: ``"bernoulli"`` (pixels in {0, 1}) or ``"gaussian"`` (per-pixel log-variance ``logvar``).
        logvar: Gaussian log-variance, scalar or per channel (e.g. a trained ``gaussian_nll``'s).
        noise: Standard-normal draws (K, B, *latent_shape) to use instead of fresh ones (reproducible under
            sharding).

    Returns:
        ``{"log_px_iwae", "elbo", "recon_ll", "kl"}``, each (B,) in nats.
    """
    q = model.encode(x)
    kl = reduce(q.kl(), "b ... -> b", "sum")  # (B,) analytic KL over every latent element
    log_ws = []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        eps = noise[start : start + k].to(q.mean) if noise is not None else torch.randn(k, *q.mean.shape, device=x.device)
        z = q.mean.unsqueeze(0) + q.std.unsqueeze(0) * eps  # (k, B, *latent_shape)
        flat = z.flatten(0, 1)  # (k B, *latent_shape)
        xs = x.unsqueeze(0).expand(k, *x.shape).reshape(-1, *x.shape[1:])
        ll = rearrange(_log_likelihood(model, xs, flat, likelihood, logvar), "(k b) -> k b", k=k)
        log_pz = reduce(-0.5 * (z.pow(2) + math.log(2 * math.pi)), "k b ... -> k b", "sum")
        log_qz = reduce(-0.5 * (eps.pow(2) + math.log(2 * math.pi) + q.logvar.unsqueeze(0)), "k b ... -> k b", "sum")
        log_ws.append(ll + log_pz - log_qz)
        if start == 0:
            recon_ll = ll.mean(dim=0)  # (B,) Monte Carlo E_q[log p(x|z)]
    log_w = torch.cat(log_ws)  # (K, B)
    log_px = torch.logsumexp(log_w, dim=0) - math.log(num_samples)
    return {"log_px_iwae": log_px, "elbo": recon_ll - kl, "recon_ll": recon_ll, "kl": kl}


class LikelihoodBounds(Metric):
    """Negative ELBO and importance-sampled NLL, in nats per image and bits per dimension.

    Args:
        model: The VAE to evaluate (not a state; held by reference).
        num_samples: Importance samples per image (K).
        likelihood: ``"bernoulli"`` (inputs binarised at 0.5 of the range, stated in the results) or
            ``"gaussian"`` (with ``logvar``). The two are not comparable with each other.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, model, num_samples: int = 100, likelihood: str = "bernoulli",
                 logvar: Optional[Tensor] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        self.model, self.num_samples, self.likelihood, self.logvar = model, num_samples, likelihood, logvar
        for name in ("nll", "neg_elbo", "recon", "kl", "n"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("dims", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def per_image(self, x: Tensor, noise: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """The bounds of each image (B, C, H, W) in nats: ``{"log_px_iwae", "elbo", "recon_ll", "kl"}``, each (B,)
        (inputs binarised first for the Bernoulli likelihood); ``noise`` (K, B, *latent_shape) fixes the
        importance samples. :meth:`update` sums exactly these."""
        if self.likelihood == "bernoulli":
            low, high = self.model.value_range
            x = torch.where(x > (low + high) / 2, high, low).to(x.dtype)  # binarise
        return importance_sampled_log_likelihood(self.model, x, self.num_samples, self.likelihood, self.logvar,
                                                 noise=noise)

    def update(self, x: Tensor, noise: Optional[Tensor] = None) -> None:
        """Add images (B, C, H, W); ``noise`` (K, B, *latent_shape) fixes the importance samples."""
        r = self.per_image(x, noise)
        self.nll += -r["log_px_iwae"].double().sum()
        self.neg_elbo += -r["elbo"].double().sum()
        self.recon += -r["recon_ll"].double().sum()
        self.kl += r["kl"].double().sum()
        self.n += x.shape[0]
        self.dims = torch.tensor(float(x[0].numel()), dtype=torch.float64, device=self.dims.device)

    def compute(self) -> Dict[str, Tensor]:
        per = {k: getattr(self, k) / self.n for k in ("nll", "neg_elbo", "recon", "kl")}
        bpd = 1.0 / (self.dims * math.log(2.0))
        return {
            "nll_nats": per["nll"], "neg_elbo_nats": per["neg_elbo"],
            "recon_nats": per["recon"], "kl_nats": per["kl"],
            "nll_bits_per_dim": per["nll"] * bpd, "neg_elbo_bits_per_dim": per["neg_elbo"] * bpd,
        }


class ClassHistogram(Metric):
    """Counts of predicted classes of generated images (mode coverage) under a classifier.

    ``compute()`` returns the normalised histogram, its entropy (nats; log(10) = 2.30 for uniform
    digits), the number of classes holding at least ``min_share`` of the samples and the mean
    confidence (the top softmax probability: how recognisable the samples are as one class).
    """

    full_state_update = False

    def __init__(self, num_classes: int = 10, min_share: float = 0.02, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.min_share = num_classes, min_share
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("confidence", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor) -> None:
        self.counts += torch.bincount(logits.argmax(dim=1), minlength=self.num_classes).double()
        self.confidence += torch.softmax(logits.double(), dim=1).amax(dim=1).sum()

    def compute(self) -> Dict[str, Tensor]:
        n = self.counts.sum().clamp_min(1)
        p = self.counts / n
        entropy = -(p * p.clamp_min(1e-12).log()).sum()
        return {"histogram": p, "entropy": entropy, "classes_covered": (p >= self.min_share).sum(),
                "confidence": self.confidence / n}


class PrecisionRecall(Metric):
    """Improved precision and recall in feature space (Kynkäänniemi et al. 2019).

    Precision: share of generated features inside the k-NN balls of real features (fidelity);
    recall: share of real features inside the k-NN balls of generated ones (diversity).
    Features are concatenated across ranks; distances are computed in chunks.
    """

    full_state_update = False

    def __init__(self, k: int = 3, chunk: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k, self.chunk = k, chunk
        self.add_state("real", [], dist_reduce_fx="cat")
        self.add_state("fake", [], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(features.float())

    def _radii(self, feats: Tensor) -> Tensor:
        radii = []
        for i in range(0, len(feats), self.chunk):
            d = torch.cdist(feats[i : i + self.chunk], feats)
            radii.append(d.kthvalue(self.k + 1, dim=1).values)  # +1 skips the point itself
        return torch.cat(radii)

    def _coverage(self, queries: Tensor, support: Tensor, radii: Tensor) -> Tensor:
        inside = []
        for i in range(0, len(queries), self.chunk):
            d = torch.cdist(queries[i : i + self.chunk], support)
            inside.append((d <= radii.unsqueeze(0)).any(dim=1))
        return torch.cat(inside).float().mean()

    def compute(self) -> Dict[str, Tensor]:
        real = torch.cat(self.real) if isinstance(self.real, list) else self.real
        fake = torch.cat(self.fake) if isinstance(self.fake, list) else self.fake
        if min(len(real), len(fake)) <= self.k:  # no k-th neighbour: undefined (vaegan.evaluation reports why)
            nan = torch.tensor(float("nan"))
            return {"precision": nan, "recall": nan}
        return {"precision": self._coverage(fake, real, self._radii(real)),
                "recall": self._coverage(real, fake, self._radii(fake))}
