"""``difflab train``: train a diffusion model (a U-Net, a DiT: any network kind whose samples are
images) on the digits or a folder of images."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import ConfigError, check_keys
from ..core.params import PREDICTIONS
from ..core.schedules import DISCRETE_SCHEDULES
from ..data import ON_ERROR, ImageReadError, load_digits, load_image_folder
from ..demos.digits import DEMO_SPEC, DEMO_TRAIN
from ..io.spec import build_denoiser, kinds_with_output, make_spec, network_kind, read_spec
from ..train import TrainConfig, train
from ..train.distributed import init_distributed
from .common import UsageError, device, device_name, output_folder, positive_float, positive_int

CONFIG_KEYS = ("spec", "train")  # the top level of --config
HELP = "train a diffusion model"
DESCRIPTION = "Train a diffusion model (--network unet, dit or moe-dit). Flags override the values of --config (a JSON file with optional 'spec' and 'train' objects)."


def add_arguments(t) -> None:
    t.add_argument("--config", type=Path, help="JSON file: {\"spec\": {\"unet\": {...}, \"diffusion\": {...}}, \"train\": {...}}")
    t.add_argument("--out", type=Path, default=Path("runs/digits"), help="run directory for checkpoint and log (default: runs/digits)")
    t.add_argument("--data", default="digits", help="'digits' (embedded) or a folder of images (subfolders = classes with --labels)")
    t.add_argument("--size", type=positive_int, default=None, help="image size (digits: 8, 16 or 32; folders: required)")
    t.add_argument("--channels", type=positive_int, default=None, help="image channels for a folder (1 or 3; default 3)")
    t.add_argument("--labels", action="store_true", help="folder data: use subfolder names as class labels")
    t.add_argument("--bad-images", choices=ON_ERROR, default="stop",
                   help="folder data: an unreadable image file stops with its name (default) or is skipped with a warning")
    t.add_argument("--network", choices=kinds_with_output("image"), default=None,
                   help="network kind (default: the --config spec's, else unet)")
    t.add_argument("--preset", default=None,
                   help="a preset of the network kind (unet: digits, tiny, cifar10; dit: digits, digits-small, DiT-S/2 ... DiT-XL/8; "
                        "moe-dit: the same names with 8 experts, top-2); default: digits")
    t.add_argument("--schedule", choices=DISCRETE_SCHEDULES, default=None, help="noise schedule (default: cosine)")
    t.add_argument("--prediction", choices=PREDICTIONS, default=None, help="what the network predicts (default: v)")
    t.add_argument("--steps", type=positive_int, help="training steps")
    t.add_argument("--batch-size", type=positive_int, help="batch size")
    t.add_argument("--lr", type=positive_float, help="learning rate")
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="fp32, bf16 autocast, or fp16 (CUDA)")
    t.add_argument("--fp8", action="store_true", default=None,
                   help="train the linears and 1x1 convs in FP8 (E4M3 forward, E5M2 gradients, delayed scaling); with fp32 or bf16")
    t.add_argument("--weighting", choices=["simple", "min_snr", "edm"], help="loss weighting")
    t.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)")
    t.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default=None,
                   help="data parallelism under torchrun: 'torchrun --nproc_per_node=N -m difflab.cli train --parallel ddp'")
    t.add_argument("--fresh", action="store_true", help="start afresh even if --out holds a checkpoint (it is overwritten)")


def read_config(path: Path | None) -> dict:
    """The JSON object of ``--config`` (``{}`` without one). Unknown keys at its top level or in
    its ``train`` object are a :class:`~difflab.config.ConfigError` naming them (exit status 2)."""
    if path is None:
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist (a JSON file with 'spec' and/or 'train')")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path} is not valid JSON: {e}") from None
    check_keys(cfg, CONFIG_KEYS, f"--config {path}")
    check_keys(cfg.get("train", {}), [f.name for f in dataclasses.fields(TrainConfig)], "train")
    return cfg


def check_data(args) -> None:
    """``--data`` is ``digits`` or an existing folder (with ``--size``), checked before any work."""
    if args.data == "digits":
        return
    folder = Path(args.data)
    if not folder.exists():
        raise FileNotFoundError(f"--data {folder} does not exist: give 'digits' or a folder of images")
    if not folder.is_dir():
        raise UsageError(f"--data {folder} is a file: give 'digits' or a folder of images")
    if not args.size:
        raise UsageError("--size is required for a folder of images (the side the images are resized to)")


def load_data(args):
    """(images, labels or None) of ``--data``."""
    if args.data == "digits":
        return load_digits(size=args.size or 8, split="train")
    try:
        folder = load_image_folder(args.data, args.size, channels=args.channels or 3, with_labels=args.labels,
                                   on_error=args.bad_images)
    except ImageReadError as err:
        raise ValueError(f"{err} (--bad-images skip leaves unreadable files out)") from None
    return (folder[0], folder[1]) if args.labels else (folder, None)


def model_spec(cfg: dict, args, images, labels) -> dict:
    """The model spec: ``--config``'s (or the demo's), with the network / preset / schedule /
    prediction flags and the data's channels, classes and (for kinds that have one) image size;
    written in the current form (:func:`make_spec`)."""
    kind, config, diffusion = read_spec(cfg.get("spec") or DEMO_SPEC)
    if args.network and args.network != kind:
        if "spec" in cfg:
            raise UsageError(f"--network {args.network} contradicts the --config spec's network kind {kind!r}")
        kind, config = args.network, {}
    entry = network_kind(kind)
    if entry.output != "image":
        raise UsageError(f"difflab train trains the network kinds whose samples are images ({', '.join(kinds_with_output('image'))}); "
                         f"the spec names {kind!r}")
    preset = args.preset or (None if config else "digits")
    if preset:
        if preset not in entry.presets:
            raise UsageError(f"--preset {preset!r} is unknown for --network {kind}; choose one of {sorted(entry.presets)}")
        config = entry.presets[preset].to_dict()
    net = entry.config_cls.from_dict(config, "spec.network.config")
    fit = {"in_channels": images.shape[1], "num_classes": (int(labels.max()) + 1) if labels is not None else None,
           "sample_size": int(images.shape[-1])}
    names = {f.name for f in dataclasses.fields(net)}
    net = dataclasses.replace(net, **{k: v for k, v in fit.items() if k in names})
    if args.schedule:
        diffusion["schedule"] = args.schedule
    if args.prediction:
        diffusion["prediction"] = args.prediction
    return make_spec(kind, net, diffusion)


def run(args) -> int:
    # 1. Check everything that can be checked before any work.
    output_folder(args.out)
    check_data(args)
    cfg = read_config(args.config)
    if "spec" in cfg:
        read_spec(cfg["spec"])
    train_cfg = TrainConfig.from_dict({**DEMO_TRAIN.to_dict(), **cfg.get("train", {})})
    images, labels = load_data(args)
    spec = model_spec(cfg, args, images, labels)
    overrides = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                                       fp8=args.fp8, weighting=args.weighting, parallel=args.parallel).items() if v is not None}
    train_cfg = dataclasses.replace(train_cfg, **overrides)
    if labels is None:
        train_cfg = dataclasses.replace(train_cfg, cfg_dropout=0.0)

    dev = init_distributed() if train_cfg.parallel != "none" else device(args.device)
    denoiser = build_denoiser(spec, seed=train_cfg.seed).to(dev)
    print(f"training on {len(images)} images {tuple(images.shape[1:])} for {train_cfg.steps} steps -> {args.out}")
    state = train(denoiser, (images, labels), train_cfg, args.out, spec=spec, resume=not args.fresh,
                  metadata={"data": args.data, "size": int(images.shape[-1])}, data_source=args.data)
    print(f"done at step {state.step}; checkpoint: {state.checkpoint}")
    return 0
