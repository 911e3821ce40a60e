"""Chapter 30: memory needs of training versus inference.

Splits the memory of one training step into weights, gradients, AdamW's two moments, the EMA copy
and the activations autograd saves for the backward pass, and compares it with an inference call,
for the guide's digits U-Net: predicted by ``difflab.perf.memory.estimate_memory`` and measured by
``measure_peak`` (on the CPU: the bytes alive before the step plus the peak of the allocator's
running total, from torch's profiler), with gradient checkpointing and bf16 autocast too. Then the
same split for a Stable Diffusion 1.5-size U-Net (860 M parameters), built on the meta device (no
memory allocated): the weight side counted exactly, the activations counted by a
``saved_tensors_hooks`` pass over shapes alone, attention counted as a fused kernel saves it.
``python examples/guide/30_memory.py [--fast --out DIR]`` (about 4 CPU seconds with one thread).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import _guide as guide
from difflab.io.spec import build_denoiser
from difflab.perf.families import peak_bytes
from difflab.perf.memory import estimate_memory, example_inputs, measure_peak, resolve_network, step_loss

MiB, GiB = 2**20, 2**30

BOUNDS = {
    "hooks_equal_estimate": (1, 1),             # our hook count is what estimate_memory counts
    "train_predicted_over_measured": (0.8, 1.05),
    "train_over_inference": (5.0, 1000.0),      # a training step needs many times an inference call
    "checkpointing_activation_ratio": (0.05, 0.9),
}
# (the full run adds the SD1.5-size U-Net: 859.5 M parameters, 12.8 GiB of fp32 weights, grads and AdamW moments)


class _FlashSaves(torch.autograd.Function):
    """Attention as a fused kernel (FlashAttention, Dao et al. 2022) saves it for the backward pass:
    q, k, v, the output and one log-sum-exp per query row; never the N x N scores."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("shapes only")


