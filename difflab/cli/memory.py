"""``difflab memory``: predict (and measure) the memory of a training step or an inference call."""
from __future__ import annotations

import json

from ..perf.families import ALIASES, FAMILIES, family_plan, format_plan
from ..perf.memory import estimate_memory, format_estimate, measure_peak, resolve_network, set_gradient_checkpointing
from ..perf.runtime import PRECISIONS, dtype_of
from .common import UsageError, device, device_name, positive_float, positive_int

HELP = "predict (and measure) the memory of a training step or a call"
DESCRIPTION = ("Parameters, gradients, optimizer states and activations (counted from what autograd saves) of one "
               "training step, for a U-Net or DiT preset; --measure runs the step and compares with its measured peak. "
               "A family preset (sdxl, sd3, sd3.5-large, flux-dev, flux-schnell) is built at real size on the meta device "
               "(no weights, no memory): its parameters, one step and one decode at the family's resolution, the peak of "
               "each placement (all on the GPU, model or sequential CPU offload, VAE tiling), and with --gpu-gb the one to use.")
FAMILY_NAMES = sorted(FAMILIES) + sorted(ALIASES)


def add_arguments(m) -> None:
    m.add_argument("--preset", default="cifar10", help="a difflab.nn.PRESETS name, sd1, sd2, sd:<name>, a DiT preset (DiT-S/2 ... DiT-XL/8), "
                   f"dit:<name>, moe-dit:<name>, or a model family at real size: {', '.join(FAMILY_NAMES)} (default: cifar10)")
    m.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default: 128; a family: 1 image)")
    m.add_argument("--image-size", type=positive_int, default=None,
                   help="image (or latent) height and width (default: 32; a family: its resolution in pixels, 1024)")
    m.add_argument("--precision", choices=list(PRECISIONS), default=None,
                   help="training: autocast precision (weights stay fp32); inference and families: weight precision "
                        "(default: fp32; a family: fp16)")
    m.add_argument("--gpu-gb", type=positive_float, default=None,
                   help="a family preset: the GPU's memory in GiB; prints the placement that fits (offload, VAE tiling)")
    m.add_argument("--optimizer", choices=["adamw", "adam", "sgd", "none"], default="adamw", help="optimizer (default: adamw)")
    m.add_argument("--inference", action="store_true", help="one inference call instead of a training step")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    m.add_argument("--ema", action="store_true", help="count an fp32 EMA copy of the weights (difflab train keeps one)")
    m.add_argument("--context-len", type=positive_int, default=77, help="text tokens for cross-attention nets (default: 77)")
    m.add_argument("--measure", action="store_true", help="also run the step and print measured against predicted")
    m.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available); probe on the device you train on")
    m.add_argument("--json", action="store_true", help="print JSON")


def run_family(args) -> int:
    """A family preset at real size, on the meta device: nothing is allocated."""
    for flag, value in (("--measure", args.measure), ("--gradient-checkpointing", args.gradient_checkpointing), ("--ema", args.ema)):
        if value:
            raise UsageError(f"{flag} is for trainable presets; a family preset ({args.preset}) is estimated for inference "
                             "on the meta device, without weights")
    plan = family_plan(args.preset, precision=args.precision or "fp16", images=args.batch_size or 1, resolution=args.image_size)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan, args.gpu_gb))
    return 0


def run(args) -> int:
    if args.preset in FAMILY_NAMES:
        return run_family(args)
    if args.gpu_gb is not None:
        raise UsageError(f"--gpu-gb is for family presets ({', '.join(FAMILY_NAMES)}), not {args.preset!r}")
    args.batch_size, args.image_size, args.precision = args.batch_size or 128, args.image_size or 32, args.precision or "fp32"
    dev = device(args.device)
    optimizer = None if args.optimizer == "none" else args.optimizer
    if args.batch_size < 1 or args.image_size < 1:
        raise ValueError("--batch-size and --image-size must be positive")
    net = resolve_network(args.preset, dev)  # unknown presets fail here, before any work
    if args.inference:
        net.to(dtype_of(args.precision))  # inference runs in the weights' precision
    est = estimate_memory(net, args.batch_size, args.image_size, precision=args.precision, optimizer=optimizer,
                          training=not args.inference, gradient_checkpointing=args.gradient_checkpointing, ema=args.ema,
                          context_len=args.context_len)
    measured = None
    if args.measure:
        if args.gradient_checkpointing:
            set_gradient_checkpointing(net, True)
        measured = measure_peak(net, args.batch_size, args.image_size, precision=args.precision, optimizer=optimizer,
                                training=not args.inference, context_len=args.context_len)
    if args.json:
        print(json.dumps({"estimate": est, "measured": measured}, indent=2))
        return 0
    what = "inference call" if args.inference else f"training step ({args.optimizer}{', gradient checkpointing' if args.gradient_checkpointing else ''})"
    print(f"{args.preset}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.precision}, one {what} on {dev}:")
    print(format_estimate(est, measured))
    return 0
