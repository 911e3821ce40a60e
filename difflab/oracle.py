"""Closed-form test beds: data whose ideal denoiser and probability-flow ODE are known exactly.

A sampler is right when, given the exact denoiser of the data, it reproduces the exact ODE
solution (deterministic samplers, at their convergence order) or the data distribution itself
(stochastic samplers). Everything here is float64, in the canonical frame x = x0 + sigma eps.
"""
from __future__ import annotations

import math

import torch


class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, Sigma_k) in d dimensions, with its exact denoiser.

    ``covs`` is (K, d, d), or (K, d) for diagonal covariances, or (K,) for isotropic ones.
    Samples are (B, d); the denoiser accepts any (B, ...) with d elements per sample.
    """

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        K, d = self.means.shape
        if covs.shape == (K,):
            covs = covs[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif covs.shape == (K, d):
            covs = torch.diag_embed(covs)
        if self.weights.shape != (K,) or covs.shape != (K, d, d):
            raise ValueError(f"need weights (K,), means (K, d), covs (K, d, d); got {tuple(self.weights.shape)}, "
                             f"{tuple(self.means.shape)}, {tuple(covs.shape)}")
        if bool((self.weights < 0).any()) or not math.isclose(float(self.weights.sum()), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights must be non-negative and sum to 1, got {self.weights.tolist()}")
        self.covs = covs
        self.chol = torch.linalg.cholesky(covs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - torch.outer(self.mean, self.mean)

    def denoiser(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """E[x0 | x0 + sigma eps = x]: with C_k = Sigma_k + sigma^2 I and responsibilities
        r_k proportional to w_k N(x; mu_k, C_k), sum_k r_k (mu_k + Sigma_k C_k^-1 (x - mu_k))
        (the Gaussian-mixture posterior mean with alpha = 1; ``cond`` is ignored)."""
        y = x.reshape(x.shape[0], -1).to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).expand(x.shape[0]) ** 2
        eye = torch.eye(self.dim, dtype=torch.float64, device=y.device)
        C = self.covs.to(y.device) + s2[:, None, None, None] * eye  # (B, K, d, d)
        L = torch.linalg.cholesky(C)
        diff = y[:, None, :] - self.means.to(y.device)  # (B, K, d)
        sol = torch.cholesky_solve(diff[..., None], L)[..., 0]  # C_k^-1 (x - mu_k)
        log_det = 2 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)
        logits = self.weights.to(y.device).log() - 0.5 * (diff * sol).sum(-1) - 0.5 * log_det
        r = torch.softmax(logits, dim=1)
        post = self.means.to(y.device) + (self.covs.to(y.device) @ sol[..., None])[..., 0]
        return (r[..., None] * post).sum(1).reshape(x.shape).to(x.dtype)

    __call__ = denoiser

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x0, shape (n, d)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (self.chol[k] @ z[..., None])[..., 0]

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log p(x0) for x0 of shape (B, d)."""
        x0 = x0.to(torch.float64)
        diff = x0[:, None, :] - self.means  # (B, K, d)
        z = torch.linalg.solve_triangular(self.chol, diff[..., None], upper=False)[..., 0]
        log_det = 2 * torch.diagonal(self.chol, dim1=-2, dim2=-1).log().sum(-1)
        log_n = -0.5 * (z**2).sum(-1) - 0.5 * log_det - 0.5 * self.dim * math.log(2 * math.pi)
        return torch.logsumexp(self.weights.log() + log_n, dim=1)


def single_gaussian_ode(x_start: torch.Tensor, sigma_start: float, sigma_end: float, mu, s: float) -> torch.Tensor:
    """Exact probability-flow ODE solution for data N(mu, s^2 I) (Karras et al. 2022, eq. 4):
    x(sigma_end) = mu + (x(sigma_start) - mu) sqrt((s^2 + sigma_end^2) / (s^2 + sigma_start^2))."""
    mu = torch.as_tensor(mu, dtype=x_start.dtype, device=x_start.device)
    return mu + (x_start - mu) * math.sqrt((s**2 + sigma_end**2) / (s**2 + sigma_start**2))
