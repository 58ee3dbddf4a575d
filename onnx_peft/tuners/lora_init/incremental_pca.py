"""Incremental PCA in torch: principal directions of a stream of activation batches.

EVA (eva.py) feeds each batch of a layer's inputs ``X [tokens, in]`` to :meth:`partial_fit`;
after each call ``components_ [k, in]`` holds the top-k right singular vectors of all the
centred data seen so far, ``explained_variance_ratio_ [k]`` their share of the total variance.
The update is scikit-learn's (Ross et al., 2008): stack the previous components scaled by their
singular values, the new centred batch and a mean-correction row, and take one SVD of that
``[k + tokens + 1, in]`` matrix. The SVD is ``torch.svd_lowrank`` (q = 2k, 4 power iterations)
under a fixed seed, and signs follow scikit-learn's ``svd_flip`` on V (the largest entry of
each component is positive), so a run is reproducible and matches PEFT's EVA.
"""

from __future__ import annotations

import torch


class IncrementalPCA:
    """Top ``n_components`` principal directions of everything passed to :meth:`partial_fit`."""

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4) -> None:
        self.n_components = n_components
        self.q = 2 * n_components
        self.seed = seed
        self.niter = niter
        self.components_: torch.Tensor | None = None
        self.singular_values_: torch.Tensor | None = None
        self.explained_variance_ratio_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self.var_: torch.Tensor | None = None
        self.n_samples_seen_ = torch.tensor([0])

    def _svd(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Singular values ``[q]`` and right singular vectors ``[q, in]`` with svd_flip's signs."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            _, S, V = torch.svd_lowrank(X, q=self.q, niter=self.niter)
        Vt = V.mH
        largest = torch.argmax(torch.abs(Vt), dim=1)
        signs = torch.sign(Vt[range(Vt.shape[0]), largest])
        return S, Vt * signs.view(-1, 1)

    def _mean_and_var(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Running mean and variance ``[in]`` (float64) and sample count after adding ``X``."""
        n_new = torch.tensor([X.shape[0]], device=X.device)
        n_total = self.n_samples_seen_ + n_new
        last_sum = (torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if self.mean_ is None
                    else self.mean_ * self.n_samples_seen_)
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / n_total
        centred = X - new_sum / n_new
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        new_unnormalized = centred.square().sum(dim=0, dtype=torch.float64) - correction / n_new
        if self.var_ is None:
            return mean, new_unnormalized / n_total, n_total
        ratio = self.n_samples_seen_.double() / n_new
        unnormalized = (self.var_ * self.n_samples_seen_ + new_unnormalized
                        + ratio / n_total * (last_sum / ratio - new_sum).square())
        return mean, unnormalized / n_total, n_total

    @torch.no_grad()
    def partial_fit(self, X: torch.Tensor) -> IncrementalPCA:
        """Add a batch ``X [tokens, in]`` (tokens >= n_components) and update the components."""
        X = X.to(torch.float32).clone()
        mean, var, n_total = self._mean_and_var(X)
        if self.components_ is None:
            X -= mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / n_total) * X.shape[0])
            X = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, X,
                              factor * (self.mean_ - batch_mean)))
        S, Vt = self._svd(X)
        self.n_samples_seen_, self.mean_, self.var_ = n_total, mean, var
        self.components_ = Vt[: self.n_components]
        self.singular_values_ = S[: self.n_components]
        self.explained_variance_ratio_ = (S**2 / torch.sum(var * n_total))[: self.n_components]
        return self
