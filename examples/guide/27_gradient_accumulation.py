"""Chapter 27: gradient accumulation.

Shows that one optimizer step on a batch of 64 and the same step as 4 micro-batches of 16 whose
gradients are summed (``TrainConfig(grad_accum=4)``) give the same weights after N steps: in float64
through the loop's own pieces (``accumulate_gradients`` and the rest; differences at rounding
level), and in float32 through ``difflab.train.train`` (differences as large as float32's own
distance from the float64 run: rounding, amplified by training). Then measures
what accumulation trades: the activation memory of a step (``difflab.perf.memory.estimate_memory``)
and the time per step, and what breaks the equality: dropout, whose masks come from one random
stream drawn in different pieces.
``python examples/guide/27_gradient_accumulation.py [--fast --out DIR]`` (about 26 CPU seconds with one thread;
--fast about 5).
"""
from __future__ import annotations

import time

import torch

import _guide as guide
import _training as tr
from difflab.io.spec import build_denoiser
from difflab.perf.memory import estimate_memory
from difflab.train import DiffusionObjective, TrainConfig, train
from difflab.train.loop import accumulate_gradients, draw_step, lr_at, make_optimizer

BOUNDS = {
    "float64_max_weight_difference": (0.0, 1e-10),  # N steps, 64 at once vs 4 x 16, float64
    "float32_max_weight_difference": (0.0, 1e-3),   # N steps through train(), float32: rounding, amplified
    "float32_vs_float64_max_weight_difference": (0.0, 1e-3),  # ... as far as float32 is from float64
    "dropout_max_weight_difference": (1e-4, 1.0),  # with dropout 0.1 the runs part: masks differ
    "activation_ratio_64_over_16": (3.5, 4.5),     # activations grow with the micro-batch
    "peak_ratio_accum_over_full": (0.0, 0.9),      # so the predicted peak falls with accumulation
}


def loop_weights(spec: dict, data: dict, steps: int, accum: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Flattened weights after ``steps`` steps of 64 made of the training loop's own pieces
    (``draw_step``, ``accumulate_gradients``, ``lr_at``, gradient clipping, ``make_optimizer``'s
    AdamW), in ``dtype``: ``train`` itself casts the batch to float32."""
    denoiser = build_denoiser(spec, seed=seed).to(dtype)
    config = TrainConfig(steps=steps, batch_size=64, grad_accum=accum, lr=2e-3, warmup_steps=2, ema_decay=None,
                         cfg_dropout=0.1, seed=seed)
    objective = DiffusionObjective.from_config(denoiser, config, null_class=10)
    params = list(denoiser.net.parameters())
    optimizer = make_optimizer([{"params": params}], config)
    for step in range(steps):
        batch = draw_step(objective, data, config, step)
        batch = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        accumulate_gradients(objective, batch, config)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return torch.cat([p.detach().reshape(-1) for p in params])


def train_weights(spec: dict, data, steps: int, accum: int, seed: int) -> tuple[torch.Tensor, float, float, list]:
    """Flattened weights after ``steps`` steps of 64 through ``train``, the wall and CPU seconds, the losses."""
    denoiser = build_denoiser(spec, seed=seed)
    losses = []
    config = TrainConfig(steps=steps, batch_size=64, grad_accum=accum, lr=2e-3, warmup_steps=2, ema_decay=None,
                         cfg_dropout=0.1, checkpoint_every=0, log_every=10_000, progress=False, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    train(denoiser, data, config, None, callback=lambda info: losses.append(info["loss"]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return torch.cat([p.detach().reshape(-1) for p in denoiser.net.parameters()]), wall / steps, cpu / steps, losses


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    width = 4 if args.fast else 16
    spec = tr.tiny_spec(width)
    data = {"x0": world["train"], "class_labels": world["train_labels"]}
    pair = (world["train"], world["train_labels"])

    # 1. N steps in float64 with the loop's own pieces: the weights agree to rounding.
    steps = 3 if args.fast else 20
    f64_1, f64_4 = (loop_weights(spec, data, steps, a, args.seed) for a in (1, 4))
    f64_diff = float((f64_1 - f64_4).abs().max())

    # 2. N steps in float32 through train(): the weights agree as closely as float32 and float64 do.
    w1, wall1, cpu1, loss1 = train_weights(spec, pair, steps, 1, args.seed)
    w4, wall4, cpu4, loss4 = train_weights(spec, pair, steps, 4, args.seed)
    weight_diff = float((w1 - w4).abs().max())
    f32_vs_f64 = float((w1.double() - f64_1).abs().max())

    # 3. With dropout the two runs draw different masks: no longer the same.
    spec_dropout = tr.tiny_spec(width)
    spec_dropout["unet"]["dropout"] = 0.1
    d1 = train_weights(spec_dropout, pair, steps, 1, args.seed)[0]
    d4 = train_weights(spec_dropout, pair, steps, 4, args.seed)[0]
    dropout_diff = float((d1 - d4).abs().max())

    # 4. Memory: activations scale with the micro-batch; gradients and Adam's moments do not.
    net = build_denoiser(spec, seed=args.seed).net
    full = estimate_memory(net, 64, 8, ema=True)
    micro = estimate_memory(net, 16, 8, ema=True)
    # with accumulation the gradients live while the next micro-batch's activations are made
    peak_accum = micro["parameters"] + micro["optimizer"] + micro["ema"] + micro["gradients"] + micro["activations"]
    figures = guide.report({
        "float64_max_weight_difference": f64_diff,
        "float32_max_weight_difference": weight_diff,
        "float32_vs_float64_max_weight_difference": f32_vs_f64,
        "max_weight": float(w1.abs().max()),
        "dropout_max_weight_difference": dropout_diff,
        "activation_ratio_64_over_16": full["activations"] / micro["activations"],
        "activations_batch64_kib": full["activations"] / 1024,
        "activations_micro16_kib": micro["activations"] / 1024,
        "peak_full_kib": full["total"] / 1024,
        "peak_accum_kib": peak_accum / 1024,
        "peak_ratio_accum_over_full": peak_accum / full["total"],
        "step_wall_ms_batch64": wall1 * 1000, "step_wall_ms_accum4": wall4 * 1000,
        "step_cpu_ms_batch64": cpu1 * 1000, "step_cpu_ms_accum4": cpu4 * 1000,
    })

    # 5. The picture: the two loss curves on top of each other, and the memory bars.
    plt = guide.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(range(1, steps + 1), loss1, "o-", label="batch 64, one pass")
    ax1.plot(range(1, steps + 1), loss4, "x--", label="4 x 16 accumulated")
    ax1.set(xlabel="step", ylabel="loss", title=f"same weights: max |diff| {weight_diff:.1e}")
    ax1.legend()
    parts = ("parameters", "optimizer", "ema", "gradients", "activations")
    for i, (label, est, grads_live) in enumerate((("batch 64", full, False), ("4 x 16", micro, True))):
        bottom = 0.0
        for part in parts:
            if part == "gradients" and not grads_live:
                continue  # a single pass frees the activations as the gradients are made
            v = est[part] / 1024
            ax2.bar(i, v, bottom=bottom, color=f"C{parts.index(part)}", label=part if i == 1 else None)
            bottom += v
    ax2.set_xticks([0, 1], ["batch 64", "4 x 16"])
    ax2.set(ylabel="predicted peak (KiB)", title=f"digits U-Net ({width} ch), one step")
    ax2.legend(fontsize=7)
    guide.save(fig, guide.picture(args, "27_gradient_accumulation.png"))
    return figures


if __name__ == "__main__":
    main()
