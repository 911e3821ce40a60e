"""Chapter 18: ControlNet, spatial control of a frozen diffusion model.

Trains a tiny ControlNet (Zhang et al. 2023) on a frozen Stable-Diffusion-style digits model
(``_editing.sd_base``: difflab's ControlNet copies a ``UNetSD``'s encoder) with each digit's
silhouette (its ink mask, pixels > 0) as the control. Prints that the freshly built ControlNet
changes nothing (zero convolutions), then how well samples follow a held-out digit's silhouette,
without and with the ControlNet: intersection over union of the sample's ink with the control,
and the judge's accuracy against the control digit's class.
``python examples/guide/18_controlnet.py [--fast --out DIR]`` (44 s on the 2-core CPU with the base
and the ControlNet cached, 100 held-out silhouettes; training them (600 and 300 steps) adds about
72 s the first time; the --fast run trains 120 and 60.)
"""
from __future__ import annotations

import torch

import _editing as ed
import _guide as guide
from difflab.adapters.controlnet import ControlledUNet, ControlNet
from difflab.core import Denoiser
from difflab.data import load_digits
from difflab.samplers import sample_ddim

BOUNDS = {
    "init_max_change": (0.0, 0.0),            # zero convolutions: the controlled model is the base, exactly
    "iou_uncontrolled": (0.1, 0.6),           # base samples vs a silhouette they never saw
    "iou_controlnet": (0.45, 1.0),
    "iou_controlnet_scale_half": (0.2, 1.0),
    "accuracy_uncontrolled": (0.0, 0.35),     # chance is 10%
    "accuracy_controlnet": (0.3, 1.0),
}


def silhouette(images: torch.Tensor) -> torch.Tensor:
    """The control: 1 where a digit has ink (pixel > 0 in [-1, 1]), else 0."""
    return (images > 0).float()


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union of two {0, 1} masks."""
    inter, union = (a * b).flatten(1).sum(1), ((a + b) > 0).float().flatten(1).sum(1)
    return inter / union.clamp(min=1)


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    base, context = ed.sd_base(args.fast, seed=args.seed)
    unet = base.net.requires_grad_(False)

    # 1. A fresh ControlNet: a copy of the encoder whose zero convolutions output exactly 0.
    with torch.random.fork_rng():  # the copy's new layers (E, zero convs) take torch's default init: seed it
        torch.manual_seed(args.seed)
        controlnet = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(16,))
    controlled = Denoiser(ControlledUNet(unet, controlnet), base.frame, base.prediction, base.sigma_data)
    held, held_labels = world["held"], world["held_labels"]
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    sigma = torch.logspace(-1.5, 1.5, 16)
    ctx = context.expand(16, -1, -1)
    with torch.no_grad():
        init_change = float((controlled(x, sigma, context=ctx, control=silhouette(held[:16])) - base(x, sigma, context=ctx)).abs().max())

    # 2. Train it on the frozen base: the train split's digits with their own silhouettes as controls.
    images, _ = load_digits(split="train")
    data = (images, None, {"context": context.expand(len(images), -1, -1).contiguous(), "control": silhouette(images)})
    ed.trained_module("controlnet_silhouette", controlled, data, args.fast, (60, 300), seed=args.seed)

    # 3. Sample with the same per-sample noise: base, controlled, controlled at scale 1/2.
    n, steps = (40, 10) if args.fast else (100, 25)
    control, labels = silhouette(held[:n]), held_labels[:n]
    sigmas = ed.grid(base, steps)
    start = ed.noise_for(args.seed, n)() * float(base.prior_std(sigmas[0]))
    cond = {"context": context.expand(n, -1, -1)}
    with torch.no_grad():
        out = {"uncontrolled": sample_ddim(base, start, sigmas, extra_args=cond),
               "controlnet": sample_ddim(controlled, start, sigmas, extra_args={**cond, "control": control}),
               "controlnet_scale_half": sample_ddim(controlled, start, sigmas,
                                                    extra_args={**cond, "control": control, "conditioning_scale": 0.5})}
    out = {k: v.clamp(-1, 1) for k, v in out.items()}
    judge = world["judge"]
    figures = {"init_max_change": init_change}
    for k, v in out.items():
        figures[f"iou_{k}"] = float(iou(silhouette(v), control).mean())
    figures["iou_real_same_class"] = float(iou(silhouette(same_class_other(held, held_labels)[:n]), control).mean())
    figures["accuracy_uncontrolled"] = judge.accuracy(out["uncontrolled"], labels)
    figures["accuracy_controlnet"] = judge.accuracy(out["controlnet"], labels)
    figures = guide.report(figures)

    plt = guide.pyplot()
    fig = plt.figure(figsize=(9, 3.6))
    ed.draw_rows(fig, [("control", control * 2 - 1), ("base", out["uncontrolled"]), ("ControlNet", out["controlnet"]),
                       ("scale 0.5", out["controlnet_scale_half"])], 12)
    guide.save(fig, guide.picture(args, "18_controlnet.png"))
    return figures


def same_class_other(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each image, the next image of the same class (cyclically): a real digit of the class
    whose silhouette is not the control's, the reference for how much a class alone fixes."""
    out = torch.empty_like(images)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        out[idx] = images[idx.roll(-1)]
    return out


if __name__ == "__main__":
    main()
