"""Chapter 1: the forward (noising) process and how noise is scheduled.

Runs the DDPM Markov chain q(x_t | x_{t-1}) step by step on the digits and checks that it lands where
the closed-form jump q(x_t | x_0) says it does; prints each schedule's signal-to-noise ratio at the
ends and the middle; draws the digits being noised and the curves of alpha_bar and log-SNR.
``python examples/guide/01_forward_process.py [--fast --out DIR]`` (about 5 s).
"""
from __future__ import annotations

import torch

import _guide as guide
from difflab.core.forward import q_sample
from difflab.core.schedules import discrete_alpha_bars, log_snr_from_sigma, sigma_from_alpha_bar
from difflab.data import load_digits

# What the --fast run must print (tests/test_guide.py checks it).
BOUNDS = {
    "chain_vs_jump_mean_error": (0.0, 0.08),   # chain's mean of x_t vs sqrt(ab_t) x0, at t = T/2
    "chain_vs_jump_std_error": (0.0, 0.08),    # chain's std of x_t vs sqrt(1 - ab_t), at t = T/2
    "linear_log_snr_end": (-11.0, -9.0),       # log-SNR at t = T for DDPM's linear betas
    "cosine_log_snr_end": (-25.0, -10.0),      # the cosine schedule ends far noisier
    "linear_t_snr_one": (200, 300),            # the step where SNR crosses 1 (signal = noise)
    "cosine_t_snr_one": (450, 550),
}


def chain(x0: torch.Tensor, alpha_bars: torch.Tensor, t_stop: int, generator: torch.Generator) -> torch.Tensor:
    """x_t by t single steps x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps (Ho et al. 2020, eq. 2)."""
    betas = 1 - torch.cat([alpha_bars[:1], alpha_bars[1:] / alpha_bars[:-1]])
    x = x0.double()
    for t in range(t_stop + 1):
        x = (1 - betas[t]).sqrt() * x + betas[t].sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    images, _ = load_digits(split="train")
    g = torch.Generator().manual_seed(args.seed)
    T = 1000
    schedules = {name: discrete_alpha_bars(name, T) for name in ("linear", "cosine", "scaled_linear", "sigmoid")}

    # 1. The chain and the jump agree: many chains from one digit, compared with eq. 4's moments.
    ab = schedules["linear"]
    t = T // 2
    x0 = images[:1].double().expand(400 if args.fast else 4000, -1, -1, -1)
    xt = chain(x0, ab, t - 1, g)                               # index t-1 is step t
    mean_err = (xt.mean(0) - ab[t - 1].sqrt() * x0[0]).abs().mean().item()
    std_err = (xt.std(0) - (1 - ab[t - 1]).sqrt()).abs().mean().item()

    # 2. Where each schedule puts its signal-to-noise ratio.
    log_snr = {name: log_snr_from_sigma(sigma_from_alpha_bar(a)) for name, a in schedules.items()}
    snr_one = {name: int((ls < 0).nonzero()[0]) + 1 for name, ls in log_snr.items()}
    figures = guide.report({
        "chain_vs_jump_mean_error": mean_err, "chain_vs_jump_std_error": std_err,
        "linear_log_snr_end": log_snr["linear"][-1].item(), "cosine_log_snr_end": log_snr["cosine"][-1].item(),
        "linear_t_snr_one": snr_one["linear"], "cosine_t_snr_one": snr_one["cosine"],
    })

    # 3. The picture: one digit jumped to eight noise levels under two schedules, and the curves.
    plt = guide.pyplot()
    fig = plt.figure(figsize=(10, 5.2))
    steps = [0, 50, 100, 200, 300, 500, 700, 999]
    eps = torch.randn(images[:1].shape, generator=torch.Generator().manual_seed(1))
    for row, name in enumerate(("linear", "cosine")):
        for col, s in enumerate(steps):
            ax = fig.add_subplot(4, 8, row * 8 + col + 1)
            ax.imshow(q_sample(images[:1], schedules[name][s].float(), eps)[0, 0], cmap="gray", vmin=-2, vmax=2)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{name} t={s + 1}", fontsize=7)
    ax1, ax2 = fig.add_subplot(2, 2, 3), fig.add_subplot(2, 2, 4)
    for name, a in schedules.items():
        ax1.plot(range(1, T + 1), a, label=name)
        ax2.plot(range(1, T + 1), log_snr[name], label=name)
    ax1.set(xlabel="t", ylabel="alpha_bar_t"), ax2.set(xlabel="t", ylabel="log-SNR = log(ab / (1 - ab))")
    ax2.axhline(0, color="gray", lw=0.5), ax1.legend(fontsize=7)
    guide.save(fig, guide.picture(args, "01_forward_process.png"))
    return figures


if __name__ == "__main__":
    main()
