"""``difflab sample``: sample a trained checkpoint into a PNG grid."""
from __future__ import annotations

from pathlib import Path

from ..io.images import save_grid
from ..io.spec import load_denoiser
from ..pipelines import generate
from ..samplers import SAMPLERS, get_sampler
from .common import device, parse_classes

HELP = "sample a trained checkpoint into a PNG grid"
DESCRIPTION = "Sample a checkpoint written by 'difflab train' or 'difflab demo'."


def add_arguments(s) -> None:
    s.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.safetensors or the run directory holding it")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write (default: samples.png)")
    s.add_argument("--sampler", default="ddim", help=f"one of {', '.join(sorted(SAMPLERS))} (default: ddim)")
    s.add_argument("--steps", type=int, default=50, help="sampler steps (default: 50)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default: 1 = none)")
    s.add_argument("--classes", type=parse_classes, default=None, help="comma-separated class indices, one image each")
    s.add_argument("--num", type=int, default=16, help="number of images when --classes is not given (default: 16)")
    s.add_argument("--seed", type=int, default=0, help="seed; sample i is the same whatever the batch size (default: 0)")
    s.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: ema)")
    s.add_argument("--eta", type=float, default=None, help="DDIM eta (default: 0)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def run(args) -> int:
    get_sampler(args.sampler)  # unknown names fail before the checkpoint is read
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist")
    dev = device(args.device)
    denoiser, meta = load_denoiser(args.checkpoint, weights=args.weights, device=dev)
    cfg = denoiser.net.config
    size = meta.get("metadata", {}).get("size", 8)
    extra = {"eta": args.eta} if args.eta is not None else {}
    images = generate(denoiser, args.classes, num_samples=None if args.classes else args.num,
                      shape=(cfg.in_channels, size, size), sampler=args.sampler, steps=args.steps,
                      guidance_scale=args.guidance, null_class=meta.get("null_class"), seed=args.seed,
                      device=dev, **extra)
    path = save_grid(images, args.out, nrow=min(10, len(images)), upscale=max(1, 48 // size))
    print(f"wrote {len(images)} samples to {path}")
    return 0
