"""An adaptive-step reference solver for the probability-flow ODE. See :mod:`difflab.samplers.common`
for the keywords every sampler shares.

The probability-flow ODE in the canonical frame (Karras et al. 2022, eq. 4 with s(t) = 1) is
dx/dsigma = (x - D(x, sigma)) / sigma. In the variable s = log sigma it reads::

    dx/ds = f(x, s) = x - D(x, e^s)

which is smooth over the whole range of noise levels (the solution grows like sigma at high noise
and settles at low noise), so an explicit embedded Runge-Kutta pair with error control in s
integrates it to any tolerance. We use Dormand & Prince's 5(4) pair (Dormand & Prince 1980,
"A family of embedded Runge-Kutta formulae", Table 2; Hairer, Norsett & Wanner, "Solving Ordinary
Differential Equations I", section II.5, Table 5.2), with local extrapolation (the 5th-order
solution is kept), first-same-as-last, the error norm and step-size controller of Hairer et al.
(II.4, eq. 4.11-4.13) and their starting step-size heuristic (II.4, "Starting step size").
"""
from __future__ import annotations

import math

import torch

from ..progress import progress_range
from .common import check_sample, check_sigmas

# Dormand-Prince 5(4): nodes c, stage matrix a, 5th-order weights b (= the last row of a: FSAL) and
# the error weights e = b - b_hat (b_hat the embedded 4th-order weights).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_ORDER = 5  # of the kept solution; the controller uses the embedded order 4: exponent 1/5

_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


@torch.no_grad()
def sample_adaptive(denoiser, x: torch.Tensor, sigmas, *, rtol: float = 1e-5, atol: float = 1e-5,
                    max_nfe: int = 100_000, return_info: bool = False, noise=None, extra_args: dict | None = None,
                    callback=None, progress: bool = False):
    """Dormand-Prince 5(4) with adaptive steps in s = log sigma on dx/ds = x - D(x, e^s)
    (Dormand & Prince 1980, Table 2; Hairer et al., Solving ODEs I, II.4-II.5).

    The grid only says *where the solution is wanted*: each interval (sigma_i, sigma_i+1) is
    integrated with as many adaptive sub-steps as the tolerance needs (the step-size controller
    restarts in every interval, so starting from ``sigmas[k:]`` continues the same trajectory), and
    ``callback`` is called once per interval. The fewest evaluations come from the shortest grid,
    ``[sigma_max, sigma_min, 0]``. A step to sigma = 0 returns the denoised estimate at the last
    positive level, D(x, sigma_min) (the ODE solution at 0 up to O(sigma_min^2)), as every sampler
    does; the adaptive part needs positive levels.

    Each accepted sub-step keeps the local error estimate below 1 in Hairer's norm
    ``sqrt(mean((e / (atol + rtol max(|x|, |x_new|)))^2))``, taken per sample and maximised over
    the batch (the batch shares its steps, so a sample's result depends on its batch mates only
    within the tolerance). On the Gaussian-mixture benchmark (``bench/samplers.py``, rtol = atol)
    the RMSE to the exact solution is about 18 rtol at rtol = 1e-3 (the steps are then too long for
    the error estimate) and below rtol from 1e-4 on (104 evaluations at 1e-4, 164 at 1e-5, 254 at
    1e-6), so use rtol <= 1e-4 for reference runs. ``noise`` is accepted for the common signature
    and never used.

    Returns ``x``, or ``(x, info)`` with ``return_info=True``, where ``info`` holds ``nfe`` (denoiser
    evaluations), ``accepted`` and ``rejected`` sub-steps.
    """
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol={rtol} and atol={atol} must be positive")
    sigmas = check_sigmas(sigmas)
    check_sample(x)
    extra_args = {} if extra_args is None else extra_args
    info = dict(nfe=0, accepted=0, rejected=0)
    denoise = _counted(denoiser, x, extra_args, info, max_nfe)
    denoised_next = None  # D(x, sigma) at the start of an interval, known from the last stage of the one before
    for i in progress_range(len(sigmas) - 1, disable=not progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma) if denoised_next is None else denoised_next
        if sigma_next == 0:
            x = denoised
        else:
            x, denoised_next = _integrate(denoise, x, denoised, sigma, sigma_next, rtol, atol, info)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return (x, info) if return_info else x


