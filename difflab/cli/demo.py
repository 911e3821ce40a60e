"""``difflab demo``: train, sample and judge a model on the embedded digits, or, with one mode flag
(``--text``, ``--cascade``, ``--policy``, ``--audio``, ``--video``, ...), another modality's demo.

Each mode is one entry of :data:`MODES`: its help line, its default output folder, the flags only it
takes, and the call that runs it. Adding a modality's demo is one :class:`DemoMode` here; the
mutual exclusion of modes and the "needs --MODE" errors come from the table.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..demos.audio import run_audio_demo
from ..demos.cascade import run_cascade_demo
from ..demos.depth import GENERATION_SAMPLER as DEPTH_GENERATION_SAMPLER, GENERATION_STEPS as DEPTH_GENERATION_STEPS
from ..demos.depth import GUIDANCE as DEPTH_GUIDANCE, run_depth_demo
from ..demos.digits import run_demo
from ..demos.motion import run_motion_demo
from ..demos.policy import run_policy_demo
from ..demos.shapes3d import POINTS_GUIDANCE, run_shapes3d_demo
from ..demos.slots import SAMPLER as SLOTS_SAMPLER, run_slots_demo
from ..demos.text import run_text_demo
from ..demos.video import CLASS_GUIDANCE as VIDEO_CLASS_GUIDANCE, DIRECTION_GUIDANCE as VIDEO_DIRECTION_GUIDANCE
from ..demos.video import GUIDANCE as VIDEO_GUIDANCE
from ..demos.video import NETWORK as VIDEO_NETWORK, NETWORKS as VIDEO_NETWORKS
from ..demos.video import SAMPLER as VIDEO_SAMPLER, SAMPLER_ETA as VIDEO_SAMPLER_ETA, SAMPLING_STEPS as VIDEO_SAMPLING_STEPS
from ..demos.video import run_video_demo
from ..samplers import ETA_SAMPLERS, SAMPLERS
from .common import (
    UsageError,
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

HELP = "train, sample and judge a model on the embedded digits"
DESCRIPTION = ("Train a class-conditional U-Net on scikit-learn's digits, sample every class with classifier-free "
               "guidance, write samples.png and print the digits judge's figures. A mode flag runs another "
               "modality's demo instead.")


@dataclass(frozen=True)
class DemoMode:
    """One ``difflab demo --NAME`` mode.

    ``options(parser)`` adds the flags only this mode takes (each defaulting to ``None`` or ``False``,
    their dests listed in ``dests``: given without the mode they are refused); ``run(args, out_dir)``
    trains, samples and judges, reading the shared flags (``--steps``, ``--sampler``, ...) from ``args``
    where they are not ``None`` and its own defaults otherwise; ``sampler`` is its ``--sampler`` default."""
    help: str
    out_dir: str
    run: Callable[[argparse.Namespace, str], None]
    options: Callable[[argparse.ArgumentParser], None] | None = None
    dests: tuple[str, ...] = ()
    sampler: str = "ddim"


def _guidance(args, default: float = 1.5) -> float:
    return default if args.guidance is None else args.guidance


# ----------------------------------------------------------------------------------------------
# the modes


def _text_run(args, out):
    run_text_demo(out, steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps or 50,
                  guidance_scale=_guidance(args), seed=args.seed, resume=args.resume)


def _cascade_options(d):
    d.add_argument("--aug-sigma", type=non_negative_float, default=None,
                   help="--cascade: the noise level of the base's samples given to the x2 stage (default: 0.1)")
    d.add_argument("--truncated", action="store_true",
                   help="--cascade: truncated augmentation (stop the base at --aug-sigma) instead of noising its samples")
    d.add_argument("--sr-steps", type=positive_int, default=None, help="--cascade: training steps of the x2 stage (default: 600)")


def _cascade_run(args, out):
    run_cascade_demo(out, base_steps=args.steps, sr_steps=args.sr_steps, sampler=args.sampler,
                     sampling_steps=args.sampling_steps or 25, guidance_scale=_guidance(args),
                     aug_sigma=0.1 if args.aug_sigma is None else args.aug_sigma, truncated=args.truncated,
                     samples_per_class=args.samples_per_class or 50, seed=args.seed, resume=args.resume)


def _policy_run(args, out):
    if args.resume:
        raise UsageError("--resume is not taken by --policy (its runs are short: train again)")
    run_policy_demo(out, steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps or 10,
                    guidance_scale=_guidance(args, 1.0), seed=args.seed)


def _audio_run(args, out):
    run_audio_demo(out, mel_steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps or 20,
                   guidance_scale=_guidance(args, 1.0), samples_per_class=args.samples_per_class or 5, seed=args.seed,
                   resume=args.resume)


def _video_options(d):
    d.add_argument("--video-network", default=None, choices=sorted(VIDEO_NETWORKS),
                   help=f"--video: which network trains (default: {VIDEO_NETWORK}, motion modules on a frozen image "
                        f"U-Net; space_time_unet: the factorized space-time U-Net)")
    d.add_argument("--image-fraction", type=non_negative_float, default=None,
                   help="--video: still-frame stacks added for joint image-and-video training, as a fraction of the "
                        "clips (the space-time U-Net's: --video-network space_time_unet; default: 0)")
    d.add_argument("--direction-guidance", type=non_negative_float, default=None,
                   help=f"--video: guidance on the direction alone, away from the opposite direction, on top of "
                        f"--guidance (default: {VIDEO_DIRECTION_GUIDANCE}; 0 = none)")
    d.add_argument("--class-guidance", type=non_negative_float, default=None,
                   help=f"--video: guidance on the class alone, away from the null class, on top of --guidance at the "
                        f"low-noise steps (default: {VIDEO_CLASS_GUIDANCE}; 0 = none; docs/video.md, stop 40)")
    d.add_argument("--eta", type=non_negative_float, default=None,
                   help=f"--video: the sampler's eta, the scale of an ancestral step's fresh noise (default: "
                        f"{VIDEO_SAMPLER_ETA} with {VIDEO_SAMPLER}, another sampler's own; docs/video.md, stop 40)")
    d.add_argument("--end-frame-weight", type=positive_float, default=None,
                   help="--video: training loss weight of the first and last frame relative to the others, weights "
                        "normalised to mean 1 (default: the network's, 1 = uniform; docs/video.md, stop 36)")
    d.add_argument("--velocity-weight", type=non_negative_float, default=None,
                   help="--video: weight of a training loss on the centre-of-mass velocity of the network's clean "
                        "estimate (default: the network's: 1 for motion_modules, 0 = none for the others; docs/video.md, stop 39)")


def _video_run(args, out):
    if args.image_fraction is not None and args.image_fraction >= 1:
        raise UsageError(f"--image-fraction {args.image_fraction} must be below 1 (a fraction of the clips)")
    if args.eta is not None and (args.sampler or VIDEO_SAMPLER) not in ETA_SAMPLERS:
        raise UsageError(f"--eta: sampler {args.sampler!r} has no eta; the samplers that take one are {', '.join(ETA_SAMPLERS)}")
    run_video_demo(out, network=args.video_network or VIDEO_NETWORK, steps=args.steps, sampler=args.sampler,
                   sampling_steps=args.sampling_steps or VIDEO_SAMPLING_STEPS, guidance_scale=_guidance(args, VIDEO_GUIDANCE),
                   direction_guidance=VIDEO_DIRECTION_GUIDANCE if args.direction_guidance is None else args.direction_guidance,
                   clips_per_pair=args.samples_per_class or 2, image_fraction=args.image_fraction or 0.0,
                   seed=args.seed, resume=args.resume, end_frame_weight=args.end_frame_weight,
                   velocity_weight=args.velocity_weight,
                   class_guidance=VIDEO_CLASS_GUIDANCE if args.class_guidance is None else args.class_guidance,
                   eta=args.eta)


def _motion_run(args, out):
    run_motion_demo(out, steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps or 50,
                    guidance_scale=_guidance(args, 1.75), samples_per_class=args.samples_per_class or 25, seed=args.seed,
                    resume=args.resume)


def _3d_options(d):
    d.add_argument("--num-points", type=positive_int, default=None, help="--3d: points per cloud (default: 256)")
    d.add_argument("--prior", default=None,
                   help="--3d: the digits model score distillation uses, a run folder of `difflab demo` (default: train one "
                        "for 800 steps)")
    d.add_argument("--sds-steps", type=positive_int, default=None, help="--3d: score-distillation steps per pair (default: 200)")
    d.add_argument("--vsd", action="store_true", help="--3d: variational score distillation (Wang et al. 2023) instead of SDS")
    d.add_argument("--skip-points", action="store_true", help="--3d: run score distillation only")
    d.add_argument("--skip-sds", action="store_true", help="--3d: run the point-cloud part only")


def _3d_run(args, out):
    if args.resume:
        raise UsageError("--resume is not taken by --3d (its runs are short: train again)")
    if args.skip_points and args.skip_sds:
        raise UsageError("--skip-points and --skip-sds together leave nothing to run: give at most one")
    if args.prior is not None and not (Path(args.prior) / "checkpoint.safetensors").is_file() and not (
            Path(args.prior).is_file() and args.prior.endswith(".safetensors")):
        raise UsageError(f"--prior {args.prior} is not a run folder with checkpoint.safetensors (train one with `difflab demo`)")
    if (args.samples_per_class or 20) < 2:
        raise UsageError("--samples-per-class must be >= 2 with --3d (the set metrics compare sets)")
    run_shapes3d_demo(out, steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps or 60,
                      guidance_scale=_guidance(args, POINTS_GUIDANCE), samples_per_class=args.samples_per_class or 20,
                      num_points=args.num_points or 256, seed=args.seed, prior=args.prior, sds_steps=args.sds_steps or 200,
                      method="vsd" if args.vsd else "sds", points=not args.skip_points, sds=not args.skip_sds)


def _depth_options(d):
    d.add_argument("--resample", type=positive_int, default=None,
                   help="--depth: RePaint passes over each step of channel inpainting (default: 2)")
    d.add_argument("--generation-sampler", default=None, choices=sorted(SAMPLERS),
                   help=f"--depth: the sampler of joint generation (default: {DEPTH_GENERATION_SAMPLER}, "
                        f"{DEPTH_GENERATION_STEPS} steps; a sampler named here takes --sampling-steps; --sampler and "
                        "--sampling-steps drive channel inpainting)")


def _depth_run(args, out):
    run_depth_demo(out, steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps or 25,
                   guidance_scale=_guidance(args, DEPTH_GUIDANCE), samples_per_class=args.samples_per_class or 50,
                   resample=args.resample or 2, seed=args.seed, resume=args.resume,
                   generation_sampler=args.generation_sampler or DEPTH_GENERATION_SAMPLER,
                   generation_steps=None if args.generation_sampler else DEPTH_GENERATION_STEPS)


def _slots_run(args, out):
    if args.guidance is not None:
        raise UsageError("--guidance is not taken by --slots (its decoder has no unconditional branch)")
    if args.samples_per_class is not None:
        raise UsageError("--samples-per-class is not taken by --slots (it decodes every held-out scene)")
    run_slots_demo(out, steps=args.steps, sampler=args.sampler, sampling_steps=args.sampling_steps or 25, seed=args.seed,
                   resume=args.resume)


# name -> mode; ``difflab demo --NAME`` runs it (the flag's dest is ``mode_NAME``)
MODES: dict[str, DemoMode] = {
    "text": DemoMode("the latent text-to-image demo instead: a small VAE and a text-conditional U-Net on captioned "
                     "digits, sampled from prompts, with inpainting, outpainting and inversion", "demo_text_out", _text_run),
    "cascade": DemoMode("the cascaded demo instead: a class-conditional 8x8 base and an x2 super-resolution stage to "
                        "16x16 with noise-conditioning augmentation, judged at 16x16", "demo_cascade_out", _cascade_run,
                        _cascade_options, ("aug_sigma", "truncated", "sr_steps")),
    "policy": DemoMode("the policy demo instead: a diffusion policy (temporal U-Net over action chunks) against a "
                       "behaviour-cloning MLP on the embedded Detour task (100 fixed-seed episodes), and Diffuser's "
                       "guided, inpainted planning (--guidance: its return-guidance scale, default 1); writes "
                       "roll_outs.gif", "demo_policy_out", _policy_run),
    "audio": DemoMode("the audio demo instead: a waveform DiffWave, a log-mel U-Net decoded by Griffin-Lim and by a "
                      "DiffWave vocoder, and a latent U-Net over a mel autoencoder, on ten classes of synthetic clips "
                      "(--guidance default 1); writes WAVs and spectrograms",
                      "demo_audio_out", _audio_run),
    "video": DemoMode("the video demo instead: a class- and direction-conditional video network on moving digits "
                      f"(16x16, 8 frames), judged per frame, by its motion and by a clip Frechet distance (--sampler "
                      f"default {VIDEO_SAMPLER}, --sampling-steps {VIDEO_SAMPLING_STEPS}, --guidance {VIDEO_GUIDANCE})",
                      "demo_video_out", _video_run, _video_options, ("video_network", "image_fraction", "direction_guidance",
                                                                   "end_frame_weight", "velocity_weight", "class_guidance",
                                                                   "eta"),
                      sampler=VIDEO_SAMPLER),
    "motion": DemoMode("the motion demo instead: MDM (a transformer over frames, geometric losses, classifier-free guidance "
                       "on the action; --guidance default 1.75) on embedded stick-figure motions of eight actions, judged by "
                       "an action classifier (FID, diversity, multimodality, bone drift, foot skate), with in-betweening "
                       "and leg generation by inpainting; writes GIFs", "demo_motion_out", _motion_run),
    "3d": DemoMode("the 3-D demo instead: a class-conditional point transformer on ten procedural shape classes (judged by a "
                   "PointNet, with MMD / COV / 1-NNA beside a Gaussian baseline), and score distillation of the digits model "
                   "into voxel objects whose front and side views read as two digits; writes PLY files and turntable GIFs",
                   "demo_3d_out", _3d_run, _3d_options, ("num_points", "prior", "sds_steps", "vsd", "skip_points", "skip_sds")),
    "depth": DemoMode("the image+depth demo instead: one U-Net over RGB and depth, conditioned on the objects asked (count and colours), on the "
                      "embedded scenes (16x16, 1-3 objects), depth from images and images from depth by channel inpainting, "
                      "beside a supervised depth regressor", "demo_depth_out", _depth_run, _depth_options, ("resample", "generation_sampler")),
    "slots": DemoMode("the slot diffusion demo instead: a slot-attention encoder and a U-Net decoder cross-attending to "
                      "its slots on the embedded scenes, beside slot attention with a mixture decoder; FG-ARI of the slot "
                      f"masks, and scenes recomposed by removing and swapping slots (--sampler default {SLOTS_SAMPLER}, "
                      "--sampling-steps 25)", "demo_slots_out", _slots_run, sampler=SLOTS_SAMPLER),
}


def add_arguments(d) -> None:
    for name, mode in MODES.items():
        d.add_argument(f"--{name}", dest=f"mode_{name}", action="store_true", help=mode.help)
    for mode in MODES.values():
        if mode.options is not None:
            mode.options(d)
    defaults = ", ".join(f"{m.out_dir} with --{n}" for n, m in MODES.items())
    d.add_argument("--out-dir", default=None,
                   help=f"where samples.png, the checkpoints and report.json go (default: demo_out; {defaults})")
    d.add_argument("--steps", type=positive_int, default=None, help="training steps (default: 2000)")
    d.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help=f"sampler (default: ddim; {VIDEO_SAMPLER} with --video, {SLOTS_SAMPLER} with --slots)")
    d.add_argument("--sampling-steps", type=positive_int, default=None,
                   help=f"sampler steps (default: 50; 25 per stage with --cascade; {VIDEO_SAMPLING_STEPS} with --video)")
    d.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: 1.5; 1 = none); with --policy the return-guidance "
                        "scale of the Diffuser plans (default: 1; 0 = none); with --3d the point clouds' (default: 1.5; 60 steps)")
    d.add_argument("--samples-per-class", type=positive_int, default=None,
                   help="samples per class judged (default: 50; 5 with --audio; --video: clips per class and direction, default 2)")
    d.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default: 0)")
    d.add_argument("--resume", action="store_true", help="continue the training checkpoint in --out-dir")


def _given(args, dest: str) -> bool:
    value = getattr(args, dest)
    return value is not None and value is not False


def run(args) -> int:
    chosen = [name for name in MODES if getattr(args, f"mode_{name}")]
    if len(chosen) > 1:
        raise UsageError(f"give one of {', '.join('--' + n for n in MODES)}, "
                         f"not both {' and '.join('--' + n for n in chosen[:2])}")
    for name, mode in MODES.items():
        stray = [dest for dest in mode.dests if _given(args, dest)]
        if stray and name not in chosen:
            flags = ", ".join("--" + dest.replace("_", "-") for dest in stray)
            raise UsageError(f"{flags} needs --{name}")
    if chosen:
        mode = MODES[chosen[0]]
        args.sampler = args.sampler or mode.sampler
        mode.run(args, args.out_dir or mode.out_dir)
        return 0
    run_demo(args.out_dir or "demo_out", steps=args.steps, sampler=args.sampler or "ddim", sampling_steps=args.sampling_steps or 50,
             guidance_scale=_guidance(args), samples_per_class=args.samples_per_class or 50, seed=args.seed,
             resume=args.resume)
    return 0
