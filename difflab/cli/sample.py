"""``difflab sample``: sample a trained checkpoint, or a diffusers pipeline folder from prompts, into a PNG grid."""
from __future__ import annotations

from pathlib import Path

from ..io.images import save_grid
from ..pipelines import sample_checkpoint
from ..pipelines.checkpoint import sampling_defaults
from ..pipelines.folder import folder_family, folder_options, sample_folder
from ..pipelines.options import DTYPES
from ..samplers import ETA_SAMPLERS, SAMPLERS
from .common import (UsageError, device, device_name, finite_float, image_checkpoint, non_negative_float, non_negative_int,
                     output_file, parse_classes, positive_int)

HELP = "sample a trained checkpoint into a PNG grid"
DESCRIPTION = ("Sample a checkpoint written by 'difflab train' or 'difflab demo' (network kinds whose samples are images), "
               "or a local diffusers pipeline folder (Stable Diffusion 1.x/2.x or 3) from --prompt.")


def add_arguments(s) -> None:
    s.add_argument("--checkpoint", type=Path, default=None, help="checkpoint.safetensors or the run directory holding it")
    s.add_argument("--model", type=Path, default=None,
                   help="a diffusers pipeline folder (model_index.json: Stable Diffusion 1.x/2.x or 3), sampled from --prompt")
    s.add_argument("--prompt", action="append", default=None, help="with --model: a prompt, one image each (repeat for more)")
    s.add_argument("--negative-prompt", default=None, help="with --model: the negative prompt of every image (default: '')")
    s.add_argument("--height", type=positive_int, default=None, help="with --model: image height (default: the model's)")
    s.add_argument("--width", type=positive_int, default=None, help="with --model: image width (default: the model's)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="with --model: the weights' dtype (default: float32; sampling arithmetic stays float32)")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write (default: samples.png)")
    s.add_argument("--sampler", default=None,
                   help=f"one of {', '.join(sorted(SAMPLERS))} (default: the checkpoint's own, else ddim; "
                        "--model: flow_euler for SD3, ddim for SD 1.x/2.x)")
    s.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the checkpoint's own, else 50; --model: 28 for SD3)")
    s.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: the checkpoint's own, else 1 = none; "
                        "--model: 7 for SD3, 7.5 for SD 1.x/2.x)")
    s.add_argument("--classes", type=parse_classes, default=None, help="comma-separated class indices, one image each")
    s.add_argument("--num", type=positive_int, default=16, help="number of images when --classes is not given (default: 16)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="seed; sample i is the same whatever the batch size (default: 0)")
    s.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: ema)")
    s.add_argument("--eta", type=non_negative_float, default=None, help="DDIM eta (default: 0)")
    s.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)")


def run(args) -> int:
    # 1. Check everything that can be checked before the weights are read.
    output_file(args.out)
    if (args.checkpoint is None) == (args.model is None):
        raise UsageError("give --checkpoint (a difflab checkpoint) or --model (a diffusers pipeline folder), one of them")
    if args.model is not None:
        return run_folder(args)
    if args.prompt or args.negative_prompt is not None or args.height or args.width or args.dtype:
        raise UsageError("--prompt, --negative-prompt, --height, --width and --dtype go with --model (a text-to-image folder)")
    meta = image_checkpoint(args.checkpoint, "--checkpoint", "difflab sample")
    given = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)
    overrides = dict({k: v for k, v in given.items() if v is not None}, seed=args.seed, device=device(args.device))
    sampler = overrides.get("sampler") or sampling_defaults(meta).sampler
    if args.eta is not None:
        if sampler not in ETA_SAMPLERS:
            raise UsageError(f"--eta: sampler {sampler!r} has no eta; the samplers that take one are {', '.join(ETA_SAMPLERS)}")
        overrides["sampler_kwargs"] = {"eta": args.eta}
    options = sampling_defaults(meta).replace(**overrides)  # checked here, before the weights are read
    # 2. Sample and write the grid.
    print(f"sampling with {options.sampler}, {options.steps} steps, guidance {options.guidance_scale:g}")
    images = sample_checkpoint(args.checkpoint, labels=args.classes, num=None if args.classes else args.num,
                               options=options, weights=args.weights)
    size = images.shape[-1]
    path = save_grid(images, args.out, nrow=min(10, len(images)), upscale=max(1, 48 // size))
    print(f"wrote {len(images)} samples to {path}")
    return 0


def run_folder(args) -> int:
    """``--model FOLDER``: text to image from a diffusers pipeline folder, one image per ``--prompt``."""
    if not args.model.is_dir():
        raise FileNotFoundError(f"--model {args.model} is not a folder (expected a diffusers pipeline folder with model_index.json)")
    family = folder_family(args.model)
    if not args.prompt:
        raise UsageError("--model needs at least one --prompt")
    if args.classes is not None:
        raise UsageError("--classes goes with --checkpoint (class-conditional models); --model takes --prompt")
    given = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)
    overrides = dict({k: v for k, v in given.items() if v is not None}, seed=args.seed, progress=False)
    if args.eta is not None:
        sampler = args.sampler or folder_options(family).sampler
        if sampler not in ETA_SAMPLERS:
            raise UsageError(f"--eta: sampler {sampler!r} has no eta; the samplers that take one are {', '.join(ETA_SAMPLERS)}")
        overrides["eta"] = args.eta
    folder_options(family, **overrides)  # checked here, before the weights are read
    print(f"sampling the {family} folder {args.model} ({len(args.prompt)} prompts)")
    images = sample_folder(args.model, args.prompt, negative_prompts=args.negative_prompt, height=args.height,
                           width=args.width, device=device(args.device), dtype=DTYPES[args.dtype or "float32"], **overrides)
    path = save_grid(images, args.out, nrow=min(10, len(images)))
    print(f"wrote {len(images)} images to {path}")
    return 0
