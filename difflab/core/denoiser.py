"""The one denoiser contract, and the frames that map every model onto it.

difflab's canonical frame is EDM's (Karras et al. 2022, eq. 1-3): a noisy sample is
``x = x0 + sigma * eps`` and every model, whatever it predicts and however it was trained, is
wrapped once into a denoiser::

    D(x, sigma, **cond) -> x0_hat

Samplers, guidance and losses see only this. A *frame* says how the canonical ``(x, sigma)``
maps to the network's own input and time (Karras et al. 2022, Table 1, "scaling s(t)" and
"c_noise"):

============  ====================  ==========================  ========================
frame         network input          network time                prior at sigma_max
============  ====================  ==========================  ========================
VPDiscrete    x / sqrt(1 + s^2)      fractional step index t     sqrt(1 + s^2)
VPContinuous  x / sqrt(1 + s^2)      t in [0, 1] * time_scale     sqrt(1 + s^2)
VE            x                      sigma, or log(sigma) / 4    sigma
EDM           x / sqrt(s^2 + sd^2)   log(sigma) / 4              sigma
Flow          x / (1 + s)            s / (1 + s) * time_scale     1 + s
============  ====================  ==========================  ========================

Levels with no finite sigma are replaced by a large finite one, as diffusers does: a zero
alpha_bar (zero terminal SNR) by min(2**-24, a quarter of the smallest positive alpha_bar), i.e.
sigma >= 4096; flow's t = 1 by sigma = 4096. Sampler arithmetic stays finite and the network
sees an input within about 1e-7 of pure noise.

Flow's t = 1 also has an exact level for the flow samplers, ``FLOW_SIGMA_ONE`` = 2**53: there
1 + s rounds to s in float64 and float32, so t = s / (1 + s) is exactly 1, the prior sample is
``randn * 2**53`` and the network's input x / (1 + s) is exactly the noise (a power-of-two
scaling), as in diffusers' flow schedulers. Only :mod:`difflab.samplers.flow` steps from it
(it works in the flow frame, x_t = x / (1 + s)); the other samplers refuse a grid that starts
there (:func:`difflab.samplers.common.prepare`).
"""
from __future__ import annotations

import torch
from torch import nn

from . import schedules
from .params import check_prediction, from_x0_eps, to_x0_eps