@torch.no_grad()
def solve_ode(denoiser, x: torch.Tensor, sigma_start: float, sigma_end: float, *, rtol: float = 1e-5,
              atol: float = 1e-5, max_nfe: int = 100_000, extra_args: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Dormand-Prince 5(4) (Dormand & Prince 1980) on the probability-flow ODE from ``sigma_start`` to
    ``sigma_end``, both positive, either way (downwards samples, upwards encodes), with the step
    control of :func:`sample_adaptive`. Returns ``(x, info)``."""
    if not (sigma_start > 0 and sigma_end > 0):
        raise ValueError(f"solve_ode needs positive sigmas, got {sigma_start} and {sigma_end}")
    info = dict(nfe=0, accepted=0, rejected=0)
    if sigma_start == sigma_end:
        return x, info
    denoise = _counted(denoiser, x, {} if extra_args is None else extra_args, info, max_nfe)
    return _integrate(denoise, x, denoise(x, sigma_start), sigma_start, sigma_end, rtol, atol, info)[0], info


def _counted(denoiser, x, extra_args, info, max_nfe):
    s_in = x.new_ones(x.shape[0])

    def denoise(x, sigma):
        info["nfe"] += 1
        if info["nfe"] > max_nfe:
            raise RuntimeError(f"the adaptive solver used more than max_nfe={max_nfe} evaluations; loosen rtol/atol")
        return denoiser(x, sigma * s_in, **extra_args)

    return denoise


def _norm(e, scale) -> float:
    """Hairer's error norm per sample, sqrt(mean((e / scale)^2)), maximised over the batch."""
    return (e / scale).reshape(e.shape[0], -1).pow(2).mean(1).sqrt().max().item()


def _integrate(denoise, x, denoised, sigma, sigma_next, rtol, atol, info):
    """Adaptive Dormand-Prince sub-steps from log(sigma) to log(sigma_next), given ``denoised`` = D(x, sigma).
    Returns the solution at sigma_next and D there (the last stage: first-same-as-last)."""
    s, s_end = math.log(sigma), math.log(sigma_next)
    direction = -1.0 if s_end < s else 1.0
    f = x - denoised

    # Starting step size (Hairer et al., II.4): h0 from the size of x and f, then one probe step.
    scale = atol + rtol * x.abs()
    d0, d1 = _norm(x, scale), _norm(f, scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, abs(s_end - s))
    x_probe = x + direction * h0 * f
    f_probe = x_probe - denoise(x_probe, math.exp(s + direction * h0))
    d2 = _norm(f_probe - f, scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / _ORDER)
    h = min(100 * h0, h1)

    while True:
        last = h >= abs(s_end - s) * (1 - 1e-12)
        if last:
            h = abs(s_end - s)
        step = direction * h
        k = [f]
        for j in range(1, 7):
            x_j = x + step * sum(a * kk for a, kk in zip(_A[j], k) if a != 0.0)
            s_j = s_end if (last and _C[j] == 1.0) else s + _C[j] * step
            sigma_j = sigma_next if (last and _C[j] == 1.0) else math.exp(s_j)
            if j == 6:
                x_new = x_j  # the 5th-order solution (FSAL: its weights are the last stage's row)
            d_j = denoise(x_j, sigma_j)
            k.append(x_j - d_j)
        denoised_new = d_j
        error = step * sum(e * kk for e, kk in zip(_E, k) if e != 0.0)
        err = _norm(error, atol + rtol * torch.maximum(x.abs(), x_new.abs()))
        if err <= 1.0:
            info["accepted"] += 1
            x, f, s = x_new, k[6], s + step
            if last:
                return x, denoised_new
        else:
            info["rejected"] += 1
        factor = _MAX_FACTOR if err == 0 else _SAFETY * err ** (-1 / _ORDER)
        h = h * min(_MAX_FACTOR, max(_MIN_FACTOR, factor))
        if err > 1.0:
            h = min(h, abs(step))  # never grow after a rejection
        if h < 1e-12 * max(1.0, abs(s)):
            raise RuntimeError(f"sample_adaptive: step size underflow at sigma={math.exp(s):.3g}")


SAMPLERS = {"adaptive": sample_adaptive}
