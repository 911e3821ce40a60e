"""`difflab demo --video`: video diffusion on moving digits. Trains a class- and direction-
conditional video network (by default, :data:`NETWORK`, AnimateDiff's motion modules on a frozen
image U-Net, Guo et al. 2023, :mod:`difflab.nn.motion`; or the factorized space-time U-Net of Ho
et al. 2022, :mod:`difflab.nn.video_unet`) through the one training loop, samples a clip for every class and
direction with classifier-free guidance, and judges the frames (the digits judge on each frame's
digit), the motion (the centre of mass, frame to frame) and the clip distribution (a Frechet
distance on clip features beside the real-data floor); writes a GIF grid (a row per class, a
column per direction), a frame-grid PNG and ``report.json``.

Which network trains is a row of :data:`NETWORKS`: a name -> a function ``(tiny) ->``
:class:`VideoRoute` (the video network's spec and training, and for the motion-module route the
image network pretrained on single frames and then frozen); a row's spec may name any network
kind that takes (B, C, F, H, W) clips with ``class_labels=`` and ``direction_labels=``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.moving_digits import DIRECTIONS, moving_digits, still_frames
from ..eval import DigitsJudge
from ..eval.video import clip_scores, video_judge_report
from ..io.spec import build_denoiser, make_spec
from ..io.video import save_frame_grid, save_gif
from ..nn.motion import MotionUNetConfig, freeze_spatial
from ..nn.unet import UNetConfig
from ..nn.video_unet import VideoUNetConfig
from ..pipelines import SampleOptions
from ..pipelines.video import generate_video, image_to_video, opposite_directions
from ..samplers import ETA_SAMPLERS
from ..train import TrainConfig, train
from ..train.objectives.centroid_motion import CentroidMotionObjective

# The data design (moving digits: one class and one direction per clip). The digit moves SPEEDS
# pixels a frame and, with BOUNCE False, never reaches an edge within a clip: every step goes the
# labelled way (with bounces, a "left" clip near the left edge spends most of its steps going right,
# and the networks learned the axis of the label but not its sign; docs/video.md).
FRAMES, SIZE, SPEEDS, BOUNCE = 8, 16, (1,), False
DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"}
TRAIN_CLIPS, HELD_CLIPS = 4000, 400
# Sampling (docs/video.md, stop 34): ancestral Euler read the frames and the motion better than DDIM on
# every route; guidance on the direction alone, away from the opposite direction, on top of CFG, at
# the high-noise steps only (sigma >= DIRECTION_MIN_SIGMA: the first 6 of 20), where the sign is set.
# 20 steps (40 before stop 36): on one network, two seeds, one class 2 clips better, motion a wash, half the CPU.
SAMPLER, SAMPLING_STEPS, GUIDANCE, DIRECTION_GUIDANCE, DIRECTION_MIN_SIGMA = "euler_ancestral", 20, 2.0, 1.0, 2.0
# The ancestral sampler's eta (the std of a step's fresh noise, x the DDPM posterior's; capped at sigma_next), used with SAMPLER.
# 2 (stop 40; 1 before): the misses of "one class in every frame" were single-frame glitches that more fresh noise washes
# out. At 2 the cap holds on every step of the 20-step grid: each step is x <- D(x) + sigma_next z. On stop 39's network,
# sampling seeds 0 / 1: one class 92.5 / 91.3% -> 100 / 100%, motion 91.3 / 92.5% -> 96.3 / 96.3%, at no cost (the same
# model calls; eta 1.5: 100 / 96.3%, 96.3 / 92.5%; eta 0.5: one class 65.0 / 68.8%) (docs/video.md, stop 40).
SAMPLER_ETA = 2.0
# Guidance on the class alone (DirectionGuidance's class term, away from the null class with the asked direction), on top
# of CFG and the direction term, at the steps where sigma < CLASS_MAX_SIGMA (docs/video.md, stop 40). 0: none (stops 34-39).
CLASS_GUIDANCE, CLASS_MAX_SIGMA = 0.0, float("inf")
# Motion modules at the encoder's sites too (AnimateDiff's layout). False: the middle and decoder only, so the
# frozen encoder runs without a backward: a module step 1.36x cheaper, but at 1,600 steps motion as asked fell
# 80.0 -> 58.7% (docs/video.md, stop 37); kept True.
DOWN_BLOCKS = True
# Motion modules per decoder level (MotionUNetConfig(up_modules=)); None: both sites, AnimateDiff's layout. 1 (stop 39):
# a module step 1.4x cheaper; with the velocity loss (VELOCITY_WEIGHT) at 1,800 steps the whole demo timed 880 s wall (663 s
# on an idle machine at stop 40)
# (motion 91.3%, one class 92.5%) against about 1,013 s for both sites at 2,000 steps (85.0%, 97.5%) (docs/video.md, stop 39).
UP_MODULES = 1
# The frozen route's centre-of-mass velocity loss (CentroidMotionObjective; 0: none, stops 34-38): at equal steps
# about +19 points of motion; one class in every frame stays under 95% with it (docs/video.md, stop 39).
VELOCITY_WEIGHT = 1.0
I2V_CLIPS = 10  # image-to-video from held-out first frames (a side figure; 40 before stop 34, 20 before stop 37: ~75 CPU s less)


@dataclass(frozen=True)
class VideoRoute:
    """One row of :data:`NETWORKS`: the video network's ``spec`` and its training on clips
    (``train``). With ``image_spec`` it is the motion-module route (Guo et al. 2023, AnimateDiff):
    that image network first trains on single frames (``image_train``), is frozen, and the video
    network (``spec``, kind ``motion_unet`` around it) trains only its motion modules; with
    ``freeze_image`` False (the control) the image network trains on the clips too.
    ``end_frame_weight``: the loss weight of the first and last frame relative to the others
    (:func:`end_frame_weights`; 1.0: every frame weighs the same). ``velocity_weight``: lambda of the
    centre-of-mass velocity loss on the clean estimate
    (:class:`~difflab.train.objectives.centroid_motion.CentroidMotionObjective`; 0: the plain diffusion loss)."""

    spec: dict
    train: TrainConfig
    image_spec: dict | None = None
    image_train: TrainConfig | None = None
    freeze_image: bool = True
    end_frame_weight: float = 1.0
    velocity_weight: float = 0.0


def end_frame_weights(frames: int, end: float) -> torch.Tensor:
    """Per-frame loss weights (frames,): the first and last frame ``end`` times the others, normalised
    to mean 1 (so the loss's scale, and the learning rate's meaning, stay those of uniform weights).
    An engineering choice, no paper's: the motion-module network's clean estimate moved the end frames
    least and erred most there (docs/video.md, stop 36)."""
    if not (end > 0 and frames >= 2):
        raise ValueError(f"end={end} must be > 0 and frames={frames} >= 2")
    w = torch.ones(frames)
    w[0] = w[-1] = end
    return w / w.mean()


def backbone(tiny: bool) -> dict:
    """The per-frame layers both routes share: full-resolution levels (16 -> 8 -> 4 for the demo's
    16x16 frames), spatial attention at the lowest."""
    return dict(model_channels=8 if tiny else 16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,),
                num_heads=2 if tiny else 4)


def space_time_unet(tiny: bool = False) -> VideoRoute:
    """The factorized space-time U-Net (Ho et al. 2022), everything trained on clips; temporal
    attention at every level (16x16, 8x8, 4x4) and the middle, and the frame index embedded."""
    config = VideoUNetConfig(**backbone(tiny), temporal_levels=(0, 1, 2), max_frames=FRAMES, sample_size=SIZE,
                             num_classes=10, num_directions=len(DIRECTIONS), frame_embedding=True)
    train = TrainConfig(steps=1600, batch_size=8, lr=2e-3, warmup_steps=50, ema_decay=0.995, cfg_dropout=0.1,
                        checkpoint_every=400, log_every=100, seed=0)
    return VideoRoute(make_spec("video_unet", config, DIFFUSION), train)


def motion_modules(tiny: bool = False, freeze_image: bool = True) -> VideoRoute:
    """AnimateDiff's route (Guo et al. 2023): the image U-Net of the same layers, class-conditional,
    trained on single frames, then frozen; motion modules at every level and the middle (AnimateDiff's
    layout), each told the clip's direction and the noise level, are all that trains on clips.
    ``freeze_image=False``: the control, the image U-Net trains on the clips with them."""
    image = UNetConfig(in_channels=1, **backbone(tiny), num_classes=10)
    motion = MotionUNetConfig(image_kind="unet", image=image.to_dict(), num_heads=2 if tiny else 4, max_frames=FRAMES,
                              num_frames=FRAMES, num_directions=len(DIRECTIONS), time_embedding=True,
                              down_blocks=DOWN_BLOCKS, up_modules=UP_MODULES)
    image_train = TrainConfig(steps=600, batch_size=64, lr=2e-3, warmup_steps=50, ema_decay=0.995, cfg_dropout=0.1,
                              checkpoint_every=300, log_every=100, seed=0)
    # Module steps: 2,000 (stop 35; 1,200 before: one class 85.0 -> 97.5%, motion 62.5 -> 85.0%); 1,800 with UP_MODULES = 1
    # and the velocity loss (stop 39: 1,500 / 1,650 / 1,800 steps moved 87.5 / 90.0 / 93.8% of clips, seed 0, one thread).
    # The control (freeze_image=False) was measured at 1,200 steps without the velocity loss.
    train = TrainConfig(steps=1800 if freeze_image else 1200, batch_size=8, lr=1e-3, warmup_steps=30,
                        ema_decay=0.99 if freeze_image else 0.995,
                        cfg_dropout=0.1, checkpoint_every=400, log_every=100, seed=0)
    return VideoRoute(make_spec("motion_unet", motion, DIFFUSION), train, make_spec("unet", image, DIFFUSION), image_train,
                      freeze_image, velocity_weight=VELOCITY_WEIGHT if freeze_image else 0.0)


def motion_modules_unfrozen(tiny: bool = False) -> VideoRoute:
    """The control of :func:`motion_modules`: the same networks, the image U-Net not frozen."""
    return motion_modules(tiny, freeze_image=False)


# The networks the demo can train: one row each, a name -> a function (tiny) -> VideoRoute. NETWORK is the
# default: the frozen motion-module route read better than the space-time U-Net on every bar (docs/video.md, stop 35).
NETWORKS = {"space_time_unet": space_time_unet, "motion_modules": motion_modules,
            "motion_modules_unfrozen": motion_modules_unfrozen}
NETWORK = "motion_modules"


def training_data(n: int, image_fraction: float, seed: int = 0):
    """(clips, labels, cond) for :func:`difflab.train.train`: ``n`` training clips, plus (joint
    image-and-video training, Ho et al. 2022, Section 3.2) ``round(image_fraction * n)`` stacks of
    independent still frames with the null direction and ``independent_frames`` set."""
    data = moving_digits(n, frames=FRAMES, size=SIZE, split="train", seed=seed, speeds=SPEEDS, bounce=BOUNCE)
    clips, labels, dirs = data.clips, data.labels, data.directions
    n_still = round(image_fraction * n)
    if not n_still:
        return clips, labels, {"direction_labels": dirs}, {"direction_labels": len(DIRECTIONS)}
    stills, still_labels = still_frames(n_still, frames=FRAMES, size=SIZE, split="train", seed=seed + 1)
    clips, labels = torch.cat([clips, stills]), torch.cat([labels, still_labels])
    dirs = torch.cat([dirs, torch.full((n_still,), len(DIRECTIONS), dtype=torch.long)])
    independent = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n_still, dtype=torch.bool)])
    cond = {"direction_labels": dirs, "independent_frames": independent}
    null_cond = {"direction_labels": len(DIRECTIONS), "independent_frames": None}  # the flag is never dropped
    return clips, labels, cond, null_cond


def train_route(route: VideoRoute, network: str, config, data, null_cond, out_dir: Path, *, steps: int | None,
                progress: bool, resume: bool):
    """Step 3 of the demo: build the route's network and train it (the motion-module route: its image
    network on single frames first, then frozen; the clips' frames weighted by the route's
    ``end_frame_weight``). Returns the EMA denoiser and the image step's CPU s."""
    spec = route.spec
    denoiser = build_denoiser(spec, seed=config.seed)
    image_cpu = 0.0
    if route.image_spec is not None:
        clips, labels = data[0], data[1]
        image_cpu = pretrain_image_network(denoiser, route, clips, labels, out_dir / network / "image", steps=steps,
                                           progress=progress, resume=resume)
        if route.freeze_image:
            freeze_spatial(denoiser.net)
    only = route.image_spec is not None and route.freeze_image
    print(f"[3/6] training {network} ({spec['network']['kind']}) for {config.steps} steps (batch {config.batch_size}"
          f"{', motion modules only' if only else ''})")
    weights = None if route.end_frame_weight == 1.0 else end_frame_weights(FRAMES, route.end_frame_weight)
    metadata = {"size": SIZE, "frames": FRAMES, "end_frame_weight": route.end_frame_weight,
                "velocity_weight": route.velocity_weight}
    # The centre-of-mass velocity loss (CentroidMotionObjective); clips whose direction was dropped for guidance get none.
    velocity = {} if route.velocity_weight == 0 else dict(
        objective=CentroidMotionObjective,
        objective_kwargs=dict(lambda_vel=route.velocity_weight, skip_key="direction_labels", skip_value=len(DIRECTIONS)))
    state = train(denoiser, data, config, out_dir / network, spec=spec, null_cond=null_cond, metadata=metadata,
                  resume=resume, frame_weights=weights, **velocity)
    state.ema.copy_to(denoiser.net)
    denoiser.eval()
    return denoiser, image_cpu