ALPHA_BAR_MIN = 2.0**-24
SIGMA_MAX_FINITE = (1 / ALPHA_BAR_MIN - 1) ** 0.5
FLOW_SIGMA_ONE = 2.0**53  # flow's t = 1 exactly, for the flow samplers (see above)


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Give a (B,) tensor trailing singleton dims so it broadcasts against a (B, ...) tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class VPDiscrete:
    """Variance-preserving model trained on ``T`` discrete steps (DDPM; Ho et al. 2020).

    ``time(sigma)`` interpolates the step index linearly in log sigma, exactly as k-diffusion
    does for discrete models, so a sigma on the training grid gives its integer step back.
    """

    def __init__(self, alpha_bars: torch.Tensor):
        alpha_bars = torch.as_tensor(alpha_bars, dtype=torch.float64)
        if alpha_bars.ndim != 1 or len(alpha_bars) < 2:
            raise ValueError(f"alpha_bars must be a 1-D tensor of at least 2 values, got shape {tuple(alpha_bars.shape)}")
        self.alpha_bars = alpha_bars
        # Only a zero level (zero terminal SNR) is replaced, by the smaller of 2**-24 and a quarter
        # of the smallest positive alpha_bar, so sigma stays finite and strictly increasing.
        positive = alpha_bars[alpha_bars > 0]
        floor = min(ALPHA_BAR_MIN, float(positive.min()) / 4) if len(positive) else ALPHA_BAR_MIN
        self.sigmas = schedules.sigma_from_alpha_bar(torch.where(alpha_bars > 0, alpha_bars, torch.full_like(alpha_bars, floor)))
        if not bool((self.sigmas[1:] > self.sigmas[:-1]).all()):
            raise ValueError("alpha_bars must be strictly decreasing (sigma strictly increasing with t)")
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_name(cls, name: str = "linear", T: int = 1000, **kwargs) -> "VPDiscrete":
        return cls(schedules.discrete_alpha_bars(name, T, **kwargs))

    @property
    def T(self) -> int:
        return len(self.alpha_bars)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def scale(self, sigma):
        return 1 / (1 + sigma**2).sqrt()

    def time(self, sigma):
        log_sigmas = self.log_sigmas.to(sigma.device, sigma.dtype)
        log_s = sigma.log().clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, log_s).clamp(1, self.T - 1)
        lo_v, hi_v = log_sigmas[hi - 1], log_sigmas[hi]
        return (hi - 1).to(sigma.dtype) + (log_s - lo_v) / (hi_v - lo_v)

    def sigma(self, t):
        """sigma at (possibly fractional) step t, interpolating log sigma."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.T - 1)
        lo = t.floor().long().clamp(max=self.T - 2)
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp()

    def prior_std(self, sigma):
        return (1 + sigma**2) ** 0.5


class VPContinuous:
    """Variance-preserving model trained in continuous time t in [0, 1] with a named schedule
    from :data:`difflab.core.schedules.CONTINUOUS_SCHEDULES` (Song et al. 2021; Kingma et al. 2021)."""

    def __init__(self, schedule: str = "cosine", time_scale: float = 1.0, t_min: float = 1e-4, t_max: float = 1.0, **kwargs):
        if schedule not in schedules.CONTINUOUS_SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is unknown; choose one of {sorted(schedules.CONTINUOUS_SCHEDULES)}")
        self.schedule, self.time_scale, self.kwargs = schedule, time_scale, kwargs
        self.sigma_min = float(self.sigma(torch.tensor(t_min * time_scale)))
        self.sigma_max = float(self.sigma(torch.tensor(t_max * time_scale)))

    def scale(self, sigma):
        return 1 / (1 + sigma**2).sqrt()

    def time(self, sigma):
        inverse = schedules.CONTINUOUS_INVERSES[self.schedule]
        return inverse(schedules.alpha_bar_from_sigma(sigma), **self.kwargs) * self.time_scale

    def sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64) / self.time_scale
        ab = schedules.CONTINUOUS_SCHEDULES[self.schedule](t, **self.kwargs).clamp(min=ALPHA_BAR_MIN)
        return schedules.sigma_from_alpha_bar(ab)

    def prior_std(self, sigma):
        return (1 + sigma**2) ** 0.5


class VE:
    """Variance-exploding model, x = x0 + sigma eps (Song et al. 2021, SMLD/NCSN++).
    ``time`` is what the network is fed: ``"sigma"`` or ``"log_sigma"`` (EDM's ln(sigma)/4)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, time: str = "log_sigma"):
        if time not in ("sigma", "log_sigma"):
            raise ValueError(f"time={time!r} must be 'sigma' or 'log_sigma'")
        self.sigma_min, self.sigma_max, self.time_kind = sigma_min, sigma_max, time

    def scale(self, sigma):
        return torch.ones_like(sigma)

    def time(self, sigma):
        return sigma if self.time_kind == "sigma" else sigma.log() / 4

    def sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return t if self.time_kind == "sigma" else (4 * t).exp()

    def prior_std(self, sigma):
        return sigma


class EDM(VE):
    """EDM preconditioning frame: input scale c_in = 1/sqrt(sigma^2 + sigma_data^2) and
    c_noise = ln(sigma)/4 (Karras et al. 2022, Table 1). Pair with ``prediction="edm"``."""

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(sigma_min, sigma_max, time="log_sigma")
        self.sigma_data = sigma_data

    def scale(self, sigma):
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()


class Flow:
    """Rectified-flow / flow-matching model, x_t = (1 - t) x0 + t eps (Liu et al. 2023;
    Lipman et al. 2023): scale 1/(1 + sigma), time t = sigma/(1 + sigma) (times ``time_scale``,
    e.g. 1000 for SD3-style networks)."""

    def __init__(self, time_scale: float = 1.0, t_min: float = 1e-4, t_max: float = 1.0):
        self.time_scale = time_scale
        self.sigma_min = float(schedules.flow_sigma(torch.tensor(t_min, dtype=torch.float64)))
        self.sigma_max = SIGMA_MAX_FINITE if t_max >= 1 else float(schedules.flow_sigma(torch.tensor(t_max, dtype=torch.float64)))

    def scale(self, sigma):
        return 1 / (1 + sigma)

    def time(self, sigma):
        return schedules.flow_t(sigma) * self.time_scale

    def sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64) / self.time_scale
        return schedules.flow_sigma(t.clamp(max=schedules.flow_t(torch.tensor(SIGMA_MAX_FINITE, dtype=torch.float64))))

    def prior_std(self, sigma):
        return 1 + sigma


