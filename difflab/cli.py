"""The ``difflab`` command: train, sample, demo, eval."""
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

    from . import __version__

    p = argparse.ArgumentParser(prog="difflab", description="Train, sample and measure diffusion models.", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="train a class-conditional model on the embedded digits, sample and judge it",
                       description="Train a class-conditional U-Net on scikit-learn's digits, sample every class with "
                                   "classifier-free guidance, write samples.png and print the digits judge's figures.")
    d.add_argument("--text", action="store_true",
                   help="the latent text-to-image demo instead: a small VAE and a text-conditional U-Net on captioned "
                        "digits, sampled from prompts, with inpainting, outpainting and inversion")
    d.add_argument("--out-dir", default=None,
                   help="where samples.png, the checkpoints and report.json go (default: demo_out, or demo_text_out with --text)")
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
    t.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default=None,
                   help="data parallelism under torchrun: 'torchrun --nproc_per_node=N -m difflab.cli train --parallel ddp'")
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

    from .eval.features import EXTRACTORS
    from .eval.harness import DEFAULT_METRICS, DEFAULT_NUM_SAMPLES, METRICS

    e = sub.add_parser("eval", help="measure generated images against a reference (FID, KID, IS, precision/recall)",
                       description="Compare generated images (a checkpoint to sample, a folder, or a statistics .npz) "
                                   "with a reference ('digits', a folder, or a statistics .npz) in the feature space of "
                                   "an extractor, and print a table of metrics (JSON with --json).")
    e.add_argument("--generated", required=True, help="a checkpoint (run folder or .safetensors), a folder of images, or a stats .npz")
    e.add_argument("--reference", default=None, help="'digits' (held-out split), a folder of images, or a stats .npz")
    e.add_argument("--extractor", default="judge", help=f"feature extractor: one of {', '.join(sorted(EXTRACTORS))} (default: judge)")
    e.add_argument("--weights", default=None, help="weights file of the extractor (judge: a .safetensors, default: train "
                                                   "one; inception: the FID Inception-v3 weights, required)")
    e.add_argument("--clip-dir", default=None, help="local transformers folder for --extractor clip or dinov2")
    e.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"comma-separated, from {', '.join(METRICS)} "
                                                                         f"(default: {','.join(DEFAULT_METRICS)})")
    e.add_argument("--num", type=int, default=None, help=f"images to sample from a checkpoint (default: {DEFAULT_NUM_SAMPLES}) "
                                                         "or to take from a folder (default: all)")
    e.add_argument("--batch-size", type=int, default=64, help="batch size of sampling and feature extraction; changes "
                                                              "no number (default: 64)")
    e.add_argument("--cache", default=None, help="a .npz for the reference statistics: reused when present, else written")
    e.add_argument("--prompts", type=Path, default=None, help="text file, one prompt per generated image (clip_score)")
    e.add_argument("--sampler", default="ddim", help="checkpoint sampling: sampler (default: ddim)")
    e.add_argument("--steps", type=int, default=50, help="checkpoint sampling: sampler steps (default: 50)")
    e.add_argument("--guidance", type=float, default=1.0, help="checkpoint sampling: guidance scale (default: 1 = none)")
    e.add_argument("--seed", type=int, default=0, help="seed of sampling and of the KID subsets (default: 0)")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    from .cli_dreambooth import add_dreambooth_command
    from .cli_perf import add_perf_commands

    add_dreambooth_command(sub)
    add_perf_commands(sub)
    return p


def _device(name):
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_demo(args) -> int:
    if args.text:
        from .demos.text import run_text_demo

        run_text_demo(args.out_dir or "demo_text_out", steps=args.steps, sampler=args.sampler,
                      sampling_steps=args.sampling_steps, guidance_scale=args.guidance, seed=args.seed, resume=args.resume)
        return 0
    from .demos.digits import run_demo

    run_demo(args.out_dir or "demo_out", steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps,
             guidance_scale=args.guidance, samples_per_class=args.samples_per_class, seed=args.seed, resume=args.resume)
    return 0


def cmd_train(args) -> int:
    from .demos.digits import DEMO_SPEC, DEMO_TRAIN
    from .io.spec import build_denoiser
    from .nn.unet import PRESETS, UNetConfig
    from .train import TrainConfig, train

    if args.config and not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config} does not exist (a JSON file with 'spec' and/or 'train')")
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
                                       weighting=args.weighting, parallel=args.parallel).items() if v is not None}
    train_cfg = dataclasses.replace(train_cfg, **overrides)
    if labels is None:
        train_cfg = dataclasses.replace(train_cfg, cfg_dropout=0.0)

    device = _device(args.device)
    if train_cfg.parallel != "none":
        from .train.distributed import init_distributed

        device = init_distributed()
    denoiser = build_denoiser(spec).to(device)
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


EVAL_LABELS = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall", "is": "Inception Score",
               "clip_score": "CLIP score"}


def format_eval(results: dict) -> str:
    """The results of :func:`difflab.eval.evaluate` as a table."""
    rows = []
    for key, label in EVAL_LABELS.items():
        if key in results:
            std = results.get(f"{key}_std")
            rows.append((label, f"{results[key]:.6g}" + (f" +- {std:.2g}" if std is not None else "")))
    rows.append(("images", f"{results['n_generated']} generated" +
                 (f", {results['n_reference']} reference" if results.get("n_reference") is not None else "")))
    w = max(len(a) for a, _ in rows)
    return f"  features: {results['extractor']}\n" + "\n".join(f"  {a:<{w}}  {b}" for a, b in rows)


def cmd_eval(args) -> int:
    from .eval import check_metrics, evaluate, is_checkpoint, load_extractor
    from .eval.features import EXTRACTORS
    from .samplers import get_sampler

    # 1. Check everything that can be checked before any work.
    metrics = check_metrics(args.metrics)
    if args.extractor not in EXTRACTORS:
        raise ValueError(f"--extractor {args.extractor!r} is unknown; choose one of {', '.join(sorted(EXTRACTORS))}")
    for flag, value in (("--generated", args.generated), ("--reference", args.reference)):
        if value is not None and value != "digits" and not Path(value).exists():
            raise FileNotFoundError(f"{flag} {value} does not exist")
    if is_checkpoint(args.generated):
        get_sampler(args.sampler)
    prompts = None
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise FileNotFoundError(f"--prompts {args.prompts} does not exist")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    device = _device(args.device)

    # 2. The extractor, then the harness.
    path = args.clip_dir if args.extractor in ("clip", "dinov2") else args.weights
    extractor = load_extractor(args.extractor, path, device=device)
    results = evaluate(args.generated, args.reference, extractor, metrics, num=args.num, batch_size=args.batch_size,
                       prompts=prompts, seed=args.seed, device=device, cache=args.cache, progress=not args.no_progress,
                       sampling=dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance, seed=args.seed))
    print(json.dumps(results, indent=2) if args.json else format_eval(results))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .cli_dreambooth import cmd_dreambooth
    from .cli_perf import PERF_COMMANDS

    commands = {"demo": cmd_demo, "train": cmd_train, "sample": cmd_sample, "dreambooth": cmd_dreambooth, "eval": cmd_eval,
                **PERF_COMMANDS}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
