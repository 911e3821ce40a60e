"""Chapter 46: diffusion for super-resolution (SR3).

Trains a tiny SR3-style model (``difflab.nn.SRUNet``: the low-resolution image, upsampled bicubic,
is concatenated to the noisy input) to take 4x4 digits (area averages of the 8x8 ones) to 8x8,
with cascaded diffusion's noise-conditioning augmentation, and compares it with bicubic upsampling
on the held-out digits: PSNR against the truth, the judge's accuracy at 8x8, and consistency (the
output area-averaged back to 4x4 against the input).
``python examples/guide/46_super_resolution.py [--fast --out DIR]`` (43 s of CPU time on one thread,
the 700 training steps included; the --fast run 12 s, 120 steps).
"""
from __future__ import annotations

import torch.nn.functional as F

import _editing as ed
import _guide as guide
from difflab.data import load_digits
from difflab.io.spec import make_spec
from difflab.nn import SRUNetConfig, UNetConfig
from difflab.nn.sr import upsample
from difflab.pipelines import super_resolve
from difflab.pipelines.edit import psnr
from difflab.train import NoiseConditioningAugmentation

BOUNDS = {
    "psnr_bicubic_db": (14.0, 17.0),            # closed form on the fixed held-out split
    "psnr_sr_db": (12.0, 20.0),                 # one sample per input
    "accuracy_low_res_nearest": (0.4, 0.95),     # the judge on the blocky 4x4 input
    "accuracy_bicubic": (0.4, 0.95),
    "accuracy_sr": (0.6, 1.0),
    "consistency_rmse_bicubic": (0.05, 0.3),    # area-average of the output vs the 4x4 input
    "consistency_rmse_sr": (0.0, 0.35),
}


def sr_spec() -> dict:
    unet = UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
                      dropout=0.0)
    return make_spec("sr_unet", SRUNetConfig(unet=unet.to_dict(), factor=2),
                     {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"})


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    high, _ = load_digits(8, split="train")
    low, _ = load_digits(4, split="train")
    sr = ed.trained("sr4to8", sr_spec(), (high, None, {"low_res": low}), args.fast, (120, 700), seed=args.seed,
                    augment=NoiseConditioningAugmentation(sigma_max=0.5, p_clean=0.3))
    n, steps = (60, 10) if args.fast else (359, 25)
    truth, labels = world["held"][:n], world["held_labels"][:n]
    small = F.avg_pool2d(truth, 2)  # = load_digits(4, split="test"): area averages
    bicubic = upsample(small, (8, 8)).clamp(-1, 1)
    out = super_resolve(sr, small, steps=steps, sampler="ddim", seed=args.seed, aug_sigma=0.0, progress=False)
    nearest = upsample(small, (8, 8), "nearest")

    judge = world["judge"]
    figures = guide.report({
        "psnr_bicubic_db": float(psnr(bicubic, truth).mean()),
        "psnr_sr_db": float(psnr(out, truth).mean()),
        "accuracy_low_res_nearest": judge.accuracy(nearest, labels),
        "accuracy_bicubic": judge.accuracy(bicubic, labels),
        "accuracy_sr": judge.accuracy(out, labels),
        "accuracy_truth": judge.accuracy(truth, labels),
        "consistency_rmse_bicubic": float(((F.avg_pool2d(bicubic, 2) - small) ** 2).mean().sqrt()),
        "consistency_rmse_sr": float(((F.avg_pool2d(out, 2) - small) ** 2).mean().sqrt()),
    })

    plt = guide.pyplot()
    fig = plt.figure(figsize=(9, 3.6))
    ed.draw_rows(fig, [("4x4 input", nearest), ("bicubic", bicubic), ("SR3 sample", out), ("8x8 truth", truth)], 12)
    guide.save(fig, guide.picture(args, "46_super_resolution.png"))
    return figures


if __name__ == "__main__":
    main()
