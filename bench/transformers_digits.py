"""Diffusion transformers on the digits: dense DiT, mixture-of-experts DiT, DiT trained in FP8 (issue 15).

Each variant trains a class-conditional DiT with ``difflab train`` (in-process, the digits' recipe:
batch 128, lr 2e-3, EMA 0.999, 10% label dropout, cosine schedule, v-prediction) for ``--steps``
steps, then samples 500 digits (50 per class: DDIM, 50 steps, guidance 1.5, like ``difflab demo``)
from the EMA weights and scores them with the digits judge: accuracy for the digit asked and the
Frechet distance of the judge's features to the held-out digits, beside the floor (500 real
training digits against the same held-out ones).

- ``dense``: ``--network dit --preset PRESET`` (default ``digits-small``, 64 wide), fp32;
- ``moe``: ``--network moe-dit --preset PRESET``: the same DiT with every feed-forward a mixture
  of 8 experts, top-2, each expert half the dense hidden width (the same active compute), the
  router seeing the block's conditioning (time and class); the Switch load-balancing loss flows
  through the aux-loss seam. Reported beside it: active / total parameters, the per-expert load
  on held-out digits over the noise levels, and how it changes with sigma;
- ``fp8``: ``--network dit --preset PRESET --fp8``: the dense DiT's linears trained in FP8
  (E4M3 forward, E5M2 gradients, delayed scaling), sampled from its fp32 master weights.

Timings are the training's wall seconds and process CPU seconds (all threads): on a shared
machine the CPU time is the bound a quiet machine's wall time would stay under with 2 threads.
Each variant's figures are kept in ``--out`` (``<variant>.json``), so the rows can be run one at a
time and the table assembled at the end:

    python bench/transformers_digits.py --variants dense
    python bench/transformers_digits.py --variants moe
    python bench/transformers_digits.py --variants fp8 --record
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from difflab.cli import main as difflab
from difflab.eval import judge_report
from difflab.io.spec import load_denoiser
from difflab.nn.moe import active_parameters, routing_by_sigma, total_parameters
from difflab.pipelines import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import digits_world, machine, write_section  # noqa: E402

GUIDANCE = 1.5
VARIANTS = {"dense": ("dit", []), "moe": ("moe-dit", []), "fp8": ("dit", ["--fp8"])}
LABELS = {"dense": "DiT (fp32)", "moe": "MoE-DiT, 8 experts top-2 (fp32)", "fp8": "DiT, FP8 training"}
SIGMAS = (0.05, 0.2, 1.0, 5.0, 20.0)  # the noise levels routing is read at (canonical sigma; the digits lie in [-1, 1])


def train_variant(variant: str, preset: str, steps: int, out: Path) -> dict:
    """``difflab train`` of one variant; its wall and process CPU seconds and last logged losses."""
    kind, extra = VARIANTS[variant]
    args = ["train", "--network", kind, "--preset", preset, "--steps", str(steps), "--precision", "fp32",
            "--device", "cpu", "--out", str(out), "--fresh", *extra]
    w0, c0 = time.perf_counter(), time.process_time()
    if difflab(args) != 0:
        raise SystemExit(f"difflab train failed for {variant}")
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    path = out / "log.jsonl"  # one line every 250 steps
    log = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    last = log[-1] if log else {}
    return {"train_wall_s": wall, "train_cpu_s": cpu, "loss": last.get("loss"), "aux_loss": last.get("aux_loss")}


def score(denoiser, world: dict, per_class: int) -> dict:
    asked = torch.arange(10).repeat_interleave(per_class)
    with torch.no_grad():
        samples = generate(denoiser, asked.tolist(), shape=(1, 8, 8), sampler="ddim", steps=50,
                           guidance_scale=GUIDANCE, seed=0, batch_size=250, progress=False)
    r = judge_report(world["judge"], samples, asked, world["held"], world["held_labels"], real_reference=world["train"])
    return {"accuracy": r["class_accuracy"], "frechet": r["frechet"], "floor": r["frechet_real_reference"]}


def routing_summary(denoiser, world: dict) -> dict:
    """Per-expert load of every MoE layer at each of :data:`SIGMAS` on 200 held-out digits with their
    labels, its mean over the sigmas, and how far each sigma's load is from that mean (total variation)."""
    x0, labels = world["held"][:200], world["held_labels"][:200]
    out = routing_by_sigma(denoiser, x0, SIGMAS, generator=torch.Generator().manual_seed(0), class_labels=labels)
    layers = {}
    for name, load in out["load"].items():
        mean = load.mean(0)
        layers[name] = {"load": load.tolist(), "mean_load": mean.tolist(),
                        "tv_from_mean": (0.5 * (load - mean).abs().sum(1)).tolist(),
                        "dropped": out["dropped"][name].tolist()}
    return {"sigmas": list(SIGMAS), "layers": layers}


