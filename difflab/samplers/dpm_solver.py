"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b): exponential integrators of the
probability-flow ODE, single-step and multistep, in the canonical frame x = x0 + sigma eps.

With lambda = -log(sigma) (the canonical sigma; in a VP frame it is log(alpha / sigma_vp)) and
h = lambda_t - lambda_s = log(sigma_s / sigma_t), the exact solution of the ODE from s to t is

    noise prediction (DPM-Solver, Lu et al. 2022, eq. 3.4, divided by alpha_t):
        x_t = x_s - int_{l_s}^{l_t} e^(-l) eps(l) dl
    data prediction (DPM-Solver++, Lu et al. 2022b, section 4, divided by alpha_t):
        x_t = (sigma_t / sigma_s) x_s + sigma_t int_{l_s}^{l_t} e^l x0(l) dl

and the solvers Taylor-expand eps_theta or x0_theta in lambda. Their VP updates divided by alpha_t
are the canonical updates below, so these samplers match diffusers' VP schedulers step by step
(the tests check it); the eps and x0 predictions are frame-invariant. ``m`` is the model output
the solver integrates: x0_hat = D(x, sigma) (data) or eps_hat = (x - D) / sigma (noise).

The step to sigma = 0 (lambda = inf) returns the denoised estimate: it is the limit of the
first-order step, and higher-order terms would divide by an infinite h (diffusers forces a
first-order final step for ``final_sigmas_type="zero"`` for the same reason).

