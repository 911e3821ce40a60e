"""``difflab demo``: train, sample and judge a model on the embedded digits (``--text``: the latent
text-to-image version)."""
from __future__ import annotations

from ..demos.digits import run_demo
from ..demos.text import run_text_demo
from ..samplers import SAMPLERS
from .common import finite_float, non_negative_int, positive_int

HELP = "train, sample and judge a model on the embedded digits"
DESCRIPTION = ("Train a class-conditional U-Net on scikit-learn's digits, sample every class with classifier-free "
               "guidance, write samples.png and print the digits judge's figures.")


def add_arguments(d) -> None:
    d.add_argument("--text", action="store_true",
                   help="the latent text-to-image demo instead: a small VAE and a text-conditional U-Net on captioned "
                        "digits, sampled from prompts, with inpainting, outpainting and inversion")
    d.add_argument("--out-dir", default=None,
                   help="where samples.png, the checkpoints and report.json go (default: demo_out, or demo_text_out with --text)")
    d.add_argument("--steps", type=positive_int, default=None, help="training steps (default: 2000)")
    d.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="sampler (default: ddim)")
    d.add_argument("--sampling-steps", type=positive_int, default=50, help="sampler steps (default: 50)")
    d.add_argument("--guidance", type=finite_float, default=1.5, help="classifier-free guidance scale (default: 1.5; 1 = none)")
    d.add_argument("--samples-per-class", type=positive_int, default=50, help="samples per class judged (default: 50)")
    d.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default: 0)")
    d.add_argument("--resume", action="store_true", help="continue the training checkpoint in --out-dir")


def run(args) -> int:
    if args.text:
        run_text_demo(args.out_dir or "demo_text_out", steps=args.steps, sampler=args.sampler,
                      sampling_steps=args.sampling_steps, guidance_scale=args.guidance, seed=args.seed, resume=args.resume)
        return 0
    run_demo(args.out_dir or "demo_out", steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps,
             guidance_scale=args.guidance, samples_per_class=args.samples_per_class, seed=args.seed, resume=args.resume)
    return 0
