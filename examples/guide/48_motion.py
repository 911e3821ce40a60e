"""Chapter 48: zero-shot human-motion diffusion (MDM; editing by inpainting in time and in joints).

Trains a small MDM (a transformer over frames, x0 prediction, MDM's geometric losses) on the
stick-figure motions for a few hundred steps, samples every action and lets the action judge read
them; then edits held-out clips with the same model and no retraining: in-betweening from three key
poses (inpainting in time) and the legs generated under a given upper body (inpainting in joints).
The in-betweens are set beside linear interpolation of the same key poses.
``python examples/guide/48_motion.py [--fast --out DIR]`` (full: 41 CPU s with one torch thread, measured on the loaded 2-core CPU; writes a PNG and a GIF).
"""
from __future__ import annotations

import tempfile
import time

import torch

import _guide as guide
from difflab.core import sample_seed
from difflab.data.stick_figures import ACTIONS, FRAMES, JOINTS, PARENTS, UPPER_BODY, MotionNormalizer, motion_split
from difflab.eval.motion_judge import MotionJudge, MotionJudgeConfig, bone_length_drift, foot_skate_ratio
from difflab.io.spec import build_denoiser, make_spec
from difflab.io.stick_gif import save_stick_gif
from difflab.nn.mdm import MDMConfig
from difflab.pipelines.motion import edit_motions, joint_mask, keyframe_mask, sample_motions
from difflab.train import TrainConfig, fit
from difflab.train.objectives.motion import MotionObjective