``lower_order_final`` (default True, as in diffusers and Lu et al.'s code): with fewer than 15
steps the last step is first order and the one before at most second order. The reference code
gives this trick for stabler few-step sampling (the final steps are the largest in lambda on
usual grids); with 15 steps or more it changes nothing, and it keeps parity with diffusers exact.
Pass ``lower_order_final=False`` for a clean order of convergence, or for k-diffusion's behaviour.
"""
from __future__ import annotations

import math

import torch

from .brownian import interval_noise
from .common import ancestral_step, grid_steps, prepare

SOLVER_TYPES = ("midpoint", "heun")
SINGLESTEP_TYPES = ("dpmsolver", "midpoint", "heun")
LOWER_ORDER_FINAL_STEPS = 15  # diffusers: lower_order_final acts only below this many steps


def half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma_vp) = -log(sigma) for the canonical sigma: DPM-Solver's time
    variable, half the log-SNR of :func:`difflab.core.schedules.log_snr_from_sigma`."""
    return -math.log(sigma)


# ----------------------------------------------------------------------------
# The update shared by every solver here (and by the SDE samplers).

def dpm_update(x: torch.Tensor, sigma: float, sigma_next: float, ds, *, predict_x0: bool, solver_type: str = "midpoint",
               eta: float = 0.0) -> torch.Tensor:
    """One exponential-integrator step from ``sigma`` to ``sigma_next`` with the Taylor terms
    ``ds = [D0, D1, D2]`` of the model output m in lambda (Lu et al. 2022, eq. 3.7;
    Lu et al. 2022b, section 4): D0 = m at sigma, D1 ~ h m' and D2 ~ h^2 m'' from finite
    differences (at most three terms); c_k below is the exact integral weight of h^k m^(k) / k!
    times k!, i.e. c0 = h phi_1, c1 = h phi_2, c2 = h phi_3 in -h (data) or h (noise).
    ``solver_type`` picks the D1 weight of a two-term step: ``"midpoint"`` (the paper's
    DPM-Solver-2) or ``"heun"`` (the phi_2 weight, which three-term steps always use).

    Data prediction (DPM-Solver++), with h_eta = (1 + eta) h::

        x_t = (sigma_t / sigma_s) e^(-eta h) x_s + c0 D0 + c1 D1 + c2 D2
        c0 = 1 - e^(-h_eta)                 c1 = c0 / 2  or  1 - c0 / h_eta
        c2 = (c0 - h_eta) / h_eta^2 + 1/2

    ``eta > 0`` is the deterministic part of the DPM-Solver++ SDE step (its noise term is
    :func:`sde_noise_std`); eta = 0 is the ODE. Noise prediction (DPM-Solver)::

        x_t = x_s - sigma_t (c0 D0 + c1 D1 + c2 D2)
        c0 = e^h - 1                        c1 = c0 / 2  or  c0 / h - 1
        c2 = (c0 - h) / h^2 - 1/2
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type={solver_type!r} is unknown; choose one of {list(SOLVER_TYPES)}")
    h = math.log(sigma / sigma_next)
    midpoint = solver_type == "midpoint" and len(ds) == 2  # three terms: the Taylor weights
    if predict_x0:
        he = (1 + eta) * h
        c0 = -math.expm1(-he)
        c1 = c0 / 2 if midpoint else 1 - c0 / he
        c2 = (c0 - he) / he**2 + 0.5
        out = (sigma_next / sigma * math.exp(-eta * h)) * x + c0 * ds[0]
        sign = 1.0
    else:
        if eta:
            raise ValueError("eta > 0 (the SDE) needs data prediction (predict_x0=True)")
        c0 = math.expm1(h)
        c1 = c0 / 2 if midpoint else c0 / h - 1
        c2 = (c0 - h) / h**2 - 0.5
        out = x - (sigma_next * c0) * ds[0]
        sign = -sigma_next
    if len(ds) > 1:
        out = out + (sign * c1) * ds[1]
    if len(ds) > 2:
        out = out + (sign * c2) * ds[2]
    return out


def sde_noise_std(sigma: float, sigma_next: float, eta: float) -> float:
    """Std of the fresh noise of a DPM-Solver++ SDE step: sigma_t sqrt(1 - e^(-2 eta h))
    (Lu et al. 2022b; diffusers' ``sde-dpmsolver++``, k-diffusion's ``sample_dpmpp_2m_sde``)."""
    return sigma_next * math.sqrt(-math.expm1(-2 * eta * math.log(sigma / sigma_next)))


def multistep_terms(history, lam_next: float):
    """[D0, D1, D2] from the last model outputs ``history = [(lambda_i, m_i), ...]`` (oldest
    first, at most three), as in Lu et al. 2022b, Algorithm 2 and appendix (3M): with
    h = lam_next - lambda_0, r_k = (lambda_k - lambda_{k+1}) / h,
    D1_0 = (m_0 - m_1) / r_0, D1_1 = (m_1 - m_2) / r_1, and for three outputs
    D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1) ~ h m', D2 = (D1_0 - D1_1) / (r_0 + r_1) ~ h^2 m'' / 2
    (see ``taylor_d2`` in :func:`sample_dpm_multistep`)."""
    (l0, m0), older = history[-1], history[-2::-1]
    if not older:
        return [m0]
    h = lam_next - l0
    (l1, m1) = older[0]
    r0 = (l0 - l1) / h
    d1_0 = (m0 - m1) / r0
    if len(older) == 1:
        return [m0, d1_0]
    (l2, m2) = older[1]
    r1 = (l1 - l2) / h
    d1_1 = (m1 - m2) / r1
    return [m0, d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)]


def step_order(order: int, i: int, n: int, lower_order_final: bool) -> int:
    """The order of multistep step ``i`` of ``n``: warm-up min(order, i + 1), and with
    ``lower_order_final`` and n < 15 steps at most n - i (diffusers' rule)."""
    k = min(order, i + 1)
    if lower_order_final and n < LOWER_ORDER_FINAL_STEPS:
        k = min(k, n - i)
    return k


# ----------------------------------------------------------------------------
# Multistep: DPM-Solver (noise) and DPM-Solver++ (data), ODE or SDE.

@torch.no_grad()
def sample_dpm_multistep(denoiser, x: torch.Tensor, sigmas, *, order: int = 2, predict_x0: bool = True,
                         solver_type: str = "midpoint", lower_order_final: bool = True, taylor_d2: bool = False,
                         eta: float = 0.0, s_noise: float = 1.0, noise=None, extra_args: dict | None = None,
                         callback=None, progress: bool = False) -> torch.Tensor:
    """Multistep DPM-Solver (Lu et al. 2022b, section 4.2 and Algorithm 2, "DPM-Solver++(2M)"; the
    same construction at third order, "3M", and on the noise prediction, diffusers' "dpmsolver").

    One model evaluation per step; the previous outputs (lambda_i, m_i) live in a local list.
    Step i uses order :func:`step_order` (warm-up, then ``order``; lower at the end, see the module
    docstring) with the terms of :func:`multistep_terms` and the update :func:`dpm_update`.
    ``predict_x0`` picks data prediction (DPM-Solver++) or noise prediction (DPM-Solver);
    ``solver_type`` the second-order weight ("midpoint" or "heun", unused at third order).

    Third order: D2 = (D1_0 - D1_1) / (r_0 + r_1) estimates h^2 m'' / 2, and the Taylor expansion
    weights h^2 m'' by the c2 of :func:`dpm_update`, so D2 needs the weight 2 c2. The reference
    code, diffusers and k-diffusion all use c2 (half of it), which leaves a local error of about
    h^3 m'' / 12, i.e. a second-order method with a small constant. ``taylor_d2=False`` (default)
    keeps that formula, so "dpmpp_3m" gives the same numbers as elsewhere; ``taylor_d2=True`` uses
    the Taylor weight and is third order (the tests measure both).

    ``eta > 0`` (data prediction only) is the DPM-Solver++ SDE, see :mod:`difflab.samplers.sde`:
    each step adds ``s_noise * sde_noise_std * z`` with z from ``noise`` (a plain ``noise()``
    callable or a :class:`~difflab.samplers.brownian.BrownianTreeNoise`). No noise on the step to 0.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order={order} must be 1, 2 or 3")
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    if eta and not predict_x0:
        raise ValueError("eta > 0 (the SDE) needs data prediction (predict_x0=True)")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type={solver_type!r} is unknown; choose one of {list(SOLVER_TYPES)}")
    sigmas, model = prepare(denoiser, x, sigmas, extra_args)
    draw = interval_noise(noise, x)
    n = len(sigmas) - 1
    history = []  # (lambda_i, m_i), oldest first
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised = model(x, sigma)
        m = denoised if predict_x0 else (x - denoised) / sigma
        history = (history + [(half_log_snr(sigma), m)])[-order:]
        if sigma_next == 0:
            x = denoised
        else:
            k = step_order(order, i, n, lower_order_final)
            ds = multistep_terms(history[-k:], half_log_snr(sigma_next))
            if taylor_d2 and k == 3:
                ds[2] = 2 * ds[2]
            x = dpm_update(x, sigma, sigma_next, ds, predict_x0=predict_x0, solver_type=solver_type, eta=eta)
            if eta:
                x = x + (s_noise * sde_noise_std(sigma, sigma_next, eta)) * draw(sigma, sigma_next)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


def sample_dpm_multistep_2(denoiser, x, sigmas, **kwargs):
    """Multistep DPM-Solver-2, noise prediction (Lu et al. 2022b, section 4.2; diffusers'
    ``algorithm_type="dpmsolver"``, ``solver_order=2``). Keywords of :func:`sample_dpm_multistep`."""
    return sample_dpm_multistep(denoiser, x, sigmas, order=2, predict_x0=False, **kwargs)


def sample_dpm_multistep_3(denoiser, x, sigmas, **kwargs):
    """Multistep DPM-Solver-3, noise prediction (Lu et al. 2022b, section 4.2; diffusers'
    ``algorithm_type="dpmsolver"``, ``solver_order=3``). Keywords of :func:`sample_dpm_multistep`."""
    return sample_dpm_multistep(denoiser, x, sigmas, order=3, predict_x0=False, **kwargs)


def sample_dpmpp_2m(denoiser, x, sigmas, **kwargs):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data prediction; k-diffusion's
    ``sample_dpmpp_2m`` with ``lower_order_final=False``. Keywords of :func:`sample_dpm_multistep`."""
    return sample_dpm_multistep(denoiser, x, sigmas, order=2, predict_x0=True, **kwargs)


def sample_dpmpp_3m(denoiser, x, sigmas, **kwargs):
    """DPM-Solver++(3M) (Lu et al. 2022b, appendix: third-order multistep), data prediction.
    The reference formula is second order; ``taylor_d2=True`` makes it third order (see
    :func:`sample_dpm_multistep`). Keywords of :func:`sample_dpm_multistep`."""
    return sample_dpm_multistep(denoiser, x, sigmas, order=3, predict_x0=True, **kwargs)


# ----------------------------------------------------------------------------
# Single-step: DPM-Solver-1/2/3 and DPM-Solver++(2S).

def singlestep_stage(x_s: torch.Tensor, lams, ms, lam_t: float, sigma_s: float, sigma_t: float, *, order: int,
                     predict_x0: bool, solver_type: str) -> torch.Tensor:
    """Stage j = len(ms) of a single-step DPM-Solver step: x at lambda_t from x_s, using the model
    outputs ``ms`` at ``lams`` = [lambda_s, lambda_s1, (lambda_s2)] (Lu et al. 2022, Algorithms 1-2;
    the reference code's ``singlestep_dpm_solver_{second,third}_update``). With r_k =
    (lambda_sk - lambda_s) / h:

    - j = 1: the first-order step (DDIM).
    - j = 2: D1 = (m_s1 - m_s) / r_1 with the midpoint weight for DPM-Solver-2 (Algorithm 1) or
      the phi_2 ("heun") weight when it is the second stage of DPM-Solver-3 (Algorithm 2, u_2).
    - j = 3: ``"dpmsolver"`` / ``"midpoint"``: Algorithm 2's last line, D1 = (m_s2 - m_s) / r_2
      with the phi_2 weight; ``"heun"``: the Taylor form with D1 and D2 from both stages.

    ``solver_type="midpoint"`` / ``"heun"`` reproduce diffusers' DPMSolverSinglestepScheduler
    (which uses the midpoint weight at stage 2 of a third-order step); ``"dpmsolver"`` is the paper.
    """
    j = len(ms)
    if j == 1:
        return dpm_update(x_s, sigma_s, sigma_t, ms, predict_x0=predict_x0)
    h = lam_t - lams[0]
    r = [(lk - lams[0]) / h for lk in lams[1:]]
    if j == 2:
        mid = solver_type == "midpoint" or (solver_type == "dpmsolver" and order == 2)
        ds = [ms[0], (ms[1] - ms[0]) / r[0]]
        return dpm_update(x_s, sigma_s, sigma_t, ds, predict_x0=predict_x0, solver_type="midpoint" if mid else "heun")
    if solver_type == "heun":
        d1_0, d1_1 = (ms[1] - ms[0]) / r[0], (ms[2] - ms[0]) / r[1]
        ds = [ms[0], (r[1] * d1_0 - r[0] * d1_1) / (r[1] - r[0]), 2 * (d1_1 - d1_0) / (r[1] - r[0])]
    else:
        ds = [ms[0], (ms[2] - ms[0]) / r[1]]
    return dpm_update(x_s, sigma_s, sigma_t, ds, predict_x0=predict_x0, solver_type="heun")


DEFAULT_R = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}


