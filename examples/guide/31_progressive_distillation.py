"""Chapter 31: progressive distillation (Salimans & Ho 2022).

Distils the guide's digits model in two rounds: a teacher sampled with 4 DDIM steps teaches a
2-step student, which teaches a 1-step student. Each student starts as a copy of its teacher and
learns to take in one DDIM step what the teacher takes in two. The judge reads the teacher at 4,
2 and 1 steps and each student at its own steps, all from the same noise; the picture shows them.
``python examples/guide/31_progressive_distillation.py [--fast --out DIR]`` (full: 63 CPU s on one
thread of the 2-core CPU with the cached digits model; the fast run about 9 CPU s with the imports).
"""
from __future__ import annotations

import tempfile

import torch

import _guide as guide
from difflab.core import grids
from difflab.pipelines.class_to_image import generate
from difflab.train import TrainConfig
from difflab.train.objectives.progressive import progressive_distillation, progressive_target

BOUNDS = {
    "target_one_step_error": (0.0, 1e-5),      # one student DDIM step with x0 = x~ lands on two teacher steps
    "teacher_4_accuracy": (0.5, 1.0),          # the fast teacher (79% at 50 steps) at 4 DDIM steps
    "teacher_1_frechet": (20.0, 1e4),          # one DDIM step of the teacher: a blur, far from the data
    "student_1_frechet": (0.0, 1e4),           # the 1-step student after two tiny rounds
    "student_1_accuracy": (0.2, 1.0),
}


def sample(denoiser, labels: torch.Tensor, sigmas: torch.Tensor, seed: int) -> torch.Tensor:
    """DDIM on the explicit grid ``sigmas``, per-sample noise from ``seed`` (no guidance)."""
    return generate(denoiser, labels.tolist(), shape=(1, 8, 8), sampler="ddim", grid=sigmas, seed=seed,
                    progress=False, batch_size=256)


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    torch.manual_seed(args.seed)
    teacher, _ = guide.digits_model(args.fast)
    world = guide.digits_world()
    data = {"x0": world["train"], "class_labels": world["train_labels"]}
    sigmas = grids.for_denoiser(teacher, 4, "default")          # the teacher's 4-step DDIM grid, ends in 0

    # 1. The target is exact: a student whose x0 is x~ lands in one step where the teacher lands in two.
    x = world["train"][:16] + sigmas[0].float() * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    lab = world["train_labels"][:16]
    s0, s1, s2 = (sigmas[i].float().expand(16) for i in (0, 1, 2))
    with torch.no_grad():
        x_tilde = progressive_target(teacher, x, s0, s1, s2, class_labels=lab)
        two = teacher(x, s0, class_labels=lab)
        two = two + (s1 / s0).view(-1, 1, 1, 1) * (x - two)
        x0b = teacher(two, s1, class_labels=lab)
        two = x0b + (s2 / s1).view(-1, 1, 1, 1) * (two - x0b)
        one = x_tilde + (s2 / s0).view(-1, 1, 1, 1) * (x - x_tilde)
    target_err = (one - two).abs().max().item() / two.abs().max().item()

    # 2. Two rounds, 4 -> 2 -> 1 steps, each a few hundred optimizer steps.
    steps = 8 if args.fast else 200
    config = TrainConfig(steps=steps, batch_size=64, lr=2e-4, ema_decay=0.99, checkpoint_every=0, log_every=10_000,
                         progress=False, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        rounds = progressive_distillation(teacher, data, config, tmp, sigmas=sigmas, rounds=2, resume=False)

    # 3. Judge everything from the same noise: teacher at 4, 2, 1 steps; the students at theirs.
    n = 50 if args.fast else 300
    labels = torch.arange(n) % 10
    rows = {f"teacher_{k}": sample(teacher, labels, sigmas[::4 // k], args.seed) for k in (4, 2, 1)}
    for r in rounds:
        rows[f"student_{r.steps}"] = sample(r.denoiser, labels, r.sigmas, args.seed)
    figures = {"target_one_step_error": target_err, **guide.judge_rows(world, rows, labels)}
    figures = guide.report(figures)

    # 4. The picture: the same ten seeds under each sampler.
    plt = guide.pyplot()
    fig, axes = plt.subplots(len(rows), 10, figsize=(8, 0.9 * len(rows) + 0.4))
    for r, (name, x) in enumerate(rows.items()):
        for c in range(10):
            ax = axes[r, c]
            ax.imshow(x[c, 0], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(name.replace("_", " ") + " st.", fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("Progressive distillation: teacher at 4, 2, 1 DDIM steps; students at 2 and 1", fontsize=9)
    guide.save(fig, guide.picture(args, "31_progressive_distillation.png"))
    return figures


if __name__ == "__main__":
    main()