def demo_route(network: str, tiny: bool, image_fraction: float, end_frame_weight: float | None,
               velocity_weight: float | None) -> VideoRoute:
    """The route of ``network`` (:data:`NETWORKS`) with :func:`run_video_demo`'s overrides, each checked
    before any work (a bad value raises ``ValueError`` naming it)."""
    if network not in NETWORKS:
        raise ValueError(f"network={network!r} is unknown; choose one of {sorted(NETWORKS)}")
    if not 0.0 <= image_fraction < 1.0:
        raise ValueError(f"image_fraction={image_fraction} must be in [0, 1)")
    route = NETWORKS[network](tiny)
    if end_frame_weight is not None:
        route = dataclasses.replace(route, end_frame_weight=end_frame_weight)
    if velocity_weight is not None:
        if not velocity_weight >= 0:
            raise ValueError(f"velocity_weight={velocity_weight} must be >= 0")
        route = dataclasses.replace(route, velocity_weight=velocity_weight)
    if image_fraction and route.image_spec is not None:
        raise ValueError(f"image_fraction={image_fraction}: joint image-and-video training is the space-time U-Net's; "
                         f"network={network!r} trains its image network on single frames first")
    return route


def run_video_demo(out_dir="demo_video_out", *, network: str = NETWORK, steps: int | None = None,
                   sampler: str = SAMPLER, sampling_steps: int = SAMPLING_STEPS, guidance_scale: float = GUIDANCE,
                   direction_guidance: float = DIRECTION_GUIDANCE, clips_per_pair: int = 2,
                    image_fraction: float = 0.0, seed: int = 0, resume: bool = False, tiny: bool = False,
                   progress: bool = True, end_frame_weight: float | None = None,
                   velocity_weight: float | None = None, class_guidance: float = CLASS_GUIDANCE,
                   eta: float | None = None) -> dict:
    """Train, sample and judge (see the module docstring); ``tiny``: a small network and data set
    for tests. ``direction_guidance``: the scale of the guidance on the direction alone, away from
    the opposite direction (:class:`~difflab.pipelines.video.DirectionGuidance`; 0 = plain CFG);
    ``class_guidance``: that of its term on the class alone (below :data:`CLASS_MAX_SIGMA`; 0 = none).
    ``eta``: the sampler's eta (None: :data:`SAMPLER_ETA` with :data:`SAMPLER`, another sampler's own default).
    ``end_frame_weight``: overrides the route's loss weight of the end frames (:func:`end_frame_weights`).
    ``velocity_weight``: overrides the route's centre-of-mass velocity loss weight (:class:`VideoRoute`).
    Returns the report (also in ``out_dir/report.json``)."""
    route = demo_route(network, tiny, image_fraction, end_frame_weight, velocity_weight)
    eta = check_sampling(sampler, eta, class_guidance)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start, c_start = time.time(), time.process_time()
    spec = route.spec
    config = dataclasses.replace(route.train, progress=progress, **({} if steps is None else {"steps": steps}))
    n_train, n_held = (32, 20) if tiny else (TRAIN_CLIPS, HELD_CLIPS)

    # 1. Data: clips from the digits' train split; held-out clips from its test split.
    clips, labels, cond, null_cond = training_data(n_train, image_fraction, seed=0)
    held = moving_digits(n_held, frames=FRAMES, size=SIZE, split="test", seed=1, speeds=SPEEDS, bounce=BOUNCE)
    reference = moving_digits(n_held, frames=FRAMES, size=SIZE, split="train", seed=2, speeds=SPEEDS, bounce=BOUNCE)
    print(f"[1/6] data: {n_train} training clips ({FRAMES} frames, {SIZE}x{SIZE}, {len(DIRECTIONS)} directions)"
          f"{f' + {len(clips) - n_train} still-frame stacks' if len(clips) > n_train else ''}, {n_held} held out")

    # 2. The judge: the digits judge reads each frame's digit, cropped around its centre of mass.
    judge_path = out_dir / "digits_judge.safetensors"  # a judge already there is used as it is
    judge = DigitsJudge.load(judge_path) if judge_path.exists() else DigitsJudge.load_or_train(judge_path)
    real = clip_scores(judge, held.clips, held.labels, held.directions)
    print(f"[2/6] judge: {real['frame_accuracy']:.1%} of held-out real frames, motion read right in "
          f"{real['motion_accuracy']:.1%} of held-out real clips")

    # 3. Train (the motion-module route: the image network on single frames first, then frozen).
    t0, c0 = time.time(), time.process_time()
    denoiser, image_cpu = train_route(route, network, config, (clips, labels, cond), null_cond, out_dir, steps=steps,
                                      progress=progress, resume=resume)
    train_seconds, train_cpu = time.time() - t0, time.process_time() - c0

    # 4. Sample every class and direction.
    opts = SampleOptions(sampler=sampler, steps=sampling_steps, guidance_scale=guidance_scale, seed=seed,
                         batch_size=40, progress=progress, sampler_kwargs={} if eta is None else {"eta": eta})
    t0, c0 = time.time(), time.process_time()
    samples, asked, dirs = sample_every_pair(denoiser, clips_per_pair, opts, direction_guidance, class_guidance)
    sample_seconds, sample_cpu = time.time() - t0, time.process_time() - c0

    # 5. Image-to-video: held-out first frames, the rest generated (their class and direction asked).
    i2v_scores, i2v_cpu = image_to_video_step(denoiser, judge, held, 4 if tiny else I2V_CLIPS, opts, direction_guidance)

    # 6. Judge, and write the clips: a row per class, a column per direction.
    picks = torch.arange(0, len(samples), clips_per_pair)
    gif = save_gif(samples[picks], out_dir / "samples.gif", nrow=len(DIRECTIONS), upscale=2)
    grid = save_frame_grid(samples[picks], out_dir / "frames.png", upscale=2)
    report = video_judge_report(judge, samples, asked, dirs, held.clips, held.labels, held.directions,
                                reference=reference.clips)
    report.update(i2v_frame_accuracy=i2v_scores["frame_accuracy"], i2v_motion_accuracy=i2v_scores["motion_accuracy"],
                  network=network, kind=spec["network"]["kind"], steps=config.steps, batch_size=config.batch_size,
                  image_fraction=image_fraction, end_frame_weight=route.end_frame_weight,
                  velocity_weight=route.velocity_weight, up_modules=UP_MODULES, sampler=sampler,
                  sampling_steps=sampling_steps, guidance_scale=guidance_scale, direction_guidance=direction_guidance,
                  direction_min_sigma=DIRECTION_MIN_SIGMA, class_guidance=class_guidance, eta=eta,
                  class_max_sigma=CLASS_MAX_SIGMA, train_seconds=round(train_seconds, 1),
                  train_cpu_seconds=round(train_cpu, 1),
                  image_steps=route.image_train.steps if route.image_train else 0, image_cpu_seconds=round(image_cpu, 1),
                  trainable_parameters=sum(p.numel() for p in denoiser.net.parameters() if p.requires_grad),
                  parameters=sum(p.numel() for p in denoiser.net.parameters()),
                  sample_seconds=round(sample_seconds, 1), sample_cpu_seconds=round(sample_cpu, 1),
                  i2v_cpu_seconds=round(i2v_cpu, 1),
                  total_seconds=round(time.time() - t_start, 1), cpu_seconds=round(time.process_time() - c_start, 1),
                  threads=torch.get_num_threads(), gif=str(gif), frames=str(grid))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"[6/6] the judge's reading (clips in {gif}):")
    print(format_video_report(report))
    return report


