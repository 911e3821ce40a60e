"""Chapter 25: continuous versus discrete time, measured side by side.

1. Frames: DDPM's discrete cosine schedule (``VPDiscrete``) and the continuous one
   (``VPContinuous``) give the same sigma at t = (i + 1) / T, except near the end, where the discrete
   betas are clipped at 0.999.
2. Training: the same tiny MLP learns the 2-D ring mixture on T = 20 discrete levels
   (``noise_levels.discrete_uniform``) or on continuous t ~ U(0, 1) (``continuous_uniform``); both
   are judged on the 20 training levels and between them, and sampled with DDIM on the discrete
   model's own 20 levels and on a 100-level grid that reaches below them.
3. The oracle: the exact probability-flow ODE (continuous time) and DDPM's 1000-step chain
   (discrete) from the same noise reach the mixture; DDIM's error to the exact ODE solution shrinks
   as its grid refines.
``python examples/guide/25_continuous_vs_discrete.py [--fast --out DIR]`` (25-26 CPU s; --fast 2.7 CPU s).
"""
from __future__ import annotations

import torch

import _basics
import _guide as guide
from difflab.core import Denoiser, VPContinuous, VPDiscrete, grids, noise_levels
from difflab.samplers import sample_ddim, sample_ddpm

BOUNDS = {
    "frames_max_rel_diff_t_lt_990": (0.0, 1e-9),   # discrete cosine vs continuous cosine at t = (i+1)/T
    "frames_rel_diff_last": (1.0, 10.0),            # the clipped last step differs
    "x0_excess_on_discrete": (0.0, 0.3),            # the 20-level model on its own levels below sigma 5
    "x0_excess_between_discrete": (0.0, 0.5),       # ... and half-way between them (geometric midpoints)
    "x0_excess_between_continuous": (0.0, 0.5),
    "ode_exact_nll_gap": (-0.3, 0.3),               # the exact ODE's samples vs the mixture's entropy
    "chain_nll_gap": (-0.3, 0.3),                   # DDPM's 1000-step chain (first 300 samples in --fast)
    "ddim_rmse_20": (0.01, 0.3),                    # DDIM on the exact denoiser, 20 steps, vs the exact ODE
    "ddim_rmse_ratio_20_over_80": (2.0, 8.0),       # four times the steps: about 4x smaller (first order)
}


