"""Chapter 14: sampling strategies (DDPM, DDIM, Euler, Heun, DPM-Solver++ 2M, UniPC, LMS, ...) measured.

1. On the closed-form test bed (a Gaussian mixture and its exact denoiser, so the exact
   probability-flow ODE solution is known): each deterministic sampler's RMSE to that solution
   against the number of denoiser evaluations (NFE), and the slope of the log-log line (minus the
   order of the method).
2. On the guide's digits model: judge accuracy and Frechet distance at 5, 10 and 20 NFE for each
   sampler (DDPM included: it has no ODE to be compared with), from the same per-sample noise,
   all on the Karras grid (rho = 7) from sigma = 80; and Heun once on the model's own trailing
   timesteps, whose first step spans sigma 2e4 -> 6.
``python examples/guide/14_samplers.py [--fast --out DIR]`` (37 CPU seconds on one thread,
after the cached digits model; the fast run about 2.5 CPU seconds beyond loading it).
"""
from __future__ import annotations

import math

import torch

import _guide as guide
import _sampling as S
from difflab.core import grids
from difflab.oracle import rmse_to_exact
from difflab.samplers import get_sampler

# name shown -> (difflab sampler, its keywords, NFE per step)
SAMPLERS = {
    "ddpm": ("ddpm", {}, 1),
    "ddim": ("ddim", {}, 1),
    "euler": ("euler", {}, 1),
    "heun": ("heun", {}, 2),
    "lms": ("lms", {"order": 4}, 1),
    "dpmpp_2m": ("dpmpp_2m", {"lower_order_final": False}, 1),
    "dpmpp_3m": ("dpmpp_3m", {"taylor_d2": True, "lower_order_final": False}, 1),
    "unipc": ("unipc", {"order": 3, "variant": "bh2", "lower_order_final": False}, 1),
}
ODE = [name for name in SAMPLERS if name != "ddpm"]
FAST_ODE = ["ddim", "euler", "heun", "dpmpp_2m", "unipc"]

BOUNDS = {
    "euler_slope": (-1.3, -0.7),        # first order: error halves when NFE doubles
    "heun_slope": (-2.8, -1.7),         # second order
    "dpmpp_2m_slope": (-2.8, -1.6),
    "unipc_slope": (-5.0, -2.4),        # third order, fourth with the corrector
    "ddim_minus_euler_error": (-1e-9, 1e-9),  # DDIM is Euler in the canonical frame
    "unipc_error_20": (0.003, 0.03),
    "euler_error_20": (0.02, 0.1),
    "unipc_accuracy_10": (0.35, 1.0),   # digits model (fast: 80 training steps, 53%)
    "ddpm_accuracy_10": (0.3, 1.0),
    "heun_accuracy_10": (0.15, 1.0),     # on the Karras grid from sigma 80 (fast: 25%)
    "heun_trailing_accuracy_10": (0.0, 0.15),  # on the trailing timesteps the first step breaks it: chance
}


