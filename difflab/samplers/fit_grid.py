"""Sampling grids fitted to a model: the noise levels at which a sampler, on this model, lands
closest to the model's own exact ODE solution.

Align Your Steps (Sabour, Fidler & Kreis 2024) showed that a schedule optimised for one model beats
the hand-made ones at few steps. AYS minimises an upper bound on the KL divergence between the
discretised and the exact reverse SDE (its KLUB), estimated on data, by refining one level at a
time. :func:`fit_sigmas` keeps that plan (optimise the grid for the model at hand, from the model)
but minimises the error itself, as LD3 (Tong et al. 2025, "Learning to Discretize Denoising
Diffusion ODEs") does with a learned grid, and needs no data: only calls of the denoiser.

The objective. Draw M starting noises x_T^(j) ~ N(0, prior_std(sigma_max)^2 I) (the model's own
prior, ``seed``); solve the probability-flow ODE of the model from sigma_max to sigma_min with
Dormand-Prince 5(4) at ``rtol`` (:func:`difflab.samplers.adaptive.solve_ode`) and denoise there:
y^(j) = D(Phi(x_T^(j)), sigma_min), the answer every sampler of this model converges to. For a grid
s = (sigma_max, sigma_1, ..., sigma_{n-1}, 0) and the sampler S,

    J(s) = sqrt( sum_j ||S(x_T^(j); s) - y^(j)||^2 / (M * numel) ),

the RMSE per coordinate to the exact ODE, i.e. the quantity the grid is for.

The grids searched. Free levels (AYS's per-level refinement) overfit M trajectories: on the
closed-form family the fitted levels came in near-coincident pairs that a multistep solver exploits
on typical trajectories and that fail on others (error on new noise 5-50 times the fitted one).
So the levels come from four numbers, :func:`difflab.core.grids.density_sigmas`: where the first
step lands (sigma_1), the last level (sigma_{n-1}), and a step density in log sigma between them,
log-linear through three knots (the first fixed to 0). J is minimised over them in log space by
Nelder-Mead (Nelder & Mead 1965), started from the best of a 3 x 3 scan of (sigma_1, sigma_{n-1})
scaled by the spread of the model's own samples y. On new noise the typical error stays close
to the fitted one; what does not carry over is which rare trajectories, next to the boundary
between two modes, a coarse step sends to the wrong one (``bench/few_step_solvers.py``).

Cost: the reference (one adaptive solve, about 100-400 evaluations of M samples) plus at most
``max_evals`` runs of the sampler (``steps`` evaluations of M samples each). For the closed-form
models of ``bench/few_step_solvers.py`` (d <= 64, up to 32 components) that took 2 s (median) to
48 s on one CPU thread.
"""
from __future__ import annotations

import math

import torch

from ..core.grids import check_sigmas, density_sigmas
from .adaptive import solve_ode
from .unipc import sample_unipc

# The recommended few-step rule (docs/samplers.md): UniPC-3, bh2, no lower-order final steps, on a
# grid fitted for it. Chosen on the tuning family (random_family seed 1): with a fitted grid the
# final steps need no lowering (median 0.36x vs 0.59x of diffusers' best at 5 NFE on its first 12
# models with the first version of the fit; 0.44x vs 0.45x on all 24 with this one), and bh2 beat
# bh1 at 10 and 20 NFE (0.22x vs 0.47x at 10).
SAMPLER_KWARGS = {"order": 3, "variant": "bh2", "lower_order_final": False}


