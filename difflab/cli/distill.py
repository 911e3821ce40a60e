"""``difflab distill``: distil a trained checkpoint into a few-step student that ``difflab sample`` loads."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import load_digits, load_image_folder
from ..io.spec import load_denoiser
from ..train.distill import METHODS, DistillConfig, distill
from .common import (UsageError, device, device_name, finite_float, image_checkpoint, non_negative_int, output_folder,
                     positive_float, positive_int)

HELP = "distil a checkpoint into a few-step student"
DESCRIPTION = ("Distil a checkpoint of 'difflab train' or 'difflab demo' into a student that samples in a few steps "
               "(progressive distillation, guided distillation, consistency distillation, reflow); the student is "
               "written to OUT/checkpoint.safetensors with the sampler and steps it was made for.")


def add_arguments(d) -> None:
    d.add_argument("--method", choices=METHODS, required=True, help="the distillation method")
    d.add_argument("--teacher", type=Path, required=True, help="the teacher: a checkpoint or the run folder holding it")
    d.add_argument("--out", type=Path, required=True, help="folder for the student (checkpoint.safetensors) and its runs")
    d.add_argument("--steps", type=positive_int, default=500, help="optimizer steps of each run (each round) (default: 500)")
    d.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default: 64)")
    d.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate (default: 1e-4)")
    d.add_argument("--guidance", type=finite_float, default=1.0,
                   help="the teacher's classifier-free guidance scale; guided: the student's default (default: 1)")
    d.add_argument("--student-steps", type=positive_int, default=1, help="the evaluations the student is for (default: 1)")
    d.add_argument("--teacher-steps", type=positive_int, default=64,
                   help="progressive/guided: the teacher's DDIM steps, halved each round (default: 64)")
    d.add_argument("--w-min", type=finite_float, default=1.0, help="guided: smallest guidance scale learned (default: 1)")
    d.add_argument("--w-max", type=finite_float, default=4.0, help="guided: largest guidance scale learned (default: 4)")
    d.add_argument("--levels", type=positive_int, default=18, help="consistency: Karras levels N (default: 18)")
    d.add_argument("--pairs", type=positive_int, default=4096, help="reflow: noise/sample pairs (default: 4096)")
    d.add_argument("--data", default=None, help="'digits' or a folder of images (default: the teacher's own)")
    d.add_argument("--seed", type=non_negative_int, default=0, help="seed (default: 0)")
    d.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--no-progress", action="store_true", help="no progress lines")


def teacher_data(args, meta: dict, conditional: bool) -> dict:
    """The data the student learns on: ``--data`` or the teacher's own (recorded at training)."""
    recorded = meta.get("metadata") or {}
    source, size = args.data or recorded.get("data", "digits"), int(recorded.get("size") or 8)
    if source == "digits":
        images, labels = load_digits(size=size, split="train")
    else:
        if not Path(source).is_dir():
            raise FileNotFoundError(f"--data {source} is not a folder of images (give --data digits or a folder)")
        images, labels = load_image_folder(source, size, channels=_channels(meta)), None
    data = {"x0": images}
    if conditional:
        if labels is None:
            raise UsageError(f"the teacher is class-conditional, but --data {source} has no labels: use the digits")
        data["class_labels"] = labels
    return data


def _channels(meta: dict) -> int:
    config = (meta["spec"].get("network") or {}).get("config") or meta["spec"].get("unet") or {}
    return int(config.get("in_channels", 3))


def run(args) -> int:
    # 1. Check everything that can be checked before any work.
    output_folder(args.out)
    image_checkpoint(args.teacher, "--teacher", "difflab distill")
    config = DistillConfig(method=args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           guidance_scale=args.guidance, w_min=args.w_min, w_max=args.w_max,
                           teacher_steps=args.teacher_steps, student_steps=args.student_steps, levels=args.levels,
                           pairs=args.pairs, seed=args.seed, progress=not args.no_progress)
    teacher, meta = load_denoiser(args.teacher, weights="ema", device=device(args.device))
    num_classes = getattr(getattr(teacher.net, "config", None), "num_classes", None)
    null_class = meta.get("null_class", num_classes) if num_classes else None
    data = teacher_data(args, meta, conditional=bool(num_classes))
    # 2. Distil, then write the student.
    print(f"distilling {args.teacher} with {args.method} on {len(data['x0'])} examples -> {args.out}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        path = distill(teacher, meta["spec"], data, config, args.out, null_class=null_class,
                       metadata={**(meta.get("metadata") or {}), "teacher": str(args.teacher)})
    print(f"student: {path} (difflab sample --checkpoint {args.out} samples it with its own sampler and steps)")
    return 0
