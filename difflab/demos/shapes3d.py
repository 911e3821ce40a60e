"""`difflab demo --3d`: 3-D generation, two ways.

Point clouds (the procedural shapes of :mod:`difflab.data.shapes3d`):

1. data: ``train_per_class`` shapes a class for training, ``samples_per_class`` held out a class;
2. the judge: a PointNet (:class:`~difflab.eval.point_judge.PointJudge`) trained on the training
   shapes, its accuracy on the held-out ones printed (the ceiling);
3. a class-conditional :class:`~difflab.nn.point_transformer.PointTransformer` trained by the one
   training loop on clouds of ``num_points`` points (v-prediction, cosine schedule);
4. sampling every class with classifier-free guidance (:func:`~difflab.pipelines.points.generate_points`),
   PLY files, a PNG of views and a turntable GIF;
5. per class: the judge's reading (and which classes it confused them with), and MMD / COV / 1-NNA under Chamfer (and EMD on a 64-point
   subsample) against the held-out shapes, beside a per-class Gaussian baseline and real training
   shapes against the held-out ones (real vs real).

Score distillation (:mod:`difflab.pipelines.score_distillation`):

6. the digits prior: the class-conditional U-Net of ``difflab demo`` (a run folder given as
   ``prior``, or trained here for ``prior_steps`` steps); for each (front digit, side digit) pair a
   voxel grid is distilled so its front render reads as the first digit and its side render
   (yaw 90) as the second; the digits judge reads renders from the two views and from views moved
   by up to 15 degrees in yaw or elevation. Renders and turntable GIFs are written.
7. ``report.json`` with every figure and the CPU seconds of each part.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..data import load_digits
from ..data.shapes3d import CLASSES, NUM_CLASSES, load_shapes3d
from ..eval import DigitsJudge
from ..eval.point_judge import PointJudge
from ..eval.point_metrics import shape_set_metrics
from ..io.images import save_grid
from ..io.ply import write_ply
from ..io.spec import build_denoiser, load_denoiser, make_spec
from ..io.turntable import save_turntable_gif, save_views_png
from ..io.video import save_gif
from ..nn.point_transformer import PointTransformerConfig
from ..nn.voxels import render_views
from ..pipelines.points import fit_gaussians, gaussian_points, generate_points
from ..pipelines.score_distillation import SDSConfig, View, distill_views, judge_views
from ..train import TrainConfig, train
from .digits import DEMO_SPEC, DEMO_TRAIN

NUM_POINTS = 256
TRAIN_PER_CLASS = 200


def points_spec(num_points: int = NUM_POINTS, knn: int = 0, local_blocks: int | None = 1) -> dict:
    """The demo's network: induced set attention (32 tokens) in 4 blocks of width 64; with ``knn`` > 0
    the first ``local_blocks`` blocks also a Point Transformer layer over each point's ``knn`` nearest
    neighbours (tried with knn=8 in the first block: no better at the demo's budget, docs/shapes3d.md)."""
    return make_spec("point_transformer", PointTransformerConfig(num_points=num_points, width=64, depth=4, num_heads=4,
                                                                 num_inducing=32, num_classes=NUM_CLASSES, knn=knn,
                                                                 local_blocks=local_blocks if knn else None),
                     {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"})


# 2,800 steps (stop 35; was 1,200): the judge reads 96.0% / 93.5% of the clouds as asked (two training seeds),
# against 82.5% / 85.5% at 1,200 (docs/shapes3d.md)
POINTS_TRAIN = TrainConfig(steps=2800, batch_size=32, lr=1e-3, lr_schedule="cosine", warmup_steps=50, ema_decay=0.995,
                           cfg_dropout=0.1, checkpoint_every=0, log_every=200, seed=0)
# Classifier-free guidance 1.5 (stop 34). Stop 36 probed 1.0-2.0 on the stop-35 model: 1.25 met one or two more classes'
# set bars at 50 clouds a class but read 90.5% as asked on a second sampling seed, at the judge's bar (docs/shapes3d.md)
POINTS_GUIDANCE = 1.5
PRIOR_TRAIN = dataclasses.replace(DEMO_TRAIN, steps=800, batch_size=64, checkpoint_every=0, log_every=200)
PAIRS = ((3, 7), (1, 4), (0, 8), (2, 5))
SDS = SDSConfig(steps=200, views_per_step=8, guidance_scale=5.0, lr=0.05)


# ----------------------------------------------------------------------------------------------
# point clouds


def set_rows(gen, ref, real, base, gen_labels, ref_labels, real_labels, base_labels, emd_points: int = 64) -> list[dict]:
    """Per class: MMD, COV and 1-NNA (Chamfer; EMD on ``emd_points`` points) of the generated,
    real (training) and baseline sets against the held-out reference."""
    rows = []
    for c in range(NUM_CLASSES):
        r = ref[ref_labels == c]
        row = {"class": CLASSES[c]}
        for name, x, lab in (("gen", gen, gen_labels), ("real", real, real_labels), ("gauss", base, base_labels)):
            row[name] = shape_set_metrics(x[lab == c], r, "chamfer")
            row[name]["emd_1nna"] = shape_set_metrics(x[lab == c], r, "emd", emd_points)["1nna"] if emd_points else None
        rows.append(row)
    return rows


def run_points(out_dir: Path, *, steps, sampler, sampling_steps, guidance_scale, samples_per_class, num_points, seed,
               progress) -> dict:
    c0 = time.process_time()
    pts, labels = load_shapes3d("train", per_class=TRAIN_PER_CLASS, num_points=num_points, seed=seed)
    held, held_labels = load_shapes3d("test", per_class=samples_per_class, num_points=num_points, seed=seed)
    print(f"[1/7] data: {len(pts)} training shapes, {len(held)} held out ({NUM_CLASSES} classes, {num_points} points)")

    c1 = time.process_time()
    judge = PointJudge.fit(pts, labels)
    judge_cpu = time.process_time() - c1
    judge_real = judge.accuracy(held, held_labels)
    print(f"[2/7] point judge (PointNet) in {judge_cpu:.0f} CPU s: {judge_real:.1%} on held-out real shapes")

    config = dataclasses.replace(POINTS_TRAIN, progress=progress, **({} if steps is None else {"steps": steps}))
    spec = points_spec(num_points)
    print(f"[3/7] training a class-conditional point transformer for {config.steps} steps (batch {config.batch_size})")
    c2 = time.process_time()
    denoiser = build_denoiser(spec, seed=config.seed)
    state = train(denoiser, (pts, labels), config, out_dir / "points_model", spec=spec, metadata={"num_points": num_points},
                  resume=False)
    train_cpu = time.process_time() - c2
    state.ema.copy_to(denoiser.net)
    denoiser.eval()

    c3 = time.process_time()
    asked = torch.arange(NUM_CLASSES).repeat_interleave(samples_per_class)
    names = [f"{CLASSES[c]}_{i:03d}" for c in range(NUM_CLASSES) for i in range(samples_per_class)]
    gen = generate_points(denoiser, asked, num_points=num_points, sampler=sampler, steps=sampling_steps,
                          guidance_scale=guidance_scale, seed=seed, batch_size=100, progress=progress)
    sample_cpu = time.process_time() - c3
    first = torch.arange(NUM_CLASSES) * samples_per_class
    for i in range(2):
        for k in (first + i).tolist():
            write_ply(out_dir / "ply" / f"{names[k]}.ply", gen[k])
    save_views_png(gen[first], out_dir / "point_views.png", nrow=5)
    save_turntable_gif(gen[first], out_dir / "points_turntable.gif", nrow=5)
    save_turntable_gif(held[first], out_dir / "real_turntable.gif", nrow=5)
    print(f"[4/7] sampled {len(gen)} clouds ({sampler}, {sampling_steps} steps, guidance {guidance_scale}) in "
          f"{sample_cpu:.0f} CPU s; PLY, point_views.png and points_turntable.gif in {out_dir}")

    c4 = time.process_time()
    means, covs = fit_gaussians(pts, labels, NUM_CLASSES)
    base = gaussian_points(means, covs, asked, num_points, seed=seed)
    real_idx = torch.cat([torch.nonzero(labels == c)[:samples_per_class, 0] for c in range(NUM_CLASSES)])
    real, real_labels = pts[real_idx], labels[real_idx]
    rows = set_rows(gen, held, real, base, asked, held_labels, real_labels, asked)
    read = judge.logits(gen).argmax(1)
    for c, row in enumerate(rows):
        row["judge"] = (read[asked == c] == c).float().mean().item()
        row["read_as"] = {CLASSES[k]: int((read[asked == c] == k).sum()) for k in range(NUM_CLASSES)
                          if k != c and (read[asked == c] == k).any()}   # the judge's confusions, as counts
    metrics_cpu = time.process_time() - c4
    report = {
        "num_points": num_points, "train_shapes": len(pts), "held_out": len(held), "steps": config.steps,
        "sampler": sampler, "sampling_steps": sampling_steps, "guidance_scale": guidance_scale,
        "judge_real_accuracy": judge_real, "judge_generated_accuracy": judge.accuracy(gen, asked),
        "judge_baseline_accuracy": judge.accuracy(base, asked), "per_class": rows,
        "cpu_seconds": {"data": round(c1 - c0, 1), "judge": round(judge_cpu, 1), "train": round(train_cpu, 1),
                        "sample": round(sample_cpu, 1), "metrics": round(metrics_cpu, 1)},
    }
    print("[5/7] per class, against the held-out shapes (1-NNA: 50% ideal; COV: higher is better):")
    print(format_points(report))
    return report


def format_points(r: dict) -> str:
    lines = [f"  judge: {r['judge_real_accuracy']:.1%} on real held-out, {r['judge_generated_accuracy']:.1%} on generated "
             f"(as asked), {r['judge_baseline_accuracy']:.1%} on the Gaussian baseline",
             "  class       judge  | 1-NNA CD gen / gauss / real | 1-NNA EMD gen / real | COV CD gen / gauss / real | MMD CD gen / real"]
    for row in r["per_class"]:
        g, b, q = row["gen"], row["gauss"], row["real"]
        lines.append(f"  {row['class']:<10} {row['judge']:6.0%}  | {g['1nna']:6.0%} {b['1nna']:6.0%} {q['1nna']:6.0%}      "
                     f"| {g['emd_1nna']:6.0%} {q['emd_1nna']:6.0%}        | {g['cov']:6.0%} {b['cov']:6.0%} {q['cov']:6.0%}    "
                     f"| {g['mmd'] * 1e3:6.2f} {q['mmd'] * 1e3:6.2f} (x1e-3)")
    confused = [f"{row['class']} as " + ", ".join(f"{k} {n}" for k, n in row["read_as"].items())
                for row in r["per_class"] if row.get("read_as")]
    if confused:
        lines.append("  generated clouds the judge read as another class (counts): " + "; ".join(confused))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# score distillation


def digits_prior(out_dir: Path, prior, prior_steps, progress: bool):
    """(denoiser, where it came from): the run folder ``prior``, else the digits demo's model trained here."""
    if prior is not None:
        denoiser, _ = load_denoiser(prior)
        return denoiser, str(prior)
    images, labels = load_digits(split="train")
    config = dataclasses.replace(PRIOR_TRAIN, progress=progress, **({} if prior_steps is None else {"steps": prior_steps}))
    denoiser = build_denoiser(DEMO_SPEC, seed=config.seed)
    state = train(denoiser, (images, labels), config, out_dir / "digits_prior", spec=DEMO_SPEC, resume=False)
    state.ema.copy_to(denoiser.net)
    return denoiser.eval(), f"trained here ({config.steps} steps, batch {config.batch_size})"


def run_sds(out_dir: Path, *, prior, prior_steps, sds_steps, pairs, guidance_scale, method, seed, progress) -> dict:
    c0 = time.process_time()
    denoiser, source = digits_prior(out_dir, prior, prior_steps, progress)
    prior_cpu = time.process_time() - c0
    judge = DigitsJudge.load_or_train(out_dir / "digits_judge.safetensors")
    print(f"[6/7] score distillation ({method}) with the digits prior ({source}, {prior_cpu:.0f} CPU s): "
          f"{len(pairs)} (front, side) pairs, {sds_steps} steps each")
    config = dataclasses.replace(SDS, steps=sds_steps, method=method, seed=seed,
                                 **({} if guidance_scale is None else {"guidance_scale": guidance_scale}))
    rows, renders, spins = [], [], []
    c1 = time.process_time()
    for a, b in pairs:
        views = [View(0.0, 0.0, a), View(90.0, 0.0, b)]
        grid, _ = distill_views(denoiser, views, config)
        r = judge_views(grid, judge, views)
        rows.append({"front": a, "side": b, **r})
        print(f"      front {a} / side {b}: {r['accuracy']:.0%} of {r['n']} renders read as asked "
              f"(front {r['by_view'][0]:.0%}, side {r['by_view'][1]:.0%}; on target {r['on_target']:.0%})")
        with torch.no_grad():
            renders.append(render_views(grid, torch.tensor([0.0, 15.0, 45.0, 75.0, 90.0, 105.0]), torch.zeros(6), 8))
            yaws = torch.arange(0.0, 360.0, 15.0)
            frames = render_views(grid, yaws, torch.full_like(yaws, 10.0), 32, supersample=1)   # (F, 1, 32, 32)
            spins.append(frames.permute(1, 0, 2, 3)[None])
    sds_cpu = time.process_time() - c1
    save_grid(torch.cat(renders), out_dir / "sds_views.png", nrow=6, upscale=6)
    save_gif(torch.cat(spins), out_dir / "sds_turntable.gif", nrow=len(pairs), upscale=2, fps=8)
    accuracy = sum(r["accuracy"] * r["n"] for r in rows) / sum(r["n"] for r in rows)
    print(f"      all pairs: {accuracy:.1%} read as the target digit; sds_views.png (yaw 0, 15, 45, 75, 90, 105) and "
          f"sds_turntable.gif in {out_dir}")
    return {"prior": source, "method": method, "steps": sds_steps, "guidance_scale": config.guidance_scale, "pairs": rows,
            "accuracy": accuracy, "cpu_seconds": {"prior": round(prior_cpu, 1), "distill": round(sds_cpu, 1)}}


# ----------------------------------------------------------------------------------------------
# the demo


def run_shapes3d_demo(out_dir="demo_3d_out", *, steps: int | None = None, sampler: str = "ddim", sampling_steps: int = 60,
                      guidance_scale: float = POINTS_GUIDANCE, samples_per_class: int = 20, num_points: int = NUM_POINTS, seed: int = 0,
                      prior=None, prior_steps: int | None = None, sds_steps: int = 200, sds_guidance: float | None = None,
                      pairs=PAIRS, method: str = "sds", points: bool = True, sds: bool = True, progress: bool = True) -> dict:
    """Run the point-cloud part (``points``) and the score-distillation part (``sds``); write
    ``report.json`` and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if samples_per_class < 2:
        raise ValueError(f"samples_per_class={samples_per_class} must be >= 2 (the set metrics compare sets)")
    c_start, t_start = time.process_time(), time.time()
    report = {"threads": torch.get_num_threads()}
    if points:
        report["points"] = run_points(out_dir, steps=steps, sampler=sampler, sampling_steps=sampling_steps,
                                      guidance_scale=guidance_scale, samples_per_class=samples_per_class,
                                      num_points=num_points, seed=seed, progress=progress)
    if sds:
        report["sds"] = run_sds(out_dir, prior=prior, prior_steps=prior_steps, sds_steps=sds_steps, pairs=pairs,
                                guidance_scale=sds_guidance, method=method, seed=seed, progress=progress)
    report.update(cpu_seconds=round(time.process_time() - c_start, 1), wall_seconds=round(time.time() - t_start, 1))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"[7/7] report.json in {out_dir}: {report['cpu_seconds']:.0f} CPU s ({report['threads']} thread(s)), "
          f"{report['wall_seconds']:.0f} s wall")
    return report


__all__ = ["run_shapes3d_demo", "points_spec", "POINTS_TRAIN", "POINTS_GUIDANCE", "PRIOR_TRAIN", "PAIRS", "SDS", "format_points"]
