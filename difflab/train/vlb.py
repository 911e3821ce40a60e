"""The variational bound of DDPM and improved DDPM's hybrid loss, one value per example.

For a discrete VP model with steps t = 0 .. T-1 (0 least noisy), the bound on -log p(x0) is
(Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eq. 4-6)::

    L_vlb = L_0 + L_1 + ... + L_{T-1} + L_T
    L_t   = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))     t > 0
    L_0   = -log p(x0 | x_0)                                   the discretized decoder

with p(x_{t-1} | x_t) = N(mu_theta, Sigma_theta): mu_theta is the posterior mean of
q(x_{t-1} | x_t, x0_hat) (eq. 7 with the model's x0_hat; :func:`difflab.core.q_posterior`) and
Sigma_theta the learned interpolation exp(v log beta_t + (1 - v) log beta~_t) (eq. 15;
:func:`difflab.core.denoiser.learned_log_variance`). L_T (the prior) has no parameters and is left out.

Units: every term is in **bits per dimension** (nats / ln 2, averaged over the dimensions of an
example), as in the paper's code. The VP frame is the network's own: its input x_in = sqrt(ab_t) x0
+ sqrt(1 - ab_t) eps is x_t. As in the paper's code, beta~_0 = 0 is replaced by beta~_1 (the
decoder's variance interpolates between beta_0 and beta~_1).

The hybrid loss (eq. 16) is L_simple + lambda L_vlb with a stop-gradient on the mean in the vlb
term, so L_vlb trains only the variance. L_vlb is estimated by T L_t with t uniform, so lambda =
0.001 at T = 1000 weighs L_t by 1 (the paper's code: ``vb *= num_timesteps / 1000``). The
importance-sampled t of section 3.3 (for training on L_vlb alone) is not implemented.
"""
from __future__ import annotations

import math

import torch
from torch import special

from difflab.core import VPDiscrete, append_dims, params, q_posterior, ve_sample
from difflab.core.denoiser import learned_log_variance

from .losses import weighted_mse

# ----------------------------------------------------------------------------------------------
# Densities


def normal_kl(mean1: torch.Tensor, logvar1, mean2: torch.Tensor, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (Ho et al. 2020, eq. 5:
    "the KL divergences ... are comparisons between Gaussians, computed in closed form"):
    (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1) / 2."""
    logvar1 = torch.as_tensor(logvar1, dtype=mean1.dtype, device=mean1.device)
    logvar2 = torch.as_tensor(logvar2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp() - 1)


def _log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, evaluated in the lower tail (by symmetry) so that it stays
    accurate far from the mean."""
    flip = a > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_a, log_b = special.log_ndtr(a), special.log_ndtr(b)
    return log_b + (-torch.expm1(log_a - log_b)).clamp(min=1e-12).log()


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, log_scale, bins: int = 256) -> torch.Tensor:
    """log p(x0) per element under the discretized Gaussian decoder of Ho et al. 2020, eq. 13:
    N(mean, e^(2 log_scale)) integrated over the bin of x0, in nats. Data in [-1, 1] take ``bins``
    values (bin width 2 / (bins - 1)); the first and last bins reach out to -inf and +inf, so the
    probabilities of the ``bins`` values sum to 1."""
    log_scale = torch.as_tensor(log_scale, dtype=mean.dtype, device=mean.device)
    half = 1.0 / (bins - 1)
    inv_scale = (-log_scale).exp()
    lo, hi = (x0 - mean - half) * inv_scale, (x0 - mean + half) * inv_scale
    first = special.log_ndtr(hi)   # x0 = -1: Phi(hi)
    last = special.log_ndtr(-lo)   # x0 = +1: 1 - Phi(lo)
    return torch.where(x0 < -1 + half, first, torch.where(x0 > 1 - half, last, _log_ndtr_diff(lo, hi)))


# ----------------------------------------------------------------------------------------------
# The terms L_t


def training_steps(frame, sigma: torch.Tensor) -> torch.Tensor:
    """The training step t (long, shape (B,)) of each canonical ``sigma``, which must lie on the
    frame's grid of training levels (``noise_level="discrete_uniform"``)."""
    if not isinstance(frame, VPDiscrete):
        raise ValueError(f"the VLB is defined on the discrete steps of a VPDiscrete frame, got {type(frame).__name__}")
    t_frac = frame.time(torch.as_tensor(sigma).detach().to(torch.float64))
    t = t_frac.round()
    if bool(((t_frac - t).abs() > 1e-3).any()):
        raise ValueError("the VLB needs sigmas on the training steps of the frame (noise_level='discrete_uniform'); "
                         f"got fractional steps {t_frac[(t_frac - t).abs() > 1e-3][:4].tolist()}")
    return t.long()


def step_variances(frame: VPDiscrete) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta_t, beta~_t) of every training step t = 0 .. T-1, float64: beta_t = 1 - ab_t / ab_{t-1}
    (ab_{-1} = 1) and the posterior variance beta~_t of q(x_{t-1} | x_t, x0) (Ho et al. 2020,
    eq. 7), with beta~_0 = 0 replaced by beta~_1 as in Nichol & Dhariwal's code."""
    ab = frame.alpha_bars
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1 - ab / ab_prev
    _, beta_tilde = q_posterior(ab.new_zeros(()), ab.new_zeros(()), ab, ab_prev)
    return beta, torch.cat([beta_tilde[1:2], beta_tilde[1:]])


