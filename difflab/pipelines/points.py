"""Class -> point cloud: sampling a point-cloud denoiser (e.g. a
:class:`~difflab.nn.point_transformer.PointTransformer`), and the per-class Gaussian baseline.

Points are samples of shape (N, 3): the same numbered stages as class -> image
(:func:`difflab.pipelines.class_to_image.generate`: per-sample noise, the grid, classifier-free
guidance, the sampler), then the clouds are written as PLY files when asked. Every cloud's noise
comes from its own generator seeded by (seed, i), so a cloud never depends on the batch size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..io.ply import write_ply
from .class_to_image import generate
from .options import SampleOptions


def check_num_points(num_points) -> int:
    if not (isinstance(num_points, int) and not isinstance(num_points, bool) and num_points >= 1):
        raise ValueError(f"num_points={num_points!r} must be an integer >= 1")
    return num_points


def generate_points(denoiser, labels, *, num_points: int, options: SampleOptions | None = None, ply_dir=None,
                    names=None, **overrides) -> torch.Tensor:
    """Stage 1: check; stages 2-6: :func:`~difflab.pipelines.class_to_image.generate` with one
    sample of shape (num_points, 3) per label (guided towards it by ``guidance_scale``), in the
    unit ball the data live in; stage 7: write ``ply_dir/<name>.ply`` per cloud when ``ply_dir``
    is given (``names``: one per cloud, default ``cloud_<i>``). Returns (B, num_points, 3)."""
    num_points = check_num_points(num_points)
    clouds = generate(denoiser, labels, shape=(num_points, 3), options=options, **overrides)
    if ply_dir is not None:
        names = [f"cloud_{i:04d}" for i in range(len(clouds))] if names is None else list(names)
        if len(names) != len(clouds):
            raise ValueError(f"names has {len(names)} entries for {len(clouds)} clouds")
        for name, cloud in zip(names, clouds):
            write_ply(Path(ply_dir) / f"{name}.ply", cloud)
    return clouds


def fit_gaussians(points: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline's fit: per class, the mean (3,) and covariance (3, 3) of all its points pooled
    (NaN for a class with no clouds)."""
    means, covs = torch.full((num_classes, 3), float("nan")), torch.full((num_classes, 3, 3), float("nan"))
    for c in range(num_classes):
        p = points[labels == c].reshape(-1, 3).double()
        if len(p) >= 2:
            means[c], covs[c] = p.mean(0).float(), torch.cov(p.T).float()
    return means, covs


def gaussian_points(means: torch.Tensor, covs: torch.Tensor, labels, num_points: int, seed: int = 0) -> torch.Tensor:
    """The baseline's samples: ``num_points`` points i.i.d. from class label's Gaussian per cloud
    (cloud i from a generator seeded by (seed, i)). A blob of the class's extent: no surface."""
    num_points = check_num_points(num_points)
    labels = torch.as_tensor(labels).tolist()
    missing = sorted({c for c in labels if not bool(torch.isfinite(means[c]).all())})
    if missing:
        raise ValueError(f"classes {missing} have no fitted Gaussian (no training clouds)")
    chol = torch.linalg.cholesky(covs[sorted(set(labels))].double() + 1e-9 * torch.eye(3, dtype=torch.float64))
    chol = dict(zip(sorted(set(labels)), chol))
    out = []
    for i, c in enumerate(labels):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        z = torch.randn(num_points, 3, generator=g, dtype=torch.float64)
        out.append((means[c].double() + z @ chol[c].T).float())
    return torch.stack(out)


__all__ = ["generate_points", "fit_gaussians", "gaussian_points", "check_num_points"]
