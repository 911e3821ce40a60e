"""Chapter 50: where diffusion is heading in content creation, argued from one measured trend.

The trend: the number of network evaluations (NFE) a sample needs has fallen with each generation of
samplers. On the closed-form Gaussian mixture (its exact denoiser, so the only error left is the
sampler's own) the example runs DDPM (2020), DDIM (2020), DPM-Solver++ 2M (2022) and UniPC (2023) at
4 to 256 NFE (the ODE solvers to 64), measures the Frechet distance of each sample set to the true distribution, and prints
the NFE each needs to come within twice the distance that true samples of the same size score.
``python examples/guide/50_future.py [--fast --out DIR]`` (about 10 s).
"""
from __future__ import annotations

import torch

import _guide as guide
import _sampling as S
from difflab.core import grids
from difflab.samplers import get_sampler

BOUNDS = {
    "nfe_to_truth_ddpm": (32, 10**6),            # the 2020 ancestral sampler needs many steps
    "nfe_to_truth_dpmpp_2m": (4, 16),            # the 2022 solver gets there in a few
    "nfe_ratio_ddpm_over_dpmpp_2m": (2, 10**6),
    "fd_true_samples": (0.0, 0.05),              # the finite-sample floor
}
NOT_REACHED = 10**6  # printed when a sampler never comes within tolerance in the NFE tried
SAMPLERS = {"ddpm": 2020.5, "ddim": 2020.8, "dpmpp_2m": 2022.9, "unipc": 2023.1}  # first arXiv version


def nfes(sampler: str, fast: bool) -> list[int]:
    """The NFE budgets tried: DDPM up to 256, the ODE solvers up to 64 (they get there sooner)."""
    if fast:
        return [64, 256] if sampler == "ddpm" else [4, 16]
    return [4, 8, 16, 32, 64, 128, 256] if sampler == "ddpm" else [4, 8, 16, 32, 64]


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    gm, den = S.oracle(args.fast, args.seed)
    n = 200 if args.fast else 1000
    floor = gm.frechet_to_truth(gm.sample(n, torch.Generator().manual_seed(args.seed + 1)))
    results = {}
    for sampler in SAMPLERS:
        for nfe in nfes(sampler, args.fast):
            sigmas = grids.for_denoiser(den, nfe, grid="karras").double()
            g = torch.Generator().manual_seed(args.seed)
            x = torch.randn(n, gm.dim, generator=g, dtype=torch.float64) * den.prior_std(sigmas[0])
            noise = lambda: torch.randn(n, gm.dim, generator=g, dtype=torch.float64)  # noqa: E731
            kwargs = {"noise": noise} if sampler == "ddpm" else {}
            results[sampler, nfe] = gm.frechet_to_truth(get_sampler(sampler)(den, x, sigmas, **kwargs))
    needed = {s: min([k for (t, k), fd in results.items() if t == s and fd <= 2 * floor], default=NOT_REACHED)
              for s in SAMPLERS}
    figures = {f"fd_{s}_{k}": fd for (s, k), fd in results.items()}
    figures.update({f"nfe_to_truth_{s}": v for s, v in needed.items()})
    figures.update({"nfe_ratio_ddpm_over_dpmpp_2m": needed["ddpm"] / needed["dpmpp_2m"], "fd_true_samples": floor})
    guide.report(figures)

    plt = guide.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in SAMPLERS:
        ax1.plot(nfes(s, args.fast), [results[s, k] for k in nfes(s, args.fast)], "o-", label=s)
    ax1.axhline(2 * floor, color="gray", ls="--", lw=0.8, label="2 x true samples' distance")
    ax1.set(xscale="log", yscale="log", xlabel="network evaluations per sample (NFE)",
            ylabel="Frechet distance to the true distribution", title="exact denoiser, four samplers")
    ax1.legend(fontsize=8)
    finite = {s: v for s, v in needed.items() if v != NOT_REACHED}
    ax2.plot([SAMPLERS[s] for s in finite], list(finite.values()), "o-")
    for s, v in finite.items():
        ax2.annotate(s, (SAMPLERS[s], v), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax2.set(yscale="log", xlabel="year the sampler was published", ylabel="NFE to reach the tolerance",
            title="evaluations a sample needs, by year")
    guide.save(fig, guide.picture(args, "50_future.png"))
    return figures


if __name__ == "__main__":
    main()
