"""Chapter 29: exponential moving averages of the weights.

Trains one small digits model and, beside the run, keeps averages of its weights at several EMA
decays (``difflab.train.EMA``, updated after every optimizer step as the loop updates its own):
without warmup, and at 0.999 with the loop's warmup ``min(decay, (1 + t) / (10 + t))``. Samples the raw last weights and each
average with the same seeds and judges them: accuracy and Frechet distance per decay. Also prints
the effective averaging window 1 / (1 - decay) against the length of the run.
``python examples/guide/29_ema.py [--fast --out DIR]`` (about 40 CPU seconds with one thread the
first time, one training; then cached).
"""
from __future__ import annotations

import torch

import _guide as guide
import _training as tr

# (decay, warmup): without warmup the average starts at the initial weights and keeps d^t of them
# after t steps; with it (the loop's own, and what difflab trains with) the decay is capped by
# (1 + t) / (10 + t), which stays below 0.98 for the first 400 steps.
DECAYS = ((0.9, False), (0.99, False), (0.995, False), (0.999, False), (0.999, True))


def label(decay: float, warmup: bool) -> str:
    return f"ema_{decay}" + ("_warmup" if warmup else "")

BOUNDS = {
    "window_at_0_999": (999, 1001),            # 1 / (1 - decay) steps
    "warmup_decay_at_step_8": (0.49, 0.51),    # (1 + 8) / (10 + 8)
    "ema_0_9_distance_to_raw": (0.0, 0.2),     # a short average stays near the last weights
    "ema_far_distance_to_raw": (0.0, 2.0),     # the longest one sits further back (at the initial weights, early on)
    "distance_order_ok": (1, 1),               # longer averages sit further from the last weights
}


def flat(denoiser) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in denoiser.net.parameters()])


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    steps, n, width, batch = (12, 20, 4, 16) if args.fast else (400, 100, 8, 64)
    out = tr.run(tr.tiny_spec(width), steps, seed=args.seed, batch_size=batch, emas=DECAYS)
    models = {"raw": out["raw"], **{label(*d): m for d, m in out["ema"].items()}}
    raw = flat(out["raw"])
    distance = {k: float((flat(m) - raw).norm() / raw.norm()) for k, m in models.items()}
    judged = {k: tr.judge(world, m, n, steps=5 if args.fast else 20, seed=args.seed) for k, m in models.items()}

    from difflab.train import EMA
    ema = EMA(out["raw"].net, 0.999)
    figures = {"window_at_0_999": 1 / (1 - 0.999), "warmup_decay_at_step_8": ema.decay_at(8), "run_steps": steps}
    for k in models:
        name = k.replace(".", "_")
        figures[f"{name}_accuracy"] = judged[k]["accuracy"]
        figures[f"{name}_frechet"] = judged[k]["frechet"]
        figures[f"{name}_distance_to_raw"] = distance[k]
    figures["ema_far_distance_to_raw"] = distance[label(0.999, False)]
    order = [distance[label(*d)] for d in DECAYS if not d[1]]
    figures["distance_order_ok"] = int(all(a <= b for a, b in zip(order, order[1:])))
    figures["frechet_floor"] = judged["raw"]["frechet_floor"]
    guide.report(figures)

    # The picture: a row of samples per set of weights, and the scores against the decay.
    plt = guide.pyplot()
    fig = plt.figure(figsize=(11, 5))
    for row, k in enumerate(models):
        for col in range(10):
            ax = fig.add_subplot(len(models), 20, row * 20 + col + 1)
            ax.imshow(judged[k]["samples"][col, 0], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(k, fontsize=7, rotation=0, ha="right")
    ax = fig.add_axes([0.62, 0.2, 0.3, 0.7])
    xs = list(range(len(models)))
    ax.bar(xs, [judged[k]["accuracy"] for k in models], color="tab:blue")
    ax.set_xticks(xs, list(models), rotation=30, fontsize=8)
    ax.set(ylabel="judge accuracy (bars)", title=f"{steps} steps, {n} samples each", ylim=(0, 1))
    ax2 = ax.twinx()
    ax2.plot(xs, [judged[k]["frechet"] for k in models], "o-", color="tab:red")
    ax2.set_ylabel("Frechet distance (dots)")
    guide.save(fig, guide.picture(args, "29_ema.png"))
    return figures


if __name__ == "__main__":
    main()
