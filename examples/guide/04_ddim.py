"""Chapter 4: DDIM and what it gains over DDPM.

On the guide's digits U-Net: DDPM's ancestral sampler and DDIM (eta = 0) at 10, 20, 50 and 100
steps, judged by accuracy and Frechet distance; DDIM's eta swept from 0 (deterministic) to 1
(DDPM's variance) at 20 steps; the same noise gives the same image, whatever the batch; DDIM
inversion of held-out digits and back. On the 2-D ring mixture with its exact denoiser: DDIM's
distance to the exact probability-flow ODE solution as the steps double (first order), and the
inversion round trip's error.
``python examples/guide/04_ddim.py [--fast --out DIR]`` (28 CPU s beyond the cached model, one thread; --fast 3.5 CPU s).
"""
from __future__ import annotations

import math

import torch

import _basics
import _guide as guide
from difflab.core import Denoiser, VPDiscrete
from difflab.samplers import invert_ddim, sample_ddim, sample_ddpm

BOUNDS = {
    "accuracy_ddim_10": (0.3, 1.0),            # fast: the 80-step model, 30 samples
    "frechet_ddim_10": (0.0, 400.0),
    "accuracy_ddpm_10": (0.0, 1.0),
    "frechet_ddpm_minus_ddim_10": (-50.0, 400.0),   # at 10 steps DDPM is worse (or no better)
    "ddim_repeat_max_diff": (0.0, 0.0),        # same seed, same images, exactly
    "ddim_batch_max_diff": (0.0, 1e-5),        # a sample does not depend on its batch
    "oracle_ddim_rmse_10": (0.05, 0.5),        # DDIM on the exact denoiser vs the exact ODE solution
    "oracle_nll_gap_ddim_10": (-1.0, 3.0),     # DDIM's samples vs the mixture's entropy, 10 steps
    "oracle_order": (0.8, 1.3),                # log2(rmse_n / rmse_2n) at the finest pair: first order
    "oracle_inversion_rmse_10": (0.01, 0.5),   # x0 -> noise -> x0 with DDIM on 10 steps
    "oracle_inversion_order": (0.3, 1.5),      # log2 of the round trip's error ratio at the finest pair
    "digits_inversion_rmse_20": (0.0, 0.8),    # per-pixel RMSE of the round trip on held-out digits
}


