"""The Frechet distance between two Gaussians, the core of FID (Heusel et al. 2017, eq. 2):

    d^2 = |mu_1 - mu_2|^2 + tr(C_1) + tr(C_2) - 2 tr((C_1 C_2)^(1/2))    (Dowson & Landau 1982)

C_1 C_2 is not symmetric, so instead of a general matrix square root (scipy.linalg.sqrtm, which
can return complex noise) we use tr((C_1 C_2)^(1/2)) = tr((S C_2 S)^(1/2)) with S = C_1^(1/2):
S C_2 S is symmetric positive semi-definite and shares the eigenvalues of C_1 C_2, so the trace is
sum_i sqrt(lambda_i) from two symmetric eigen-decompositions, in float64.
"""
from __future__ import annotations

import torch


def _float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def feature_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64 (as pytorch-fid's
    ``np.cov(rowvar=False)``)."""
    f = _float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sqrt_psd(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative rounding-error eigenvalues -> 0)."""
    lam, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * lam.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(cov1, cov2) -> float:
    """tr((C_1 C_2)^(1/2)) = sum_i sqrt(eig_i(S C_2 S)), S = C_1^(1/2), for symmetric PSD C_1, C_2.

    Eigenvalues below the float64 rounding floor (eps * lambda_max * D) are treated as 0: for a
    singular covariance their square roots would otherwise add up to about D sqrt(eps lambda_max)."""
    s = _sqrt_psd(_float64(cov1))
    m = s @ _float64(cov2) @ s
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    floor = torch.finfo(torch.float64).eps * eig.abs().max().clamp(min=1e-300) * len(eig)
    return torch.where(eig > floor, eig, torch.zeros_like(eig)).sqrt().sum().item()


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2)
    (Heusel et al. 2017, eq. 2), in float64. It is the *squared* distance, as FID reports it."""
    mu1, mu2, cov1, cov2 = (_float64(a) for a in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"shapes do not match: mu1 {tuple(mu1.shape)}, cov1 {tuple(cov1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, cov2 {tuple(cov2.shape)}"
        )
    diff = mu1 - mu2
    return (diff @ diff + cov1.trace() + cov2.trace()).item() - 2 * trace_sqrt_product(cov1, cov2)


def frechet_distance_features(features_a, features_b) -> float:
    """:func:`frechet_distance` between Gaussians fitted to two sets of (N, D) features."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))
