"""Chapter 22: video diffusion models (the factorized space-time U-Net; AnimateDiff's motion modules).

On moving digits (the video demo's design: 8 frames of a 16 x 16 canvas, one digit moving a pixel a
frame left, right, up or down), trains
the video demo's space-time U-Net at its tiny width for a few hundred steps, samples a clip for every
class and direction and lets the clip judge read them (per-frame class, one class through the clip,
motion as asked). Checks the two structural facts the chapter rests on: with the frames marked
independent, the space-time U-Net is an image U-Net applied frame by frame; and freshly inserted
motion modules leave an image U-Net exactly as it was.
``python examples/guide/22_video.py [--fast --out DIR]`` (full: 50 CPU s with one torch thread, measured on the loaded 2-core CPU; writes a PNG and a GIF).
"""
from __future__ import annotations

import time

import torch

import _guide as guide
import _modal1 as m1
from difflab.data.moving_digits import DIRECTIONS, moving_digits
from difflab.demos.video import BOUNCE, FRAMES, SIZE, SPEEDS, motion_modules, space_time_unet
from difflab.eval import DigitsJudge
from difflab.eval.video import clip_scores, video_judge_report
from difflab.io.spec import build_denoiser
from difflab.io.video import save_gif
from difflab.nn.motion import insert_motion_modules
from difflab.pipelines import SampleOptions
from difflab.pipelines.video import generate_video

CLIPS = dict(frames=FRAMES, size=SIZE, speeds=SPEEDS, bounce=BOUNCE)  # the demo's data design

BOUNDS = {
    "judge_real_frames": (0.9, 1.0),            # the digits judge on real held-out frames (cropped)
    "judge_real_motion": (0.9, 1.0),            # the motion read right on real held-out clips
    "independent_frames_error": (0.0, 1e-4),    # frames marked independent = an image U-Net per frame
    "temporal_mixing": (1e-4, 10.0),            # ... and without the mark the frames do talk to each other
    "motion_module_identity_error": (0.0, 1e-6),  # zero-initialised motion modules change nothing
    "frame_accuracy": (0.0, 1.0),               # a few steps in --fast: only that it runs
}


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    t0, c0 = time.time(), time.process_time()
    judge = DigitsJudge.load_or_train(guide.cache_dir() / "digits_judge.safetensors")
    train = moving_digits(200 if args.fast else 2000, split="train", seed=0, **CLIPS)
    held = moving_digits(40 if args.fast else 200, split="test", seed=1, **CLIPS)
    reference = moving_digits(40, split="train", seed=2, **CLIPS)

    # 1. The space-time U-Net (Ho et al. 2022), tiny: per-frame ResBlocks, temporal attention at every level and the middle, the frame index embedded.
    route = space_time_unet(tiny=True)
    denoiser, train_cpu, losses = m1.fit(route.spec, (train.clips, train.labels, {"direction_labels": train.directions}),
                                         steps=10 if args.fast else 200, batch_size=8, seed=args.seed,
                                         null_cond={"direction_labels": len(DIRECTIONS)})

    # 2. Factorization: frames marked independent see only themselves in time.
    net = denoiser.net
    x = held.clips[:2]
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        joint = net(x, t, class_labels=held.labels[:2], direction_labels=held.directions[:2], independent_frames=True)
        alone = torch.cat([net(x[:, :, f:f + 1], t, class_labels=held.labels[:2], direction_labels=held.directions[:2])
                           for f in range(FRAMES)], dim=2)
        mixed = net(x, t, class_labels=held.labels[:2], direction_labels=held.directions[:2])
    # 3. AnimateDiff: motion modules inserted into an image U-Net start as the identity.
    image = build_denoiser(motion_modules(tiny=True).image_spec, seed=args.seed).net.eval()
    video = insert_motion_modules(image, num_heads=2, max_frames=FRAMES, num_frames=FRAMES).eval()
    with torch.no_grad():
        per_frame = torch.stack([image(x[:, :, f], t, class_labels=held.labels[:2]) for f in range(FRAMES)], dim=2)
        through = video(x, t, class_labels=held.labels[:2])

    # 4. Sample every class and direction; the clip judge reads them.
    asked = torch.arange(10).repeat_interleave(len(DIRECTIONS))
    dirs = torch.arange(len(DIRECTIONS)).repeat(10)
    if args.fast:
        asked, dirs = asked[::5], dirs[::5]
    opts = SampleOptions(sampler="ddim", steps=4 if args.fast else 15, guidance_scale=2.0, seed=args.seed, progress=False)
    samples = generate_video(denoiser, asked, dirs, shape=(1, FRAMES, SIZE, SIZE), options=opts)
    real = clip_scores(judge, held.clips, held.labels, held.directions)
    report = video_judge_report(judge, samples, asked, dirs, held.clips, held.labels, held.directions,
                                reference=reference.clips[:len(samples)])
    figures = guide.report({
        "judge_real_frames": real["frame_accuracy"], "judge_real_motion": real["motion_accuracy"],
        "independent_frames_error": float((joint - alone).abs().max()),
        "temporal_mixing": float((mixed - alone).abs().mean()),
        "motion_module_identity_error": float((through - per_frame).abs().max()),
        "parameters": sum(p.numel() for p in net.parameters()),
        "loss_first": losses[0], "loss_last": losses[-1],
        "frame_accuracy": report["frame_accuracy"], "same_class": report["same_class"],
        "motion_accuracy": report["motion_accuracy"],
        "clip_frechet": report["frechet"], "clip_frechet_floor": report["frechet_real_reference"],
        "train_cpu_seconds": train_cpu,
    })

    # 5. Pictures: real clips and generated clips, frames left to right; the generated ones as a GIF.
    plt = guide.pyplot()
    rows = [("real", held.clips[i], int(held.labels[i]), int(held.directions[i])) for i in range(3)]
    rows += [("generated", samples[i], int(asked[i]), int(dirs[i])) for i in range(0, len(samples), max(1, len(samples) // 5))][:5]
    fig, axes = plt.subplots(len(rows), FRAMES, figsize=(8, 1.1 * len(rows)))
    for r, (name, clip, c, d) in enumerate(rows):
        for f in range(FRAMES):
            ax = axes[r, f]
            ax.imshow(clip[0, f].clamp(-1, 1), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(f"{name}\n{c} {DIRECTIONS[d]}", fontsize=7)
    guide.save(fig, guide.picture(args, "22_video.png"))
    gif = save_gif(samples[:min(len(samples), 40)], guide.picture(args, "22_video.gif"), nrow=len(DIRECTIONS), upscale=2)
    print(f"gif: {gif}")
    guide.print_time(t0, c0)
    return figures


# one thread: on a shared CPU two threads spin and cost far more CPU time
main = guide.on_one_thread(run)


if __name__ == "__main__":
    main()
