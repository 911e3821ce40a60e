"""The ``difflab`` command: train, sample, demo."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

EPILOG = "Run 'difflab COMMAND --help' for the options of a command."


def _parse_classes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.replace(" ", "").split(",") if c != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes must be comma-separated integers like 0,1,2, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from .core.params import PREDICTIONS
    from .core.schedules import DISCRETE_SCHEDULES
    from .samplers import SAMPLERS

    p = argparse.ArgumentParser(prog="difflab", description="Train, sample and measure diffusion models.", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="train a class-conditional model on the embedded digits, sample and judge it",
                       description="Train a class-conditional U-Net on scikit-learn's digits, sample every class with "
                                   "classifier-free guidance, write samples.png and print the digits judge's figures.")
    d.add_argument("--out-dir", default="demo_out", help="where samples.png, the checkpoint and report.json go (default: demo_out)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: 2000)")
    d.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="sampler (default: ddim)")
    d.add_argument("--sampling-steps", type=int, default=50, help="sampler steps (default: 50)")
    d.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (default: 2; 1 = none)")
    d.add_argument("--samples-per-class", type=int, default=50, help="samples per class judged (default: 50)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    d.add_argument("--resume", action="store_true", help="continue the training checkpoint in --out-dir")

    t = sub.add_parser("train", help="train a diffusion model", description="Train a U-Net diffusion model. Flags override "
                       "the values of --config (a JSON file with optional 'spec' and 'train' objects).")
    t.add_argument("--config", type=Path, help="JSON file: {\"spec\": {\"unet\": {...}, \"diffusion\": {...}}, \"train\": {...}}")
    t.add_argument("--out", type=Path, default=Path("runs/digits"), help="run directory for checkpoint and log (default: runs/digits)")
    t.add_argument("--data", default="digits", help="'digits' (embedded) or a folder of images (subfolders = classes with --labels)")
    t.add_argument("--size", type=int, default=None, help="image size (digits: 8, 16 or 32; folders: required)")
    t.add_argument("--channels", type=int, default=None, help="image channels for a folder (1 or 3; default 3)")
    t.add_argument("--labels", action="store_true", help="folder data: use subfolder names as class labels")
    t.add_argument("--preset", default=None, help="U-Net preset (default: digits)")
    t.add_argument("--schedule", choices=DISCRETE_SCHEDULES, default=None, help="noise schedule (default: cosine)")
    t.add_argument("--prediction", choices=PREDICTIONS, default=None, help="what the network predicts (default: v)")
    t.add_argument("--steps", type=int, help="training steps")
    t.add_argument("--batch-size", type=int, help="batch size")
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="fp32, bf16 autocast, or fp16 (CUDA)")
    t.add_argument("--weighting", choices=["simple", "min_snr", "edm"], help="loss weighting")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    t.add_argument("--fresh", action="store_true", help="start afresh even if --out holds a checkpoint (it is overwritten)")

    s = sub.add_parser("sample", help="sample a trained checkpoint into a PNG grid",
                       description="Sample a checkpoint written by 'difflab train' or 'difflab demo'.")
    s.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.safetensors or the run directory holding it")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write (default: samples.png)")
    s.add_argument("--sampler", default="ddim", help=f"one of {', '.join(sorted(SAMPLERS))} (default: ddim)")
    s.add_argument("--steps", type=int, default=50, help="sampler steps (default: 50)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default: 1 = none)")
    s.add_argument("--classes", type=_parse_classes, default=None, help="comma-separated class indices, one image each")
    s.add_argument("--num", type=int, default=16, help="number of images when --classes is not given (default: 16)")
    s.add_argument("--seed", type=int, default=0, help="seed; sample i is the same whatever the batch size (default: 0)")
    s.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: ema)")
    s.add_argument("--eta", type=float, default=None, help="DDIM eta (default: 0)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


def _device(name):
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out_dir, steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps,
             guidance_scale=args.guidance, samples_per_class=args.samples_per_class, seed=args.seed, resume=args.resume)
    return 0


def cmd_train(args) -> int:
    from .demo import DEMO_SPEC, DEMO_TRAIN
    from .io.spec import build_denoiser
    from .nn.unet import PRESETS, UNetConfig
    from .train import TrainConfig, train

    cfg = json.loads(args.config.read_text()) if args.config else {}
    if args.config and not isinstance(cfg, dict):
        raise ValueError(f"--config {args.config} must hold a JSON object")
    spec = json.loads(json.dumps(cfg.get("spec") or DEMO_SPEC))
    train_cfg = TrainConfig.from_dict({**DEMO_TRAIN.to_dict(), **cfg.get("train", {})})

    # Data.
    if args.data == "digits":
        from .data import load_digits

        size = args.size or 8
        images, labels = load_digits(size=size, split="train")
    else:
        from .data import load_image_folder

        if not args.size:
            raise ValueError("--size is required for a folder of images")
        folder = load_image_folder(args.data, args.size, channels=args.channels or 3, with_labels=args.labels)
        images, labels = (folder[0], folder[1]) if args.labels else (folder, None)
    # Model: preset / schedule / prediction flags override the spec.
    if args.preset:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset {args.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        spec["unet"] = PRESETS[args.preset].to_dict()
    unet = UNetConfig.from_dict(spec["unet"])
    unet = dataclasses.replace(unet, in_channels=images.shape[1],
                               num_classes=(int(labels.max()) + 1) if labels is not None else None)
    spec["unet"] = unet.to_dict()
    if args.schedule:
        spec["diffusion"]["schedule"] = args.schedule
    if args.prediction:
        spec["diffusion"]["prediction"] = args.prediction
    overrides = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                                       weighting=args.weighting).items() if v is not None}
    train_cfg = dataclasses.replace(train_cfg, **overrides)
    if labels is None:
        train_cfg = dataclasses.replace(train_cfg, cfg_dropout=0.0)

    denoiser = build_denoiser(spec).to(_device(args.device))
    print(f"training on {len(images)} images {tuple(images.shape[1:])} for {train_cfg.steps} steps -> {args.out}")
    state = train(denoiser, (images, labels), train_cfg, args.out, spec=spec, resume=not args.fresh,
                  metadata={"data": args.data, "size": int(images.shape[-1])})
    print(f"done at step {state.step}; checkpoint: {state.checkpoint}")
    return 0


def cmd_sample(args) -> int:
    from .io.images import save_grid
    from .io.spec import load_denoiser
    from .pipelines import generate
    from .samplers import get_sampler

    get_sampler(args.sampler)  # unknown names fail before the checkpoint is read
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist")
    device = _device(args.device)
    denoiser, meta = load_denoiser(args.checkpoint, weights=args.weights, device=device)
    cfg = denoiser.net.config
    size = meta.get("metadata", {}).get("size", 8)
    extra = {"eta": args.eta} if args.eta is not None else {}
    images = generate(denoiser, args.classes, num_samples=None if args.classes else args.num,
                      shape=(cfg.in_channels, size, size), sampler=args.sampler, steps=args.steps,
                      guidance_scale=args.guidance, null_class=meta.get("null_class"), seed=args.seed,
                      device=device, **extra)
    path = save_grid(images, args.out, nrow=min(10, len(images)), upscale=max(1, 48 // size))
    print(f"wrote {len(images)} samples to {path}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"demo": cmd_demo, "train": cmd_train, "sample": cmd_sample}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