def check_sampling(sampler: str, eta: float | None, class_guidance: float = 0.0) -> float | None:
    """The eta the demo samples with: ``eta`` if given (a ValueError unless ``sampler`` takes one and
    it is a finite number >= 0), else :data:`SAMPLER_ETA` for :data:`SAMPLER` and None (the
    sampler's own default) for the others; a ValueError for a ``class_guidance`` that is not a
    finite number >= 0."""
    if not 0 <= class_guidance < float("inf"):
        raise ValueError(f"class_guidance={class_guidance} must be a finite number >= 0 (0 = none)")
    if eta is None:
        return SAMPLER_ETA if sampler == SAMPLER else None
    if sampler not in ETA_SAMPLERS:
        raise ValueError(f"eta={eta}: sampler {sampler!r} has no eta; the samplers that take one are {', '.join(ETA_SAMPLERS)}")
    if not 0 <= eta < float("inf"):
        raise ValueError(f"eta={eta} must be a finite number >= 0")
    return float(eta)


def sample_every_pair(denoiser, clips_per_pair: int, opts: SampleOptions, direction_guidance: float,
                      class_guidance: float = 0.0):
    """Step 4 of the demo: ``clips_per_pair`` clips of every class and direction; returns (clips,
    classes asked, directions asked)."""
    asked = torch.arange(10).repeat_interleave(len(DIRECTIONS) * clips_per_pair)
    dirs = torch.arange(len(DIRECTIONS)).repeat_interleave(clips_per_pair).repeat(10)
    samples = generate_video(denoiser, asked, dirs, shape=(1, FRAMES, SIZE, SIZE), options=opts,
                             direction_guidance=direction_guidance, negative_directions=opposite_directions(dirs),
                             direction_guidance_min_sigma=DIRECTION_MIN_SIGMA, class_guidance=class_guidance,
                             class_guidance_max_sigma=CLASS_MAX_SIGMA)
    eta = dict(opts.sampler_kwargs).get("eta")
    print(f"[4/6] sampled {len(samples)} clips: {opts.sampler}{'' if eta is None else f' (eta {eta})'}, {opts.steps} steps, "
          f"guidance {opts.guidance_scale}, "
          f"direction guidance {direction_guidance} (sigma >= {DIRECTION_MIN_SIGMA}), class guidance {class_guidance}"
          f"{f' (sigma < {CLASS_MAX_SIGMA})' if class_guidance and CLASS_MAX_SIGMA < float('inf') else ''}")
    return samples, asked, dirs


