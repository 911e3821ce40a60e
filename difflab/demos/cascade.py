"""`difflab demo --cascade`: cascaded diffusion on the digits (Ho et al. 2022, CDM). A
class-conditional base model at 8x8 (the digits demo's) and an x2 super-resolution stage to 16x16
(SR3's conditioning, Saharia et al. 2022, with noise-conditioning augmentation), each trained by
the one training loop, chained by :func:`difflab.pipelines.cascade` and judged at 16x16."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_digits
from ..eval import DigitsJudge, judge_report
from ..io.images import save_grid
from ..io.spec import build_denoiser, make_spec
from ..nn.sr import SRUNetConfig, upsample
from ..nn.unet import UNetConfig
from ..pipelines import SampleOptions, cascade
from ..train import NoiseConditioningAugmentation, TrainConfig, train
from .digits import DEMO_SPEC, DEMO_TRAIN

# The x2 stage: a small ADM U-Net (two levels, no attention) at 16x16 that sees the 8x8 image,
# bicubic-upsampled, beside its noisy input; trained with the input noised at s ~ U(0, 1) (a
# fifth of the examples clean).
SR_BACKBONE = UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
                         num_heads=1, num_classes=10)
SR_SPEC = make_spec("sr_unet", SRUNetConfig(unet=SR_BACKBONE.to_dict(), factor=2),
                    {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"})
SR_TRAIN = TrainConfig(steps=600, batch_size=32, lr=2e-3, warmup_steps=50, ema_decay=0.995, checkpoint_every=400,
                       log_every=200, seed=0)
SR_AUGMENT = dict(sigma_max=1.0, p_clean=0.2)
BASE_TRAIN = dataclasses.replace(DEMO_TRAIN, steps=1200)


def train_stage(spec: dict, high, labels, low, config: TrainConfig, out_dir, *, augment: dict | None = None,
                resume: bool = False):
    """Train a super-resolution stage of ``spec`` on ``high`` (N, C, H, W) conditioned on ``low``
    (N, C, H / factor, W / factor) and ``labels`` through :func:`difflab.train.train`, with
    :class:`~difflab.train.NoiseConditioningAugmentation` (``augment``: its keywords); returns the
    denoiser with its EMA weights, in eval mode."""
    denoiser = build_denoiser(spec, seed=config.seed)
    aug = NoiseConditioningAugmentation(**(augment or {}))
    state = train(denoiser, (high, labels, {"low_res": low}), config, out_dir, spec=spec, augment=aug,
                  metadata={"size": int(high.shape[-1])}, resume=resume)
    state.ema.copy_to(denoiser.net)
    return denoiser.eval()


def train_base(out_dir, config: TrainConfig, images, labels, resume: bool = False):
    """The digits demo's class-conditional 8x8 model, trained by :func:`difflab.train.train`."""
    denoiser = build_denoiser(DEMO_SPEC, seed=config.seed)
    state = train(denoiser, (images, labels), config, out_dir, spec=DEMO_SPEC, resume=resume)
    state.ema.copy_to(denoiser.net)
    return denoiser.eval()