SHAPE = (FRAMES, len(JOINTS), 3)
KEY_FRAMES = (0, FRAMES // 2, FRAMES - 1)
SPEC = make_spec("mdm", MDMConfig(frames=FRAMES, joints=len(JOINTS), num_classes=len(ACTIONS), d_model=64, depth=3,
                                  heads=4, ff_mult=2, dropout=0.1),
                 {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "x0"})

BOUNDS = {
    "judge_real": (0.8, 1.0),                  # the action judge on real held-out clips (10 epochs in --fast)
    "generated_accuracy": (0.0, 1.0),          # 20 steps of MDM in --fast: only that it runs
    "keyframe_error_cm": (0.0, 1e-3),          # inpainting gives the key poses back exactly
    "given_joints_error_cm": (0.0, 1e-3),      # ... and the given upper body
    "linear_inbetween_error_cm": (5.0, 40.0),  # linear interpolation's distance to the real in-between frames
    "mdm_inbetween_error_cm": (1.0, 200.0),
}


def joint_error_cm(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Euclidean distance of corresponding joints, in centimetres."""
    return 100 * float((a - b).norm(dim=-1).mean()) if a.numel() else 0.0


def linear_inbetween(real: torch.Tensor, keys) -> torch.Tensor:
    """The clip's key poses joined by straight lines in time (the baseline an animator starts from)."""
    out = real.clone()
    for a, b in zip(keys[:-1], keys[1:]):
        for f in range(a + 1, b):
            w = (f - a) / (b - a)
            out[:, f] = (1 - w) * real[:, a] + w * real[:, b]
    return out


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    t0, c0 = time.time(), time.process_time()
    fast = args.fast
    train_set, held = motion_split(40 if fast else 150, 4 if fast else 10, seed=0)
    norm = MotionNormalizer.fit(train_set.motions)
    judge = MotionJudge.fit(train_set.motions, train_set.labels, MotionJudgeConfig(epochs=10 if fast else 20))

    # 1. MDM through the one training loop with its geometric losses (MDM eq. 2-6).
    steps = 20 if fast else 400
    cfg = TrainConfig(steps=steps, batch_size=64, lr=1e-3, lr_schedule="cosine", warmup_steps=max(1, steps // 10),
                      ema_decay=0.99, checkpoint_every=0, log_every=10_000, progress=False, seed=args.seed)
    denoiser = build_denoiser(SPEC, seed=args.seed)
    c1 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        state = fit(MotionObjective(denoiser, norm.mean, norm.std, cfg_dropout=0.1),
                    {"x0": norm.normalize(train_set.motions), "class_labels": train_set.labels}, cfg, tmp, spec=SPEC,
                    null_class=len(ACTIONS))
    state.ema.copy_to(denoiser.net)
    denoiser.eval()
    train_cpu = time.process_time() - c1

    # 2. Sample every action.
    per = 2 if fast else 8
    labels = torch.arange(len(ACTIONS)).repeat_interleave(per)
    sampling = dict(guidance_scale=1.75, sampler="ddim", steps=10 if fast else 30)
    generated = norm.denormalize(sample_motions(denoiser, labels, [sample_seed(args.seed, i) for i in range(len(labels))],
                                                shape=SHAPE, **sampling))

    # 3. Zero-shot editing of held-out clips: in time (key poses) and in joints (the upper body).
    pick = torch.cat([torch.nonzero(held.labels == c)[:1, 0] for c in range(len(ACTIONS))])
    real, real_labels = held.motions[pick], held.labels[pick]
    seeds = [sample_seed(args.seed + 1, i) for i in range(len(pick))]
    known = norm.normalize(real)
    inb = norm.denormalize(edit_motions(denoiser, known, keyframe_mask(SHAPE, KEY_FRAMES), real_labels, seeds, **sampling))
    legs = norm.denormalize(edit_motions(denoiser, known, joint_mask(SHAPE, UPPER_BODY), real_labels, seeds, **sampling))
    missing = [f for f in range(FRAMES) if f not in KEY_FRAMES]
    lower = [j for j in range(len(JOINTS)) if j not in UPPER_BODY]
    linear = linear_inbetween(real, KEY_FRAMES)

    figures = guide.report({
        "judge_real": judge.accuracy(held.motions, held.labels),
        "generated_accuracy": judge.accuracy(generated, labels),
        "generated_bone_drift": bone_length_drift(generated),
        "real_bone_drift": bone_length_drift(held.motions),
        "generated_foot_skate": foot_skate_ratio(generated),
        "real_foot_skate": foot_skate_ratio(held.motions),
        "keyframe_error_cm": joint_error_cm(inb[:, list(KEY_FRAMES)], real[:, list(KEY_FRAMES)]),
        "given_joints_error_cm": joint_error_cm(legs[:, :, list(UPPER_BODY)], real[:, :, list(UPPER_BODY)]),
        "mdm_inbetween_error_cm": joint_error_cm(inb[:, missing], real[:, missing]),
        "linear_inbetween_error_cm": joint_error_cm(linear[:, missing], real[:, missing]),
        "inbetween_accuracy": judge.accuracy(inb, real_labels),
        "legs_error_cm": joint_error_cm(legs[:, :, lower], real[:, :, lower]),
        "legs_accuracy": judge.accuracy(legs, real_labels),
        "mdm_train_cpu_seconds": train_cpu,
    })

    # 4. Pictures: one frame strip per row (real, in-between, legs), and the GIF of all three.
    plt = guide.pyplot()
    show = [0, 1, 3]                               # walk, run, wave
    rows = [("real held-out", real), ("in-between (keys 0, 16, 31)", inb), ("legs generated", legs)]
    fig, axes = plt.subplots(len(rows) * len(show), 8, figsize=(12, 13))
    for r, (name, clips) in enumerate(rows):
        for i, clip_i in enumerate(show):
            for k, f in enumerate(range(0, FRAMES, FRAMES // 8)):
                ax = axes[i * len(rows) + r, k]
                pose = clips[clip_i, f]
                for j, p in enumerate(PARENTS):
                    if p >= 0:
                        ax.plot([pose[j, 0], pose[p, 0]], [pose[j, 1], pose[p, 1]],
                                color="tab:red" if (name.startswith("legs") and j not in UPPER_BODY) else "k", lw=1.2)
                ax.set_xlim(-1.2, 1.2), ax.set_ylim(-0.05, 2.0), ax.set_aspect("equal"), ax.axis("off")
                if f in KEY_FRAMES and name.startswith("in-between"):
                    ax.set_title("key", fontsize=7, color="tab:green")
                if k == 0:
                    ax.text(-1.2, 1.9, f"{ACTIONS[int(real_labels[clip_i])]}: {name}", fontsize=7)
    guide.save(fig, guide.picture(args, "48_motion.png"))
    gif = save_stick_gif(torch.cat([real[:4], inb[:4], legs[:4]]), guide.picture(args, "48_motion.gif"), columns=4, size=96,
                         titles=[f"real {ACTIONS[int(c)]}" for c in real_labels[:4]] + ["in-between"] * 4 + ["legs"] * 4,
                         marks=[()] * 4 + [KEY_FRAMES] * 4 + [()] * 4)
    print(f"gif: {gif}")
    guide.print_time(t0, c0)
    return figures


# one thread: on a shared CPU two threads spin and cost far more CPU time
main = guide.on_one_thread(run)


if __name__ == "__main__":
    main()
