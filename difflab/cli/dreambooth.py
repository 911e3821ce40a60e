"""``difflab dreambooth``: fine-tune a text-conditional model on a folder of subject images
(Ruiz et al. 2023, DreamBooth, Section 3 and eq. 2; :mod:`difflab.train.dreambooth`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..data import ON_ERROR, ImageReadError, load_image_folder
from ..io.text_model import RESERVED, read_text_model
from ..train.dreambooth import DreamBoothConfig, dreambooth, save_dreambooth
from .common import (UsageError, device, device_name, finite_float, non_negative_float, non_negative_int, positive_float,
                     positive_int)

HELP = "fine-tune on a few images of a subject (DreamBooth, LoRA)"
DESCRIPTION = ("Bind a rare identifier to a subject shown in a few images (DreamBooth; Ruiz et al. 2023), with "
               "class-specific prior preservation: class images are sampled from the base model first. "
               "Writes DIR/model.safetensors (a text model that loads as --base again) and, with --lora-rank, "
               "DIR/lora.safetensors.")


def add_arguments(d) -> None:
    d.add_argument("--base", type=Path, required=True, help="base text model: a checkpoint of kind difflab.text_model "
                                                            "(U-Net with cross-attention + TinyTextEncoder)")
    d.add_argument("--images", type=Path, required=True, help="folder of the subject's images (3-5 are enough)")
    d.add_argument("--bad-images", choices=ON_ERROR, default="stop",
                   help="an unreadable image file stops with its name (default) or is skipped with a warning")
    d.add_argument("--identifier", default="sks", help="the rare identifier word [V] (default: sks)")
    d.add_argument("--class-prompt", required=True, help="prompt of the subject's class, e.g. 'a digit'")
    d.add_argument("--instance-prompt", default=None, help="prompt of the subject (default: the class prompt with the "
                                                           "identifier before its last word, 'a sks digit')")
    d.add_argument("--out", type=Path, required=True, help="output folder")
    d.add_argument("--lora-rank", type=positive_int, default=None, help="train LoRA adapters of this rank only (default: the whole U-Net)")
    d.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (default: the rank)")
    d.add_argument("--text-encoder", choices=["frozen", "tokens", "full"], default="tokens",
                   help="what of the text encoder trains: nothing, the identifier's embedding (default), or all of it")
    d.add_argument("--steps", type=positive_int, default=400, help="fine-tuning steps (default: 400)")
    d.add_argument("--batch-size", type=positive_int, default=4, help="subject images per step, and as many class images (default: 4)")
    d.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: 2e-4 full, 1e-3 LoRA)")
    d.add_argument("--prior-weight", type=non_negative_float, default=1.0, help="lambda of the prior-preservation loss; 0 = off (default: 1)")
    d.add_argument("--num-prior-images", type=non_negative_int, default=50, help="class images sampled from the base model (default: 50)")
    d.add_argument("--prior-guidance", type=finite_float, default=2.0, help="guidance scale of the class images (default: 2)")
    d.add_argument("--seed", type=non_negative_int, default=0, help="seed of the class images and of the fine-tuning draws (default: 0)")
    d.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    # 1. Check everything that can be checked before any work.
    if not args.base.exists():
        raise FileNotFoundError(f"--base {args.base} does not exist")
    if not args.images.exists():
        raise FileNotFoundError(f"--images {args.images} does not exist")
    if not args.images.is_dir():
        raise ValueError(f"--images {args.images} is not a folder")
    if args.steps < 1 or args.batch_size < 1 or args.num_prior_images < 0:
        raise ValueError("--steps and --batch-size must be >= 1, --num-prior-images >= 0")
    lr = args.lr if args.lr is not None else (1e-3 if args.lora_rank else 2e-4)
    config = DreamBoothConfig(identifier=args.identifier, class_prompt=args.class_prompt, instance_prompt=args.instance_prompt,
                              prior_weight=args.prior_weight, num_prior_images=args.num_prior_images,
                              prior_guidance=args.prior_guidance, steps=args.steps, batch_size=args.batch_size, lr=lr,
                              lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, text_encoder=args.text_encoder,
                              seed=args.seed)
    dev = device(args.device)

    # 2. The base model, then the subject's images at its size and channels.
    base = read_text_model(args.base, device=dev)
    if base.vae is not None:
        raise UsageError(f"--base {args.base} is a latent model (it has a VAE): difflab dreambooth fine-tunes "
                         "pixel-space text models")
    denoiser, text_encoder, meta = base.denoiser, base.text_encoder, base.meta
    net_config = denoiser.net.config
    size = meta.get("size")
    if not size:
        raise ValueError(f"--base {args.base} records no image size ('size' in its metadata)")
    try:
        images = load_image_folder(args.images, size, channels=net_config.in_channels, on_error=args.bad_images)
    except ImageReadError as err:
        raise ValueError(f"{err} (--bad-images skip leaves unreadable files out)") from None
    print(f"dreambooth: {len(images)} subject images {tuple(images.shape[1:])}, prompt {config.prompt!r}, class prompt "
          f"{config.class_prompt!r}, {'LoRA rank ' + str(config.lora_rank) if config.lora_rank else 'full U-Net'}, "
          f"{config.steps} steps")

    # 3. Fine-tune and write.
    result = dreambooth(denoiser, text_encoder, images.to(dev), config, progress=not args.no_progress)
    extra = {k: v for k, v in meta.items() if k not in (*RESERVED, "file", "dreambooth")}
    files = save_dreambooth(args.out, denoiser, text_encoder, meta["spec"], config, result,
                            metadata={**extra, "base": str(args.base)})
    last = result.history[-1]
    print(json.dumps({"files": {k: str(v) for k, v in files.items()}, "trainable": result.trainable,
                      "final_loss": last["loss"]}, indent=1))
    return 0

