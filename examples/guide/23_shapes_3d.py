"""Chapter 23: 3-D shape generation with diffusion: point clouds, and score distillation.

Two routes, small. (1) Point-cloud diffusion (Point-E, PVD): a permutation-equivariant point
transformer learns to denoise clouds of 64 points of three shape classes (sphere, cube, torus);
its samples are compared with held-out shapes by the field's set measures (Chamfer distance,
MMD, COV, 1-NNA) beside a per-class Gaussian blob and beside real training shapes. (2) Score
distillation (DreamFusion's SDS): a 16^3 voxel grid is optimized through a differentiable renderer
until the guide's 2-D digits model reads its front view as one digit and its side view as another.
``python examples/guide/23_shapes_3d.py [--fast --out DIR]`` (full: 25 CPU s on one thread of the
2-core CPU with the cached digits model; the fast run about 8 CPU s with the imports).
"""
from __future__ import annotations

import tempfile

import torch

import _guide as guide
from difflab.data.shapes3d import CLASSES, load_shapes3d
from difflab.eval.point_metrics import shape_set_metrics
from difflab.io.spec import build_denoiser, make_spec
from difflab.nn.point_transformer import PointTransformerConfig
from difflab.nn.voxels import render_views
from difflab.pipelines.points import fit_gaussians, gaussian_points, generate_points
from difflab.pipelines.score_distillation import SDSConfig, View, distill_views, judge_views
from difflab.train import TrainConfig, train

BOUNDS = {
    "identical_chamfer_mmd": (0.0, 0.0),        # a set against itself: MMD 0,
    "identical_cov": (1.0, 1.0),                # every reference covered,
    "identical_1nna": (0.0, 0.0),               # and each cloud's nearest neighbour its copy
    "real_1nna": (0.2, 0.8),                    # two samples of the same shapes: near 50%
    "gauss_1nna": (0.8, 1.0),                   # a Gaussian blob is told apart from surfaces
    "gen_1nna": (0.3, 1.0),                     # the tiny model after a few steps
    "sds_accuracy": (0.25, 1.0),               # the fast prior, 25 steps: at least the front view reads
}
SHAPES = (0, 1, 4)   # sphere, cube, torus
POINTS = 64
PAIR = (1, 7)        # front view reads 1, side view reads 7


def point_clouds(args) -> tuple[dict, dict]:
    """Train, sample and measure the point-cloud model; returns (figures, clouds to draw)."""
    per_ref = 10 if args.fast else 20
    pts, labels = load_shapes3d("train", per_class=100, num_points=POINTS, seed=args.seed, classes=SHAPES)
    held, held_labels = load_shapes3d("test", per_class=per_ref, num_points=POINTS, seed=args.seed, classes=SHAPES)
    labels = torch.tensor([SHAPES.index(int(c)) for c in labels])           # classes 0, 1, 2
    held_labels = torch.tensor([SHAPES.index(int(c)) for c in held_labels])
    spec = make_spec("point_transformer", PointTransformerConfig(num_points=POINTS, width=32, depth=2, num_heads=2,
                                                                 num_classes=len(SHAPES)),
                     {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"})
    config = TrainConfig(steps=40 if args.fast else 600, batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.99,
                         cfg_dropout=0.1, checkpoint_every=0, log_every=10_000, progress=False, seed=args.seed)
    denoiser = build_denoiser(spec, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        state = train(denoiser, (pts, labels), config, tmp, spec=spec)
    state.ema.copy_to(denoiser.net)
    denoiser.eval()
    asked = torch.arange(len(SHAPES)).repeat_interleave(per_ref)
    gen = generate_points(denoiser, asked, num_points=POINTS, sampler="ddim", steps=10 if args.fast else 40,
                          guidance_scale=1.5, seed=args.seed, progress=False)
    means, covs = fit_gaussians(pts, labels, len(SHAPES))
    gauss = gaussian_points(means, covs, asked, POINTS, seed=args.seed)
    real = torch.cat([pts[labels == c][:per_ref] for c in range(len(SHAPES))])
    rows = {name: [shape_set_metrics(x[asked == c], held[held_labels == c]) for c in range(len(SHAPES))]
            for name, x in (("gen", gen), ("gauss", gauss), ("real", real))}
    same = shape_set_metrics(held[:per_ref], held[:per_ref].clone())
    figures = {"identical_chamfer_mmd": same["mmd"], "identical_cov": same["cov"], "identical_1nna": same["1nna"]}
    for name, r in rows.items():
        figures[f"{name}_1nna"] = sum(m["1nna"] for m in r) / len(r)
        figures[f"{name}_cov"] = sum(m["cov"] for m in r) / len(r)
        figures[f"{name}_mmd_x1e3"] = 1e3 * sum(m["mmd"] for m in r) / len(r)
    for c, name in enumerate(CLASSES[i] for i in SHAPES):
        figures[f"gen_1nna_{name}"] = rows["gen"][c]["1nna"]
    first = torch.arange(len(SHAPES)) * per_ref
    return figures, {"generated": gen[first], "gaussian": gauss[first], "held-out": held[first]}


def score_distillation(args, world) -> tuple[dict, torch.Tensor]:
    """SDS of one (front, side) pair with the guide's digits model; the judge reads 26 renders."""
    prior, _ = guide.digits_model(args.fast)
    views = [View(0.0, 0.0, PAIR[0]), View(90.0, 0.0, PAIR[1])]
    config = SDSConfig(steps=25 if args.fast else 200, views_per_step=8, guidance_scale=5.0, lr=0.05, seed=args.seed)
    grid, _ = distill_views(prior, views, config)
    r = judge_views(grid, world["judge"], views)
    with torch.no_grad():
        yaws = torch.tensor([0.0, 30.0, 60.0, 90.0])
        renders = render_views(grid, yaws, torch.zeros(4), 32, supersample=1)
    return {"sds_accuracy": r["accuracy"], "sds_on_target": r["on_target"], "sds_front": r["by_view"][0],
            "sds_side": r["by_view"][1]}, renders


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    torch.manual_seed(args.seed)
    world = guide.digits_world()
    figures, clouds = point_clouds(args)
    sds, renders = score_distillation(args, world)
    figures = guide.report({**figures, **sds})

    plt = guide.pyplot()
    fig = plt.figure(figsize=(10, 7))
    for r, (name, x) in enumerate(clouds.items()):
        for c in range(len(SHAPES)):
            ax = fig.add_subplot(4, 4, r * 4 + c + 1, projection="3d")
            p = x[c].numpy()
            ax.scatter(p[:, 0], p[:, 2], p[:, 1], s=4, c=p[:, 1], cmap="viridis")
            ax.set_xlim(-1, 1), ax.set_ylim(-1, 1), ax.set_zlim(-1, 1)
            ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
            ax.set_title(f"{name}: {CLASSES[SHAPES[c]]}", fontsize=7)
    for c in range(4):
        ax = fig.add_subplot(4, 4, 12 + c + 1)
        ax.imshow(renders[c, 0], cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"SDS grid, yaw {30 * c}", fontsize=7)
    fig.suptitle(f"Point-cloud diffusion (3 classes, {POINTS} points) and SDS: front reads {PAIR[0]}, side {PAIR[1]}",
                 fontsize=9)
    guide.save(fig, guide.picture(args, "23_shapes_3d.png"))
    return figures


if __name__ == "__main__":
    main()
