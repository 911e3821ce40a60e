"""Chapter 2: the reverse process, how denoising turns noise into data.

On a 2-D mixture of eight Gaussians whose denoiser is known exactly (``difflab.oracle``), runs the
reverse chain of DDPM from pure noise for 1000 steps and watches the cloud of samples condense
onto the mixture; prints how far the final samples are from the truth (Frechet distance to the
true moments, mean NLL under the true density against that of true samples); checks that the
reverse step's mean is the forward posterior q(x_{t-1} | x_t, x0) with x0 replaced by the
denoiser's estimate, and that the denoiser is Tweedie's formula on the noisy density's score.
``python examples/guide/02_reverse_process.py [--fast --out DIR]`` (about 10 CPU s; --fast 1.4 CPU s).
"""
from __future__ import annotations

import torch

import _basics
import _guide as guide
from difflab.core import Denoiser, VPDiscrete, q_posterior, ve_posterior
from difflab.samplers import sample_ddpm

BOUNDS = {
    "frechet_to_truth": (0.0, 0.02),          # squared Frechet distance of 500 samples to the true moments
    "nll_gap": (-0.15, 0.15),                 # mean NLL of the samples minus the entropy (NLL of 100k true samples)
    "noise_start_nll_gap": (10.0, 50.0),      # the starting noise is far from the data (same yardstick)
    "posterior_mean_error": (0.0, 1e-10),     # VP posterior mean vs the canonical one times sqrt(ab_prev)
    "posterior_var_error": (0.0, 1e-10),
    "tweedie_error": (0.0, 1e-8),             # D(x) vs x + sigma^2 grad log p_sigma(x), exact
    "mode_share_min": (0.05, 0.2),            # least-visited of the 8 modes (1/8 = 0.125 ideal)
}


def tweedie_error(gm, sigmas, n: int, g: torch.Generator) -> float:
    """max |D(x; sigma) - (x + sigma^2 grad log p_sigma(x))| with the score by autograd of the
    noisy mixture's exact log-density (Efron 2011; Robbins 1956)."""
    worst = 0.0
    for s in sigmas:
        x = (gm.sample(n, g) + s * torch.randn(n, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
        score, = torch.autograd.grad(gm.noisy(s).log_prob(x).sum(), x)
        worst = max(worst, (gm.denoiser(x.detach(), s) - (x.detach() + s**2 * score)).abs().max().item())
    return worst


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    g = torch.Generator().manual_seed(args.seed)
    n = 400 if args.fast else 4000
    gm = _basics.ring_mixture()
    frame = VPDiscrete.from_name("linear")
    denoiser = Denoiser(gm.network(frame, "eps"), frame, "eps")  # the exact eps-prediction model
    sigmas = _basics.discrete_grid(frame, 1000)

    # 1. The reverse chain from pure noise, keeping x_t at a few steps (canonical x -> VP x_t = x / sqrt(1 + s^2)).
    keep_at = {600, 300, 150, 60, 20, 0}  # after step i the chain is at t = 1000 - (i + 1) (0: the sample)
    snaps = {}

    def keep(info):
        t = 999 - info["i"]
        if t in keep_at:
            snaps[t] = info["x"] / (1 + info["sigma_next"] ** 2) ** 0.5

    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64) * float(denoiser.prior_std(sigmas[0]))
    snaps[1000] = x_T / (1 + float(sigmas[0]) ** 2) ** 0.5
    gen = torch.Generator().manual_seed(args.seed + 1)
    samples = sample_ddpm(denoiser, x_T, sigmas, noise=lambda: torch.randn(n, 2, generator=gen, dtype=torch.float64),
                          callback=keep)
    truth = gm.sample(100_000, g)
    nll_true = gm.mean_nll(truth)  # the mixture's entropy, to +-0.003
    modes = ((samples[:, None] - gm.means[None]).norm(dim=-1)).argmin(1).bincount(minlength=8).double() / n

    # 2. The reverse step's mean is the forward posterior with x0 := D(x_t): VP form (eq. 7) = canonical form.
    ab = frame.alpha_bars
    t = torch.randint(1, 999, (64,), generator=g)
    x0 = gm.sample(64, g)
    xt = ab[t, None].sqrt() * x0 + (1 - ab[t, None]).sqrt() * torch.randn(64, 2, generator=g, dtype=torch.float64)
    mean_vp, var_vp = q_posterior(x0, xt, ab[t, None], ab[t - 1, None])
    s, s_prev = frame.sigmas[t, None], frame.sigmas[t - 1, None]
    mean_c, var_c = ve_posterior(x0, xt / ab[t, None].sqrt(), s, s_prev)
    mean_err = (mean_c * ab[t - 1, None].sqrt() - mean_vp).abs().max().item()
    var_err = (var_c * ab[t - 1, None] - var_vp).abs().max().item()

    figures = guide.report({
        "frechet_to_truth": gm.frechet_to_truth(samples),
        "nll_gap": gm.mean_nll(samples) - nll_true,
        "noise_start_nll_gap": gm.mean_nll(snaps[1000]) - nll_true,
        "posterior_mean_error": mean_err,
        "posterior_var_error": var_err,
        "tweedie_error": tweedie_error(gm, [0.05, 0.3, 1.0, 5.0], 200, g),
        "mode_share_min": modes.min().item(),
    })

    # 3. The picture: the cloud at six steps of the reverse chain, the true density's samples last.
    plt = guide.pyplot()
    order = sorted(snaps, reverse=True)
    fig, axes = plt.subplots(1, len(order) + 1, figsize=(2.2 * (len(order) + 1), 2.4))
    for ax, step in zip(axes, order):
        pts = snaps[step][:2000]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_title(f"x_t, t = {step}" if step else "x_0 (samples)", fontsize=8)
    axes[-1].scatter(truth[:2000, 0], truth[:2000, 1], s=1, alpha=0.4, color="C1")
    axes[-1].set_title("true data", fontsize=8)
    for ax in axes:
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
    guide.save(fig, guide.picture(args, "02_reverse_process.png"))
    return figures


main = guide.on_one_thread(run)  # one thread: small operations, CPU seconds quoted for one

if __name__ == "__main__":
    main()