def vlb_terms(frame: VPDiscrete, t: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, x0_hat: torch.Tensor,
              v: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """L_t of each example in bits per dimension, shape (B,) (Nichol & Dhariwal 2021, eq. 4-6;
    Ho et al. 2020, eq. 5 and 13): the Gaussian KL between q(x_{t-1} | x_t, x0) and
    p(x_{t-1} | x_t) = N(mu(x_t, x0_hat), Sigma(v)) for t > 0, the decoder NLL -log p(x0 | x_0)
    for t = 0.

    ``t`` (B,) long training steps; ``x_t`` the VP noisy sample sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
    (the network input); ``x0_hat`` the model's estimate of x0; ``v`` in [0, 1] shaped like x0.
    """
    ab = frame.alpha_bars.to(x0.device)
    t = t.to(x0.device)
    ab_t = append_dims(ab[t], x0.ndim).to(x0.dtype)
    ab_prev = append_dims(torch.where(t > 0, ab[(t - 1).clamp(min=0)], torch.ones_like(ab[t])), x0.ndim).to(x0.dtype)
    beta, beta_tilde = (append_dims(b.to(x0.device)[t], x0.ndim).to(x0.dtype) for b in step_variances(frame))

    true_mean, _ = q_posterior(x0, x_t, ab_t, ab_prev)
    model_mean, _ = q_posterior(x0_hat, x_t, ab_t, ab_prev)  # eq. 7 with x0_hat; = x0_hat at t = 0
    model_logvar = learned_log_variance(v, beta, beta_tilde)
    kl = normal_kl(true_mean, beta_tilde.log(), model_mean, model_logvar)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar, bins)
    per_dim = torch.where(append_dims(t == 0, x0.ndim), nll, kl)
    return per_dim.reshape(per_dim.shape[0], -1).mean(1) / math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Losses over a denoiser


def _forward(denoiser, x0: torch.Tensor, sigma, noise: torch.Tensor, extra_args: dict | None):
    if not getattr(denoiser, "learned_variance", False):
        raise ValueError("the VLB needs a learned-variance denoiser: Denoiser(net, frame, prediction, learned_variance=True)")
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x0.shape[0])
    t = training_steps(denoiser.frame, sigma)
    x = ve_sample(x0, sigma, noise)
    out, v, x_in, alpha, sigma_in = denoiser.net_output_and_v(x, sigma, **(extra_args or {}))
    return sigma, t, out, v, x_in, alpha, sigma_in


def _x0_hat(denoiser, out, x_in, alpha, sigma_in):
    return params.to_x0_eps(out, denoiser.prediction, x_in, alpha, sigma_in, denoiser.sigma_data)[0]


def vlb_loss(denoiser, x0: torch.Tensor, sigma, noise: torch.Tensor, *, extra_args: dict | None = None,
             bins: int = 256) -> torch.Tensor:
    """L_t per example in bits per dimension, shape (B,), at the training step t of each ``sigma``
    (Nichol & Dhariwal 2021, eq. 4-6), with gradients into both mean and variance; T times its mean
    over uniform t is an estimate of L_vlb - L_T. ``x0`` is data in [-1, 1] (``bins`` levels)."""
    _, t, out, v, x_in, alpha, sigma_in = _forward(denoiser, x0, sigma, noise, extra_args)
    return vlb_terms(denoiser.frame, t, x0, x_in, _x0_hat(denoiser, out, x_in, alpha, sigma_in), v, bins)


def hybrid_terms(denoiser, x0: torch.Tensor, sigma, noise: torch.Tensor, *, weighting: str = "simple",
                 min_snr_gamma: float = 5.0, extra_args: dict | None = None, bins: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_simple, L_t) per example from one network call (Nichol & Dhariwal 2021, eq. 16):
    L_simple the weighted MSE of :func:`difflab.train.losses.diffusion_loss` on the first C
    channels; L_t (bits per dimension) of :func:`vlb_terms` with a stop-gradient on the mean, so
    it trains only the variance channels."""
    sigma, t, out, v, x_in, alpha, sigma_in = _forward(denoiser, x0, sigma, noise, extra_args)
    simple = weighted_mse(denoiser, out, denoiser.target(x0, noise, sigma), alpha, sigma_in, weighting=weighting,
                          min_snr_gamma=min_snr_gamma)
    x0_hat = _x0_hat(denoiser, out.detach(), x_in, alpha, sigma_in)
    return simple, vlb_terms(denoiser.frame, t, x0, x_in, x0_hat, v, bins)


def hybrid_loss(denoiser, x0: torch.Tensor, sigma, noise: torch.Tensor, *, vlb_weight: float = 0.001,
                weighting: str = "simple", min_snr_gamma: float = 5.0, extra_args: dict | None = None,
                bins: int = 256) -> torch.Tensor:
    """L_hybrid = L_simple + lambda L_vlb per example, shape (B,) (Nichol & Dhariwal 2021, eq. 16),
    lambda = ``vlb_weight``, L_vlb estimated by T L_t (see the module doc) with the mean's gradient
    stopped. Needs ``Denoiser(..., learned_variance=True)`` on a VPDiscrete frame and sigmas on
    its training steps."""
    simple, vlb = hybrid_terms(denoiser, x0, sigma, noise, weighting=weighting, min_snr_gamma=min_snr_gamma,
                               extra_args=extra_args, bins=bins)
    return simple + vlb_weight * denoiser.frame.T * vlb


__all__ = ["normal_kl", "discretized_gaussian_log_likelihood", "training_steps", "step_variances", "vlb_terms",
           "vlb_loss", "hybrid_terms", "hybrid_loss"]
