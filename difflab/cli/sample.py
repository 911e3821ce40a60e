"""``difflab sample``: sample a trained checkpoint into a PNG grid."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..io.audio import save_wav
from ..io.images import save_grid
from ..io.spec import NETWORKS, checkpoint_spec
from ..pipelines import sample_checkpoint
from ..pipelines.checkpoint import check_sampled_kind, sampling_defaults
from ..pipelines.folder import IMAGE_FAMILIES, SINGLE_FILE_FAMILIES, check_image_request, model_family, sample_folder
from ..pipelines.options import DTYPES
from ..samplers import ETA_SAMPLERS, SAMPLERS
from .common import (UsageError, device, device_name, finite_float, image_checkpoint, non_negative_float, non_negative_int,
                     output_file, parse_classes, positive_int)

HELP = "sample a trained checkpoint or a text-to-image model folder into a PNG grid (WAV files for audio checkpoints)"
DESCRIPTION = ("Sample a checkpoint written by 'difflab train' or 'difflab demo' (network kinds whose samples are images), "
               "or a text-to-image model folder (--model) from prompts.")


def add_arguments(s) -> None:
    s.add_argument("--checkpoint", type=Path, default=None, help="checkpoint.safetensors or the run directory holding it")
    s.add_argument("--model", type=Path, default=None,
                   help="instead of --checkpoint: a text-to-image model folder (difflab demo --text, difflab distill "
                        "--method lcm|lcm-lora, a diffusers Stable Diffusion, SDXL, SD3 or Flux folder, or an SDXL / SD3 / Flux single file with --base), sampled from --prompt")
    s.add_argument("--base", type=Path, default=None,
                   help="--model FILE.safetensors (an SDXL, SD3 or Flux single file): a diffusers folder of the same family "
                        "supplying its tokenizers and scheduler (Flux: also its text encoders and autoencoder)")
    s.add_argument("--prompt", action="append", default=None, help="--model: a prompt (repeat for several)")
    s.add_argument("--negative-prompt", default=None, help="--model: the negative prompt (default: empty)")
    s.add_argument("--image", type=Path, default=None,
                   help="--model with an upscaler folder (Stable Diffusion's x4 or x2 latent upscaler): the low-resolution "
                        "image to upscale (PNG, JPEG, ...), one for every prompt")
    s.add_argument("--height", type=positive_int, default=None, help="--model: image height (default: the model's)")
    s.add_argument("--width", type=positive_int, default=None, help="--model: image width (default: the model's)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="--model: the weights' dtype (default: float32; sampling arithmetic stays float32)")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write (default: samples.png)")
    s.add_argument("--sampler", default=None,
                   help=f"one of {', '.join(sorted(SAMPLERS))} (default: the checkpoint's own, else ddim)")
    s.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the checkpoint's own, else 50)")
    s.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: the checkpoint's own, else 1 = none)")
    s.add_argument("--classes", type=parse_classes, default=None, help="comma-separated class indices, one image each")
    s.add_argument("--num", type=positive_int, default=None,
                   help="number of images when --classes is not given (default: 16); --model: images per prompt (default: 1)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="seed; sample i is the same whatever the batch size (default: 0)")
    s.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: ema)")
    s.add_argument("--eta", type=non_negative_float, default=None, help="DDIM eta (default: 0)")
    s.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)")


def run(args) -> int:
    if (args.checkpoint is None) == (args.model is None):
        raise UsageError("give exactly one of --checkpoint (a trained checkpoint) or --model (a text-to-image model folder)")
    if args.model is not None:
        return run_model(args)
    for flag, value in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt), ("--height", args.height),
                        ("--width", args.width), ("--dtype", args.dtype), ("--image", args.image),
                        ("--base", args.base)):
        if value is not None:
            raise UsageError(f"{flag} needs --model (a text-to-image model folder); a --checkpoint takes --classes or --num")
    # 1. Check everything that can be checked before the weights are read.
    output_file(args.out)
    meta, rate = sampled_checkpoint(args.checkpoint, args.out)
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
    images = sample_checkpoint(args.checkpoint, labels=args.classes, num=None if args.classes else args.num or 16,
                               options=options, weights=args.weights)
    if rate is not None:  # audio: one WAV per clip
        paths = [save_wav(args.out if len(images) == 1 else args.out.with_name(f"{args.out.stem}_{i}.wav"), clip, rate)
                 for i, clip in enumerate(images)]
        print(f"wrote {len(paths)} clips at {rate} Hz to {paths[0]}{' ...' if len(paths) > 1 else ''}")
        return 0
    size = images.shape[-1]
    path = save_grid(images, args.out, nrow=min(10, len(images)), upscale=max(1, 48 // size))
    print(f"wrote {len(images)} samples to {path}")
    return 0


def sampled_checkpoint(path: Path, out: Path) -> tuple[dict, int | None]:
    """(metadata, sample rate or None) of the checkpoint to sample: an image kind, or an audio kind
    (then ``--out`` must be a .wav path), refused before the weights are read."""
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    kind, meta = checkpoint_spec(path)
    if NETWORKS[kind].output != "audio":
        return image_checkpoint(path, "--checkpoint", "difflab sample"), None
    check_sampled_kind(kind, meta, "difflab sample")
    if out.suffix.lower() != ".wav":
        raise UsageError(f"--out {out}: network kind {kind!r} makes audio; give a .wav path (several clips are written "
                         f"as NAME_0.wav, NAME_1.wav, ...)")
    return meta, int(meta["spec"]["network"]["config"].get("sample_rate", 8000))


def run_model(args) -> int:
    """``--model FOLDER --prompt ...``: text-to-image with the folder's family and its defaults
    (:func:`difflab.pipelines.folder.sample_folder`)."""
    # 1. Check the arguments and the folder's layout before any weights are read.
    output_file(args.out)
    if not args.prompt:
        raise UsageError("--model needs at least one --prompt")
    if args.classes is not None:
        raise UsageError("--classes is for class-conditional checkpoints; --model samples from --prompt")
    family = model_family(args.model)
    if args.base is not None:
        if family not in SINGLE_FILE_FAMILIES:
            raise UsageError(f"--base is for single-file checkpoints ({', '.join(SINGLE_FILE_FAMILIES)}); {args.model} is a "
                             f"{family} model, which holds everything itself")
        if not args.base.is_dir():
            raise UsageError(f"--base {args.base} is not a folder (give a diffusers pipeline folder of the same family)")
    elif family in SINGLE_FILE_FAMILIES:
        raise UsageError(f"{args.model} is a {family} checkpoint: it holds no tokenizer or scheduler; pass --base FOLDER, "
                         "a diffusers folder of the same family")
    image = read_image_argument(args.image, family)
    given = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)
    overrides = dict({k: v for k, v in given.items() if v is not None}, seed=args.seed, device=device(args.device))
    if args.eta is not None:
        if args.sampler is not None and args.sampler not in ETA_SAMPLERS:
            raise UsageError(f"--eta: sampler {args.sampler!r} has no eta; the samplers that take one are {', '.join(ETA_SAMPLERS)}")
        overrides["eta"] = args.eta
    # 2. Sample (the folder's own defaults under the overrides) and write the grid.
    prompts = [p for p in args.prompt for _ in range(args.num or 1)]
    print(f"{family} model {args.model}: {len(prompts)} images")
    images = sample_folder(args.model, prompts, negative_prompts=args.negative_prompt, height=args.height,
                           width=args.width, dtype=DTYPES[args.dtype] if args.dtype else None, image=image, base=args.base,
                           **overrides)
    path = save_grid(images, args.out, nrow=min(10, len(images)))
    print(f"wrote {len(images)} samples to {path}")
    return 0


def read_image_argument(path: Path | None, family: str):
    """``--image``: the Pillow image an upscaler folder needs (RGB), checked before any weights are
    read; a UsageError when it is missing, unreadable, or given to a folder that takes none."""
    try:
        check_image_request(family, path)
    except ValueError as e:
        raise UsageError(f"--image: {e}") from None
    if path is None:
        return None
    if not path.is_file():
        raise UsageError(f"--image {path} is not a file (give the low-resolution image to upscale, e.g. a PNG; "
                         f"upscaler layouts: {', '.join(IMAGE_FAMILIES)})")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"--image {path} is not a readable image ({e})") from None
