"""Chapter 21: multi-scale diffusion architectures.

Three measurements. (1) The same noise destroys a large image less: the digits at 8, 16 and 32
pixels a side get the same per-pixel noise, and the judge (which sees them averaged down to 8x8)
reads them; the noise std after average pooling by k falls as 1/k. (2) Simple diffusion's
resolution-shifted schedule (Hoogeboom et al. 2023) undoes that: at the same t, the shifted
schedules leave the three sizes equally legible. (3) One level or two: U-Nets with one and with two
resolution levels trained with the same budget on the digits.
``python examples/guide/21_multi_scale.py [--fast --out DIR]`` (full: 50 s of CPU time on one thread,
two 200-step trainings included; --fast: 27 s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import _arch as arch
import _guide as guide
from difflab.core.schedules import cosine_alpha_bar, resolution_shift, shifted_cosine_alpha_bar

BOUNDS = {
    "pooled_noise_std_k2": (0.48, 0.52),        # average pooling by 2 halves i.i.d. noise's std
    "pooled_noise_std_k4": (0.24, 0.26),
    "sigma_half_ratio_32_over_8": (2.0, 6.0),   # noise needed to halve the judge's accuracy: ~4x at 4x the side
    "shifted_spread": (0.0, 0.25),              # accuracy spread over sizes at t = 0.5, shifted schedules
    "unshifted_spread": (0.25, 1.0),            # ... with the same (unshifted) cosine schedule
    "two_level_error_sigma_1": (0.02, 0.35),
}
SIZES = (8, 16, 32)
SIGMA_GRID = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """The 8x8 digits at ``size`` x ``size`` (bilinear): the same picture with more pixels."""
    return images if size == images.shape[-1] else F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def accuracy_under_noise(judge, images, labels, sigma: float, seed: int) -> float:
    """The judge's accuracy on ``images + sigma eps`` (it averages them down to 8x8)."""
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return judge.accuracy(images + sigma * eps, labels)


