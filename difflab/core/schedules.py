"""Noise schedules: how much signal survives at each time.

Everything here returns ``alpha_bar`` (the signal fraction of the VP forward process,
``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``) or converts it. The canonical noise
level used by the rest of difflab is the VE sigma, ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``,
so that ``x_t / sqrt(alpha_bar) = x0 + sigma * eps`` (Karras et al. 2022, section 2).

Discrete schedules take the number of training steps ``T`` and return a float64 tensor of
``T`` values of ``alpha_bar`` (index 0 is the least noisy). Continuous schedules are functions
of ``t`` in [0, 1].
"""
from __future__ import annotations

import math

import torch

DISCRETE_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")


# ----------------------------------------------------------------------------
# Conversions between alpha_bar, sigma and log-SNR (one place for all of them).

def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """VE sigma of a VP level: sigma^2 = (1 - alpha_bar) / alpha_bar (Karras et al. 2022, Table 1)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sigma_from_alpha_bar`: alpha_bar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def log_snr_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_bar / (1 - alpha_bar)) = -2 log sigma (Kingma et al. 2021, eq. 2)."""
    return -2 * torch.log(sigma)


def sigma_from_log_snr(log_snr: torch.Tensor) -> torch.Tensor:
    return torch.exp(-log_snr / 2)


# ----------------------------------------------------------------------------
# Discrete schedules (T training steps).

def betas_linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear betas (Ho et al. 2020, section 4), scaled so T=1000 gives 1e-4..0.02."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def betas_scaled_linear(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: linear in sqrt(beta) (Rombach et al. 2022)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def betas_sigmoid(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """GeoDiff's sigmoid betas (Xu et al. 2022): sigmoid(linspace(-6, 6)) mapped to [start, end]."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Improved DDPM's cosine schedule f(t)/f(0), f(t) = cos((t + s)/(1 + s) * pi/2)^2
    (Nichol & Dhariwal 2021, eq. 17), for continuous t in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def betas_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Discrete cosine betas: beta_t = 1 - alpha_bar(t/T) / alpha_bar((t-1)/T), clipped at
    ``max_beta`` (Nichol & Dhariwal 2021, section 3.2)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    ab = cosine_alpha_bar(steps, s)
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def alpha_bars_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that the last step has SNR exactly 0 while the first
    keeps its value (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Algorithm 1)."""
    sqrt_ab = alpha_bars_from_betas(betas).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def discrete_alpha_bars(name: str, T: int = 1000, *, zero_terminal_snr: bool = False, **kwargs) -> torch.Tensor:
    """alpha_bar for ``T`` discrete steps of the named schedule (float64, index 0 least noisy).

    ``name`` is one of ``linear``, ``scaled_linear``, ``cosine``, ``sigmoid``; keyword
    arguments go to the beta function (``beta_start``, ``beta_end`` or ``s``).
    """
    makers = {"linear": betas_linear, "scaled_linear": betas_scaled_linear,
              "cosine": betas_cosine, "sigmoid": betas_sigmoid}
    if name not in makers:
        raise ValueError(f"schedule={name!r} is not a discrete schedule; choose one of {sorted(makers)}")
    if T < 2:
        raise ValueError(f"T={T} must be at least 2")
    betas = makers[name](T, **kwargs)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return alpha_bars_from_betas(betas)


# ----------------------------------------------------------------------------
# Continuous-time schedules, t in [0, 1].

def vp_linear_alpha_bar(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """The VP-SDE's alpha_bar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)
    (Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 33)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.exp(-beta_min * t - 0.5 * (beta_max - beta_min) * t**2)


def sigmoid_alpha_bar(t: torch.Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Continuous sigmoid schedule (Chen 2023, "On the Importance of Noise Scheduling",
    Algorithm 1): alpha_bar(t) = (sig(end/tau) - sig((t(end-start)+start)/tau)) / (sig(end/tau) - sig(start/tau))."""
    t = torch.as_tensor(t, dtype=torch.float64)
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
    out = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return out.clamp(0, 1)


def resolution_shift(size: int, base: int = 64) -> float:
    """The factor by which a schedule tuned at ``base`` x ``base`` should scale sigma at ``size`` x
    ``size``: size / base. Average-pooling a size-s image by k = s / base divides its noise std by k,
    so the noise a model sees at the base resolution's scale matches the base schedule only when
    sigma is k times larger. Hoogeboom et al. 2023 ("simple diffusion", Section 3.1, eq. 4) shift
    the log-SNR by 2 log(base / size); SD3's time shift t' = a t / (1 + (a - 1) t) with
    a = sqrt(m / n), m and n the pixel counts (Esser et al. 2024, Section 5.3.2, eq. 23), is, for
    square images, sigma' = t' / (1 - t') = (size / base) sigma: the same shift."""
    if not (isinstance(size, int) and size >= 1 and isinstance(base, int) and base >= 1):
        raise ValueError(f"size={size!r} and base={base!r} must be positive ints (image side lengths)")
    return size / base


def shifted_cosine_alpha_bar(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Simple diffusion's shifted cosine schedule (Hoogeboom et al. 2023, Section 3.1, eq. 4):
    log-SNR(t) = -2 log tan(pi t / 2) - 2 log(shift), with shift = size / base
    (:func:`resolution_shift`); alpha_bar = sigmoid(log-SNR), so sigma(t) = shift tan(pi t / 2).
    shift = 1 is the cosine schedule with s = 0."""
    if not shift > 0:
        raise ValueError(f"shift={shift} must be > 0")
    t = torch.as_tensor(t, dtype=torch.float64)
    log_snr = -2 * torch.log(torch.tan(math.pi * t / 2)) - 2 * math.log(shift)
    return torch.sigmoid(log_snr)


CONTINUOUS_SCHEDULES = {"cosine": cosine_alpha_bar, "linear": vp_linear_alpha_bar, "sigmoid": sigmoid_alpha_bar,
                        "shifted_cosine": shifted_cosine_alpha_bar}


def flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """Rectified flow x_t = (1 - t) x0 + t eps (Liu et al. 2023; Lipman et al. 2023) as a VE
    level: dividing by (1 - t) gives x0 + t/(1 - t) eps, so sigma = t / (1 - t)."""
    t = torch.as_tensor(t)
    return t / (1 - t)


def flow_t(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flow_sigma`: t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


# Inverses t(alpha_bar) of the continuous schedules, so a frame can map a noise level back to
# the time its network was trained with.

def cosine_t(alpha_bar: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return torch.acos((alpha_bar * f0).clamp(0, 1).sqrt()) * 2 / math.pi * (1 + s) - s


def vp_linear_t(alpha_bar: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    d = beta_max - beta_min
    return (-beta_min + (beta_min**2 - 2 * d * torch.log(alpha_bar)).sqrt()) / d


def sigmoid_t(alpha_bar: torch.Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
    u = torch.logit(v_end - alpha_bar * (v_end - v_start))
    return (u * tau - start) / (end - start)


def shifted_cosine_t(alpha_bar: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`shifted_cosine_alpha_bar`: t = (2 / pi) atan(sigma / shift)."""
    return torch.atan(sigma_from_alpha_bar(alpha_bar) / shift) * 2 / math.pi


CONTINUOUS_INVERSES = {"cosine": cosine_t, "linear": vp_linear_t, "sigmoid": sigmoid_t, "shifted_cosine": shifted_cosine_t}