def steps_for(name: str, nfe: int) -> int:
    """Grid steps that spend ``nfe`` evaluations (Heun's last step costs one)."""
    per = SAMPLERS[name][2]
    return max(1, (nfe + 1) // 2) if per == 2 else nfe


def run(name, denoiser, x, sigmas, **extra):
    fn_name, kwargs, _ = SAMPLERS[name]
    counted = S.Counted(denoiser)
    out = get_sampler(fn_name)(counted, x, sigmas, **kwargs, **extra)
    return out, counted.calls


def oracle_errors(args) -> dict:
    """RMSE to the exact ODE solution for each deterministic sampler at each NFE (Karras grid)."""
    gm, den = S.oracle(args.fast, args.seed)
    n = 32 if args.fast else 128
    g = torch.Generator().manual_seed(args.seed)
    sigma_max, sigma_min = den.frame.sigma_max, den.frame.sigma_min
    x = torch.randn(n, gm.dim, generator=g, dtype=torch.float64) * float(den.prior_std(torch.tensor(sigma_max, dtype=torch.float64)))
    # Every sampler ends with x0 = D(x, sigma_min) (its step to 0): the exact answer takes the same last step.
    at_min = gm.exact_ode_solution(x, (sigma_max, sigma_min), rtol=1e-7, atol=1e-7)
    exact = gm.denoiser(at_min, sigma_min)
    budgets = [10, 20, 40] if args.fast else [5, 10, 20, 40, 80]
    table = {}
    for name in (FAST_ODE if args.fast else ODE):
        rows = []
        for nfe in budgets:
            sigmas = grids.for_denoiser(den, steps_for(name, nfe), grid="karras").double()
            out, calls = run(name, den, x, sigmas)
            rows.append((calls, rmse_to_exact(out, exact)))
        table[name] = rows
    return table


def slope(rows) -> float:
    """Least-squares slope of log(error) on log(NFE) over the budgets of 19 NFE and more (the
    asymptotic regime; below it the error of the first steps dominates)."""
    pts = torch.tensor([[math.log(c), math.log(max(e, 1e-300))] for c, e in rows if c >= 19], dtype=torch.float64)
    xm, ym = pts[:, 0].mean(), pts[:, 1].mean()
    return float(((pts[:, 0] - xm) * (pts[:, 1] - ym)).sum() / ((pts[:, 0] - xm) ** 2).sum())


def digits_scores(args, world):
    """Judge accuracy and Frechet distance per sampler at 5 / 10 / 20 NFE."""
    model, _ = guide.digits_model(args.fast)
    per_class = 10 if args.fast else 30
    asked = S.asked_labels(per_class)
    names = ["ddpm", "heun", "unipc"] if args.fast else list(SAMPLERS)
    scores, grids_ = {}, {}
    for name in names:
        fn_name, kwargs, _ = SAMPLERS[name]
        for nfe in (10,) if args.fast else (5, 10, 20):
            samples = S.sample(model, len(asked), steps_for(name, nfe), labels=asked, sampler=fn_name,
                               seed=args.seed, grid="karras80", **kwargs)
            r = guide.judge_samples(world, samples, asked)
            scores[name, nfe] = r
            if nfe == 10:
                grids_[name] = samples
    # Heun on the model's own trailing timesteps: the first step spans sigma 2e4 -> 2 at 10 NFE
    samples = S.sample(model, len(asked), steps_for("heun", 10), labels=asked, sampler="heun", seed=args.seed)
    scores["heun_trailing", 10] = guide.judge_samples(world, samples, asked)
    return scores, grids_


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    table = oracle_errors(args)
    scores, samples = digits_scores(args, world)

    figures = {}
    for name, rows in table.items():
        figures[f"{name}_slope"] = slope(rows)
    for name, rows in table.items():
        figures[f"{name}_error_20"] = dict(rows)[min(dict(rows), key=lambda c: abs(c - 20))]
    figures["ddim_minus_euler_error"] = figures["ddim_error_20"] - figures["euler_error_20"]
    for (name, nfe), r in scores.items():
        figures[f"{name}_accuracy_{nfe}"] = r["accuracy"]
        figures[f"{name}_frechet_{nfe}"] = r["frechet"]
    figures["frechet_floor"] = next(iter(scores.values()))["frechet_floor"]
    guide.report(figures)

    plt = guide.pyplot()
    fig = plt.figure(figsize=(11, 7))
    ax = fig.add_subplot(2, 2, 1)
    for name, rows in table.items():
        ax.loglog([c for c, _ in rows], [e for _, e in rows], "o-", label=f"{name} ({figures[f'{name}_slope']:.1f})", ms=3)
    ax.set(xlabel="NFE", ylabel="RMSE to the exact ODE solution", title="closed-form mixture (slope in legend)")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 2, 2)
    names = sorted({n for n, _ in scores if n in SAMPLERS}, key=list(SAMPLERS).index)
    budgets = sorted({k for _, k in scores})
    for name in names:
        ax.plot(budgets, [scores[name, k]["frechet"] for k in budgets], "o-", label=name, ms=3)
    ax.axhline(figures["frechet_floor"], color="gray", ls="--", lw=0.8, label="train vs held-out")
    ax.set(xlabel="NFE", ylabel="Frechet distance (judge features)", title="digits model", xscale="log")
    ax.legend(fontsize=7)
    shown = [n for n in ("ddpm", "euler", "heun", "unipc") if n in samples]
    for i, name in enumerate(shown):
        S.show_grid(fig.add_subplot(2, len(shown), len(shown) + i + 1), S.class_grid(samples[name], len(samples[name]) // 10, 3),
                    10, f"{name}, 10 NFE")
    guide.save(fig, guide.picture(args, "14_samplers.png"))
    return figures


if __name__ == "__main__":
    main()
