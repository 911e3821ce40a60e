"""Chapter 15: deterministic (ODE) versus stochastic (SDE, ancestral) samplers, measured side by side.

Three pairs that differ only in the fresh noise they add: DDIM eta 0 / eta 1, Euler / Euler
ancestral, DPM-Solver++(2M) / its SDE variant.

1. On the closed-form test bed: the Frechet distance of each sampler's samples to the true
   distribution, with the exact denoiser and with a denoiser that errs at high noise levels (a
   constant offset weighted by sigma^2 / (sigma^2 + 1)). The ODE carries the early error to the
   end; the fresh noise of the SDE lets later steps forget it (Karras et al. 2022, sec. 4).
2. On the guide's digits model: judge accuracy, Frechet distance and diversity (mean distance
   between two samples of one class, judge features) for each sampler, from the same noise.
3. Determinism: the same seed gives the same image, whatever the batch, stochastic samplers too.
``python examples/guide/15_deterministic_vs_stochastic.py [--fast --out DIR]`` (24 CPU seconds on one
thread, after the cached digits model; the fast run about 2 CPU seconds beyond loading it).
"""
from __future__ import annotations

import torch

import _guide as guide
import _sampling as S
from difflab.core import grids
from difflab.samplers import get_sampler

PAIRS = {  # name -> (ODE sampler, keywords), (stochastic sampler, keywords)
    "ddim": (("ddim", {}), ("ddim", {"eta": 1.0})),
    "euler": (("euler", {}), ("euler_ancestral", {})),
    "dpmpp_2m": (("dpmpp_2m", {}), ("dpmpp_2m_sde", {})),
}

BOUNDS = {
    "oracle_dpmpp_2m_ode_exact": (0.0, 0.03),      # exact denoiser: near the truth (true samples: 0.01)
    "oracle_ddim_ode_biased": (0.08, 0.4),         # an early error survives the ODE
    "oracle_ddim_sde_over_ode_biased": (0.4, 0.95),   # the SDE forgets part of it
    "oracle_dpmpp_2m_sde_over_ode_biased": (0.1, 0.7),
    "same_seed_max_difference": (0.0, 1e-4),       # ancestral sampler, batch of 20 vs of 7
    "other_seed_mean_difference": (0.1, 2.0),
    "digits_euler_ode_accuracy": (0.4, 1.0),       # fast model: 80 training steps
    "digits_euler_sde_accuracy": (0.4, 1.0),
}