def oracle(n: int, seed: int, steps: tuple[int, ...]) -> tuple[dict, dict]:
    """DDIM on the ring mixture's exact eps-model vs the exact ODE solution; inversion round trips."""
    gm = _basics.ring_mixture()
    frame = VPDiscrete.from_name("linear")
    model = Denoiser(gm.network(frame, "eps"), frame, "eps")
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64) * float(frame.prior_std(torch.tensor(frame.sigma_max)))
    exact = gm.exact_ode_solution(x_T, (frame.sigma_max, 0.0), rtol=1e-9, atol=1e-9)
    out, rmse, inv = {}, {}, {}
    x0 = gm.sample(n, g)
    entropy = gm.mean_nll(gm.sample(100_000, g))
    for k in steps:
        grid = _basics.discrete_grid(frame, k)
        ddim = sample_ddim(model, x_T, grid)
        rmse[k] = (ddim - exact).pow(2).sum(-1).mean().sqrt().item()
        out[f"oracle_ddim_rmse_{k}"] = rmse[k]
        gen = torch.Generator().manual_seed(seed + 1)
        ddpm = sample_ddpm(model, x_T, grid, noise=lambda gen=gen: torch.randn(n, 2, generator=gen, dtype=torch.float64))
        out[f"oracle_nll_gap_ddim_{k}"] = gm.mean_nll(ddim) - entropy
        out[f"oracle_nll_gap_ddpm_{k}"] = gm.mean_nll(ddpm) - entropy
        back = sample_ddim(model, invert_ddim(model, x0, grid), grid)
        inv[k] = (back - x0).pow(2).sum(-1).mean().sqrt().item()
        out[f"oracle_inversion_rmse_{k}"] = inv[k]
    out["oracle_order"] = math.log2(rmse[steps[-2]] / rmse[steps[-1]])
    out["oracle_inversion_order"] = math.log2(inv[steps[-2]] / inv[steps[-1]])
    return out, rmse


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    denoiser, _ = guide.digits_model(args.fast)
    frame = denoiser.frame
    n = 30 if args.fast else 100
    labels = torch.arange(n) % 10
    step_counts = (10, 20) if args.fast else (10, 20, 50, 100)
    figures, fd = {}, {"ddpm": [], "ddim": []}
    for steps in step_counts:
        grid = _basics.discrete_grid(frame, steps)
        for name in ("ddpm", "ddim"):
            judged = guide.judge_samples(world, _basics.sample_digits(denoiser, labels, grid, name, args.seed), labels)
            figures[f"accuracy_{name}_{steps}"] = judged["accuracy"]
            figures[f"frechet_{name}_{steps}"] = judged["frechet"]
            fd[name].append(judged["frechet"])
    figures["frechet_floor"] = judged["frechet_floor"]
    figures["frechet_ddpm_minus_ddim_10"] = figures["frechet_ddpm_10"] - figures["frechet_ddim_10"]

    # eta: 0 is DDIM, 1 has DDPM's posterior variance (Song et al. 2021, eq. 16), at 20 steps.
    grid20 = _basics.discrete_grid(frame, 20)
    for eta in ((0.5, 1.0) if not args.fast else (1.0,)):
        s = _basics.sample_digits(denoiser, labels, grid20, "ddim", args.seed, eta=eta)
        judged = guide.judge_samples(world, s, labels)
        tag = f"{eta:g}".replace(".", "p")
        figures[f"accuracy_eta_{tag}"] = judged["accuracy"]
        figures[f"frechet_eta_{tag}"] = judged["frechet"]

    # Determinism: the same seed twice; and the first 10 samples drawn alone vs inside the batch.
    grid10 = _basics.discrete_grid(frame, 10)
    a = _basics.sample_digits(denoiser, labels, grid10, "ddim", args.seed)
    b = _basics.sample_digits(denoiser, labels, grid10, "ddim", args.seed)
    c = _basics.sample_digits(denoiser, labels[:10], grid10, "ddim", args.seed)
    figures["ddim_repeat_max_diff"] = (a - b).abs().max().item()
    figures["ddim_batch_max_diff"] = (a[:10] - c).abs().max().item()

    # Inversion of held-out digits (with their labels) on 20 steps and back.
    held, held_labels = world["held"][:n], world["held_labels"][:n]
    cond = {"class_labels": held_labels}
    with torch.no_grad():
        latent = invert_ddim(denoiser, held, grid20, extra_args=cond)
        back = sample_ddim(denoiser, latent, grid20, extra_args=cond)
    figures["digits_inversion_rmse_20"] = (back - held).pow(2).mean().sqrt().item()

    with guide.threads(1):
        more, rmse = oracle(200 if args.fast else 2000, args.seed, (10, 20, 40) if args.fast else (10, 20, 40, 80, 160))
    figures.update(more)
    figures = guide.report(figures)

    # The picture: FD against steps; the oracle's error against steps; held digits, their latents, the round trip.
    plt = guide.pyplot()
    fig = plt.figure(figsize=(13, 3.6), constrained_layout=True)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.5]})
    for name in ("ddpm", "ddim"):
        ax1.plot(step_counts, fd[name], "o-", label=name)
    ax1.axhline(figures["frechet_floor"], color="gray", ls="--", label="real digits (floor)")
    ax1.set(xscale="log", xlabel="steps", ylabel=f"judge FD ({n} samples)", title="digits: quality vs steps"), ax1.legend(fontsize=8)
    ks = sorted(rmse)
    ax2.loglog(ks, [rmse[k] for k in ks], "o-", label="DDIM vs exact ODE")
    ax2.loglog(ks, [rmse[ks[0]] * ks[0] / k for k in ks], "k--", lw=0.8, label="slope -1")
    ax2.set(xlabel="steps", ylabel="RMSE", title="oracle: first order"), ax2.legend(fontsize=8)
    rows = torch.cat([held[:8], latent[:8] / latent[:8].std(dim=(1, 2, 3), keepdim=True) / 2, back[:8].clamp(-1, 1)])
    tile = rows[:, 0].reshape(3, 8, 8, 8).permute(0, 2, 1, 3).reshape(24, 64)
    ax3.imshow(tile, cmap="gray", vmin=-1, vmax=1)
    ax3.set(xticks=[], yticks=[])
    ax3.set_title("rows: held-out digits, DDIM-inverted noise, sampled back (20 steps)", fontsize=9)
    guide.save(fig, guide.picture(args, "04_ddim.png"))
    return figures


main = guide.on_one_thread(run)  # one thread: small operations, CPU seconds quoted for one

if __name__ == "__main__":
    main()
