"""UniPC (Zhao et al. 2023): a unified predictor-corrector for the probability-flow ODE, data
prediction, multistep, in the canonical frame x = x0 + sigma eps.

With lambda = -log(sigma), h = lambda_t - lambda_s0 and the data predictions m_i = D(x_i, sigma_i),
a step of order p from s0 to t uses the previous points s_1 .. s_{p-1}:

    r_k = (lambda_{s_k} - lambda_{s0}) / h,   D_k = (m_k - m_0) / r_k
    x_t = (sigma_t / sigma_s0) x_s0 + (1 - e^(-h)) m_0 - B(h) sum_k a_k D_k

(UniP-p in its data-prediction form; the VP formula divided by alpha_t). The weights
a solve R a = g with R_{ik} = r_k^(i-1) and g_i = i! (-h) phi_{i+1}(-h) / B(h), phi_{k+1}(z) =
(phi_k(z) - 1/k!) / z, phi_1(z) = (e^z - 1) / z. B(h) is -h ("bh1") or e^(-h) - 1 ("bh2"): the
paper's B_1(h) = h and B_2(h) = e^h - 1 in the data-prediction sign convention (as diffusers).
For p = 2 the predictor uses a_1 = 1/2.

UniC-p corrects x_t once the model has been evaluated there: the same formula from
s0 with the new output m_t as an extra point at r = 1 (D_t = m_t - m_0), weights from the full
system (a = 1/2 for p = 1). Its accuracy is one order higher, and it costs nothing: the output
m_t at the uncorrected x_t is also what the next predictor step uses (multistep UniPC-p; Zhao
et al. 2023, Algorithms 1-3). The step to sigma = 0 returns the denoised estimate and is never
corrected.

Orders 1-4 are accepted (the paper allows any; diffusers' ``solver_order`` too). Order 4 matches
diffusers step by step and converges at 4 (UniP) and 5 (UniPC) on a Gaussian (stop 39); order 5 was
tried and not kept: its observed rates on the same test were erratic (1.2-13 between halvings).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .common import grid_steps, prepare
from .dpm_solver import half_log_snr

VARIANTS = ("bh1", "bh2")


def unipc_weights(rks: Sequence[float], h: float, variant: str) -> tuple[float, list[float]]:
    """B(h) and the weights a of UniP (the previous points' r_k) or UniC (``rks`` ends with the
    new point, r = 1), solving R a = g in float64 (Zhao et al. 2023, UniP-p and UniC-p). As in the
    reference implementation and diffusers, UniP-2 uses a = [1/2] and UniC-1 a = [1/2]."""
    hh = -h  # data prediction integrates in -lambda
    B = hh if variant == "bh1" else math.expm1(hh)
    p = len(rks)
    if p == 1:  # UniP-2 or UniC-1
        return B, [0.5]
    g, h_phi, factorial = [], math.expm1(hh) / hh - 1, 1  # h_phi = hh * phi_2(hh)
    for i in range(1, p + 1):
        g.append(h_phi * factorial / B)
        factorial *= i + 1
        h_phi = h_phi / hh - 1 / factorial
    R = torch.tensor([[rk ** (i - 1) for rk in rks] for i in range(1, p + 1)], dtype=torch.float64)
    return B, torch.linalg.solve(R, torch.tensor(g, dtype=torch.float64)).tolist()


def unipc_update(x_s0: torch.Tensor, sigma_s0: float, sigma_t: float, history, m_t: torch.Tensor | None,
                 variant: str) -> torch.Tensor:
    """UniP (``m_t=None``) or UniC (``m_t`` the output at the predicted x_t) from s0 to t, with
    ``history = [(lambda_k, m_k), ...]`` oldest first, the last being s0 (Zhao et al. 2023,
    UniP-p / UniC-p, data prediction)."""
    (l0, m0), older = history[-1], history[-2::-1]
    h = half_log_snr(sigma_t) - l0
    x = (sigma_t / sigma_s0) * x_s0 - math.expm1(-h) * m0
    rks = [(lk - l0) / h for lk, _ in older]
    ds = [(mk - m0) / rk for rk, (_, mk) in zip(rks, older)]
    if m_t is not None:
        rks, ds = rks + [1.0], ds + [m_t - m0]
    if not ds:
        return x
    B, a = unipc_weights(rks, h, variant)
    return x - B * sum(ak * dk for ak, dk in zip(a, ds))


@torch.no_grad()
def sample_unipc(denoiser, x: torch.Tensor, sigmas, *, order: int = 2, variant: str = "bh2", corrector: bool = True,
                 disable_corrector: Sequence[int] = (), lower_order_final: bool = True, noise=None,
                 extra_args: dict | None = None, callback=None, progress: bool = False) -> torch.Tensor:
    """UniPC-p (Zhao et al. 2023, Algorithms 1-3: multistep UniP-p with UniC-p), data prediction,
    1 NFE per step, deterministic; diffusers' UniPCMultistepScheduler (``solver_order=order``,
    ``solver_type=variant``, ``predict_x0=True``).

    Step i evaluates m_i = D(x_i, sigma_i); if ``corrector`` and i - 1 is not in
    ``disable_corrector``, x_i is first corrected by UniC with the order of the step that made it
    (it then plays x_i for the predictor; m_i is not re-evaluated). Then UniP of order
    min(order, i + 1) -- and, with ``lower_order_final`` (diffusers' default, applied whatever the
    number of steps, unlike DPM-Solver's rule), at most n - i -- predicts x_{i+1}. The callback's
    ``x`` is that prediction, i.e. what the denoiser sees next, as diffusers' ``prev_sample``.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"order={order} must be 1, 2, 3 or 4")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; choose one of {list(VARIANTS)}")
    sigmas, model = prepare(denoiser, x, sigmas, extra_args)
    disabled = set(disable_corrector)
    n = len(sigmas) - 1
    history = []  # (lambda_k, m_k), oldest first
    x_last = None  # the (corrected) state the last predictor started from; p is its order
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised = model(x, sigma)
        if corrector and x_last is not None and i - 1 not in disabled:
            x = unipc_update(x_last, float(sigmas[i - 1]), sigma, history[-p:], denoised, variant)
        history = (history + [(half_log_snr(sigma), denoised)])[-order:]
        p = min(order, n - i) if lower_order_final else order
        p = min(p, len(history))
        x_last = x
        x = denoised if sigma_next == 0 else unipc_update(x, sigma, sigma_next, history[-p:], None, variant)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


SAMPLERS = {"unipc": sample_unipc}
