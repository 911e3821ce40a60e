"""FP8 training on the digits, judged like the demo (issue 15: FP8 within 1 point of fp32/bf16).

Each variant trains the demo's class-conditional U-Net with ``difflab train`` (in-process, the
digits' recipe, ``--steps`` steps), with or without ``--fp8``, then samples 500 digits (50 per
class: DDIM, 50 steps, guidance 1.5, like ``difflab demo``) from the EMA weights and scores them
with the digits judge: accuracy for the digit asked, and the Frechet distance of the judge's
features to the held-out digits (``judge_report``: the ``fid`` of ``difflab eval --extractor
judge``). The FP8-trained runs are sampled twice: from their fp32 master weights (what
``difflab sample`` does), and with the FP8 layers in eval mode (weights and activations in E4M3,
the activations at their recorded scales: FP8 inference).

    python bench/fp8_digits.py --steps 2000 --variants fp32,fp8,bf16,bf16+fp8 --record
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
from difflab.io.checkpoint import TRAINING_BUFFERS, load_checkpoint
from difflab.io.spec import load_denoiser
from difflab.perf.fp8 import swap_fp8_training
from difflab.pipelines import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import digits_world, machine, write_section  # noqa: E402

GUIDANCE = 1.5


def train_variant(variant: str, steps: int, out: Path) -> float:
    """``difflab train`` of one variant ("fp32", "bf16", "fp8" = fp32 + FP8, "bf16+fp8"); wall seconds."""
    precision = "bf16" if variant.startswith("bf16") else "fp32"
    args = ["train", "--steps", str(steps), "--precision", precision, "--device", "cpu", "--out", str(out), "--fresh"]
    t0 = time.perf_counter()
    if difflab(args + (["--fp8"] if "fp8" in variant else [])) != 0:
        raise SystemExit(f"difflab train failed for {variant}")
    return time.perf_counter() - t0


def fp8_inference(run: Path):
    """The EMA denoiser of ``run`` with its FP8 layers in eval mode: the scales recorded in training."""
    denoiser, _ = load_denoiser(run)
    swap_fp8_training(denoiser.net)
    tensors, _ = load_checkpoint(run)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.") and k.rsplit(".", 1)[-1] in TRAINING_BUFFERS}
    missing = denoiser.net.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    return denoiser.eval()


def score(denoiser, world: dict, per_class: int) -> dict:
    asked = torch.arange(10).repeat_interleave(per_class)
    t0 = time.perf_counter()
    with torch.no_grad():
        samples = generate(denoiser, asked.tolist(), shape=(1, 8, 8), sampler="ddim", steps=50,
                           guidance_scale=GUIDANCE, seed=0, batch_size=250, progress=False)
    r = judge_report(world["judge"], samples, asked, world["held"], world["held_labels"], real_reference=world["train"])
    return {"accuracy": r["class_accuracy"], "frechet": r["frechet"], "floor": r["frechet_real_reference"],
            "sample_seconds": time.perf_counter() - t0}


def format_table(rows: list, args) -> str:
    lines = [f"Machine: {machine()}. `difflab train` on the digits (demo recipe: batch 128, lr 2e-3, EMA 0.999), "
             f"{args.steps} steps per variant; {10 * args.samples_per_class} samples (DDIM 50 steps, guidance {GUIDANCE}) from the EMA weights, "
             f"judged like `difflab demo`. FD: judge-feature Frechet distance to the held-out digits "
             f"(real-data floor {rows[0]['floor']:.2f}).", "",
             "| training | sampled | judge accuracy | FD | training wall time |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['sampled']} | {r['accuracy']:.1%} | {r['frechet']:.2f} | {r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps per variant (the demo's: 2000)")
    p.add_argument("--variants", default="fp32,fp8", help="comma-separated from fp32, fp8, bf16, bf16+fp8")
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--out", default="/tmp/difflab_fp8_digits")
    p.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = digits_world(out)
    rows = []
    for variant in args.variants.split(","):
        run = out / variant.replace("+", "_")
        seconds = train_variant(variant, args.steps, run)
        samplings = [("fp32 weights", lambda: load_denoiser(run)[0])]
        if "fp8" in variant:
            samplings.append(("FP8 layers (eval)", lambda: fp8_inference(run)))
        for sampled, build in samplings:
            r = {"variant": variant, "sampled": sampled, **score(build(), world, args.samples_per_class), "train_seconds": seconds}
            rows.append(r)
            print(f"{variant:<9} sampled with {sampled:<18} accuracy {r['accuracy']:6.1%}  FD {r['frechet']:6.2f}  "
                  f"training {seconds:5.0f} s", flush=True)
    table = format_table(rows, args)
    print(table)
    (out / "fp8_digits.json").write_text(json.dumps(rows, indent=1))
    if args.record:
        path = write_section("bench/fp8_digits.py", "FP8 training on the digits (`python bench/fp8_digits.py`)", table)
        print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