def image_to_video_step(denoiser, judge, held, n: int, opts: SampleOptions, direction_guidance: float):
    """Step 5 of the demo: clips from the first ``n`` held-out first frames, their class and
    direction asked, judged; returns (scores, CPU seconds)."""
    c0 = time.process_time()
    i2v = image_to_video(denoiser, held.clips[:n, :, 0], held.labels[:n], held.directions[:n], frames=FRAMES,
                         options=opts, reconstruction_weight=1.0, direction_guidance=direction_guidance,
                         negative_directions=opposite_directions(held.directions[:n]),
                         direction_guidance_min_sigma=DIRECTION_MIN_SIGMA)
    i2v_cpu = time.process_time() - c0
    scores = clip_scores(judge, i2v, held.labels[:n], held.directions[:n])
    print(f"[5/6] image-to-video from {n} held-out first frames: motion as asked in {scores['motion_accuracy']:.1%}")
    return scores, i2v_cpu


def pretrain_image_network(denoiser, route: VideoRoute, clips, labels, out_dir, *, steps: int | None, progress: bool,
                           resume: bool) -> float:
    """Train ``route``'s image network on the clips' frames as single images (the class label
    each), copy its EMA weights into ``denoiser.net.unet`` (the image network inside the motion
    U-Net); returns the CPU seconds taken. ``steps`` (a test's tiny run) caps its steps too."""
    c0 = time.process_time()
    config = dataclasses.replace(route.image_train, progress=progress,
                                 **({} if steps is None else {"steps": min(steps, route.image_train.steps)}))
    frames = clips.transpose(1, 2).reshape(-1, *clips.shape[1:2], *clips.shape[3:])  # (N * F, C, H, W), clip-major
    print(f"[3/6] pretraining the image network on {len(frames)} single frames for {config.steps} steps (batch {config.batch_size})")
    image = build_denoiser(route.image_spec, seed=config.seed)
    state = train(image, (frames, labels.repeat_interleave(clips.shape[2])), config, out_dir, spec=route.image_spec,
                  metadata={"size": SIZE}, resume=resume)
    state.ema.copy_to(image.net)
    denoiser.net.unet.load_state_dict(image.net.state_dict())
    return time.process_time() - c0


