"""A small GAN versus the guide's diffusion model on the 8x8 digits, each trained for the same CPU
seconds, three seeds each: judge accuracy, Frechet distance (judge features, vs the held-out digits;
the floor is training digits vs held-out), precision / recall (Kynkaanniemi et al. 2019), recall per
class (mode coverage), the Frechet distance along training (stability) and samples per CPU second.

    python bench/gan_vs_diffusion.py --method gan --seed 0 --threads 1 --json out/gan_0.json   # one run
    python bench/gan_vs_diffusion.py --rows-from out/gan_0.json,...,out/diffusion_2.json --write  # the table

The GAN is :mod:`difflab.nn.gan` (DCGAN-shaped, projection discriminator with spectral norm, hinge
loss, EMA generator); the diffusion model is ``examples/guide/_guide.py``'s ``digits_spec`` U-Net
(0.27 M parameters, v-prediction, cosine) trained by ``difflab.train.train`` with the guide model's
settings, stopped when its CPU time is spent, sampled by DDIM (50 steps, no guidance).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples" / "guide"))
import _guide as guide  # noqa: E402
from machine import add_run_options, record, start_run, write_section  # noqa: E402

from difflab.eval import precision_recall  # noqa: E402
from difflab.io.spec import build_denoiser  # noqa: E402
from difflab.nn.gan import GANConfig, sample_gan, train_gan  # noqa: E402
from difflab.pipelines import generate  # noqa: E402
from difflab.train import TrainConfig, train  # noqa: E402

METHODS = ("gan", "diffusion")
CURVE_POINTS = 4          # Frechet distance measured at 1/4, 2/4, 3/4 and all of the budget
CURVE_SAMPLES = 200


def quality(world: dict, samples: torch.Tensor, asked: torch.Tensor) -> dict:
    """Accuracy, Frechet distance, precision / recall in judge features, and recall per class."""
    judge, held, held_labels = world["judge"], world["held"], world["held_labels"]
    fake, real = judge.features(samples).double(), judge.features(held).double()
    precision, recall = precision_recall(real, fake, k=3)
    per_class = [precision_recall(real[held_labels == c], fake[asked == c], k=3)[1] for c in range(10)]
    return {"accuracy": judge.accuracy(samples, asked), "frechet": judge.frechet(samples, held),
            "precision": precision, "recall": recall, "class_recall_min": min(per_class),
            "class_recall_mean": sum(per_class) / 10, "classes_covered": sum(r >= 0.5 for r in per_class)}


class _Spent(Exception):
    """The diffusion run's CPU budget is spent (raised from fit's callback)."""


def train_diffusion(world: dict, budget: float, seed: int, curve: list):
    """The guide's digits U-Net trained until ``budget`` CPU seconds (evaluation excluded); the
    EMA weights; ``curve`` gets (cpu_s, Frechet distance) at each quarter of the budget."""
    spec = guide.digits_spec()
    denoiser = build_denoiser(spec, seed=seed)
    probe = build_denoiser(spec, seed=seed).eval()
    config = TrainConfig(steps=10 ** 6, batch_size=64, lr=2e-3, warmup_steps=50, ema_decay=0.995, cfg_dropout=0.1,
                         checkpoint_every=0, log_every=100, progress=False, seed=seed)
    asked = torch.arange(CURVE_SAMPLES) % 10
    start, outside, marks = time.process_time(), [0.0], [budget * (i + 1) / CURVE_POINTS for i in range(CURVE_POINTS)]
    losses = []

    def callback(info):
        losses.append(info["loss"])
        used = time.process_time() - start - outside[0]
        if marks and used >= marks[0]:
            t = time.process_time()
            info["state"].ema.copy_to(probe.net)
            x = generate(probe, asked.tolist(), shape=(1, 8, 8), steps=20, seed=seed, batch_size=CURVE_SAMPLES, progress=False)
            curve.append((round(used, 1), world["judge"].frechet(x, world["held"])))
            marks.pop(0)
            outside[0] += time.process_time() - t
            if not marks:
                raise _Spent(info["step"])

    try:
        train(denoiser, (world["train"], world["train_labels"]), config, None, spec=spec, callback=callback)
    except _Spent as done:
        steps = done.args[0]
    return probe, steps, losses


def run_one(method: str, seed: int, args, world: dict) -> dict:
    curve, asked = [], torch.arange(args.samples) % 10
    if method == "gan":
        def probe(entry, gen):
            if len(curve) < CURVE_POINTS and entry["cpu_s"] >= args.budget * (len(curve) + 1) / CURVE_POINTS:
                x = sample_gan(gen, torch.arange(CURVE_SAMPLES) % 10, seed=seed)
                curve.append((round(entry["cpu_s"], 1), world["judge"].frechet(x, world["held"])))

        model, _, history = train_gan(world["train"], world["train_labels"], GANConfig(), cpu_seconds=args.budget,
                                      seed=seed, log_every=10, callback=probe)
        steps, losses = history[-1]["step"], [h["g_loss"] for h in history]
        t = time.process_time()
        samples = sample_gan(model, asked, seed=seed)
    else:
        model, steps, losses = train_diffusion(world, args.budget, seed, curve)
        t = time.process_time()
        samples = generate(model, asked.tolist(), shape=(1, 8, 8), steps=50, seed=seed, batch_size=250, progress=False)
    sample_cpu = time.process_time() - t
    half = losses[len(losses) // 2:]
    row = {"method": method, "seed": seed, "steps": steps, "budget_cpu_s": args.budget,
           "samples_per_cpu_s": len(asked) / max(sample_cpu, 1e-9), "curve": curve,
           "loss_late_std": statistics.pstdev(half) if len(half) > 1 else 0.0,
           "fd_max_rise": max([b[1] - a[1] for a, b in zip(curve, curve[1:])] + [0.0]), **quality(world, samples, asked)}
    print(json.dumps(row))
    return row


def mean_std(rows: list, key: str) -> str:
    values = [float(r[key]) for r in rows]
    m, s = statistics.mean(values), statistics.pstdev(values)
    return f"{m:.3g} +- {s:.2g}" if abs(m) < 1000 else f"{m:,.0f} +- {s:,.0f}"


def report(reference: dict, rows: list, args) -> dict:
    heads = [("accuracy", "judge accuracy"), ("frechet", "Frechet distance"), ("precision", "precision"),
             ("recall", "recall"), ("class_recall_min", "worst class recall"), ("classes_covered", "classes with recall >= 0.5"),
             ("fd_max_rise", "largest FD rise along training"), ("steps", "updates in the budget"),
             ("samples_per_cpu_s", "samples per CPU second")]
    by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    lines = ["| measure (mean +- std over seeds) | " + " | ".join(f"{m} ({len(by[m])} seeds)" for m in METHODS if by[m]) + " |",
             "| --- | " + " | ".join("---" for m in METHODS if by[m]) + " |"]
    for key, label in heads:
        lines.append(f"| {label} | " + " | ".join(mean_std(by[m], key) for m in METHODS if by[m]) + " |")
    lines.append(f"| Frechet floor (training digits vs held-out) | {reference['frechet']:.3g} | {reference['frechet']:.3g} |")
    per_seed = ["", "| run | accuracy | FD | precision | recall | worst class recall | FD along training (CPU s: FD) |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
    per_seed += [f"| {r['method']} seed {r['seed']} | {r['accuracy']:.1%} | {r['frechet']:.2f} | {r['precision']:.3f} | "
                 f"{r['recall']:.3f} | {r['class_recall_min']:.3f} | " + ", ".join(f"{c}: {f:.1f}" for c, f in r["curve"]) + " |"
                 for r in rows]
    text = "\n".join(lines + per_seed)
    text += (f"\n\nMachine: {args.machine}; 2-core CPU, shared/loaded (load 16-41); each run {args.budget:g} CPU seconds of training "
             f"(evaluation excluded), its own process, 1 thread; {args.samples} samples per run (balanced classes), "
             "judge features. GAN: difflab.nn.gan (hinge, spectral norm, EMA generator, batch 64). Diffusion: the "
             "guide's digits U-Net (batch 64, lr 2e-3, EMA 0.995), DDIM 50 steps, no guidance. FD along training: "
             f"{CURVE_SAMPLES} samples (diffusion: DDIM 20 steps) at each quarter of the budget (the GAN's loop ends "
             "before its fourth); at 200 samples FD reads higher than at 500. "
             "See [docs/guide/10-diffusion-vs-gans.md](docs/guide/10-diffusion-vs-gans.md).")
    print(text)
    if args.write:
        write_section("bench/gan_vs_diffusion.py", "GAN versus diffusion on the digits, same CPU budget "
                      "(`bench/gan_vs_diffusion.py`)", text)
    return {"reference": reference, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS + ("both",), default="both")
    p.add_argument("--seed", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--budget", type=float, default=90.0, help="CPU seconds of training per run")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--out", default="bench_out/gan_vs_diffusion")
    p.add_argument("--json", default=None, help="write this run's record here")
    add_run_options(p, "--json")
    args = p.parse_args(argv)
    done = start_run(args, report)
    if done is not None:
        return done
    world = guide.digits_world()  # the guide's cached judge: the chapters' numbers and these are comparable
    reference = {"frechet": world["judge"].frechet(world["train"][:args.samples], world["held"])}
    rows = [run_one(m, int(s), args, world) for m in (METHODS if args.method == "both" else (args.method,))
            for s in args.seed.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(record(reference, rows, args)))
    return report(reference, rows, args)


if __name__ == "__main__":
    main()
