"""`difflab demo`: train a class-conditional diffusion model on the embedded digits, sample every
class with classifier-free guidance, and let an independent classifier judge the result."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..data import load_digits
from ..eval import DigitsJudge, judge_report
from ..io.images import save_grid
from ..io.spec import build_denoiser
from ..nn.unet import PRESETS
from ..pipelines import generate
from ..train import TrainConfig, train

# The demo's model: the "digits" U-Net preset (about 1 M parameters) with DDPM's discrete
# cosine schedule and v-prediction (Salimans & Ho 2022), which trains fast and samples well in
# few DDIM steps.
DEMO_SPEC = {
    "unet": dataclasses.replace(PRESETS["digits"], dropout=0.0).to_dict(),
    "diffusion": {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "zero_terminal_snr": False, "prediction": "v"},
}
DEMO_TRAIN = TrainConfig(steps=2000, batch_size=128, lr=2e-3, warmup_steps=100, ema_decay=0.999, cfg_dropout=0.1,
                         weighting="simple", checkpoint_every=500, log_every=250, seed=0)


def run_demo(out_dir="demo_out", *, steps: int | None = None, sampler: str = "ddim", sampling_steps: int = 50,
             guidance_scale: float = 1.5, samples_per_class: int = 50, seed: int = 0, resume: bool = False,
             threads: int | None = None) -> dict:
    """Train, sample and judge; writes ``out_dir/samples.png`` and ``out_dir/report.json`` and
    returns the report (figures of :func:`difflab.eval.judge_report` plus timings)."""
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    config = DEMO_TRAIN if steps is None else dataclasses.replace(DEMO_TRAIN, steps=steps)

    # 1. Data: the 80% train split trains both the judge and the generator; the 20% is held out.
    images, labels = load_digits(split="train")
    held_images, held_labels = load_digits(split="test")
    print(f"[1/5] data: {len(images)} training digits, {len(held_images)} held out (8x8, 10 classes)")

    # 2. The judge: an independent classifier, cached in out_dir.
    t0 = time.time()
    judge = DigitsJudge.load_or_train(out_dir / "digits_judge.safetensors")
    print(f"[2/5] judge ready in {time.time() - t0:.1f}s: {judge.accuracy(held_images, held_labels):.1%} on held-out real digits")

    # 3. Train the generator.
    print(f"[3/5] training a class-conditional U-Net for {config.steps} steps (batch {config.batch_size})")
    denoiser = build_denoiser(DEMO_SPEC, seed=config.seed)
    t0 = time.time()
    state = train(denoiser, (images, labels), config, out_dir, spec=DEMO_SPEC, resume=resume, data_source="digits")
    train_seconds = time.time() - t0

    # 4. Sample every class from the EMA weights with classifier-free guidance.
    state.ema.copy_to(denoiser.net)
    denoiser.eval()
    asked = torch.arange(10).repeat_interleave(samples_per_class)
    print(f"[4/5] sampling {len(asked)} digits: {sampler}, {sampling_steps} steps, guidance {guidance_scale}")
    t0 = time.time()
    samples = generate(denoiser, asked, shape=(1, 8, 8), sampler=sampler, steps=sampling_steps,
                       guidance_scale=guidance_scale, seed=seed, batch_size=250)
    sample_seconds = time.time() - t0
    # One row per class, the first 10 samples of each.
    grid = samples.reshape(10, samples_per_class, 1, 8, 8)[:, :10].reshape(-1, 1, 8, 8)
    path = save_grid(grid, out_dir / "samples.png", nrow=10, upscale=6)

    # 5. Judge the samples beside real digits.
    report = judge_report(judge, samples, asked, held_images, held_labels, real_reference=images)
    report.update(train_seconds=round(train_seconds, 1), sample_seconds=round(sample_seconds, 1),
                  total_seconds=round(time.time() - t_start, 1), steps=config.steps, sampler=sampler,
                  sampling_steps=sampling_steps, guidance_scale=guidance_scale, samples=str(path))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"[5/5] the judge's reading (samples in {path}):")
    print(format_report(report))
    return report


def format_report(r: dict) -> str:
    rows = [
        ("judge accuracy on generated digits (class asked)", f"{r['class_accuracy']:.1%}", f"{r['n_generated']} samples"),
        ("judge accuracy on real held-out digits", f"{r['real_accuracy']:.1%}", f"{r['n_real']} digits"),
        ("Frechet distance, generated vs held-out", f"{r['frechet']:.2f}", "judge features"),
    ]
    if "frechet_real_reference" in r:
        rows.append(("Frechet distance, real train vs held-out", f"{r['frechet_real_reference']:.2f}", "same sample size"))
    rows.append(("time: train / sample / total", f"{r['train_seconds']:.0f}s / {r['sample_seconds']:.0f}s / {r['total_seconds']:.0f}s", ""))
    w = max(len(a) for a, _, _ in rows)
    return "\n".join(f"  {a:<{w}}  {b:>14}  {c}" for a, b, c in rows)
