"""Few-step students of the digits demo's model, judged like the demo (issue 14's table).

The teacher is the demo's class-conditional U-Net (``--teacher``: a run folder of ``difflab demo``
or ``difflab train``; trained here with the demo's recipe when missing), sampled with DDIM at 50
steps and classifier-free guidance ``--guidance`` as the reference. Each method distils it within
its CPU budget, through the same library calls as ``difflab distill``:

- ``progressive``: Salimans & Ho 2022, 64 -> 32 -> ... -> 1 DDIM steps; the students of the
  4-, 2- and 1-step rounds are judged;
- ``consistency``: Song et al. 2023, Algorithm 2 (Heun teacher steps on 18 Karras levels), sampled
  with 1, 2 and 4 steps of multistep consistency sampling;
- ``guided``: Meng et al. 2023, stage one (a student taking the guidance scale w in [1, 4] as an
  input) then its progressive rounds 64 -> ... -> 1, sampled at ``--guidance``;
- ``solver``: no training, the teacher itself: DDIM without guidance at 4, 2 and 1 steps, and
  DPM-Solver++(2M) with guidance at 2 and 1 steps (each step two evaluations: 4 and 2 NFE).

Each row: judge accuracy for the digit asked (500 samples, 50 per class), the judge-feature Frechet
distance to held-out digits, its ratio to the teacher's, and the wall time of the distillation.

    python bench/few_step_digits.py --teacher demo_out --out /tmp/few_step --write
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from difflab.core import grids
from difflab.core.consistency import ConsistencyFunction
from difflab.data import load_digits
from difflab.demos.digits import run_demo
from difflab.eval import DigitsJudge, judge_report
from difflab.io.spec import load_denoiser
from difflab.pipelines import generate
from difflab.train import TrainConfig, fit
from difflab.train.distill import consistency_grid, guided_teacher
from difflab.train.objectives.consistency import ConsistencyDistillation
from difflab.train.objectives.guided import GuidedDistillation, guided_progressive_distillation
from difflab.train.objectives.progressive import progressive_distillation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_run_options, record, start_run, write_section  # noqa: E402

SAMPLES_PER_CLASS = 50


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now: the CPU time of this process, both threads together, bounds the wall
    time the same work takes on a quiet machine (where the process never waits for a core)."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def judge(student, sampler: str, steps: int, grid, guidance: float, world: dict) -> dict:
    """Judge accuracy and Frechet distance of 500 class-balanced samples."""
    asked = torch.arange(10).repeat_interleave(SAMPLES_PER_CLASS)
    t0 = time.perf_counter()
    samples = generate(student, asked, shape=(1, 8, 8), sampler=sampler, steps=steps, grid=grid,
                       guidance_scale=guidance, seed=0, batch_size=250, progress=False)
    r = judge_report(world["judge"], samples, asked, world["held"], world["held_labels"], real_reference=world["train"])
    return {"accuracy": r["class_accuracy"], "frechet": r["frechet"], "floor": r["frechet_real_reference"],
            "sample_seconds": time.perf_counter() - t0}


def progressive_rows(teacher, world, args, null_class):
    t0 = clock()
    cfg = TrainConfig(steps=args.progressive_steps, batch_size=args.batch_size, lr=args.lr, ema_decay=0.999,
                      checkpoint_every=args.progressive_steps, log_every=args.progressive_steps, progress=False, seed=0)
    rounds = progressive_distillation(guided_teacher(teacher, args.guidance, null_class), world["data"], cfg,
                                      Path(args.out) / "progressive", sigmas=grids.for_denoiser(teacher, 64, "default"),
                                      student=copy.deepcopy(teacher).requires_grad_(True))
    seconds = since(t0)
    return [("progressive", r.steps, judge(r.denoiser, "ddim", r.steps, r.sigmas.float(), 1.0, world), seconds)
            for r in rounds if r.steps in (4, 2, 1)]


def consistency_rows(teacher, world, args, null_class):
    t0 = clock()
    student = ConsistencyFunction(copy.deepcopy(teacher).requires_grad_(True), form="lcm")
    objective = ConsistencyDistillation(student, guided_teacher(teacher, args.guidance, null_class), N=18)
    cfg = TrainConfig(steps=args.consistency_steps, batch_size=args.batch_size, lr=args.lr, ema_decay=0.999,
                      checkpoint_every=args.consistency_steps, log_every=args.consistency_steps, progress=False, seed=0)
    state = fit(objective, world["data"], cfg, Path(args.out) / "consistency")
    state.ema.copy_to(objective.module)
    seconds = since(t0)
    student.eval()
    return [("consistency", n, judge(student, "consistency", n, torch.tensor(consistency_grid(student, n, 18)), 1.0, world),
             seconds) for n in (4, 2, 1)]


def guided_rows(teacher, world, args, null_class):
    """Meng et al. 2023: stage one (w as an input, w in [1, 4]), then progressive rounds of it, sampled at w."""
    t0 = clock()
    one = GuidedDistillation(teacher, {"class_labels": null_class}, w_min=1.0, w_max=4.0)
    steps = args.guided_steps or args.progressive_steps
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, ema_decay=0.999,
                      checkpoint_every=steps, log_every=steps, progress=False, seed=0)
    state = fit(one, world["data"], cfg, Path(args.out) / "guided_stage1")
    state.ema.copy_to(one.module)
    rounds = guided_progressive_distillation(one.student, world["data"], cfg, Path(args.out) / "guided_stage2",
                                             w_min=1.0, w_max=4.0, sigmas=grids.for_denoiser(teacher, 64, "default"))
    seconds = since(t0)
    return [("guided (w as input)", r.steps, judge(r.denoiser, "ddim", r.steps, r.sigmas.float(), args.guidance, world),
             seconds) for r in rounds if r.steps in (4, 2, 1)]


def solver_rows(teacher, world, args, null_class):
    """No training: the teacher with few steps. Under guidance each step is two evaluations."""
    rows = [("teacher, DDIM, no guidance", n, judge(teacher, "ddim", n, "default", 1.0, world), (0.0, 0.0)) for n in (4, 2, 1)]
    rows += [(f"teacher, dpmpp_2m, guidance {args.guidance}", 2 * n, judge(teacher, "dpmpp_2m", n, "default", args.guidance,
                                                                          world), (0.0, 0.0)) for n in (2, 1)]
    return rows


def train_steps(name: str, args) -> str:
    """The optimizer steps a method's distillation takes, for the table."""
    guided = args.guided_steps or args.progressive_steps
    return {"progressive": f"6 x {args.progressive_steps}", "consistency": f"{args.consistency_steps}",
            "guided": f"{guided} + 6 x {guided}", "solver": "-"}[name]