class _Fused(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _FlashSaves.apply(*args[:3])
        return func(*args, **(kwargs or {}))


def saved_bytes(net, batch: int, size: int, fused: bool = False) -> int:
    """Bytes of the distinct storages autograd saves in one training forward (parameters excluded),
    counted by ``saved_tensors_hooks``; works on the meta device (shapes only)."""
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    x, t, cond = example_inputs(net, batch, size, device=next(net.parameters()).device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), (_Fused() if fused else torch.enable_grad()):
        loss = step_loss(net, x, t, cond)
    del loss
    return sum(seen.values())


def sd15(batch: int, latent: int) -> dict:
    """The SD1.5-size U-Net on the meta device: parameters; activations of a training step and of an
    inference call (fp32 training, fp16 inference; fused attention) at ``batch`` latents of ``latent`` x ``latent``."""
    net = resolve_network("sd1", "meta")
    out = {"parameters": sum(p.numel() for p in net.parameters())}
    per = saved_bytes(net, 1, latent, fused=True)
    out["train_activations"] = per * batch  # saved tensors are per example: linear in the batch
    net = net.to(torch.float16)
    x, t, cond = example_inputs(net, batch, latent, device="meta", dtype=torch.float16)
    out["inference_activations"] = peak_bytes(net, x, t, **cond)
    return out


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    width, batch = (4, 8) if args.fast else (16, 64)
    net = build_denoiser(guide.digits_spec(width), seed=args.seed).net
    n = sum(p.numel() for p in net.parameters())

    # 1. The digits U-Net: predicted and measured, training and inference.
    est = estimate_memory(net, batch, 8, ema=True)
    est_ckpt = estimate_memory(net, batch, 8, ema=True, gradient_checkpointing=True)
    est_bf16 = None if args.fast else estimate_memory(net, batch, 8, ema=True, precision="bf16")
    est_inf = estimate_memory(net, batch, 8, training=False)
    hooks = saved_bytes(net, batch, 8)
    measured = measure_peak(net, batch, 8)
    measured_inf = measure_peak(net, batch, 8, training=False)
    # measure_peak has no EMA copy: compare like with like
    predicted_no_ema = est["total"] - est["ema"]

    # 2. SD1.5 size on the meta device.
    sd_batch, latent = 8, 64
    sd = {} if args.fast else sd15(sd_batch, latent)
    figures = {
        "digits_parameters": n,
        "digits_params_kib": est["parameters"] / 1024, "digits_grads_kib": est["gradients"] / 1024,
        "digits_adam_kib": est["optimizer"] / 1024, "digits_ema_kib": est["ema"] / 1024,
        "digits_activations_kib": est["activations"] / 1024,
        "digits_activations_ckpt_kib": est_ckpt["activations"] / 1024,
        "digits_train_predicted_kib": predicted_no_ema / 1024,
        "digits_train_measured_kib": measured["peak"] / 1024,
        "digits_inference_predicted_kib": est_inf["total"] / 1024,
        "digits_inference_measured_kib": measured_inf["peak"] / 1024,
        "hooks_equal_estimate": int(hooks == est["activations"]),
        "train_predicted_over_measured": predicted_no_ema / measured["peak"],
        "train_over_inference": measured["peak"] / measured_inf["peak"],
        "checkpointing_activation_ratio": est_ckpt["activations"] / est["activations"],
    }
    if sd:
        p = sd["parameters"]
        figures["digits_activations_bf16_kib"] = est_bf16["activations"] / 1024
        figures["sd15_parameters_millions"] = p / 1e6
        figures["sd15_weight_side_gib"] = 16 * p / GiB
        figures["sd15_ema_gib"] = 4 * p / GiB
        figures["sd15_inference_weights_fp16_gib"] = 2 * p / GiB
        figures["sd15_train_activations_b8_gib"] = sd["train_activations"] / GiB
        figures["sd15_train_total_b8_gib"] = (16 * p + max(sd["train_activations"], 4 * p)) / GiB  # weights, Adam, EMA; then activations or grads
        figures["sd15_inference_activations_b8_fp16_gib"] = sd["inference_activations"] / GiB
        figures["sd15_inference_total_b8_fp16_gib"] = (2 * p + sd["inference_activations"]) / GiB
    guide.report(figures)

    # 3. The picture: stacked bars, training vs inference, digits (KiB) and SD1.5 (GiB).
    plt = guide.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    parts = ("weights", "gradients", "AdamW moments", "EMA", "activations")
    digits = {"train": [est["parameters"], est["gradients"], est["optimizer"], est["ema"], est["activations"]],
              "train, ckpt": [est_ckpt["parameters"], est_ckpt["gradients"], est_ckpt["optimizer"], est_ckpt["ema"],
                              est_ckpt["activations"]],
              "inference": [est_inf["parameters"], 0, 0, 0, est_inf["activations"]]}
    for ax, table, unit, title in ((ax1, digits, MiB, f"digits U-Net ({n / 1e3:.0f} k params), batch {batch}"),):
        for i, (label, values) in enumerate(table.items()):
            bottom = 0.0
            for j, v in enumerate(values):
                ax.bar(i, v / unit, bottom=bottom, color=f"C{j}", label=parts[j] if i == 0 else None)
                bottom += v / unit
        ax.set_xticks(range(len(table)), list(table))
        ax.set(ylabel="MiB (all parts stacked; a peak holds the larger of\ngradients and activations, not both)", title=title)
        ax.axhline(measured["peak"] / unit, color="k", ls=":", lw=1, label="measured training peak (no EMA)")
        ax.legend(fontsize=7)
    if sd:
        sdt = {"train fp32": [4 * p, 4 * p, 8 * p, 4 * p, sd["train_activations"]],
               "inference fp16": [2 * p, 0, 0, 0, sd["inference_activations"]]}
        for i, (label, values) in enumerate(sdt.items()):
            bottom = 0.0
            for j, v in enumerate(values):
                ax2.bar(i, v / GiB, bottom=bottom, color=f"C{j}")
                bottom += v / GiB
        ax2.set_xticks(range(len(sdt)), list(sdt))
        ax2.set(ylabel="GiB", title=f"SD1.5-size U-Net, batch {sd_batch}, {latent}x{latent} latents (meta device)")
    guide.save(fig, guide.picture(args, "30_memory.png"))
    return figures


if __name__ == "__main__":
    main()