def format_video_report(r: dict) -> str:
    rows = [
        ("per-frame class accuracy (class asked)", f"{r['frame_accuracy']:.1%}", f"real held-out: {r['real_frame_accuracy']:.1%}"),
        ("clips with one class in every frame", f"{r['same_class']:.1%}", f"real: {r['real_same_class']:.1%}"),
        ("clips moving as asked", f"{r['motion_accuracy']:.1%}", f"real: {r['real_motion_accuracy']:.1%}"),
        ("Frechet distance, clips vs held-out", f"{r['frechet']:.2f}", f"{r['n_generated']} clips"),
        ("Frechet distance, real train vs held-out", f"{r.get('frechet_real_reference', float('nan')):.2f}", "floor, same sizes"),
        ("Frechet distance, real half vs half", f"{r['frechet_real_halves']:.2f}", f"{r['n_real'] // 2} each"),
        ("image-to-video: frames right / moving as asked", f"{r['i2v_frame_accuracy']:.0%} / {r['i2v_motion_accuracy']:.0%}", ""),
        ("motion route: image pretraining (CPU)", f"{r.get('image_steps', 0)} steps, {r.get('image_cpu_seconds', 0):.0f}s", "within train"),
        ("time: train / sample / total (CPU)", f"{r['train_seconds']:.0f}s / {r['sample_seconds']:.0f}s / "
                                               f"{r['total_seconds']:.0f}s ({r['cpu_seconds']:.0f}s)", ""),
    ]
    w = max(len(a) for a, _, _ in rows)
    return "\n".join(f"  {a:<{w}}  {b:>22}  {c}" for a, b, c in rows)


__all__ = ["run_video_demo", "NETWORKS", "NETWORK", "FRAMES", "SIZE", "SPEEDS", "BOUNCE", "SAMPLER", "SAMPLING_STEPS", "GUIDANCE",
           "DIRECTION_GUIDANCE", "DIRECTION_MIN_SIGMA", "CLASS_GUIDANCE", "CLASS_MAX_SIGMA", "SAMPLER_ETA", "I2V_CLIPS", "DOWN_BLOCKS", "UP_MODULES", "VELOCITY_WEIGHT", "VideoRoute", "space_time_unet", "motion_modules",
           "motion_modules_unfrozen", "backbone", "training_data", "pretrain_image_network", "format_video_report"]
