"""``difflab bench``: time difflab against diffusers on the same U-Nets and device."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..perf.bench import WORKLOADS, format_report, record, run_bench
from .common import device_name, positive_int

HELP = "time difflab against diffusers on the same U-Nets and device"
DESCRIPTION = ("DDPM's CIFAR-10 U-Net (forward img/s at batch 256, training img/s at batch 128) and an SD1.5-size U-Net "
               "(ms per call at 64x64 latents, batch 2), difflab against diffusers in one run, with MFU and each fast "
               "path's error against eager fp32.")


def add_arguments(b) -> None:
    b.add_argument("--quick", action="store_true", help="tiny models, few iterations, no compile: a CPU smoke run")
    b.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch.compile variants (default: on, off with --quick)")
    b.add_argument("--compile-mode", default=None, help="torch.compile mode for every compiled variant (default: torch's)")
    b.add_argument("--iters", type=positive_int, default=None, help="timed iterations per variant (default: 20; 2 with --quick)")
    b.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    b.add_argument("--record", type=Path, default=None, help="write the report as the 'U-Net speed' section of this Markdown file")


def run(args) -> int:
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