@torch.no_grad()
def sample_dpm_solver(denoiser, x: torch.Tensor, sigmas, *, order: int = 3, predict_x0: bool = False,
                      solver_type: str = "dpmsolver", r: tuple | None = None, eta: float = 0.0, s_noise: float = 1.0,
                      noise=None, extra_args: dict | None = None, callback=None,
                      progress: bool = False) -> torch.Tensor:
    """Single-step DPM-Solver-k (Lu et al. 2022, Algorithms 1-2, eq. 3.7): every step of the grid
    is one k-stage step with k model evaluations, the extra ones at lambda_s + r_i h
    (``r`` defaults to (1/2,) for k = 2 and (1/3, 2/3) for k = 3), so NFE = k per step.

    ``predict_x0=True`` integrates the data prediction instead (DPM-Solver++(2S), Lu et al.
    2022b, Algorithm 1). ``eta > 0`` makes it ancestral as in k-diffusion's
    ``sample_dpmpp_2s_ancestral``: each step solves the ODE down to sigma_down and adds noise
    of std ``s_noise * sigma_up`` (:func:`~difflab.samplers.common.ancestral_step`).
    ``solver_type``: see :func:`singlestep_stage` ("dpmsolver" = the paper). The step to
    sigma = 0 returns the denoised estimate (one evaluation).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order={order} must be 1, 2 or 3")
    if solver_type not in SINGLESTEP_TYPES:
        raise ValueError(f"solver_type={solver_type!r} is unknown; choose one of {list(SINGLESTEP_TYPES)}")
    r = DEFAULT_R[order] if r is None else tuple(float(v) for v in r)
    if len(r) != order - 1 or not all(0 < a < b for a, b in zip(r, r[1:] + (1.0,))):
        raise ValueError(f"r={r} must hold {order - 1} increasing fractions in (0, 1) for order {order}")
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    sigmas, denoise = prepare(denoiser, x, sigmas, extra_args)
    draw = interval_noise(noise, x)

    def model(x_, sigma_):
        d = denoise(x_, sigma_)
        return d, (d if predict_x0 else (x_ - d) / sigma_)

    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised, m = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x_next = denoised
        else:
            lam_s, lam_t = half_log_snr(sigma), half_log_snr(sigma_down)
            lams, ms = [lam_s], [m]
            for rk in r:  # the intermediate stages u_1, u_2 at lambda_s + r_k h
                lam_k = lam_s + rk * (lam_t - lam_s)
                u = singlestep_stage(x, lams, ms, lam_k, sigma, math.exp(-lam_k), order=order, predict_x0=predict_x0,
                                     solver_type=solver_type)
                lams.append(lam_k)
                ms.append(model(u, math.exp(-lam_k))[1])
            x_next = singlestep_stage(x, lams, ms, lam_t, sigma, sigma_down, order=order, predict_x0=predict_x0,
                                      solver_type=solver_type)
        if sigma_up > 0:
            x_next = x_next + (s_noise * sigma_up) * draw(sigma, sigma_next)
        x = x_next
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


def sample_dpm_solver_1(denoiser, x, sigmas, **kwargs):
    """DPM-Solver-1 (Lu et al. 2022, eq. 3.7 with k = 1; = DDIM), noise prediction, 1 NFE per step."""
    return sample_dpm_solver(denoiser, x, sigmas, order=1, **kwargs)


def sample_dpm_solver_2(denoiser, x, sigmas, **kwargs):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r1 = 1/2), noise prediction, 2 NFE per step."""
    return sample_dpm_solver(denoiser, x, sigmas, order=2, **kwargs)


