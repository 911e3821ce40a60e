"""Chapter 35: cascaded diffusion models (Ho et al. 2022, CDM) and noise-conditioning augmentation.

A two-stage cascade on the digits: the guide's class-conditional 8x8 model is the base, and an x2
super-resolution U-Net (SR3's conditioning: the 8x8 image, upsampled, beside its noisy input) makes
16x16. Two x2 stages are trained with the same budget: one on clean 8x8 inputs, one with
noise-conditioning augmentation (the input noised at s ~ U(0, 1), a fifth clean, and told s). Both
then super-resolve the same base samples at several augmentation levels s; the judge reads the
16x16 outputs (it area-averages them to 8x8) and their Frechet distance to held-out 16x16 digits.
``python examples/guide/35_cascades.py [--fast --out DIR]`` (full: 43 CPU s on one thread, the
stages' training included; the fast run about 10 CPU s with the imports).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import _guide as guide
from difflab.core.forward import noise_augment
from difflab.data import load_digits
from difflab.demos.cascade import SR_SPEC, SR_TRAIN, train_stage
from difflab.nn.sr import upsample
from difflab.pipelines import generate, super_resolve

BOUNDS = {
    "augment_s0_exact": (0.0, 0.0),             # noise_augment at s = 0 returns the image unchanged
    "augment_s1_variance": (0.9, 1.1),          # at s = 1 a unit-variance input keeps unit variance
    "base_accuracy": (0.5, 1.0),                # the fast base model at 8x8
    "aug_s0_accuracy": (0.4, 1.0),              # the cascade with the augmented stage (15 steps in --fast), clean input
    "aug_s1_rmse": (0.0, 0.7),                  # output area-averaged vs its 8x8 input stays close
    "aug_rmse_rise_s1": (0.05, 0.5),            # more augmentation: the output strays further from its input
}
LEVELS = (0.0, 0.2, 0.5, 1.0)


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    torch.manual_seed(args.seed)
    base, _ = guide.digits_model(args.fast)
    world = guide.digits_world()
    judge = world["judge"]
    images8, labels = load_digits(8, split="train")
    images16, _ = load_digits(16, split="train")
    held16, _ = load_digits(16, split="test")

    # 1. Noise-conditioning augmentation itself (CDM, section 4.1), in its variance-preserving form.
    g = torch.Generator().manual_seed(args.seed)
    z, eps = torch.randn(4000, 1, 8, 8, generator=g), torch.randn(4000, 1, 8, 8, generator=g)
    s0_err = (noise_augment(z, 0.0, eps) - z).abs().max().item()
    s1_var = noise_augment(z, 1.0, eps).var().item()

    # 2. Two x2 stages (8 -> 16), the same network and budget: clean inputs, and augmented inputs.
    config = dataclasses.replace(SR_TRAIN, steps=15 if args.fast else 200, warmup_steps=3 if args.fast else 50,
                                 checkpoint_every=0, log_every=10_000,
                                 progress=False, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        stages = {
            "clean": train_stage(SR_SPEC, images16, labels, images8, config, Path(tmp) / "clean",
                                 augment=dict(sigma_max=0.0, p_clean=1.0)),
            "aug": train_stage(SR_SPEC, images16, labels, images8, config, Path(tmp) / "aug",
                               augment=dict(sigma_max=1.0, p_clean=0.2)),
        }

    # 3. One set of base samples (guidance 1.5, as the demo), super-resolved by each stage at each level.
    n = 50 if args.fast else 100
    asked = torch.arange(n) % 10
    steps = 6 if args.fast else 25
    low = generate(base, asked.tolist(), shape=(1, 8, 8), sampler="ddim", steps=steps, guidance_scale=1.5,
                   seed=args.seed, progress=False, batch_size=300)
    figures = {"augment_s0_exact": s0_err, "augment_s1_variance": s1_var,
               "base_accuracy": judge.accuracy(low, asked)}
    outputs, titles = {}, {"base 8x8": "base 8x8 (nearest)"}
    for name, stage in stages.items():
        for s in (LEVELS if name == "aug" else (0.0, 0.5)):
            high = super_resolve(stage, low, asked.tolist(), aug_sigma=s, sampler="ddim", steps=steps,
                                 seed=args.seed + 1, progress=False, batch_size=300)
            key = f"{name}_s{s:g}".replace(".", "")
            outputs[key], titles[key] = high, f"SR {name}, s={s:g}"
            figures[f"{key}_accuracy"] = judge.accuracy(high, asked)
            figures[f"{key}_frechet"] = judge.frechet(high, held16)
            figures[f"{key}_rmse"] = float(((F.avg_pool2d(high, 2) - low) ** 2).mean().sqrt())
    figures["aug_rmse_rise_s1"] = figures["aug_s1_rmse"] - figures["aug_s0_rmse"]
    figures["bicubic_frechet"] = judge.frechet(upsample(low, (16, 16), "bicubic").clamp(-1, 1), held16)
    figures["frechet_floor"] = judge.frechet(images16[:n], held16)
    figures = guide.report(figures)

    # 4. The picture: the base row, then each stage and level, the same ten samples.
    plt = guide.pyplot()
    rows = {"base 8x8": upsample(low, (16, 16), "nearest"), **outputs}
    fig, axes = plt.subplots(len(rows), 10, figsize=(8, 0.85 * len(rows) + 0.4))
    for r, (name, x) in enumerate(rows.items()):
        for c in range(10):
            axes[r, c].imshow(x[c, 0], cmap="gray", vmin=-1, vmax=1)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(titles[name], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("Cascade 8x8 -> 16x16: SR stage trained clean vs with augmentation, at levels s", fontsize=9)
    guide.save(fig, guide.picture(args, "35_cascades.png"))
    return figures


main = guide.on_one_thread(run)  # small convolutions: one thread is faster than two contending ones

if __name__ == "__main__":
    main()
