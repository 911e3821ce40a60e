"""``difflab distill``: distil a trained checkpoint into a few-step student that ``difflab sample`` loads."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import load_digits, load_image_folder
from ..demos.text import TRAIN_TEMPLATES, caption_dataset
from ..io.spec import load_denoiser
from ..io.checkpoint import read_metadata
from ..io.text_model import RESERVED, is_text_model, model_file, read_text_model
from ..train.distill import METHODS, TEXT_METHODS, DistillConfig, caption_data, distill, distill_text
from .common import (UsageError, device, device_name, finite_float, image_checkpoint, non_negative_int, output_folder,
                     positive_float, positive_int)

HELP = "distil a checkpoint into a few-step student"
DESCRIPTION = ("Distil a checkpoint of 'difflab train' or 'difflab demo' into a student that samples in a few steps "
               "(progressive distillation, guided distillation, consistency distillation, reflow); the student is "
               "written to OUT/checkpoint.safetensors with the sampler and steps it was made for. lcm and lcm-lora "
               "distil a text-to-image model folder ('difflab demo --text') into a model folder OUT that "
               "'difflab sample --model OUT' samples with the LCM sampler.")


def add_arguments(d) -> None:
    d.add_argument("--method", choices=METHODS, required=True, help="the distillation method")
    d.add_argument("--teacher", type=Path, required=True,
                   help="the teacher: a checkpoint or the run folder holding it; lcm/lcm-lora: a text-to-image model folder")
    d.add_argument("--out", type=Path, required=True, help="folder for the student (checkpoint.safetensors) and its runs")
    d.add_argument("--steps", type=positive_int, default=500, help="optimizer steps of each run (each round) (default: 500)")
    d.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default: 64)")
    d.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate (default: 1e-4)")
    d.add_argument("--guidance", type=finite_float, default=None,
                   help="the teacher's classifier-free guidance scale; guided, lcm: the student's default (default: 1; "
                        "lcm: the teacher folder's own)")
    d.add_argument("--student-steps", type=positive_int, default=None,
                   help="the evaluations the student is for (default: 1; lcm, lcm-lora: 4)")
    d.add_argument("--teacher-steps", type=positive_int, default=64,
                   help="progressive/guided: the teacher's DDIM steps, halved each round (default: 64)")
    d.add_argument("--w-min", type=finite_float, default=1.0, help="guided: smallest guidance scale learned (default: 1)")
    d.add_argument("--w-max", type=finite_float, default=4.0, help="guided: largest guidance scale learned (default: 4)")
    d.add_argument("--levels", type=positive_int, default=18, help="consistency: Karras levels N (default: 18)")
    d.add_argument("--pairs", type=positive_int, default=4096, help="reflow: noise/sample pairs (default: 4096)")
    d.add_argument("--original-steps", type=positive_int, default=50,
                   help="lcm/lcm-lora: the skipping schedule's steps, k = T / this (default: 50)")
    d.add_argument("--rank", type=positive_int, default=64, help="lcm-lora: the adapter's rank (default: 64)")
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
    text = args.method in TEXT_METHODS
    if not args.teacher.exists():
        raise FileNotFoundError(f"--teacher {args.teacher} does not exist")
    if text != is_text_model(args.teacher):
        raise UsageError(f"--method {args.method} needs " + ("a latent text-to-image model (the model.safetensors "
                         "'difflab demo --text' writes)" if text else "an image checkpoint (lcm and lcm-lora take a text-to-image "
                         "model folder)") + f"; --teacher {args.teacher} is not one")
    if not text:
        image_checkpoint(args.teacher, "--teacher", "difflab distill")
    try:
        config = DistillConfig(method=args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               guidance_scale=teacher_guidance(args, text), w_min=args.w_min, w_max=args.w_max,
                               teacher_steps=args.teacher_steps, student_steps=args.student_steps or (4 if text else 1),
                               levels=args.levels,
                               pairs=args.pairs, original_steps=args.original_steps, rank=args.rank, seed=args.seed,
                               progress=not args.no_progress)
    except ValueError as e:
        raise UsageError(str(e).replace("w_min=", "--w-min ").replace("w_max=", "--w-max ")) from e
    if text:
        return run_text(args, config)
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


def teacher_guidance(args, text: bool) -> float:
    """--guidance, else 1, else (lcm) the guidance the teacher folder samples with."""
    if args.guidance is not None:
        return args.guidance
    if text:
        return float((read_metadata(model_file(args.teacher)).get("sampling") or {}).get("guidance_scale", 1.0))
    return 1.0


def run_text(args, config: DistillConfig) -> int:
    """lcm / lcm-lora: the teacher folder's model on its own data (the captioned digits of ``difflab demo --text``)."""
    model = read_text_model(args.teacher, device=device(args.device))
    recorded = {k: v for k, v in model.meta.items() if k not in RESERVED + ("file",)}
    if (args.data or recorded.get("data")) != "captioned_digits":
        raise UsageError(f"--method {args.method} learns on the teacher's captioned digits ('difflab demo --text'); "
                         f"--data {args.data or recorded.get('data')!r} is not supported")
    images, labels = load_digits(size=int(recorded.get("size") or 16), split="train")
    index, captions = caption_dataset(labels, TRAIN_TEMPLATES)
    print(f"distilling {args.teacher} with {args.method} on {len(captions)} captioned digits -> {args.out}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        data, uncond = caption_data(model.text_encoder, model.vae, images[index], captions, seed=args.seed)
        path = distill_text(model.denoiser, model.text_encoder, model.vae, model.meta["spec"], data, uncond, config,
                            args.out, metadata={**recorded, "teacher": str(args.teacher)}, sampling_size=model.sampling)
    print(f"student: {path} (difflab sample --model {args.out} --prompt \"the digit 3\" samples it with the LCM "
          f"sampler, {config.student_steps} steps)")
    return 0