def learned_log_variance(v: torch.Tensor, beta, beta_tilde) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 15: log Sigma_theta = v log beta_t + (1 - v) log beta~_t.

    v = 1 gives beta_t (DDPM's "fixed_large"), v = 0 the posterior variance beta~_t
    ("fixed_small"). ``beta`` and ``beta_tilde`` are positive floats or tensors broadcasting
    against ``v``; on a grid that skips steps they are the respaced beta_t = 1 - ab_t / ab_prev
    and beta~_t = (1 - ab_prev) / (1 - ab_t) beta_t of its consecutive levels (section 4). Both
    scale alike between frames (canonical = VP / ab_prev), so the formula holds in either."""
    log_beta = torch.as_tensor(beta, dtype=v.dtype, device=v.device).log()
    log_beta_tilde = torch.as_tensor(beta_tilde, dtype=v.dtype, device=v.device).log()
    return v * log_beta + (1 - v) * log_beta_tilde


FRAMES = {"vp_discrete": VPDiscrete, "vp": VPContinuous, "ve": VE, "edm": EDM, "flow": Flow}


class Denoiser(nn.Module):
    """Wrap a network ``net(x_in, t, **cond)`` into ``D(x, sigma, **cond) -> x0_hat``.

    ``frame`` maps the canonical (x, sigma) to the network's input and time; ``prediction``
    (eps, x0, v, score, flow, edm) says what it outputs (conversions in
    :mod:`difflab.core.params`). The network computes in its own dtype; the result comes back
    in the dtype of ``x``.

    ``learned_variance=True`` (improved DDPM; Nichol & Dhariwal 2021, section 3.1): the network
    outputs 2C channels along dim 1, its usual prediction then raw values r in [-1, 1] with
    v = (r + 1) / 2 interpolating the reverse variance (:func:`learned_log_variance`).
    ``forward`` still returns x0_hat only, so every sampler works; :meth:`x0_and_v` returns both,
    and :meth:`net_output` / :meth:`target` deal with the first C channels. VPDiscrete frames only.
    """

    def __init__(self, net: nn.Module, frame, prediction: str = "eps", sigma_data: float = 0.5, learned_variance: bool = False):
        super().__init__()
        self.net, self.frame, self.prediction = net, frame, check_prediction(prediction)
        self.sigma_data = getattr(frame, "sigma_data", sigma_data)
        self.learned_variance = bool(learned_variance)
        if prediction == "edm" and not isinstance(frame, EDM):
            raise ValueError("prediction='edm' needs the EDM frame (its c_in and c_noise define F)")
        if self.learned_variance and not isinstance(frame, VPDiscrete):
            raise ValueError("learned_variance=True needs the VPDiscrete frame (v interpolates between beta_t and beta~_t "
                             f"of consecutive steps), got {type(frame).__name__}")

    def _levels(self, x: torch.Tensor, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        alpha = append_dims(self.frame.scale(sigma), x.ndim)
        return sigma, alpha, alpha * append_dims(sigma, x.ndim)

    def net_output(self, x: torch.Tensor, sigma, **cond):
        """The raw network output and its frame: (out, x_in, alpha, sigma_in), where
        x_in = alpha x = alpha x0 + sigma_in eps. Losses use this to compare in the network's
        own parameterization. With learned variance, ``out`` is the first C channels."""
        out, x_in, alpha, sigma_in = self._call(x, sigma, **cond)
        if self.learned_variance:
            out, _ = self._split_v(out, x)
        return out, x_in, alpha, sigma_in

    def net_output_and_v(self, x: torch.Tensor, sigma, **cond):
        """One network call of a learned-variance model: (out, v, x_in, alpha, sigma_in), with
        ``out`` the first C channels (the usual prediction) and v = (r + 1) / 2 from the last C
        (Nichol & Dhariwal 2021, eq. 15 and their code's ``frac``)."""
        if not self.learned_variance:
            raise ValueError("this denoiser has no learned variance: build it with Denoiser(..., learned_variance=True)")
        out, x_in, alpha, sigma_in = self._call(x, sigma, **cond)
        out, v = self._split_v(out, x)
        return out, v, x_in, alpha, sigma_in

    def _call(self, x: torch.Tensor, sigma, **cond):
        sigma, alpha, sigma_in = self._levels(x, sigma)
        x_in = alpha * x
        out = self.net(x_in, self.frame.time(sigma), **cond)
        return out.to(x.dtype), x_in, alpha, sigma_in

    @staticmethod
    def _split_v(out: torch.Tensor, x: torch.Tensor):
        if x.ndim < 2:
            raise ValueError(f"a learned-variance model needs (B, C, ...) samples (its variance channels follow the "
                             f"C channels along dim 1), got x of shape {tuple(x.shape)}")
        C = x.shape[1]
        if out.ndim != x.ndim or out.shape[1] != 2 * C or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"a learned-variance net must output 2C = {2 * C} channels along dim 1 for x of shape "
                             f"{tuple(x.shape)}, got {tuple(out.shape)}")
        out, r = out.split(C, dim=1)
        return out, (r + 1) / 2

    def x0_and_v(self, x: torch.Tensor, sigma, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, v) of a learned-variance model from one network call; v in [0, 1] where the
        network's raw output is in [-1, 1] (v = 1: beta_t, v = 0: beta~_t; see :func:`learned_log_variance`)."""
        out, v, x_in, alpha, sigma_in = self.net_output_and_v(x, sigma, **cond)
        x0, _ = to_x0_eps(out, self.prediction, x_in, alpha, sigma_in, self.sigma_data)
        return x0, v

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        out, x_in, alpha, sigma_in = self.net_output(x, sigma, **cond)
        x0, _ = to_x0_eps(out, self.prediction, x_in, alpha, sigma_in, self.sigma_data)
        return x0

    def target(self, x0: torch.Tensor, eps: torch.Tensor, sigma):
        """What the network should output for clean ``x0`` noised with ``eps`` at ``sigma``."""
        _, alpha, sigma_in = self._levels(x0, sigma)
        return from_x0_eps(x0, eps, self.prediction, alpha, sigma_in, self.sigma_data)

    @property
    def sigma_min(self) -> float:
        return self.frame.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.frame.sigma_max

    def prior_std(self, sigma):
        """Standard deviation of the canonical x at ``sigma`` when x0 is negligible: the
        starting noise of a sampler is ``randn * prior_std(sigmas[0])``."""
        return self.frame.prior_std(torch.as_tensor(sigma, dtype=torch.float64))
