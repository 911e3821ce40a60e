"""Chapter 44: multi-modal diffusion, image and depth together (LDM3D; Marigold's task).

One small U-Net denoises 4-channel samples, RGB and depth of 16x16 rendered scenes, conditioned on
the object count. The same model then answers three questions without retraining: generate image
and depth together; depth from a given image (the RGB channels known, depth filled in by RePaint
over channels); an image for a given depth map. Depth from held-out real images is scored by
AbsRel and delta < 1.25 against the exact rendered depth, beside a trivial baseline (the mean
training depth map: these scenes' depth is mostly a function of the row).
``python examples/guide/44_image_depth.py [--fast --out DIR]`` (full: 57 CPU s on one
thread of the 2-core CPU; the fast run about 7.6 CPU s with the imports).
"""
from __future__ import annotations

import tempfile

import torch

import _guide as guide
from difflab.data.scenes import depth_to_unit, load_scenes, unit_to_depth
from difflab.eval.scene_metrics import abs_rel, delta_accuracy
from difflab.io.spec import build_denoiser, make_spec
from difflab.nn.unet import UNetConfig
from difflab.pipelines.image_depth import (DEPTH_CHANNELS, complete_channels, depth_from_image, generate_image_depth,
                                           image_from_depth, join)
from difflab.train import TrainConfig, train

BOUNDS = {
    "known_channels_error": (0.0, 0.0),        # channel inpainting returns the known channels exactly
    "mean_depth_abs_rel": (0.02, 0.5),         # the trivial baseline's error
    "inpainted_abs_rel": (0.0, 1.0),           # the tiny joint model's depth from real images
    "inpainted_delta": (0.0, 1.0),
}
SIZE = 16
UNET = UNetConfig(in_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
                  num_heads=1, num_classes=3)
SPEC = make_spec("unet", UNET, {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"})


def depth_scores(pred_unit: torch.Tensor, true_unit: torch.Tensor) -> tuple[float, float]:
    """AbsRel and delta < 1.25 of depth maps given in the model's [-1, 1], in world units."""
    pred, true = unit_to_depth(pred_unit, SIZE), unit_to_depth(true_unit, SIZE)
    return abs_rel(pred, true), delta_accuracy(pred, true)


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    torch.manual_seed(args.seed)
    train_set = load_scenes(400 if args.fast else 6000, size=SIZE, split="train", max_objects=3)
    held = load_scenes(16 if args.fast else 100, size=SIZE, split="test", max_objects=3)
    depth_train, depth_held = depth_to_unit(train_set.depth, SIZE), depth_to_unit(held.depth, SIZE)

    # 1. One model over four channels, count-conditional (label = count - 1), 10% label dropout.
    denoiser = build_denoiser(SPEC, seed=args.seed)
    config = TrainConfig(steps=10 if args.fast else 500, batch_size=32, lr=2e-3, warmup_steps=5 if args.fast else 50,
                         ema_decay=0.99, cfg_dropout=0.1, checkpoint_every=0, log_every=10_000, progress=False,
                         seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        state = train(denoiser, (join(train_set.images, depth_train), train_set.counts - 1), config, tmp, spec=SPEC)
    state.ema.copy_to(denoiser.net)
    denoiser.eval()

    # 2. Depth from held-out real images: RePaint over channels (RGB known), and the trivial baseline.
    opts = dict(sampler="ddim", steps=4 if args.fast else 25, seed=args.seed, progress=False)
    completed = complete_channels(denoiser, join(held.images, torch.zeros_like(depth_held)), DEPTH_CHANNELS,
                                  resample=2, **opts)
    inpainted = completed[:, 3:]
    mean_map = depth_train.mean(0, keepdim=True).expand_as(depth_held)
    figures = {"known_channels_error": (completed[:, :3] - held.images).abs().max().item()}
    figures["inpainted_abs_rel"], figures["inpainted_delta"] = depth_scores(inpainted, depth_held)
    figures["mean_depth_abs_rel"], figures["mean_depth_delta"] = depth_scores(mean_map, depth_held)

    # 3. Joint generation (1, 2, 3 objects), and the depth the model reads back from its own images.
    k = 6 if args.fast else 30
    asked = torch.arange(3).repeat_interleave(k // 3)
    images, depth = generate_image_depth(denoiser, asked.tolist(), size=SIZE, guidance_scale=2.0, **opts)
    back = depth_from_image(denoiser, images, resample=2, **opts)
    figures["generated_consistency_abs_rel"], figures["generated_consistency_delta"] = depth_scores(back, depth)
    made = image_from_depth(denoiser, depth_held[:8], labels=(held.counts[:8] - 1).tolist(), guidance_scale=2.0,
                            resample=2, **opts)
    figures = guide.report(figures)

    # 4. The picture.
    plt = guide.pyplot()
    grey = lambda d: d.expand(-1, 3, -1, -1)                              # noqa: E731
    rows = {"held-out image": held.images[:8], "true depth": grey(depth_held[:8]),
            "depth by inpainting": grey(inpainted[:8]), "mean depth map": grey(mean_map[:8]),
            "image for true depth": made, "generated image": images[:8], "generated depth": grey(depth[:8])}
    fig, axes = plt.subplots(len(rows), 8, figsize=(8, 7.2))
    for r, (name, x) in enumerate(rows.items()):
        for c in range(min(8, len(x))):
            axes[r, c].imshow(((x[c] + 1) / 2).permute(1, 2, 0).clamp(0, 1).numpy())
        for c in range(8):
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"One 4-channel model (RGB + depth), {config.steps} steps; depth near = dark", fontsize=9)
    guide.save(fig, guide.picture(args, "44_image_depth.png"))
    return figures


if __name__ == "__main__":
    main()
