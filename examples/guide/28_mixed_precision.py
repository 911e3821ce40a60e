"""Chapter 28: mixed-precision training and what it buys.

Trains the same small digits model twice from the same seed, once in float32 and once under bf16
autocast (``TrainConfig(precision="bf16")``: fp32 master weights, bf16 matmuls and convolutions),
prints how far the loss curves drift apart and what the digits judge reads of each. Then the
numerics: the range and precision of fp32, bf16 and fp16 (``torch.finfo``), and where the real
gradients of a digits model fall against fp16's range: the share that would underflow to zero in
fp16 without loss scaling and with a scale of 2^16 (Micikevicius et al. 2018), and in bf16.
``python examples/guide/28_mixed_precision.py [--fast --out DIR]`` (about 33 CPU seconds with one
thread the first time, two trainings; then cached).
"""
from __future__ import annotations

import torch

import _guide as guide
import _training as tr
from difflab.train import diffusion_loss, draw_sigmas

BOUNDS = {
    "bf16_max": (3.38e38, 3.40e38), "fp16_max": (65503, 65505),
    "bf16_eps": (0.0078, 0.0079), "fp16_eps": (0.00097, 0.00098),
    "fp16_smallest_subnormal": (5.9e-8, 6.0e-8),
    "grad_share_underflow_fp16": (0.0, 0.5),          # measured on real gradients
    "grad_share_underflow_fp16_scaled": (0.0, 0.01),  # a 2^16 loss scale rescues them
    "grad_share_underflow_bf16": (0.0, 0.001),        # bf16 has fp32's exponent
    "bf16_rounding_rel_rms": (0.001, 0.003),          # 8 significant bits: about 2^-9 relative
    "loss_curve_max_rel_diff": (0.0, 0.5),            # bf16 vs fp32, same seed, same steps
}


def gradients(denoiser, world: dict, seed: int) -> torch.Tensor:
    """Every parameter gradient of one fp32 loss on 64 training digits, flattened."""
    g = torch.Generator().manual_seed(seed)
    x0, labels = world["train"][:64], world["train_labels"][:64]
    sigma = draw_sigmas(denoiser.frame, 64, g).float()
    noise = torch.randn(x0.shape, generator=g)
    denoiser.net.zero_grad()
    with torch.enable_grad():
        diffusion_loss(denoiser, x0, sigma, noise, extra_args={"class_labels": labels}).mean().backward()
    out = torch.cat([p.grad.reshape(-1) for p in denoiser.net.parameters() if p.grad is not None])
    denoiser.net.zero_grad()
    return out


def underflow_share(values: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> float:
    """The share of non-zero ``values`` that become zero when cast to ``dtype`` after scaling."""
    nz = values[values != 0].double() * scale
    return float((nz.to(dtype) == 0).double().mean())


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    steps, n, width, batch = (10, 20, 4, 16) if args.fast else (200, 100, 8, 64)
    runs = {p: tr.run(tr.tiny_spec(width), steps, seed=args.seed, batch_size=batch, precision=p) for p in ("fp32", "bf16")}
    l32, l16 = runs["fp32"]["losses"], runs["bf16"]["losses"]
    rel = (l16 - l32).abs() / l32
    judged = {p: tr.judge(world, r["raw"], n, steps=5 if args.fast else 20, seed=args.seed) for p, r in runs.items()}

    # The numerics: ranges, and real gradients against them.
    f32, b16, h16 = torch.finfo(torch.float32), torch.finfo(torch.bfloat16), torch.finfo(torch.float16)
    grads = gradients(runs["fp32"]["raw"], world, args.seed)
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(args.seed))
    bf16_err = ((x.to(torch.bfloat16).float() - x) / x).pow(2).mean().sqrt()
    figures = guide.report({
        "fp32_max": f32.max, "bf16_max": b16.max, "fp16_max": h16.max,
        "fp32_eps": f32.eps, "bf16_eps": b16.eps, "fp16_eps": h16.eps,
        "bf16_smallest_normal": b16.tiny, "fp16_smallest_normal": h16.tiny, "fp16_smallest_subnormal": h16.smallest_normal * h16.eps,
        "grad_abs_median": float(grads.abs().median()),
        "grad_share_underflow_fp16": underflow_share(grads, torch.float16),
        "grad_share_underflow_fp16_scaled": underflow_share(grads, torch.float16, 2.0**16),
        "grad_share_underflow_bf16": underflow_share(grads, torch.bfloat16),
        "bf16_rounding_rel_rms": float(bf16_err),
        "loss_curve_max_rel_diff": float(rel.max()),
        "loss_curve_mean_rel_diff": float(rel.mean()),
        "fp32_final_loss": float(l32[-max(1, steps // 10):].mean()),
        "bf16_final_loss": float(l16[-max(1, steps // 10):].mean()),
        "fp32_accuracy": judged["fp32"]["accuracy"], "bf16_accuracy": judged["bf16"]["accuracy"],
        "fp32_frechet": judged["fp32"]["frechet"], "bf16_frechet": judged["bf16"]["frechet"],
        "frechet_floor": judged["fp32"]["frechet_floor"],
        "fp32_train_cpu_s": runs["fp32"]["cpu"], "bf16_train_cpu_s": runs["bf16"]["cpu"],
    })

    # The picture: the loss curves, and the gradients' magnitudes against the formats' ranges.
    plt = guide.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot(range(1, steps + 1), l32, lw=0.8, label=f"fp32 (judge {judged['fp32']['accuracy']:.0%})")
    ax1.plot(range(1, steps + 1), l16, lw=0.8, label=f"bf16 autocast (judge {judged['bf16']['accuracy']:.0%})")
    ax1.set(xlabel="step", ylabel="loss", title="same seed, same batches")
    ax1.legend()
    logs = grads[grads != 0].abs().log2()
    ax2.hist(logs.numpy(), bins=80, color="gray")
    for value, label, color in ((h16.smallest_normal * h16.eps, "fp16 smallest subnormal", "tab:red"),
                                (h16.tiny, "fp16 smallest normal", "tab:orange"),
                                (h16.smallest_normal * h16.eps / 2.0**16, "... with loss scale 2^16", "tab:green"),
                                (b16.tiny, "bf16 smallest normal", "tab:blue")):
        ax2.axvline(torch.tensor(value).log2(), color=color, label=label)
    ax2.set(xlabel="log2 |gradient|", ylabel="count", title="one step's gradients (digits U-Net)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    guide.save(fig, guide.picture(args, "28_mixed_precision.png"))
    return figures


if __name__ == "__main__":
    main()
