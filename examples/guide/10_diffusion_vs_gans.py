"""Chapter 10: diffusion models compared with GANs, trained for the same CPU time.

A small version of ``bench/gan_vs_diffusion.py``: a class-conditional GAN (``difflab.nn.gan``) and
the guide's digits diffusion U-Net, each trained from scratch for the same CPU seconds (one thread),
over several seeds; prints each run's judge accuracy, Frechet distance, precision and recall, and
the spread over seeds (``--fast``: one seed and fixed numbers of updates). The full-size table (90 CPU s each, three seeds) is in BENCHMARKS.md.
``python examples/guide/10_diffusion_vs_gans.py [--fast --out DIR]`` (full: 3 seeds x 2 x 4 CPU s
of training, about 40 s on a quiet 2-core CPU).
"""
from __future__ import annotations

import statistics
import time

import torch

import _guide as guide
from difflab.eval import precision_recall
from difflab.io.spec import build_denoiser
from difflab.nn.gan import GANConfig, sample_gan, train_gan
from difflab.pipelines import generate
from difflab.train import TrainConfig, train

# --fast trains 20 GAN and 10 diffusion updates (fixed counts, so these are exact on any CPU)
BOUNDS = {
    "gan_frechet_mean": (200.0, 1500.0),       # 20 updates: far from the digits
    "diffusion_frechet_mean": (100.0, 600.0),  # 10 updates: nearer, still far
    "diffusion_accuracy_mean": (0.0, 0.6),
    "recall_diffusion_minus_gan": (0.02, 1.0),  # the diffusion model covers more of the held-out digits early
}


class _Spent(Exception):
    pass


def train_diffusion(world, seconds: float | None, seed: int, steps_: int | None = None):
    """The guide's digits U-Net (its training settings) until ``seconds`` of CPU time (or for
    ``steps_`` updates): the EMA weights."""
    spec = guide.digits_spec()
    denoiser = build_denoiser(spec, seed=seed)
    start, steps = time.process_time(), [0]

    def stop(info):
        steps[0] = info["step"]
        if (seconds is not None and time.process_time() - start >= seconds) or info["step"] == steps_:
            info["state"].ema.copy_to(denoiser.net)
            raise _Spent

    config = TrainConfig(steps=10 ** 6, batch_size=64, lr=2e-3, warmup_steps=50, ema_decay=0.995, cfg_dropout=0.1,
                         checkpoint_every=0, log_every=0, progress=False, seed=seed)
    try:
        train(denoiser, (world["train"], world["train_labels"]), config, None, spec=spec, callback=stop)
    except _Spent:
        pass
    return denoiser.eval(), steps[0]


def judged(world, x, asked) -> dict:
    judge = world["judge"]
    precision, recall = precision_recall(judge.features(world["held"]).double(), judge.features(x).double(), k=3)
    return {"accuracy": judge.accuracy(x, asked), "frechet": judge.frechet(x, world["held"]),
            "precision": precision, "recall": recall}


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU seconds on one thread: the budget both get
    seeds = [args.seed] if args.fast else [args.seed + i for i in range(3)]
    # full: the same CPU seconds each (as the bench); fast: fixed updates, so the test's figures are exact
    seconds, updates = (None, {"gan": 20, "diffusion": 10}) if args.fast else (4.0, {"gan": None, "diffusion": None})
    asked = torch.arange(100 if args.fast else 200) % 10
    runs, shown = {"gan": [], "diffusion": []}, {}
    try:
        for seed in seeds:
            gen, _, history = train_gan(world["train"], world["train_labels"], GANConfig(), cpu_seconds=seconds, seed=seed,
                                        steps=updates["gan"], log_every=1)
            x = sample_gan(gen, asked, seed=seed)
            runs["gan"].append(dict(judged(world, x, asked), updates=history[-1]["step"]))
            denoiser, steps = train_diffusion(world, seconds, seed, updates["diffusion"])
            y = generate(denoiser, asked.tolist(), shape=(1, 8, 8), steps=10 if args.fast else 50, seed=seed,
                         batch_size=len(asked), progress=False)
            runs["diffusion"].append(dict(judged(world, y, asked), updates=steps))
            shown.setdefault("gan", x), shown.setdefault("diffusion", y)
    finally:
        torch.set_num_threads(threads)

    figures = {}
    for method, rows in runs.items():
        for key in ("accuracy", "frechet", "precision", "recall", "updates"):
            values = [r[key] for r in rows]
            figures[f"{method}_{key}_mean"] = statistics.mean(values)
            figures[f"{method}_{key}_std"] = statistics.pstdev(values)
    figures["frechet_floor"] = guide.judge_samples(world, world["train"][:len(asked)], asked)["frechet_floor"]
    figures["recall_diffusion_minus_gan"] = figures["diffusion_recall_mean"] - figures["gan_recall_mean"]
    figures = guide.report(figures)

    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, method in zip(axes, ("gan", "diffusion")):
        grid = shown[method][:100].reshape(10, 10, 8, 8).permute(1, 2, 0, 3).reshape(80, 80)
        ax.imshow(grid, cmap="gray", vmin=-1, vmax=1), ax.axis("off")
        ax.set_title(f"{method}, {runs[method][0]['updates']} updates: FD {runs[method][0]['frechet']:.0f}, "
                     f"recall {runs[method][0]['recall']:.2f}", fontsize=9)
    guide.save(fig, guide.picture(args, "10_diffusion_vs_gans.png"))
    return figures


if __name__ == "__main__":
    main()