def default_samples(steps: int) -> int:
    """M, the number of model trajectories to fit on: 2560 / steps within [256, 512] (512 at 5 steps,
    256 from 10 on). The fewer the steps, the more often a trajectory near the boundary between two
    modes is sent to the wrong one, and the RMSE counts those: fitting on more of them makes such
    misses rarer on new noise (the plain RMSE, not a robust one, for the same reason: on the tuning
    family a trimmed or L1 objective ignored them and the worst member at 5 steps went from 1.0 to
    3.2 times diffusers' best), and each run is cheaper at few steps."""
    return int(min(512, max(256, 2560 // max(steps, 1))))


def model_reference(denoiser, shape, samples: int, *, seed: int = 0, rtol: float = 1e-7, frame=None,
                    extra_args: dict | None = None, dtype=torch.float64, device=None):
    """``(x_T, y)``: ``samples`` starting noises of shape ``(samples, *shape)`` at the model's
    sigma_max (``seed``) and y = D(ODE solution at sigma_min, sigma_min), the model's own exact
    answer for each (Dormand-Prince 5(4) at ``rtol``; see the module docstring)."""
    frame = _frame(denoiser, frame)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *shape, generator=g, dtype=torch.float64)
    x = (x * float(frame.prior_std(torch.tensor(frame.sigma_max, dtype=torch.float64)))).to(device=device, dtype=dtype)
    extra_args = {} if extra_args is None else extra_args
    x_end, _ = solve_ode(denoiser, x, frame.sigma_max, frame.sigma_min, rtol=rtol, atol=rtol, max_nfe=10**6,
                         extra_args=extra_args)
    return x, denoiser(x_end, x.new_full((samples,), frame.sigma_min), **extra_args)


def fit_sigmas(denoiser, steps: int, shape, *, sampler=sample_unipc, sampler_kwargs: dict | None = None,
               samples: int | None = None, seed: int = 0, rtol: float = 1e-7, max_evals: int = 150, reference=None,
               frame=None, extra_args: dict | None = None, dtype=torch.float64, device=None,
               return_info: bool = False):
    """A grid of ``steps`` levels then 0 for ``sampler`` on this model, fitted from the model alone:
    the :func:`difflab.core.grids.density_sigmas` grid that minimises the sampler's RMSE to the
    model's exact ODE solution on ``samples`` trajectories of its own (module docstring).

    ``sampler`` is a sampler function (default UniPC with :data:`SAMPLER_KWARGS`); the grid is fitted
    for it and its ``sampler_kwargs``, so use the same ones to sample. ``shape`` is one sample's
    shape (C, H, W), without the batch. ``reference`` = ``(x_T, y)`` from :func:`model_reference`
    reuses one reference for several step counts (its first ``samples`` rows are used). ``frame``
    gives sigma_min, sigma_max and the prior for denoisers without one (guidance wrappers);
    ``extra_args`` is the conditioning, as for samplers. The result is deterministic given ``seed``.

    Returns the grid (float64, decreasing, ending in 0), or ``(grid, info)`` with ``return_info``:
    ``info`` holds ``rmse`` (J at the fitted grid), ``rmse_start`` (at the best scanned start),
    ``evals`` (sampler runs), ``params`` (sigma_first, sigma_last, log_density) and ``samples``.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    frame = _frame(denoiser, frame)
    samples = default_samples(steps) if samples is None else int(samples)
    kwargs = dict(SAMPLER_KWARGS if sampler is sample_unipc and sampler_kwargs is None else sampler_kwargs or {})
    if reference is None:
        reference = model_reference(denoiser, shape, samples, seed=seed, rtol=rtol, frame=frame, extra_args=extra_args,
                                    dtype=dtype, device=device)
    x, y = reference[0][:samples], reference[1][:samples]
    lo, hi = math.log(frame.sigma_min), math.log(frame.sigma_max)
    evals = [0]

    def grid(theta):
        a = min(max(theta[0], lo + 0.01), hi - 0.01)
        b = min(max(theta[1], lo), a - 0.01) if len(theta) > 1 else a
        density = (0.0, *(min(max(c, -6.0), 6.0) for c in theta[2:]))  # density ratios up to e^12
        return density_sigmas(steps, frame.sigma_max, math.exp(a), math.exp(b), density)

    def loss(theta) -> float:
        evals[0] += 1
        out = sampler(denoiser, x, grid(theta), extra_args=extra_args, **kwargs)
        mse = (out.to(torch.float64) - y.to(torch.float64)).pow(2).mean().item()
        return math.log(mse) / 2 if mse > 0 and math.isfinite(mse) else (math.inf if mse != 0 else -math.inf)

    if steps == 1:
        theta = (hi,)
        best = start = loss(theta)
    else:
        spread = (y.to(torch.float64) - y.to(torch.float64).mean(0)).pow(2).mean().sqrt().item()
        theta, start = _scan(loss, spread, lo, hi, steps)
        theta, best = _nelder_mead(loss, theta, start, [0.7, 0.7, 1.0, 1.0][:len(theta)], max_evals - evals[0])
    sigmas = check_sigmas(grid(theta))
    if not return_info:
        return sigmas
    params = dict(sigma_first=float(sigmas[1]), sigma_last=float(sigmas[-2]),
                  log_density=(0.0, *[float(t) for t in theta[2:]]))
    return sigmas, dict(rmse=math.exp(best), rmse_start=math.exp(start), evals=evals[0], params=params, samples=samples)


def _frame(denoiser, frame):
    frame = getattr(denoiser, "frame", None) if frame is None else frame
    if frame is None or not hasattr(frame, "sigma_max"):
        raise ValueError("fit_sigmas needs the model's frame (sigma_min, sigma_max, prior_std): pass frame= for a "
                         "denoiser that has none, e.g. a guidance wrapper (frame=denoiser.denoiser.frame)")
    return frame


def _scan(loss, spread: float, lo: float, hi: float, steps: int):
    """The best of 3 x 3 starts: the first level at 1, 3 or 10 times the spread of the model's own
    samples, the last at sigma_min, or a third or two thirds of the way in log sigma from sigma_min
    to the spread (density uniform in log sigma)."""
    s = math.log(max(spread, 1e-12))
    firsts = [min(max(s + math.log(k), lo + 0.1), hi - 0.1) for k in (1.0, 3.0, 10.0)]
    lasts = [lo + f * max(s - lo, 0.0) for f in (0.0, 1 / 3, 2 / 3)]
    best = (math.inf, None)
    for a in firsts:
        for b in (lasts if steps > 2 else lasts[:1]):
            # parameters: sigma_first; + sigma_last (2+ levels); + 1 or 2 log-density knots (3, 4+ levels)
            theta = ((a,) if steps == 2 else (a, min(b, a - 0.1)) + (0.0,) * min(steps - 3, 2))
            value = loss(theta)
            if value < best[0]:
                best = (value, theta)
    return best[1], best[0]


def _nelder_mead(f, x0, f0: float, step, max_evals: int, xtol: float = 0.01, ftol: float = 1e-4):
    """Minimise f from x0 (f(x0) = f0) by the Nelder-Mead simplex method (Nelder & Mead 1965;
    reflection 1, expansion 2, contraction 1/2, shrink 1/2), within ``max_evals`` evaluations."""
    n = len(x0)
    simplex = [list(x0)] + [[v + (step[i] if i == k else 0.0) for i, v in enumerate(x0)] for k in range(n)]
    values = [f0] + [f(p) for p in simplex[1:]]
    evals = n
    while evals < max_evals:
        order = sorted(range(n + 1), key=lambda i: values[i])
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        size = max(abs(p[i] - simplex[0][i]) for p in simplex[1:] for i in range(n))
        if size < xtol or values[-1] - values[0] < ftol:
            break
        centroid = [sum(p[i] for p in simplex[:-1]) / n for i in range(n)]
        point = lambda t: [c + t * (w - c) for c, w in zip(centroid, simplex[-1])]  # noqa: E731
        xr = point(-1.0)
        fr = f(xr)
        evals += 1
        if fr < values[0]:
            xe = point(-2.0)
            fe = f(xe)
            evals += 1
            simplex[-1], values[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = xr, fr
        else:
            xc = point(-0.5) if fr < values[-1] else point(0.5)
            fc = f(xc)
            evals += 1
            if fc < min(fr, values[-1]):
                simplex[-1], values[-1] = xc, fc
            else:  # shrink towards the best point
                for k in range(1, n + 1):
                    simplex[k] = [b + 0.5 * (v - b) for b, v in zip(simplex[0], simplex[k])]
                    values[k] = f(simplex[k])
                evals += n
    k = min(range(n + 1), key=lambda i: values[i])
    return tuple(simplex[k]), values[k]
