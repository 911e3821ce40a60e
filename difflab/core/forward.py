"""The forward (noising) process and the DDPM posterior.

VP form (Ho et al. 2020): q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I), eq. 4; posterior
q(x_{t-1} | x_t, x0) = N(mu~, beta~ I), eq. 6-7. The same posterior in the canonical frame
(x = x0 + sigma eps) is what the samplers use; tests check the two agree.
"""
from __future__ import annotations

import torch

from .denoiser import append_dims


def q_sample(x0: torch.Tensor, alpha_bar, noise: torch.Tensor) -> torch.Tensor:
    """Jump straight to step t: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (Ho et al. 2020, eq. 4)."""
    ab = append_dims(torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device).expand(x0.shape[0]), x0.ndim)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def ve_sample(x0: torch.Tensor, sigma, noise: torch.Tensor) -> torch.Tensor:
    """Canonical frame: x = x0 + sigma eps (Karras et al. 2022, eq. 2)."""
    s = append_dims(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device).expand(x0.shape[0]), x0.ndim)
    return x0 + s * noise


def noise_augment(x: torch.Tensor, sigma, noise: torch.Tensor) -> torch.Tensor:
    """Noise-conditioning augmentation of a conditioning image (Ho et al. 2022, "Cascaded Diffusion
    Models", Section 4.1: z_s = alpha_s z + sigma_s eps) in the variance-preserving form of a
    canonical level: (x + sigma eps) / sqrt(1 + sigma^2); sigma = 0 returns x unchanged."""
    s = append_dims(torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0]), x.ndim)
    return (x + s * noise) / (1 + s**2).sqrt()


def flow_sample(x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_t = (1 - t) x0 + t eps (Liu et al. 2023, eq. 1)."""
    t = append_dims(torch.as_tensor(t, dtype=x0.dtype, device=x0.device).expand(x0.shape[0]), x0.ndim)
    return (1 - t) * x0 + t * noise


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t, alpha_bar_prev):
    """Mean and variance of q(x_{t-1} | x_t, x0) for the VP process (Ho et al. 2020, eq. 6-7):
    mu = sqrt(ab_prev) beta_t / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_prev) / (1 - ab_t) x_t,
    beta~ = (1 - ab_prev) / (1 - ab_t) beta_t, with alpha_t = ab_t / ab_prev."""
    ab_t = torch.as_tensor(alpha_bar_t, dtype=x0.dtype, device=x0.device)
    ab_prev = torch.as_tensor(alpha_bar_prev, dtype=x0.dtype, device=x0.device)
    alpha_t = ab_t / ab_prev
    beta_t = 1 - alpha_t
    mean = ab_prev.sqrt() * beta_t / (1 - ab_t) * x0 + alpha_t.sqrt() * (1 - ab_prev) / (1 - ab_t) * x_t
    var = (1 - ab_prev) / (1 - ab_t) * beta_t
    return mean, var


def ve_posterior(x0: torch.Tensor, x: torch.Tensor, sigma, sigma_next):
    """q(x_next | x, x0) of the canonical Markov chain x_next -> x (adding variance sigma^2 -
    sigma_next^2): mean x0 + (sigma_next^2 / sigma^2)(x - x0), variance
    sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2. Equal to eq. 6-7 of Ho et al. 2020 divided
    by sqrt(ab_prev)."""
    r = (sigma_next / sigma) ** 2
    return x0 + r * (x - x0), sigma_next**2 * (1 - r)
