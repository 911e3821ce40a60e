"""Chapter 50: where diffusion is heading in content creation, argued from one measured trend.

The trend: the number of network evaluations (NFE) a sample needs has fallen with each generation of
samplers. The example samples the guide's digits model with DDPM (2020), DDIM (2020), DPM-Solver++ 2M
(2022) and UniPC (2023) at a range of NFE, judges every set, and prints the NFE each needs to come within
20% of the best Frechet distance any of them reached.
``python examples/guide/50_future.py [--fast --out DIR]`` (about 40 s, once the guide model is cached).
"""
from __future__ import annotations

import torch

import _guide as guide
from difflab.pipelines import generate

BOUNDS = {
    "dpmpp_2m_vs_ddpm_fd_ratio_8": (0.0, 1.0),  # at 8 NFE the 2022 solver beats DDPM's ancestral sampler
    "nfe_within_20pct_ddpm": (16, 10**6),        # DDPM needs more than 8 evaluations
    "accuracy_dpmpp_2m_8": (0.4, 1.0),           # the fast model (80 training steps) reads as its class
}
NOT_REACHED = 10**6  # printed when a sampler never comes within 20% in the NFE tried
SAMPLERS = {"ddpm": 2020.5, "ddim": 2020.8, "dpmpp_2m": 2022.9, "unipc": 2023.1}  # publication dates (arXiv)


def nfe_grid(sampler: str, fast: bool) -> list[int]:
    if fast:
        return [8, 32] if sampler == "ddpm" else [4, 8]
    return [8, 32, 128] if sampler == "ddpm" else [4, 8, 16, 32]


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    denoiser, _ = guide.digits_model(args.fast)
    n_per_class = 6 if args.fast else 20
    asked = torch.arange(10).repeat_interleave(n_per_class)
    results = {}
    for sampler in SAMPLERS:
        for nfe in nfe_grid(sampler, args.fast):
            samples = generate(denoiser, asked, shape=(1, 8, 8), sampler=sampler, steps=nfe, guidance_scale=1.5,
                               seed=args.seed, batch_size=len(asked))
            results[sampler, nfe] = guide.judge_samples(world, samples, asked)
    best = min(r["frechet"] for r in results.values())
    needed = {s: min([n for (t, n), r in results.items() if t == s and r["frechet"] <= 1.2 * best], default=NOT_REACHED)
              for s in SAMPLERS}
    figures = {f"fd_{s}_{n}": r["frechet"] for (s, n), r in results.items()}
    figures.update({f"accuracy_{s}_{n}": r["accuracy"] for (s, n), r in results.items()})
    figures.update({f"nfe_within_20pct_{s}": v for s, v in needed.items()})
    figures.update({"ddim_vs_ddpm_fd_ratio_8": results["ddim", 8]["frechet"] / results["ddpm", 8]["frechet"],
                    "dpmpp_2m_vs_ddpm_fd_ratio_8": results["dpmpp_2m", 8]["frechet"] / results["ddpm", 8]["frechet"],
                    "frechet_floor": next(iter(results.values()))["frechet_floor"]})
    guide.report(figures)

    plt = guide.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in SAMPLERS:
        nfes = nfe_grid(s, args.fast)
        ax1.plot(nfes, [results[s, n]["frechet"] for n in nfes], "o-", label=s)
    ax1.axhline(figures["frechet_floor"], color="gray", ls="--", lw=0.8, label="real-data floor")
    ax1.set(xscale="log", yscale="log", xlabel="network evaluations per sample", ylabel="Frechet distance (judge features)",
            title="the digits model, one network, four samplers")
    ax1.legend(fontsize=8)
    finite = {s: v for s, v in needed.items() if v != NOT_REACHED}
    ax2.plot([SAMPLERS[s] for s in finite], list(finite.values()), "o-")
    for s, v in finite.items():
        ax2.annotate(s, (SAMPLERS[s], v), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax2.set(yscale="log", xlabel="year the sampler was published", ylabel="NFE to within 20% of the best FD",
            title="evaluations a good sample needs, by year")
    guide.save(fig, guide.picture(args, "50_future.png"))
    return figures


if __name__ == "__main__":
    main()
