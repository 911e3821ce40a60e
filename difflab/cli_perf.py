"""The ``difflab bench`` and ``difflab memory`` commands (wired into :mod:`difflab.cli` by
``add_perf_commands``; ``PERF_COMMANDS`` maps each name to its handler)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_perf_commands(subparsers) -> dict:
    """Register ``bench`` and ``memory`` on an argparse subparsers object; returns ``PERF_COMMANDS``."""
    from .perf.bench import WORKLOADS

    b = subparsers.add_parser(
        "bench", help="time difflab against diffusers on the same U-Nets and device",
        description="DDPM's CIFAR-10 U-Net (forward img/s at batch 256, training img/s at batch 128) and an "
                    "SD1.5-size U-Net (ms per call at 64x64 latents, batch 2), difflab against diffusers in one run, "
                    "with MFU and each fast path's error against eager fp32.")
    b.add_argument("--quick", action="store_true", help="tiny models, few iterations, no compile: a CPU smoke run")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch.compile variants (default: on, off with --quick)")
    b.add_argument("--compile-mode", default=None, help="torch.compile mode for every compiled variant (default: torch's)")
    b.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default: 20; 2 with --quick)")
    b.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    b.add_argument("--record", type=Path, default=None, help="write the report as the 'U-Net speed' section of this Markdown file")

    m = subparsers.add_parser(
        "memory", help="predict (and measure) the memory of a training step or an inference call",
        description="Parameters, gradients, optimizer states and activations (counted from what autograd saves) of one "
                    "training step, for a U-Net preset; --measure runs the step and compares with its measured peak.")
    m.add_argument("--preset", default="cifar10", help="a difflab.nn.PRESETS name, sd1, sd2 or sd:<name> (default: cifar10)")
    m.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    m.add_argument("--image-size", type=int, default=32, help="image (or latent) height and width (default: 32)")
    m.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="training: autocast precision (weights stay fp32); inference: weight precision")
    m.add_argument("--optimizer", choices=["adamw", "adam", "sgd", "none"], default="adamw", help="optimizer (default: adamw)")
    m.add_argument("--inference", action="store_true", help="one inference call instead of a training step")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    m.add_argument("--ema", action="store_true", help="count an fp32 EMA copy of the weights (difflab train keeps one)")
    m.add_argument("--context-len", type=int, default=77, help="text tokens for cross-attention nets (default: 77)")
    m.add_argument("--measure", action="store_true", help="also run the step and print measured against predicted")
    m.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available); probe on the device you train on")
    m.add_argument("--json", action="store_true", help="print JSON")
    return PERF_COMMANDS


def _device(name):
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_bench(args) -> int:
    from .perf.bench import format_report, record, run_bench

    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    report = run_bench(quick=args.quick, device=args.device, workloads=workloads, compile=args.compile,
                       compile_mode=args.compile_mode, iters=args.iters)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.record:
        print(f"recorded in {record(report, args.record)}")
    return 0


def cmd_memory(args) -> int:
    from .perf.fast import dtype_of
    from .perf.memory import estimate_memory, format_estimate, measure_peak, resolve_network, set_gradient_checkpointing

    device = _device(args.device)
    optimizer = None if args.optimizer == "none" else args.optimizer
    if args.batch_size < 1 or args.image_size < 1:
        raise ValueError("--batch-size and --image-size must be positive")
    net = resolve_network(args.preset, device)  # unknown presets fail here, before any work
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
    print(f"{args.preset}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.precision}, one {what} on {device}:")
    print(format_estimate(est, measured))
    return 0


PERF_COMMANDS = {"bench": cmd_bench, "memory": cmd_memory}


def main(argv=None) -> int:
    """Run ``bench`` or ``memory`` on their own (what ``difflab bench`` / ``difflab memory`` do)."""
    import sys

    parser = argparse.ArgumentParser(prog="difflab")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_perf_commands(sub)
    args = parser.parse_args(argv)
    try:
        return PERF_COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
