"""Super-resolution on the digits: SR3-style models against bicubic upsampling on held-out digits,
and the effect of the noise-conditioning augmentation level on the cascade (CDM).

1. SR vs bicubic: held-out digits downsampled (area) to low resolution, brought back up by bicubic
   interpolation and by an unconditional SR model (:class:`difflab.nn.SRUNet`, trained on the train
   split with augmentation), and by the cascade demo's class-conditional x2 stage. Judge accuracy
   at the high resolution (the true class), Frechet distance to the held-out truth, and the
   consistency RMSE (the output area-averaged back to the low resolution vs its input).
2. The augmentation sweep: the cascade demo's base and x2 stage (``--demo``, a run folder of
   ``difflab demo --cascade``) sampled at several levels s, non-truncated and truncated; judge
   accuracy and Frechet distance at 16x16.

    python bench/sr_digits.py --demo demo_cascade_out --out /tmp/sr_bench [--write]

Records into BENCHMARKS.md with ``--write``. Times are wall and process CPU seconds (one thread).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine, write_section  # noqa: E402

from difflab.data import load_digits  # noqa: E402
from difflab.demos.cascade import SR_AUGMENT, SR_BACKBONE, SR_TRAIN, train_stage  # noqa: E402
from difflab.eval import DigitsJudge  # noqa: E402
from difflab.eval.features import JudgeFeatures  # noqa: E402
from difflab.eval.metrics import fid  # noqa: E402
from difflab.io.images import save_grid  # noqa: E402
from difflab.io.spec import load_denoiser, make_spec  # noqa: E402
from difflab.nn.sr import SRUNetConfig, upsample  # noqa: E402
from difflab.pipelines import SampleOptions, cascade, super_resolve  # noqa: E402
from difflab.pipelines.super_resolution import rmse  # noqa: E402

DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"}
LEVELS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


def scores(judge, out, truth, labels, low) -> dict:
    feats = JudgeFeatures(judge)
    return {"accuracy": judge.accuracy(out, labels), "frechet": fid(feats(out), feats(truth)),
            "rmse": rmse(F.adaptive_avg_pool2d(out, low.shape[-1]), low)}


def sr_rows(judge, out_dir: Path, demo: Path | None, steps: int, sampling_steps: int) -> list[dict]:
    """SR vs bicubic, x2 4->8, x4 4->16 (unconditional models trained here) and x2 8->16 (the demo's stage)."""
    rows = []
    for name, lo_size, hi_size in (("x2 4->8", 4, 8), ("x4 4->16", 4, 16)):
        high, labels = load_digits(hi_size, split="train")
        low = load_digits(lo_size, split="train")[0]
        backbone = dataclasses.replace(SR_BACKBONE, num_classes=None)
        spec = make_spec("sr_unet", SRUNetConfig(unet=backbone.to_dict(), factor=hi_size // lo_size), DIFFUSION)
        t0, c0 = time.perf_counter(), time.process_time()
        sr = train_stage(spec, high, None, low, dataclasses.replace(SR_TRAIN, steps=steps, progress=False),
                         out_dir / name.split()[0] / str(lo_size), augment=SR_AUGMENT)
        rows.append(evaluate_sr(judge, name, sr, lo_size, hi_size, None, sampling_steps, out_dir,
                                train=(time.perf_counter() - t0, time.process_time() - c0)))
    if demo is not None:
        sr, _ = load_denoiser(demo / "sr_x2")
        rows.append(evaluate_sr(judge, "x2 8->16 (demo stage, class-conditional)", sr, 8, 16, True, sampling_steps, out_dir))
    return rows


def evaluate_sr(judge, name, sr, lo_size, hi_size, with_labels, sampling_steps, out_dir: Path, train=(0.0, 0.0)) -> dict:
    truth, labels = load_digits(hi_size, split="test")
    low = load_digits(lo_size, split="test")[0]
    t0, c0 = time.perf_counter(), time.process_time()
    out = super_resolve(sr, low, labels if with_labels else None, steps=sampling_steps, progress=False, batch_size=400)
    cost = (time.perf_counter() - t0, time.process_time() - c0)
    bicubic = upsample(low, (hi_size, hi_size), "bicubic").clamp(-1, 1)
    first = torch.tensor([int(torch.nonzero(labels == c)[0]) for c in range(10)])  # one held-out digit per class
    rows = [upsample(low[first], (hi_size, hi_size), "nearest"), bicubic[first], out[first], truth[first]]
    picture = save_grid(upsample(torch.cat(rows), (16, 16), "nearest"), out_dir / f"{name.split()[0]}_{lo_size}.png",
                        nrow=10, upscale=4)
    row = {"name": name, "sr": scores(judge, out, truth, labels, low), "bicubic": scores(judge, bicubic, truth, labels, low),
           "truth": judge.accuracy(truth, labels), "train_seconds": train[0], "train_cpu_seconds": train[1],
           "sample_seconds": cost[0], "sample_cpu_seconds": cost[1], "picture": str(picture)}
    print(json.dumps(row), flush=True)
    return row


def sweep_rows(judge, demo: Path, samples_per_class: int, sampling_steps: int) -> list[dict]:
    """The cascade's judge accuracy and Frechet distance at 16x16 against the augmentation level."""
    base, _ = load_denoiser(demo / "base")
    sr, _ = load_denoiser(demo / "sr_x2")
    held, held_labels = load_digits(16, split="test")
    feats = JudgeFeatures(judge)
    held_feats = feats(held)
    asked = torch.arange(10).repeat_interleave(samples_per_class)
    rows = []
    for truncated in (False, True):
        for s in LEVELS:
            if truncated and s == 0:
                continue
            c0 = time.process_time()
            out = cascade(base, [sr], asked, shape=(1, 8, 8), aug_sigma=s, truncated=truncated,
                          options=[stage(sampling_steps, 1.5), stage(sampling_steps, 1.0)])
            row = {"aug_sigma": s, "truncated": truncated, "accuracy": judge.accuracy(out, asked),
                   "frechet": fid(feats(out), held_feats), "cpu_seconds": time.process_time() - c0}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def stage(steps: int, guidance_scale: float) -> SampleOptions:
    return SampleOptions(steps=steps, guidance_scale=guidance_scale, progress=False, batch_size=250)


def floor(judge, n: int) -> float:
    """The Frechet distance of n real 16x16 train digits to the held-out ones (the real-data floor)."""
    train16 = load_digits(16, split="train")[0]
    pick = torch.randperm(len(train16), generator=torch.Generator().manual_seed(0))[:n]
    feats = JudgeFeatures(judge)
    return fid(feats(train16[pick]), feats(load_digits(16, split="test")[0]))


def table(sr: list[dict], sweep: list[dict], real_floor: float | None, args) -> str:
    lines = [f"Machine: {machine()}.", "",
             "Held-out digits (359) downsampled by area averaging, brought back up by bicubic interpolation and by SR "
             f"models (DDIM, {args.sampling_steps} steps); the judge reads the high-resolution outputs (it area-averages "
             "them to 8x8). RMSE: the output area-averaged to the low resolution vs its input ([-1, 1] range). SR "
             f"models trained {args.sr_steps} steps (batch {SR_TRAIN.batch_size}, augmentation s ~ U(0, "
             f"{SR_AUGMENT['sigma_max']}), {SR_AUGMENT['p_clean']:.0%} clean), unconditional unless said.", "",
             "| task | judge accuracy: SR | bicubic | truth | Frechet: SR | bicubic | RMSE: SR | bicubic | train s (CPU s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sr:
        lines.append(f"| {r['name']} | {r['sr']['accuracy']:.1%} | {r['bicubic']['accuracy']:.1%} | {r['truth']:.1%} | "
                     f"{r['sr']['frechet']:.2f} | {r['bicubic']['frechet']:.2f} | {r['sr']['rmse']:.3f} | "
                     f"{r['bicubic']['rmse']:.3f} | {r['train_seconds']:.0f} ({r['train_cpu_seconds']:.0f}) |")
    if sweep:
        lines += ["", f"The cascade demo's base (8x8, guidance 1.5) and x2 stage sampled at augmentation level s, "
                  f"{args.samples_per_class} samples per class, DDIM {args.sampling_steps} steps per stage; at 16x16. "
                  f"Real-data floor (500 real train digits vs held-out): Frechet {real_floor:.2f}.", "",
                  "| s | augmentation | judge accuracy | Frechet | CPU s |", "| --- | --- | --- | --- | --- |"]
        for r in sweep:
            lines.append(f"| {r['aug_sigma']:g} | {'truncated' if r['truncated'] else 'non-truncated'} | "
                         f"{r['accuracy']:.1%} | {r['frechet']:.2f} | {r['cpu_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=None, help="a run folder of difflab demo --cascade (base/, sr_x2/)")
    p.add_argument("--out", type=Path, default=Path("/tmp/sr_bench"))
    p.add_argument("--sr-steps", type=int, default=SR_TRAIN.steps)
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="record the tables in BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    judge = DigitsJudge.load_or_train(args.demo / "digits_judge.safetensors" if args.demo else args.out / "digits_judge.safetensors")
    sr = sr_rows(judge, args.out, args.demo, args.sr_steps, args.sampling_steps)
    sweep = [] if args.no_sweep or args.demo is None else sweep_rows(judge, args.demo, args.samples_per_class, args.sampling_steps)
    text = table(sr, sweep, floor(judge, 10 * args.samples_per_class) if sweep else None, args)
    print(text)
    (args.out / "sr_digits.json").write_text(json.dumps({"sr": sr, "sweep": sweep}, indent=2))
    if args.write:
        shutil.copyfile(sr[1]["picture"], Path(__file__).resolve().parents[1] / "docs" / "sr_digits.png")
        write_section("bench/sr_digits.py", "Super-resolution and cascaded diffusion on the digits", text)


if __name__ == "__main__":
    main()
