"""Chapter 32: consistency models for fast sampling (Song et al. 2023; LCM, Luo et al. 2023).

Checks the boundary condition f(x, sigma_min) = x of a consistency function (exact, by
construction), then distils the guide's digits model into one (consistency distillation,
Song et al. 2023, Algorithm 2: the student at sigma_{i+1} matches its own stop-gradient output one
Heun step of the teacher's ODE lower) and samples it in 1, 2 and 4 steps (Algorithm 1), judged
beside the teacher's DDIM at the same numbers of steps, all from the same noise.
``python examples/guide/32_consistency_models.py [--fast --out DIR]`` (full: 59 CPU s on one
thread of the 2-core CPU with the cached digits model; the fast run about 8 CPU s with the imports).
"""
from __future__ import annotations

import copy

import torch

import _guide as guide
from difflab.core.consistency import ConsistencyFunction
from difflab.pipelines.class_to_image import generate
from difflab.train import TrainConfig, fit
from difflab.train.distill import consistency_grid
from difflab.train.objectives.consistency import ConsistencyDistillation

BOUNDS = {
    "boundary_error_cm": (0.0, 0.0),            # f(x, sigma_min) = x exactly (c_skip = 1, c_out = 0)
    "boundary_c_out_lcm": (0.0, 0.0),           # LCM's form: c_out = 0 at t = 0 exactly
    "student_1_accuracy": (0.2, 1.0),           # after a tiny distillation of the fast model
    "teacher_1_frechet": (20.0, 1e4),           # one DDIM step of the teacher: a blur
    "student_1_frechet": (0.0, 1e4),
}
LEVELS = 18


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    torch.manual_seed(args.seed)
    teacher, _ = guide.digits_model(args.fast)
    world = guide.digits_world()
    teacher.requires_grad_(False)

    # 1. The boundary condition, in both parameterizations (Song et al. 2023, eq. 5; Luo et al. 2023).
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    lab = torch.arange(16) % 10
    cm = ConsistencyFunction(teacher, form="cm")
    lcm = ConsistencyFunction(teacher, form="lcm")
    with torch.no_grad():
        boundary_cm = (cm(x, cm.sigma_min, class_labels=lab) - x).abs().max().item()
    _, c_out = lcm.scalings(torch.tensor([lcm.sigma_min], dtype=torch.float64))

    # 2. Consistency distillation: the student is LCM's form around a copy of the teacher (VP model).
    student = ConsistencyFunction(copy.deepcopy(teacher).requires_grad_(True), form="lcm")
    objective = ConsistencyDistillation(student, teacher, N=LEVELS, solver="heun")
    steps = 8 if args.fast else 300
    config = TrainConfig(steps=steps, batch_size=64, lr=2e-4, ema_decay=0.99, checkpoint_every=0, log_every=10_000,
                         progress=False, seed=args.seed)
    state = fit(objective, {"x0": world["train"], "class_labels": world["train_labels"]}, config)
    state.ema.copy_to(objective.module)
    student.eval()

    # 3. 1, 2 and 4 steps: the student (consistency sampling) and the teacher (DDIM), the same noise.
    n = 50 if args.fast else 300
    labels = (torch.arange(n) % 10).tolist()
    rows = {}
    for k in (1, 2, 4):
        rows[f"teacher_{k}"] = generate(teacher, labels, shape=(1, 8, 8), sampler="ddim", steps=k, seed=args.seed,
                                        progress=False, batch_size=256)
        grid = torch.tensor(consistency_grid(student, k, LEVELS), dtype=torch.float64)
        rows[f"student_{k}"] = generate(student, labels, shape=(1, 8, 8), sampler="consistency", grid=grid,
                                        seed=args.seed, progress=False, batch_size=256)
    figures = {"boundary_error_cm": boundary_cm, "boundary_c_out_lcm": float(c_out[0])}
    figures.update(guide.judge_rows(world, rows, torch.tensor(labels)))
    figures = guide.report(figures)

    # 4. The picture: the same ten seeds, teacher and student at 1, 2, 4 steps.
    plt = guide.pyplot()
    names = ["teacher_1", "student_1", "teacher_2", "student_2", "teacher_4", "student_4"]
    fig, axes = plt.subplots(len(names), 10, figsize=(8, 0.9 * len(names) + 0.4))
    for r, name in enumerate(names):
        for c in range(10):
            axes[r, c].imshow(rows[name][c, 0], cmap="gray", vmin=-1, vmax=1)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name.replace("_", " ") + " st.", fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("Consistency distillation: teacher DDIM vs consistency student, 1/2/4 steps", fontsize=9)
    guide.save(fig, guide.picture(args, "32_consistency_models.png"))
    return figures


if __name__ == "__main__":
    main()