def sample_dpm_solver_3(denoiser, x, sigmas, **kwargs):
    """DPM-Solver-3 (Lu et al. 2022, Algorithm 2, r1 = 1/3, r2 = 2/3), noise prediction, 3 NFE per step."""
    return sample_dpm_solver(denoiser, x, sigmas, order=3, **kwargs)


def sample_dpmpp_2s(denoiser, x, sigmas, *, eta: float = 0.0, **kwargs):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2), data prediction, 2 NFE per step;
    ``eta > 0`` is k-diffusion's ``sample_dpmpp_2s_ancestral``."""
    return sample_dpm_solver(denoiser, x, sigmas, order=2, predict_x0=True, eta=eta, **kwargs)


def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, eta: float = 1.0, **kwargs):
    """DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``): each step solves
    down to sigma_down with Lu et al. 2022b, Algorithm 1, then adds noise of std sigma_up."""
    return sample_dpm_solver(denoiser, x, sigmas, order=2, predict_x0=True, eta=eta, **kwargs)


# ----------------------------------------------------------------------------
# diffusers' DPMSolverSinglestepScheduler: the grid points are the intermediate stages.

def singlestep_orders(n: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The stage of each grid step in diffusers' DPMSolverSinglestepScheduler (``get_order_list``):
    blocks [1, 2, .., order]; with ``lower_order_final`` the tail is shortened so the last step is
    low order; a final sigma of 0 always gets a first-order last step."""
    if lower_order_final:
        q, rem = divmod(n, order)
        if order == 3:
            orders = [1, 2, 3] * (q - 1) + [1, 2] + [1] if rem == 0 else [1, 2, 3] * q + [1, 2][:rem]
        elif order == 2:
            orders = [1, 2] * (q - 1) + [1, 1] if rem == 0 else [1, 2] * q + [1]
        else:
            orders = [1] * n
    else:
        if n % order:
            raise ValueError(f"lower_order_final=False needs a multiple of order={order} steps, got {n}")
        orders = list(range(1, order + 1)) * (n // order)
    if final_zero:
        orders[-1] = 1
    return orders


@torch.no_grad()
def sample_dpm_singlestep(denoiser, x: torch.Tensor, sigmas, *, order: int = 2, predict_x0: bool = True,
                          solver_type: str = "midpoint", lower_order_final: bool = True, noise=None,
                          extra_args: dict | None = None, callback=None, progress: bool = False) -> torch.Tensor:
    """Single-step DPM-Solver(++) with the grid points as the intermediate stages, as diffusers'
    DPMSolverSinglestepScheduler does (Lu et al. 2022, Algorithms 1-2, with r_k set by the grid).

    Steps are grouped in blocks following :func:`singlestep_orders`, e.g. [1, 2, 3, 1, 2, 3, ...]:
    the step of stage j goes from the block's first point s straight to the next grid point using
    the model outputs at the block's first j points (:func:`singlestep_stage`), so one DPM-Solver-k
    step spans k grid steps, with one evaluation per grid step. The state reported at the inner
    points is the intermediate u_j. ``lower_order_final=False`` needs a multiple of ``order`` steps
    (diffusers silently switches it on otherwise). The step to sigma = 0 returns the denoised estimate.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order={order} must be 1, 2 or 3")
    if solver_type not in SINGLESTEP_TYPES:
        raise ValueError(f"solver_type={solver_type!r} is unknown; choose one of {list(SINGLESTEP_TYPES)}")
    sigmas, model = prepare(denoiser, x, sigmas, extra_args)
    n = len(sigmas) - 1
    orders = singlestep_orders(n, order, lower_order_final, n > 0 and float(sigmas[-1]) == 0)
    x_s = x  # the state at the current block's first point
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised = model(x, sigma)
        m = denoised if predict_x0 else (x - denoised) / sigma
        j = orders[i]
        if j == 1:
            x_s, lams, ms = x, [half_log_snr(sigma)], [m]
        else:
            lams, ms = lams + [half_log_snr(sigma)], ms + [m]
        if sigma_next == 0:
            x = denoised
        else:
            s = i - j + 1
            x = singlestep_stage(x_s, lams, ms, half_log_snr(sigma_next), float(sigmas[s]), sigma_next, order=order,
                                 predict_x0=predict_x0, solver_type=solver_type)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


SAMPLERS = {
    "dpm_solver_1": sample_dpm_solver_1,
    "dpm_solver_2": sample_dpm_solver_2,
    "dpm_solver_3": sample_dpm_solver_3,
    "dpm_singlestep": sample_dpm_singlestep,
    "dpm_multistep_2": sample_dpm_multistep_2,
    "dpm_multistep_3": sample_dpm_multistep_3,
    "dpmpp_2s": sample_dpmpp_2s,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
}