def format_table(rows: list, args) -> str:
    floor = rows[0]["floor"]
    lines = [f"Machine: {machine()}; 2-core CPU, shared with other jobs (CPU seconds are the process's, all threads). "
             f"`difflab train --preset {args.preset}` on the digits (digits recipe: batch 128, lr 2e-3, EMA 0.999, "
             f"10% label dropout, cosine, v-prediction), {rows[0]['steps']} steps per variant; "
             f"{10 * args.samples_per_class} samples (DDIM 50 steps, guidance {GUIDANCE}) from the EMA weights, judged like "
             f"`difflab demo`. FD: judge-feature Frechet distance to the held-out digits (real-data floor {floor:.2f}: "
             f"{10 * args.samples_per_class} real training digits).", "",
             "| model | params total / active | steps | judge accuracy | FD (floor) | training wall s | training CPU s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {LABELS[r['variant']]} | {r['total'] / 1e6:.3f} M / {r['active'] / 1e6:.3f} M | {r['steps']} | "
                     f"{r['accuracy']:.1%} | {r['frechet']:.2f} ({r['floor']:.2f}) | {r['train_wall_s']:.0f} | {r['train_cpu_s']:.0f} |")
    lines += ["| DiT-XL/2 forward, bf16 compiled, vs diffusers (GPU) | | | | | not measured (no GPU lent) | |",
              "| DiT FP8 vs bf16 training step time (GPU) | | | | | not measured (no GPU lent) | |"]
    for r in rows:
        if r.get("routing"):
            lines += ["", routing_table(r)]
    return "\n".join(lines)


def routing_table(r: dict) -> str:
    routing = r["routing"]
    aux = "not logged" if r["aux_loss"] is None else f"{r['aux_loss']:.4f}"
    lines = [f"MoE-DiT routing on 200 held-out digits (with their labels; last logged aux loss {aux}, alpha 0.01 "
             f"per layer, so uniform load would read {0.01 * len(routing['layers']):.2f}): the load of each expert "
             f"(fraction of top-2 assignments; uniform = 0.125), mean over sigma in {routing['sigmas']}, and the total "
             f"variation between the load at each sigma and that mean (0: routing ignores sigma, 1: disjoint experts).", "",
             "| layer | load of experts 0-7 (mean over sigma) | TV from the mean at sigma " + ", ".join(f"{s:g}" for s in routing["sigmas"]) + " |",
             "| --- | --- | --- |"]
    for name, layer in routing["layers"].items():
        lines.append(f"| {name.removeprefix('net.')} | {' '.join(f'{v:.2f}' for v in layer['mean_load'])} | "
                     f"{', '.join(f'{v:.2f}' for v in layer['tv_from_mean'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps per variant (default 2000)")
    p.add_argument("--preset", default="digits-small", help="the dit / moe-dit preset (default digits-small)")
    p.add_argument("--variants", default="dense,moe,fp8", help="comma-separated from dense, moe, fp8")
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the recorded runs ran side by side)")
    p.add_argument("--out", default="/tmp/difflab_transformers_digits")
    p.add_argument("--record", action="store_true", help="write the table of every variant in --out into BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = digits_world(out)
    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
        run = out / variant
        r = {"variant": variant, "preset": args.preset, "steps": args.steps, **train_variant(variant, args.preset, args.steps, run)}
        denoiser, _ = load_denoiser(run)
        r.update(total=total_parameters(denoiser.net), active=active_parameters(denoiser.net))
        r.update(score(denoiser, world, args.samples_per_class))
        if variant == "moe":
            r["routing"] = routing_summary(denoiser, world)
        (out / f"{variant}.json").write_text(json.dumps(r, indent=1))
        print(f"{variant:<6} accuracy {r['accuracy']:6.1%}  FD {r['frechet']:6.2f} (floor {r['floor']:.2f})  "
              f"training {r['train_wall_s']:5.0f} s wall, {r['train_cpu_s']:5.0f} s CPU", flush=True)
    rows = [json.loads((out / f"{v}.json").read_text()) for v in VARIANTS if (out / f"{v}.json").exists()]
    table = format_table(rows, args)
    print(table)
    if args.record:
        path = write_section("bench/transformers_digits.py", "Diffusion transformers on the digits "
                             "(`python bench/transformers_digits.py`)", table)
        print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
