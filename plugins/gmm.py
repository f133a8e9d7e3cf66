"""``gmm``: a Gaussian mixture over the latents, fitted by scikit-learn, sampled in torch.

Fitting uses scikit-learn's ``GaussianMixture``: a well-kept EM with k-means initialisation, several
restarts and a covariance floor (``reg_covar``), which a hand-written torch EM would have to
re-implement and re-test. Sampling needs none of it: the weights, means and Cholesky factors are
buffers, drawn from with a ``torch.Generator``, so a saved mixture samples without scikit-learn and
gives the same latents for the same seed as the process that fitted it.

Example:
    >>> from vaegan.samplers import build_sampler
    >>> gmm = build_sampler("gmm", (2,), {"n_components": 2})
    >>> _ = gmm.fit(torch.cat([torch.randn(200, 2) - 4, torch.randn(200, 2) + 4]))
    >>> gmm.sample(5, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([5, 2])
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

import torch
from torch import Tensor

from vaegan.errors import DataError
from vaegan.progress import Phase
from vaegan.samplers import LatentSampler, check_size

__all__ = ["GaussianMixtureSampler"]

Covariance = Literal["full", "tied", "diag", "spherical"]


class GaussianMixtureSampler(LatentSampler):
    """A mixture of ``n_components`` Gaussians fitted to the flattened latents (any latent shape).

    Args:
        latent_shape: Shape of one latent.
        n_components: Mixture components (50 fills the MNIST posterior's modes; see docs/benchmarks.md).
        covariance_type: ``full`` (one full covariance per component), ``tied`` (one shared), ``diag``
            or ``spherical``; ``diag`` keeps a spatial latent's mixture small.
        reg_covar: Added to the covariances' diagonals (scikit-learn's floor against singular components).
        max_iter: EM iterations per initialisation.
        n_init: Initialisations; the best one is kept.

    Raises:
        ConfigError: an unknown covariance type, or a mixture too large for the latent (use ``diag``).
    """

    def __init__(self, latent_shape, n_components: int = 50, covariance_type: Covariance = "full",
                 reg_covar: float = 1e-4, max_iter: int = 200, n_init: int = 1) -> None:
        super().__init__(latent_shape)
        if covariance_type not in ("full", "tied", "diag", "spherical"):
            raise ValueError(f"covariance_type must be full, tied, diag or spherical, got {covariance_type!r}")
        if n_components < 1 or max_iter < 1 or n_init < 1 or not reg_covar >= 0:
            raise ValueError("n_components, max_iter and n_init must be >= 1 and reg_covar >= 0")
        self.n_components, self.covariance_type = int(n_components), covariance_type
        self.reg_covar, self.max_iter, self.n_init = float(reg_covar), int(max_iter), int(n_init)
        self.min_latents = max(2, self.n_components)
        k, d = self.n_components, self.dim
        full = covariance_type in ("full", "tied")
        check_size(self, k * d * (d if full else 1),
                   "Use covariance_type: diag (one variance per latent element), fewer components, or another sampler.")
        self.register_buffer("weights", torch.full((k,), 1.0 / k))  # (K,)
        self.register_buffer("means", torch.zeros(k, d))  # (K, D)
        # Cholesky factors of the covariances: (K, D, D) lower-triangular, or (K, D) standard deviations.
        self.register_buffer("scales", torch.zeros(k, d, d) if full else torch.ones(k, d))

    def check_state(self) -> None:
        """The weights a probability vector (>= 0, summing to 1) and the scales' diagonals > 0.

        Raises:
            ValueError: naming what is wrong.
        """
        w = self.weights.double()
        if bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-4:
            raise ValueError(f"its mixture weights must be >= 0 and sum to 1, got {[round(float(v), 4) for v in w]}.")
        diag = self.scales.diagonal(dim1=-2, dim2=-1) if self.scales.dim() == 3 else self.scales
        if not bool((diag > 0).all()):
            raise ValueError("its scales (standard deviations, or the Cholesky factors' diagonals) must be > 0.")

    def fit_plan(self) -> str:
        return (f"a {self.n_components}-component {self.covariance_type}-covariance mixture (k-means, then up to "
                f"{self.max_iter * self.n_init} EM iterations)")

    def fit_latents(self, latents: Tensor, seed: int) -> Dict[str, Any]:
        from sklearn.mixture import GaussianMixture

        x = latents.detach().flatten(1).double().cpu().numpy()  # (N, D)
        if x.shape[0] < self.min_latents:
            raise DataError(f"A mixture of {self.n_components} components needs at least that many latents to fit; got "
                            f"{x.shape[0]}. Fit on more images or lower n_components.")
        with Phase(f"{self.name or 'gmm'} fit", total=self.max_iter * self.n_init, unit="EM iterations",
                   bound=True) as phase:
            gm = _reporting(GaussianMixture, phase)(
                self.n_components, covariance_type=self.covariance_type, reg_covar=self.reg_covar,
                max_iter=self.max_iter, n_init=self.n_init, random_state=seed).fit(x)
        cov = torch.from_numpy(gm.covariances_)
        k, d = self.n_components, self.dim
        if self.covariance_type == "full":
            scales = torch.linalg.cholesky(cov)  # (K, D, D)
        elif self.covariance_type == "tied":
            scales = torch.linalg.cholesky(cov).expand(k, d, d)
        elif self.covariance_type == "diag":
            scales = cov.sqrt()  # (K, D)
        else:  # spherical: one variance per component
            scales = cov.sqrt()[:, None].expand(k, d)
        self.weights.copy_(torch.from_numpy(gm.weights_))
        self.means.copy_(torch.from_numpy(gm.means_))
        self.scales.copy_(scales)
        return {"avg_log_likelihood": float(gm.score(x)), "converged": bool(gm.converged_), "em_iterations": int(gm.n_iter_)}

    def draw(self, n: int, generator: Optional[torch.Generator], temperature: float) -> Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype) * temperature  # (n, D)
        if self.scales.ndim == 3:
            z = self.means[comp] + torch.einsum("nij,nj->ni", self.scales[comp], eps)
        else:
            z = self.means[comp] + self.scales[comp] * eps
        return z.view(n, *self.latent_shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """log density of latents (N, *latent_shape) under the mixture, (N,)."""
        x = z.flatten(1).to(self.means)
        if self.scales.ndim == 3:
            comp = torch.distributions.MultivariateNormal(self.means, scale_tril=self.scales)
        else:
            comp = torch.distributions.Independent(torch.distributions.Normal(self.means, self.scales), 1)
        mix = torch.distributions.Categorical(probs=self.weights)
        return torch.distributions.MixtureSameFamily(mix, comp).log_prob(x)


def _reporting(base: type, phase: Phase) -> type:
    """``GaussianMixture`` that moves ``phase`` by one per EM iteration.

    scikit-learn has no progress callback; its EM loop calls ``_print_verbose_msg_iter_end`` once per iteration
    (and does nothing there unless ``verbose``), so overriding that hook reports progress without changing the
    fit. A scikit-learn without the hook fits the same, with no progress shown.
    """

    class Reporting(base):  # type: ignore[misc, valid-type]
        def _print_verbose_msg_iter_end(self, n_iter, diff_ll):
            phase.update(1)
            super()._print_verbose_msg_iter_end(n_iter, diff_ll)

    Reporting.__name__ = Reporting.__qualname__ = base.__name__
    return Reporting