def levels_between(sigmas: torch.Tensor) -> torch.Tensor:
    """Geometric midpoints of consecutive levels: the noise levels a 20-level model never saw."""
    return (sigmas[1:] * sigmas[:-1]).sqrt()


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    g = torch.Generator().manual_seed(args.seed)
    figures = {}

    # 1. The two frames: the same schedule, one sampled at T points.
    disc, cont = VPDiscrete.from_name("cosine"), VPContinuous("cosine")
    sc = cont.sigma((torch.arange(1000, dtype=torch.float64) + 1) / 1000)
    rel = ((disc.sigmas - sc) / sc).abs()
    figures["frames_max_rel_diff_t_lt_990"] = rel[:990].max().item()
    figures["frames_rel_diff_last"] = rel[-1].item()

    # 2. Training on 20 discrete levels vs continuous t; the same net, steps, data. Both nets see the
    #    time in [0, 1000] (discrete: the step index x 50; continuous: t x 1000).
    gm = _basics.ring_mixture()
    d20 = VPDiscrete.from_name("cosine", T=20)
    steps = 120 if args.fast else 2000
    data = gm.sample(20_000, g).float()
    models = {"discrete": Denoiser(_basics.ToyNet(t_scale=50.0, seed=args.seed), d20, "eps"),
              "continuous": Denoiser(_basics.ToyNet(t_scale=1000.0, seed=args.seed), cont, "eps")}
    draws = {"discrete": lambda n, gen: noise_levels.discrete_uniform(d20, n, gen),
             "continuous": lambda n, gen: noise_levels.continuous_uniform(cont, n, gen)}
    for name, model in models.items():
        _basics.train_toy(model, data, steps, seed=args.seed, sigma_fn=draws[name])
        model.eval()
    held = gm.sample(1000 if args.fast else 8000, g)
    exact = gm.denoiser  # the canonical D(x, sigma), exact at every sigma (a frame would clamp below its range)
    low = d20.sigmas[d20.sigmas < 5]  # where x0 errors are comparable (eps-models guess x0 badly at high noise)
    level_sets = {"on": low, "between": levels_between(low)}
    for where, lv in level_sets.items():
        floor = _basics.x0_mse(exact, held, lv)
        for name, model in models.items():
            figures[f"x0_excess_{where}_{name}"] = _basics.x0_mse(model, held, lv) - floor
    n = 400 if args.fast else 4000
    entropy = gm.mean_nll(gm.sample(100_000, g))
    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64)
    sample_grids = {"grid20": grids.timestep_sigmas(d20, torch.arange(19, -1, -1)),
                    "grid100": grids.exponential_sigmas(100, 0.01, float(d20.sigma_max))}
    for gname, sig in sample_grids.items():
        for name, model in models.items():
            x = x_T.float() * float(model.prior_std(sig[0]))
            with torch.no_grad():
                figures[f"nll_gap_{name}_{gname}"] = gm.mean_nll(sample_ddim(model, x, sig)) - entropy

    # 3. The oracle: continuous-time ODE vs discrete chain, from the same noise, exact denoiser.
    frame = VPDiscrete.from_name("linear")
    oracle = Denoiser(gm.network(frame, "eps"), frame, "eps")
    x_T = x_T * float(frame.prior_std(torch.tensor(frame.sigma_max)))
    ode = gm.exact_ode_solution(x_T, (frame.sigma_max, 0.0), rtol=1e-7 if args.fast else 1e-9,
                                atol=1e-7 if args.fast else 1e-9)
    figures["ode_exact_nll_gap"] = gm.mean_nll(ode) - entropy
    m = 300 if args.fast else n  # the 1000-step chain is the slow part
    gen = torch.Generator().manual_seed(args.seed + 1)
    chain = sample_ddpm(oracle, x_T[:m], _basics.discrete_grid(frame, 1000),
                        noise=lambda: torch.randn(m, 2, generator=gen, dtype=torch.float64))
    figures["chain_nll_gap"] = gm.mean_nll(chain) - entropy
    rmse = {}
    for k in (10, 20, 40, 80):
        out = sample_ddim(oracle, x_T, _basics.discrete_grid(frame, k))
        rmse[k] = (out - ode).pow(2).sum(-1).mean().sqrt().item()
        figures[f"ddim_rmse_{k}"] = rmse[k]
    figures["ddim_rmse_ratio_20_over_80"] = rmse[20] / rmse[80]
    figures = guide.report(figures)

    # 4. The picture: x0 error by noise level for both models; ODE samples vs chain samples.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    probe = grids.exponential_sigmas(60, 0.02, 200.0)[:-1].flip(0)
    floor = [_basics.x0_mse(exact, held[:1000], s.reshape(1)) for s in probe]
    for name, model in models.items():
        err = [_basics.x0_mse(model, held[:1000], s.reshape(1)) / f for s, f in zip(probe, floor)]
        axes[0].plot(probe, err, label=f"{name} t")
    for s in d20.sigmas[:-1]:
        axes[0].axvline(float(s), color="gray", lw=0.4)
    axes[0].set(xscale="log", yscale="log", xlabel="sigma (grey: the 20 training levels)", ylabel="x0 MSE / exact denoiser's",
                title="error between and beyond the training levels"), axes[0].legend(fontsize=8)
    for ax, pts, title in ((axes[1], ode, "exact probability-flow ODE"), (axes[2], chain, "DDPM chain, 1000 steps")):
        ax.scatter(pts[:2000, 0], pts[:2000, 1], s=1, alpha=0.4)
        ax.set(xlim=(-2.3, 2.3), ylim=(-2.3, 2.3), aspect="equal", xticks=[], yticks=[], title=title)
    guide.save(fig, guide.picture(args, "25_continuous_vs_discrete.png"))
    return figures


main = guide.on_one_thread(run)  # one thread: small operations, CPU seconds quoted for one

if __name__ == "__main__":
    main()