METHODS = {"progressive": progressive_rows, "consistency": consistency_rows, "guided": guided_rows,
           "solver": solver_rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="run folder of the teacher (default: train one in OUT/teacher)")
    p.add_argument("--out", default="/tmp/difflab_few_step")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--methods", default="solver,progressive,consistency,guided")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--progressive-steps", type=int, default=300, help="optimizer steps per round (6 rounds)")
    p.add_argument("--consistency-steps", type=int, default=1500)
    p.add_argument("--guided-steps", type=int, default=None,
                   help="optimizer steps of stage one and of each stage-two round (default: --progressive-steps)")
    add_run_options(p, "few_step.json")
    args = p.parse_args(argv)
    merged_table = start_run(args, report)
    if merged_table is not None:
        return merged_table

    # 1. The teacher, the judge, the data.
    teacher_dir = Path(args.teacher or Path(args.out) / "teacher")
    if not (teacher_dir / "checkpoint.safetensors").exists():
        run_demo(teacher_dir)
    teacher, meta = load_denoiser(teacher_dir)
    teacher.requires_grad_(False)
    null_class = meta.get("null_class", teacher.net.config.num_classes)
    images, labels = load_digits(split="train")
    held, held_labels = load_digits(split="test")
    world = {"judge": DigitsJudge.load_or_train(teacher_dir / "digits_judge.safetensors"), "held": held,
             "held_labels": held_labels, "train": images, "data": {"x0": images, "class_labels": labels}}
    reference = judge(teacher, "ddim", 50, "default", args.guidance, world)
    print(f"teacher, DDIM 50 steps, guidance {args.guidance} (100 NFE): accuracy {reference['accuracy']:.1%}, "
          f"FD {reference['frechet']:.2f} (real-data floor {reference['floor']:.2f})", flush=True)

    # 2. The methods, one table.
    rows = []
    for name in args.methods.split(","):
        for method, nfe, r, seconds in METHODS[name](teacher, world, args, null_class):
            rows.append({"method": method, "train_steps": train_steps(name, args), "nfe": nfe, **r, "train_seconds": seconds[0], "train_cpu_seconds": seconds[1]})
            (Path(args.out) / "few_step.json").write_text(json.dumps(record(reference, rows, args), indent=1))
            print(f"{method:<32} {nfe:>3} NFE  accuracy {r['accuracy']:6.1%}  FD {r['frechet']:6.2f} "
                  f"({r['frechet'] / reference['frechet']:.2f}x teacher)  distillation {seconds[0]:5.0f}s wall, "
                  f"{seconds[1]:5.0f}s CPU", flush=True)
    (Path(args.out) / "few_step.json").write_text(json.dumps(record(reference, rows, args), indent=1))
    return report(reference, rows, args)


def report(reference: dict, rows: list, args) -> int:
    table = format_table(reference, rows, args)
    print(table)
    if args.write:
        write_section("bench/few_step_digits.py", "Few-step students of the digits model (`python bench/few_step_digits.py`)",
                      table)
    return 0


def format_table(reference: dict, rows: list, args) -> str:
    lines = [f"Machine: {args.machine}. Teacher: DDIM 50 steps, guidance {args.guidance}: accuracy "
             f"{reference['accuracy']:.1%}, FD {reference['frechet']:.2f} (real-data floor {reference['floor']:.2f}). "
             f"Batch {args.batch_size}, lr {args.lr}, EMA 0.999; steps: the optimizer steps of the distillation "
             "(progressive: 6 rounds 64 -> 1; guided: stage one + 6 rounds).", "",
             f"Distillation time: wall seconds as measured on the shared machine, and the process's CPU seconds "
             f"({args.threads} thread(s)), which bound the wall time on a quiet 2-core machine.", "",
             "| method | steps | NFE | judge accuracy | FD | FD / teacher | distillation: wall (CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('train_steps', '-')} | {r['nfe']} | {r['accuracy']:.1%} | {r['frechet']:.2f} | "
                     f"{r['frechet'] / reference['frechet']:.2f} | {seconds(r)} |")
    return "\n".join(lines)


def seconds(row: dict) -> str:
    """The distillation's wall (CPU) seconds, '-' for no training."""
    return f"{row['train_seconds']:.0f} s ({row['train_cpu_seconds']:.0f} s)" if row["train_cpu_seconds"] else "-"


if __name__ == "__main__":
    sys.exit(main())