def offset_error(gm, size: float = 1.0, seed: int = 3):
    """The mixture's exact denoiser plus a fixed offset c (|c| = ``size``) weighted by
    sigma^2 / (sigma^2 + 1): wrong at high noise, right at low noise."""
    c = torch.randn(gm.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    c = size * c / c.norm()

    def denoiser(x, sigma, **cond):
        s = torch.as_tensor(sigma, dtype=torch.float64)
        w = (s**2 / (s**2 + 1)).reshape(-1, *[1] * (x.ndim - 1)) if s.ndim else s**2 / (s**2 + 1)
        return gm.denoiser(x, sigma) + w * c
    return denoiser


def oracle_distances(args) -> dict:
    gm, den = S.oracle(args.fast, args.seed)
    n, steps = (500, 30) if args.fast else (2000, 50)
    sigmas = grids.for_denoiser(den, steps, grid="karras").double()
    out = {"truth": gm.frechet_to_truth(gm.sample(n, torch.Generator().manual_seed(args.seed + 1)))}
    for error, D in (("exact", gm.denoiser), ("biased", offset_error(gm))):
        for pair, sides in PAIRS.items():
            for side, (name, kwargs) in zip(("ode", "sde"), sides):
                g = torch.Generator().manual_seed(args.seed)
                noise = lambda: torch.randn(n, gm.dim, generator=g, dtype=torch.float64)  # noqa: E731
                x = noise() * float(sigmas[0])
                samples = get_sampler(name)(D, x, sigmas, noise=noise, **kwargs)
                out[f"oracle_{pair}_{side}_{error}"] = gm.frechet_to_truth(samples)
    return out


def diversity(judge, samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean distance between two samples asked for the same class, in judge features."""
    f = judge.features(samples)
    dists = [torch.pdist(f[labels == k]).mean() for k in labels.unique()]
    return float(torch.stack(dists).mean())


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    figures = oracle_distances(args)
    for pair in PAIRS:
        figures[f"oracle_{pair}_sde_over_ode_biased"] = figures[f"oracle_{pair}_sde_biased"] / figures[f"oracle_{pair}_ode_biased"]

    world = guide.digits_world()
    model, _ = guide.digits_model(args.fast)
    per_class = 10 if args.fast else 30
    asked = S.asked_labels(per_class)
    steps = 10 if args.fast else 20
    shown = {}
    for pair, sides in PAIRS.items():
        if args.fast and pair != "euler":
            continue
        for side, (name, kwargs) in zip(("ode", "sde"), sides):
            samples = S.sample(model, len(asked), steps, labels=asked, sampler=name, seed=args.seed, **kwargs)
            r = guide.judge_samples(world, samples, asked)
            figures[f"digits_{pair}_{side}_accuracy"] = r["accuracy"]
            figures[f"digits_{pair}_{side}_frechet"] = r["frechet"]
            figures[f"digits_{pair}_{side}_diversity"] = diversity(world["judge"], samples, asked)
            shown[pair, side] = samples
    held = world["held"][: 10 * per_class]
    figures["digits_held_out_diversity"] = diversity(world["judge"], held, world["held_labels"][: 10 * per_class])
    figures["frechet_floor"] = r["frechet_floor"]

    # Determinism: sample i depends on (seed, i) only, also through every step's fresh noise.
    a = S.sample(model, 20, steps, labels=asked[:20], sampler="euler_ancestral", seed=args.seed, batch_size=20)
    b = S.sample(model, 20, steps, labels=asked[:20], sampler="euler_ancestral", seed=args.seed, batch_size=7)
    c = S.sample(model, 20, steps, labels=asked[:20], sampler="euler_ancestral", seed=args.seed + 1, batch_size=20)
    figures["same_seed_max_difference"] = (a - b).abs().max().item()
    figures["other_seed_mean_difference"] = (a - c).abs().mean().item()
    guide.report(figures)

    plt = guide.pyplot()
    fig = plt.figure(figsize=(11, 6.5))
    ax = fig.add_subplot(2, 2, 1)
    labels = [f"{p}\n{e}" for e in ("exact", "biased") for p in PAIRS]
    xs = torch.arange(len(labels)).float()
    for k, side in enumerate(("ode", "sde")):
        vals = [figures[f"oracle_{p}_{side}_{e}"] for e in ("exact", "biased") for p in PAIRS]
        ax.bar(xs + (k - 0.5) * 0.38, vals, 0.38, label="ODE" if side == "ode" else "SDE / ancestral")
    ax.axhline(figures["truth"], color="gray", ls="--", lw=0.8, label="true samples")
    ax.set_xticks(xs.tolist(), labels, fontsize=7)
    ax.set(ylabel="Frechet distance to the truth", title="closed-form mixture, exact vs erring denoiser")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 2, 2)
    for pair, side in shown:
        ax.scatter(figures[f"digits_{pair}_{side}_diversity"], figures[f"digits_{pair}_{side}_frechet"],
                   marker="o" if side == "ode" else "^", label=f"{pair} {side}")
    ax.axvline(figures["digits_held_out_diversity"], color="gray", ls=":", lw=0.8, label="held-out digits")
    ax.set(xlabel="diversity (mean distance within a class)", ylabel="Frechet distance", title="digits model")
    ax.legend(fontsize=7)
    picks = [k for k in (("euler", "ode"), ("euler", "sde"), ("dpmpp_2m", "ode"), ("dpmpp_2m", "sde")) if k in shown]
    for i, (pair, side) in enumerate(picks):
        S.show_grid(fig.add_subplot(2, len(picks), len(picks) + i + 1), S.class_grid(shown[pair, side], per_class, 3), 10,
                    f"{PAIRS[pair][side == 'sde'][0]}")
    guide.save(fig, guide.picture(args, "15_deterministic_vs_stochastic.png"))
    return figures


if __name__ == "__main__":
    main()
