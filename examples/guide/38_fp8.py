"""Chapter 38: hardware acceleration, FP8 in particular.

The two FP8 formats of Micikevicius et al. 2022, E4M3 (forward: weights and activations) and E5M2
(backward: gradients): their ranges (``torch.finfo``) and the rounding error they make on real
tensors (a digits U-Net's weights, a batch of its activations, one step's gradients), each scaled
per tensor as ``difflab.perf.fp8.quantize`` does. Then delayed scaling (``scale_for_call``): the
scale comes from the amax history of earlier calls, so an outlier newer than the history
saturates instead of overflowing. Finally trains the same small digits model in fp32 and with
its linears and 1x1 convolutions in FP8 (``TrainConfig(fp8=True)``, emulated on the CPU: the same
arithmetic as the GPU path, none of its speed), and judges both.
``python examples/guide/38_fp8.py [--fast --out DIR]`` (about 38 CPU seconds with one thread
the first time, two trainings; then cached; --fast about 5 CPU seconds).
"""
from __future__ import annotations

import torch

import _guide as guide
import _training as tr
from difflab.perf.fp8 import FORMATS, quantize, scale_for_call, scale_from
from difflab.train import diffusion_loss, draw_sigmas

BOUNDS = {
    "e4m3_max": (448, 448), "e5m2_max": (57344, 57344),
    "e4m3_rel_rms_error_normal": (0.015, 0.05),   # 3 mantissa bits: about 2^-5 relative (uniform rounding)
    "e5m2_rel_rms_error_normal": (0.03, 0.09),    # 2 mantissa bits: twice that
    "e4m3_unscaled_underflow_share_grads": (0.5, 1.0),  # gradients are tiny: unscaled E4M3 loses most of them
    "e5m2_scaled_underflow_share_grads": (0.0, 0.05),   # scaled per tensor, E5M2 keeps nearly all
    "delayed_outlier_saturates": (1, 1),          # an outlier 10x the history's amax comes back as the max, finite
    "fp8_loss_max_rel_diff": (0.0, 0.5),          # fp8 vs fp32 training, same seed, same steps
}


def rel_rms(x: torch.Tensor, fmt: str) -> float:
    """RMS of (dequantized - x) / |x| over the non-zero values that do not underflow, scaled per tensor
    to the format's max (just-in-time amax scaling)."""
    scale = scale_from(x.abs().amax().float(), fmt, 0, torch.tensor(1.0))
    back = quantize(x, scale, fmt).float() / scale
    keep = (x != 0) & (back != 0)
    return float((((back - x) / x)[keep]).pow(2).mean().sqrt())


def underflow(x: torch.Tensor, fmt: str, scaled: bool) -> float:
    """The share of non-zero values that become zero in ``fmt``, unscaled or scaled per tensor."""
    scale = scale_from(x.abs().amax().float(), fmt, 0, torch.tensor(1.0)) if scaled else torch.tensor(1.0)
    nz = x[x != 0]
    return float((quantize(nz, scale, fmt).float() == 0).double().mean())