def run_cascade_demo(out_dir="demo_cascade_out", *, base_steps: int | None = None, sr_steps: int | None = None,
                     sampler: str = "ddim", sampling_steps: int = 25, guidance_scale: float = 1.5,
                     aug_sigma: float = 0.1, truncated: bool = False, samples_per_class: int = 50, seed: int = 0,
                     resume: bool = False, progress: bool = True) -> dict:
    """Train the base and the x2 stage, sample the cascade for every class, judge at 16x16; writes
    ``out_dir/samples.png`` (8x8 base row above its 16x16 output) and ``out_dir/report.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start, c_start = time.time(), time.process_time()
    base_cfg = BASE_TRAIN if base_steps is None else dataclasses.replace(BASE_TRAIN, steps=base_steps)
    sr_cfg = SR_TRAIN if sr_steps is None else dataclasses.replace(SR_TRAIN, steps=sr_steps)
    base_cfg, sr_cfg = (dataclasses.replace(c, progress=progress) for c in (base_cfg, sr_cfg))

    # 1. Data: 8x8 digits and their 16x16 versions (nearest, as in the text demo); same splits.
    images8, labels = load_digits(8, split="train")
    images16, _ = load_digits(16, split="train")
    held16, held_labels = load_digits(16, split="test")
    print(f"[1/6] data: {len(images8)} training digits at 8x8 and 16x16, {len(held16)} held out")

    # 2. The judge (reads 16x16 digits by area-averaging them to 8x8).
    judge = DigitsJudge.load_or_train(out_dir / "digits_judge.safetensors")
    print(f"[2/6] judge: {judge.accuracy(held16, held_labels):.1%} on held-out real 16x16 digits")

    # 3-4. The two stages, each through the one training loop.
    t0 = time.time()
    print(f"[3/6] base: class-conditional 8x8 U-Net, {base_cfg.steps} steps")
    base = train_base(out_dir / "base", base_cfg, images8, labels, resume)
    print(f"[4/6] x2 stage: 8x8 -> 16x16 SR U-Net, {sr_cfg.steps} steps, augmentation s ~ U(0, {SR_AUGMENT['sigma_max']})")
    sr = train_stage(SR_SPEC, images16, labels, images8, sr_cfg, out_dir / "sr_x2", augment=SR_AUGMENT, resume=resume)
    train_seconds = time.time() - t0

    # 5. Sample the cascade for every class.
    asked = torch.arange(10).repeat_interleave(samples_per_class)
    t0 = time.time()
    low, high = cascade(base, [sr], asked, shape=(1, 8, 8), aug_sigma=aug_sigma, truncated=truncated,
                        options=[stage_opts(sampler, sampling_steps, guidance_scale, seed, progress),
                                 stage_opts(sampler, sampling_steps, 1.0, seed, progress)], return_all=True)
    sample_seconds = time.time() - t0
    print(f"[5/6] sampled {len(asked)} digits: {sampler}, {sampling_steps} steps per stage, guidance {guidance_scale}, "
          f"augmentation s = {aug_sigma} ({'truncated' if truncated else 'non-truncated'})")
    picks = torch.arange(10) * samples_per_class
    row = torch.cat([upsample(low[picks], (16, 16), "nearest"), high[picks]])
    path = save_grid(row, out_dir / "samples.png", nrow=10, upscale=4)

    # 6. Judge at 16x16 beside real digits, and the base alone.
    report = judge_report(judge, high, asked, held16, held_labels, real_reference=images16)
    report.update(base_class_accuracy=judge.accuracy(low, asked),
                  consistency_rmse=float(((F.avg_pool2d(high, 2) - low.clamp(-1, 1)) ** 2).mean().sqrt()),
                  train_seconds=round(train_seconds, 1), sample_seconds=round(sample_seconds, 1),
                  total_seconds=round(time.time() - t_start, 1), cpu_seconds=round(time.process_time() - c_start, 1),
                  base_steps=base_cfg.steps, sr_steps=sr_cfg.steps, sampler=sampler, sampling_steps=sampling_steps,
                  guidance_scale=guidance_scale, aug_sigma=aug_sigma, truncated=truncated, samples=str(path))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"[6/6] the judge's reading at 16x16 (samples in {path}: base above, cascade below):")
    print(format_cascade_report(report))
    return report


def stage_opts(sampler, steps, guidance_scale, seed, progress) -> SampleOptions:
    """The sampling options of one stage."""
    return SampleOptions(sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed, progress=progress,
                         batch_size=250)


def format_cascade_report(r: dict) -> str:
    rows = [
        ("judge accuracy at 16x16 (class asked)", f"{r['class_accuracy']:.1%}", f"{r['n_generated']} samples"),
        ("judge accuracy of the 8x8 base samples", f"{r['base_class_accuracy']:.1%}", ""),
        ("judge accuracy on real held-out 16x16 digits", f"{r['real_accuracy']:.1%}", f"{r['n_real']} digits"),
        ("Frechet distance, cascade vs held-out 16x16", f"{r['frechet']:.2f}", "judge features"),
        ("Frechet distance, real train vs held-out", f"{r['frechet_real_reference']:.2f}", "the floor, same sizes"),
        ("RMSE, 16x16 output area-averaged vs its 8x8 input", f"{r['consistency_rmse']:.3f}", "[-1, 1] range"),
        ("time: train / sample / total (CPU)", f"{r['train_seconds']:.0f}s / {r['sample_seconds']:.0f}s / "
                                               f"{r['total_seconds']:.0f}s ({r['cpu_seconds']:.0f}s)", ""),
    ]
    w = max(len(a) for a, _, _ in rows)
    return "\n".join(f"  {a:<{w}}  {b:>22}  {c}" for a, b, c in rows)