def sigma_at_half(sigmas, accs, chance: float = 0.1) -> float:
    """The noise std where the accuracy falls halfway from its first value to chance (log-linear interpolation)."""
    target = (accs[0] + chance) / 2
    for (s0, a0), (s1, a1) in zip(zip(sigmas, accs), zip(sigmas[1:], accs[1:])):
        if a0 >= target >= a1:
            f = (a0 - target) / max(a0 - a1, 1e-9)
            return math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0)))
    return float("nan")


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    judge = world["judge"]
    n = 120 if args.fast else 600
    held, labels = world["held"][:n], world["held_labels"][:n]

    # 1. Pooling shrinks noise; the same noise spares bigger images.
    eps = torch.randn(256, 1, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    pooled_std = {k: float(F.avg_pool2d(eps, k).std()) for k in (2, 4)}
    sized = {s: upsample(held, s) for s in SIZES}
    curves = {s: [accuracy_under_noise(judge, sized[s], labels, sg, args.seed) for sg in SIGMA_GRID] for s in SIZES}
    half = {s: sigma_at_half(SIGMA_GRID, curves[s]) for s in SIZES}

    # 2. The resolution shift: sigma(t) = shift * tan(pi t / 2), shift = size / base (base = 8).
    ts = torch.linspace(0.05, 0.95, 10 if args.fast else 19)
    acc_t = {}
    for s in SIZES:
        for name, ab in (("cosine", cosine_alpha_bar(ts, s=0.0)), ("shifted", shifted_cosine_alpha_bar(ts, resolution_shift(s, 8)))):
            sig = ((1 - ab) / ab).sqrt()        # the x = x0 + sigma eps frame
            acc_t[name, s] = [accuracy_under_noise(judge, sized[s], labels, float(v), args.seed) for v in sig]
    mid = int((ts - 0.5).abs().argmin())
    spread = {name: max(acc_t[name, s][mid] for s in SIZES) - min(acc_t[name, s][mid] for s in SIZES)
              for name in ("cosine", "shifted")}

    # 3. One level against two, the same budget.
    spec2 = guide.digits_spec()
    spec1 = {**spec2, "unet": {**spec2["unet"], "channel_mult": [1], "attention_levels": [0]}}
    steps = 30 if args.fast else 200
    models = {"one_level": arch.train_digits(spec1, steps, args.seed, world),
              "two_level": arch.train_digits(spec2, steps, args.seed, world)}
    errs = {k: arch.x0_error(d, held[:256], labels[:256], (0.5, 1.0, 2.0), args.seed) for k, d in models.items()}
    asked = torch.arange(10).repeat_interleave(4 if args.fast else 30)
    from difflab.pipelines import generate
    samples = {k: generate(d, asked.tolist(), shape=(1, 8, 8), steps=10 if args.fast else 25, guidance_scale=2.0,
                           seed=args.seed, progress=False) for k, d in models.items()}
    judged = {k: guide.judge_samples(world, s, asked) for k, s in samples.items()}

    figures = guide.report({
        "pooled_noise_std_k2": pooled_std[2], "pooled_noise_std_k4": pooled_std[4],
        **{f"sigma_half_{s}": half[s] for s in SIZES}, "sigma_half_ratio_32_over_8": half[32] / half[8],
        **{f"acc_t05_cosine_{s}": acc_t["cosine", s][mid] for s in SIZES},
        **{f"acc_t05_shifted_{s}": acc_t["shifted", s][mid] for s in SIZES},
        "unshifted_spread": spread["cosine"], "shifted_spread": spread["shifted"],
        "log_snr_shift_32": -2 * math.log(resolution_shift(32, 8)),
        "one_level_params": arch.count(models["one_level"].net), "two_level_params": arch.count(models["two_level"].net),
        "train_steps": steps,
        "one_level_error_sigma_1": errs["one_level"][1], "two_level_error_sigma_1": errs["two_level"][1],
        "one_level_error_sigma_2": errs["one_level"][2], "two_level_error_sigma_2": errs["two_level"][2],
        "one_level_accuracy": judged["one_level"]["accuracy"], "two_level_accuracy": judged["two_level"]["accuracy"],
        "one_level_frechet": judged["one_level"]["frechet"], "two_level_frechet": judged["two_level"]["frechet"],
    })

    # 4. The picture: one noisy digit at three sizes; accuracy vs sigma; vs t, plain and shifted; samples.
    plt = guide.pyplot()
    fig = plt.figure(figsize=(15, 4.4))
    gs = fig.add_gridspec(3, 5, width_ratios=[0.8, 1.3, 1.3, 0.45, 0.45], wspace=0.35)
    g = torch.Generator().manual_seed(1)
    for r, s in enumerate(SIZES):
        ax = fig.add_subplot(gs[r, 0])
        x = sized[s][3:4] + 2.0 * torch.randn((1, 1, s, s), generator=g)
        ax.imshow(torch.cat([x[0, 0], F.interpolate(F.adaptive_avg_pool2d(x, 8), size=s, mode="nearest")[0, 0]], 1),
                  cmap="gray", vmin=-2, vmax=2)
        ax.set_xticks([]), ax.set_yticks([]), ax.set_ylabel(f"{s}x{s}", fontsize=8)
        if r == 0:
            ax.set_title("sigma 2: pixels | seen at 8x8", fontsize=8)
    ax = fig.add_subplot(gs[:, 1])
    for s in SIZES:
        ax.semilogx(SIGMA_GRID, curves[s], "o-", label=f"{s}x{s} (half at sigma {half[s]:.1f})")
    ax.set(xlabel="per-pixel noise sigma", ylabel="judge accuracy", title="the same noise, three sizes"), ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[:, 2])
    for i, s in enumerate(SIZES):
        ax.plot(ts, acc_t["cosine", s], "--", color=f"C{i}", label=f"{s}: cosine")
        ax.plot(ts, acc_t["shifted", s], "-", color=f"C{i}", label=f"{s}: shifted by {s // 8}")
    ax.set(xlabel="t", ylabel="judge accuracy", title="schedules: plain (dashed) vs resolution-shifted"), ax.legend(fontsize=6)
    for col, k in enumerate(("one_level", "two_level")):
        ax = fig.add_subplot(gs[:, 3 + col])
        ax.imshow(samples[k].reshape(10, -1, 8, 8)[:, :4].permute(0, 2, 1, 3).reshape(80, -1), cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{k.replace('_', ' ')}\njudge {judged[k]['accuracy']:.0%}", fontsize=8)
    guide.save(fig, guide.picture(args, "21_multi_scale.png"))
    return figures


if __name__ == "__main__":
    main()
