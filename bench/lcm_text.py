"""Latent consistency models of the text demo's model: LCM and LCM-LoRA students, judged like the demo.

The teacher is the latent text-to-image model of ``difflab demo --text`` (``--teacher``: the
demo's output folder, whose ``model.safetensors`` it reads; trained here with the demo's recipe
when missing), sampled with DDIM at 50 steps and guidance ``--guidance`` (100 evaluations) as the
reference. Each student is distilled through the same calls as ``difflab distill --method
lcm|lcm-lora`` and sampled with the LCM sampler at 1, 2 and 4 steps (one evaluation each):

- ``lcm``: Luo et al. 2023a, the whole U-Net with w as an input, sampled at w = ``--guidance``;
- ``lcm-lora``: Luo et al. 2023b, a LoRA on the teacher's U-Net (rank ``--rank``), guidance 1.

Each row: the judge's accuracy for the digit the prompt names (every digit x every template,
training and held-out, ``--per-prompt`` images each), the judge-feature Frechet distance to held-out
16x16 digits and its ratio to the teacher's, and the distillation's wall and CPU seconds.

    python bench/lcm_text.py --teacher demo_text_out --out /tmp/lcm --write
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from difflab.data import load_digits
from difflab.demos import text as dt
from difflab.eval import DigitsJudge, judge_report
from difflab.io.text_model import is_text_model, read_text_model
from difflab.pipelines.folder import load_text_model, sample_text_model
from difflab.pipelines.options import TEXT_DEFAULTS
from difflab.train.distill import DistillConfig, caption_data, distill_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_run_options, record, start_run, write_section  # noqa: E402


def prompts(per_prompt: int) -> tuple[list[str], torch.Tensor]:
    templates = dt.TRAIN_TEMPLATES + dt.HELD_OUT_TEMPLATES
    texts = [dt.caption(d, t) for d in range(10) for t in templates for _ in range(per_prompt)]
    asked = torch.arange(10).repeat_interleave(len(templates) * per_prompt)
    return texts, asked


def judged(model, options, world) -> dict:
    texts, asked = prompts(world["per_prompt"])
    t0 = time.perf_counter()
    images = sample_text_model(model, texts, options=options.replace(batch_size=250, progress=False))
    r = judge_report(world["judge"], images, asked, world["held"], world["held_labels"], real_reference=world["train"])
    return {"accuracy": r["class_accuracy"], "frechet": r["frechet"], "floor": r["frechet_real_reference"],
            "sample_seconds": time.perf_counter() - t0}


def student_rows(method: str, teacher, world, args):
    """Distil ``method`` and judge it at 4, 2 and 1 steps after each count of ``--judge-at``: one
    run, continued (the learning rate is constant, so its first S steps are an S-step run); the
    times are the run's up to that point (the caption data included, the judging between excluded)."""
    out = Path(args.out) / method
    lr = args.lora_lr if method == "lcm-lora" and args.lora_lr is not None else args.lr
    images, labels = load_digits(size=16, split="train")
    index, captions = dt.caption_dataset(labels, dt.TRAIN_TEMPLATES)
    wall, cpu = 0.0, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    data, uncond = caption_data(teacher.text_encoder, teacher.vae, images[index], captions, seed=0)
    for steps in sorted(int(s) for s in args.judge_at.split(",")):
        config = DistillConfig(method=method, steps=steps, batch_size=args.batch_size, lr=lr,
                               guidance_scale=args.guidance, w_min=args.w_min, w_max=args.w_max, rank=args.rank,
                               student_steps=4, checkpoint_every=steps, progress=False)
        distill_text(teacher.denoiser, teacher.text_encoder, teacher.vae, teacher.meta["spec"], data, uncond, config,
                     out, sampling_size=teacher.sampling)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        student = load_text_model(out)
        base = TEXT_DEFAULTS.replace(sampler="lcm", grid="lcm", guidance_scale=student.sampling["guidance_scale"])
        for n in (4, 2, 1):
            yield {"method": method, "steps": steps, "lr": lr, "nfe": n, **judged(student, base.replace(steps=n), world),
                   "train_seconds": wall, "train_cpu_seconds": cpu}
        t0, c0 = time.perf_counter(), time.process_time()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="output folder of difflab demo --text (default: train one in OUT/teacher)")
    p.add_argument("--out", default="/tmp/difflab_lcm")
    p.add_argument("--methods", default="lcm,lcm-lora")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--w-min", type=float, default=1.0)
    p.add_argument("--w-max", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-lr", type=float, default=None, help="lcm-lora's learning rate (default: --lr)")
    p.add_argument("--judge-at", default="300", help="judge the students after these step counts of one run, e.g. 150,300")
    p.add_argument("--no-baselines", action="store_true", help="skip the teacher's own few-step rows")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--per-prompt", type=int, default=4)
    add_run_options(p, "lcm.json")
    args = p.parse_args(argv)
    merged_table = start_run(args, report)
    if merged_table is not None:
        return merged_table

    # 1. The teacher, the judge, the data.
    teacher_dir = Path(args.teacher or Path(args.out) / "teacher")
    if not is_text_model(teacher_dir):
        dt.run_text_demo(teacher_dir, progress=False)
    teacher = read_text_model(teacher_dir)
    held, held_labels = load_digits(size=16, split="test")
    world = {"judge": DigitsJudge.load_or_train(Path(args.out) / "digits_judge.safetensors"), "held": held,
             "held_labels": held_labels, "train": load_digits(size=16, split="train")[0], "per_prompt": args.per_prompt}
    reference = judged(teacher, TEXT_DEFAULTS.replace(sampler="ddim", steps=50, guidance_scale=args.guidance), world)
    print(f"teacher, DDIM 50 steps, guidance {args.guidance} (100 NFE): accuracy {reference['accuracy']:.1%}, "
          f"FD {reference['frechet']:.2f} (real-data floor {reference['floor']:.2f})", flush=True)

    # 2. The students, one table; first the teacher itself at few steps (no training).
    rows = [] if args.no_baselines else [
            {"method": f"teacher, DDIM, guidance {g:g}", "steps": 0, "lr": 0.0, "nfe": n * (2 if g != 1 else 1),
             **judged(teacher, TEXT_DEFAULTS.replace(sampler="ddim", steps=n, guidance_scale=g), world),
             "train_seconds": 0.0, "train_cpu_seconds": 0.0} for g, steps in ((1.0, (4, 2, 1)), (args.guidance, (2, 1)))
            for n in steps]
    for method in args.methods.split(","):
        for r in student_rows(method, teacher, world, args):
            rows.append(r)
            (Path(args.out) / "lcm.json").write_text(json.dumps(record(reference, rows, args), indent=1))
            print(f"{method:<9} {r['steps']:>4} steps, lr {r['lr']:g}: {r['nfe']} NFE  accuracy {r['accuracy']:6.1%}  FD {r['frechet']:6.2f} "
                  f"({r['frechet'] / reference['frechet']:.2f}x teacher)  distillation {r['train_seconds']:.0f}s wall, "
                  f"{r['train_cpu_seconds']:.0f}s CPU", flush=True)
    (Path(args.out) / "lcm.json").write_text(json.dumps(record(reference, rows, args), indent=1))
    return report(reference, rows, args)


def report(reference: dict, rows: list, args) -> int:
    text = "\n".join([
        f"Machine: {args.machine}. Teacher: the text demo's latent model, DDIM 50 steps, guidance {args.guidance} (100 NFE): "
        f"accuracy {reference['accuracy']:.1%}, FD {reference['frechet']:.2f} (real-data floor {reference['floor']:.2f}). "
        f"Batch {args.batch_size}, w in [{args.w_min}, {args.w_max}], LoRA rank {args.rank}; each student judged "
        f"after {sorted({r['steps'] for r in rows if r['steps']})} steps of one run (constant lr). Distillation time: wall seconds as measured on the "
        f"shared machine, and the process's CPU seconds ({args.threads} thread(s)), which bound the wall time on a "
        "quiet 2-core machine.", "",
        "| student | steps | lr | NFE | judge accuracy | FD | FD / teacher | distillation: wall (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {r['method']} | {r['steps'] or '-'} | {format(r['lr'], 'g') if r['lr'] else '-'} | {r['nfe']} | {r['accuracy']:.1%} | {r['frechet']:.2f} | "
          f"{r['frechet'] / reference['frechet']:.2f} | {seconds(r)} |"
          for r in rows]])
    print(text)
    if args.write:
        write_section("bench/lcm_text.py", "Latent consistency models of the text demo (`python bench/lcm_text.py`)", text)
    return 0


def seconds(row: dict) -> str:
    """The distillation's wall (CPU) seconds, '-' for no training."""
    return f"{row['train_seconds']:.0f} s ({row['train_cpu_seconds']:.0f} s)" if row["train_cpu_seconds"] else "-"


if __name__ == "__main__":
    sys.exit(main())
