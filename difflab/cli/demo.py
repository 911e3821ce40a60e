"""``difflab demo``: train, sample and judge a model on the embedded digits (``--text``: the latent
text-to-image version; ``--cascade``: base + super-resolution; ``--audio``: the audio routes)."""
from __future__ import annotations

from ..demos.audio import run_audio_demo
from ..demos.cascade import run_cascade_demo
from ..demos.digits import run_demo
from ..demos.policy import run_policy_demo
from ..demos.text import run_text_demo
from ..demos.video import NETWORKS as VIDEO_NETWORKS
from ..demos.video import run_video_demo
from ..samplers import SAMPLERS
from .common import UsageError, finite_float, non_negative_float, non_negative_int, positive_int

HELP = "train, sample and judge a model on the embedded digits"
DESCRIPTION = ("Train a class-conditional U-Net on scikit-learn's digits, sample every class with classifier-free "
               "guidance, write samples.png and print the digits judge's figures.")


def add_arguments(d) -> None:
    d.add_argument("--text", action="store_true",
                   help="the latent text-to-image demo instead: a small VAE and a text-conditional U-Net on captioned "
                        "digits, sampled from prompts, with inpainting, outpainting and inversion")
    d.add_argument("--cascade", action="store_true",
                   help="the cascaded demo instead: a class-conditional 8x8 base and an x2 super-resolution stage to "
                        "16x16 with noise-conditioning augmentation, judged at 16x16")
    d.add_argument("--policy", action="store_true",
                   help="the policy demo instead: a diffusion policy (temporal U-Net over action chunks) against a "
                        "behaviour-cloning MLP on the embedded Detour task (100 fixed-seed episodes), and Diffuser's "
                        "guided, inpainted planning (--guidance: its return-guidance scale, default 1); writes roll_outs.gif")
    d.add_argument("--audio", action="store_true",
                   help="the audio demo instead: a waveform DiffWave, and a log-mel U-Net decoded by Griffin-Lim and by a "
                        "DiffWave vocoder, on ten classes of synthetic clips; writes WAVs and spectrograms")
    d.add_argument("--video", action="store_true",
                   help="the video demo instead: a class- and direction-conditional video network on moving digits "
                        "(24x24, 8 frames), judged per frame, by its motion and by a clip Frechet distance")
    d.add_argument("--video-network", default=None, choices=sorted(VIDEO_NETWORKS),
                   help="--video: which network trains (default: space_time_unet, the factorized space-time U-Net)")
    d.add_argument("--image-fraction", type=non_negative_float, default=None,
                   help="--video: still-frame stacks added for joint image-and-video training, as a fraction of the "
                        "clips (default: 0)")
    d.add_argument("--aug-sigma", type=non_negative_float, default=None,
                   help="--cascade: the noise level of the base's samples given to the x2 stage (default: 0.1)")
    d.add_argument("--truncated", action="store_true",
                   help="--cascade: truncated augmentation (stop the base at --aug-sigma) instead of noising its samples")
    d.add_argument("--sr-steps", type=positive_int, default=None, help="--cascade: training steps of the x2 stage (default: 600)")
    d.add_argument("--out-dir", default=None,
                   help="where samples.png, the checkpoints and report.json go (default: demo_out, demo_text_out with "
                        "--text, demo_cascade_out with --cascade, demo_policy_out with --policy, demo_video_out with --video)")
    d.add_argument("--steps", type=positive_int, default=None, help="training steps (default: 2000)")
    d.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="sampler (default: ddim)")
    d.add_argument("--sampling-steps", type=positive_int, default=None,
                   help="sampler steps (default: 50; 25 per stage with --cascade)")
    d.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: 1.5; 1 = none); with --policy the return-guidance "
                        "scale of the Diffuser plans (default: 1; 0 = none)")
    d.add_argument("--samples-per-class", type=positive_int, default=None,
                   help="samples per class judged (default: 50; 5 with --audio; --video: clips per class and direction, default 2)")
    d.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default: 0)")
    d.add_argument("--resume", action="store_true", help="continue the training checkpoint in --out-dir")


def run(args) -> int:
    cascade_only = [flag for flag, v in (("--aug-sigma", args.aug_sigma is not None), ("--truncated", args.truncated),
                                         ("--sr-steps", args.sr_steps is not None)) if v]
    if cascade_only and not args.cascade:
        raise UsageError(f"{', '.join(cascade_only)} needs --cascade")
    video_only = [flag for flag, v in (("--video-network", args.video_network is not None),
                                       ("--image-fraction", args.image_fraction is not None)) if v]
    if video_only and not args.video:
        raise UsageError(f"{', '.join(video_only)} needs --video")
    if args.image_fraction is not None and args.image_fraction >= 1:
        raise UsageError(f"--image-fraction {args.image_fraction} must be below 1 (a fraction of the clips)")
    modes = [flag for flag, v in (("--text", args.text), ("--cascade", args.cascade), ("--policy", args.policy),
                                  ("--audio", args.audio), ("--video", args.video)) if v]
    if len(modes) > 1:
        raise UsageError(f"give one of --text, --cascade, --policy, --audio, --video, not both {' and '.join(modes[:2])}")
    if args.policy:
        if args.resume:
            raise UsageError("--resume is not taken by --policy (its runs are short: train again)")
        run_policy_demo(args.out_dir or "demo_policy_out", steps=args.steps, sampler=args.sampler,
                        sampling_steps=args.sampling_steps or 10, guidance_scale=1.0 if args.guidance is None else args.guidance,
                        seed=args.seed)
        return 0
    guidance = 1.5 if args.guidance is None else args.guidance
    if args.audio:
        run_audio_demo(args.out_dir or "demo_audio_out", mel_steps=args.steps, sampler=args.sampler,
                       sampling_steps=args.sampling_steps or 20, guidance_scale=guidance,
                       samples_per_class=args.samples_per_class or 5, seed=args.seed, resume=args.resume)
        return 0
    if args.video:
        run_video_demo(args.out_dir or "demo_video_out", network=args.video_network or "space_time_unet", steps=args.steps,
                       sampler=args.sampler, sampling_steps=args.sampling_steps or 20, guidance_scale=guidance,
                       clips_per_pair=args.samples_per_class or 2, image_fraction=args.image_fraction or 0.0, seed=args.seed,
                       resume=args.resume)
        return 0
    if args.cascade:
        run_cascade_demo(args.out_dir or "demo_cascade_out", base_steps=args.steps, sr_steps=args.sr_steps,
                         sampler=args.sampler, sampling_steps=args.sampling_steps or 25,
                         guidance_scale=guidance, aug_sigma=0.1 if args.aug_sigma is None else args.aug_sigma,
                         truncated=args.truncated, samples_per_class=args.samples_per_class or 50, seed=args.seed,
                         resume=args.resume)
        return 0
    if args.text:
        run_text_demo(args.out_dir or "demo_text_out", steps=args.steps, sampler=args.sampler,
                      sampling_steps=args.sampling_steps or 50, guidance_scale=guidance, seed=args.seed, resume=args.resume)
        return 0
    run_demo(args.out_dir or "demo_out", steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps or 50,
             guidance_scale=guidance, samples_per_class=args.samples_per_class or 50, seed=args.seed, resume=args.resume)
    return 0