def tensors_of(denoiser, world: dict, seed: int) -> dict:
    """A trained digits net's weights, the input of one of its linears, and one step's gradients."""
    g = torch.Generator().manual_seed(seed)
    x0, labels = world["train"][:64], world["train_labels"][:64]
    sigma = draw_sigmas(denoiser.frame, 64, g).float()
    noise = torch.randn(x0.shape, generator=g)
    seen = []
    linear = next(m for m in denoiser.net.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1)))
    denoiser.net.zero_grad()
    with torch.enable_grad():
        diffusion_loss(denoiser, x0, sigma, noise, extra_args={"class_labels": labels}).mean().backward()
    handle.remove()
    params = [p for p in denoiser.net.parameters() if p.grad is not None]
    out = {"weights": torch.cat([p.detach().reshape(-1) for p in params]), "activations": seen[0],
           "gradients": torch.cat([p.grad.reshape(-1) for p in params])}
    denoiser.net.zero_grad()
    return out


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    steps, n, width, batch = (10, 20, 4, 16) if args.fast else (200, 100, 8, 64)
    runs = {f: tr.run(tr.tiny_spec(width), steps, seed=args.seed, batch_size=batch, fp8=f == "fp8") for f in ("fp32", "fp8")}
    judged = {k: tr.judge(world, r["raw"], n, steps=5 if args.fast else 20, seed=args.seed) for k, r in runs.items()}
    l32, l8 = runs["fp32"]["losses"], runs["fp8"]["losses"]
    rel = (l8 - l32).abs() / l32

    # 1. Formats and rounding error on real tensors.
    e4, e5 = torch.finfo(FORMATS["e4m3"][0]), torch.finfo(FORMATS["e5m2"][0])
    normal = torch.randn(100_000, generator=torch.Generator().manual_seed(args.seed))
    t = tensors_of(runs["fp32"]["raw"], world, args.seed)
    figures = {"e4m3_max": e4.max, "e5m2_max": e5.max, "e4m3_smallest_normal": e4.tiny, "e5m2_smallest_normal": e5.tiny,
               "e4m3_eps": e4.eps, "e5m2_eps": e5.eps,
               "e4m3_rel_rms_error_normal": rel_rms(normal, "e4m3"), "e5m2_rel_rms_error_normal": rel_rms(normal, "e5m2")}
    for name, x in t.items():
        figures[f"e4m3_rel_rms_error_{name}"] = rel_rms(x, "e4m3")
        figures[f"e5m2_rel_rms_error_{name}"] = rel_rms(x, "e5m2")
    figures["grad_abs_median"] = float(t["gradients"].abs().median())
    figures["e4m3_unscaled_underflow_share_grads"] = underflow(t["gradients"], "e4m3", False)
    figures["e5m2_unscaled_underflow_share_grads"] = underflow(t["gradients"], "e5m2", False)
    figures["e5m2_scaled_underflow_share_grads"] = underflow(t["gradients"], "e5m2", True)

    # 2. Delayed scaling: four calls of amax 1 fill the history; the fifth brings an outlier of 10.
    history, scale = torch.zeros(16), torch.ones(())
    g = torch.Generator().manual_seed(args.seed)
    used = []
    for amax in (1.0, 1.0, 1.0, 1.0, 10.0):
        x = torch.randn(1000, generator=g)
        x = x / x.abs().max() * amax
        s = scale_for_call(x, history, scale, "e4m3", 0, True)
        used.append(float(s))
    back = quantize(x, torch.tensor(used[-1]), "e4m3").float() / used[-1]
    figures["delayed_scale_before_outlier"] = used[-1]
    figures["delayed_scale_after_outlier"] = float(scale)
    figures["delayed_outlier_saturates"] = int(bool(torch.isfinite(back).all()) and abs(float(back.abs().max()) - 1.0) < 1e-6)

    # 3. Training: fp32 against FP8, same seed, same batches.
    figures.update({
        "fp8_loss_max_rel_diff": float(rel.max()), "fp8_loss_mean_rel_diff": float(rel.mean()),
        "fp32_final_loss": float(l32[-max(1, steps // 10):].mean()), "fp8_final_loss": float(l8[-max(1, steps // 10):].mean()),
        "fp32_accuracy": judged["fp32"]["accuracy"], "fp8_accuracy": judged["fp8"]["accuracy"],
        "fp32_frechet": judged["fp32"]["frechet"], "fp8_frechet": judged["fp8"]["frechet"],
        "frechet_floor": judged["fp32"]["frechet_floor"],
        "fp32_train_cpu_s": runs["fp32"]["cpu"], "fp8_train_cpu_s": runs["fp8"]["cpu"],
    })
    guide.report(figures)

    # The picture: the formats' grids against a tensor, the quantization error, the loss curves.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, color in (("weights", "tab:blue"), ("activations", "tab:green"), ("gradients", "tab:red")):
        x = t[name][t[name] != 0].abs().log2()
        axes[0].hist(x.numpy(), bins=80, histtype="step", color=color, label=name, density=True)
    for fmt, fi, style in (("E4M3", e4, "-"), ("E5M2", e5, "--")):
        smallest = fi.tiny * fi.eps
        for v in (smallest, fi.max):
            axes[0].axvline(torch.tensor(v).log2(), color="k", ls=style, lw=0.8)
    axes[0].set(xlabel="log2 |value|", ylabel="density",
                title="unscaled tensors vs FP8 ranges\n(solid E4M3, dashed E5M2: smallest subnormal, max)")
    axes[0].legend(fontsize=7)
    xs = torch.linspace(-4, 4, 2001)
    for fmt in ("e4m3", "e5m2"):
        s = scale_from(torch.tensor(4.0), fmt, 0, torch.tensor(1.0))
        axes[1].plot(xs, quantize(xs, s, fmt).float() / s - xs, lw=0.7, label=fmt.upper())
    axes[1].set(xlabel="x (amax 4 scaled to the format's max)", ylabel="rounding error",
                title="per-tensor scaled rounding error")
    axes[1].legend(fontsize=7)
    axes[2].plot(range(1, steps + 1), l32, lw=0.8, label=f"fp32 (judge {judged['fp32']['accuracy']:.0%})")
    axes[2].plot(range(1, steps + 1), l8, lw=0.8, label=f"FP8 linears, emulated (judge {judged['fp8']['accuracy']:.0%})")
    axes[2].set(xlabel="step", ylabel="loss", title="same seed, same batches")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    guide.save(fig, guide.picture(args, "38_fp8.png"))
    return figures


if __name__ == "__main__":
    main()
