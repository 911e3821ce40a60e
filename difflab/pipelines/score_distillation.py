"""Score distillation sampling (Poole et al. 2022, "DreamFusion"): lift a 2-D diffusion model into
3-D by optimizing a differentiable 3-D representation (a :class:`~difflab.nn.voxels.VoxelGrid`)
so that its renders from chosen cameras look like samples of the model for the class asked.

:func:`sds_gradient` is the paper's eq. 3 in difflab's canonical frame: a render x is noised to
z = x + sigma eps and the gradient of the diffusion loss with the U-Net's Jacobian dropped is

    grad_x = w(sigma) (eps_hat - eps) = w(sigma) (x - x0_hat(z)) / sigma,

with x0_hat the classifier-free-guided denoiser (Ho & Salimans 2022). We take w(sigma) =
sigma / sqrt(1 + sigma^2) (the VP frame's sigma_t, DreamFusion's choice of w(t) in eps form up to a
constant), so grad_x = (x - x0_hat) / sqrt(1 + sigma^2). Noise levels are drawn as DreamFusion's t
~ U(t_min, t_max) through the cosine schedule, sigma = tan(pi t / 2), whatever the model's frame.

:func:`vsd_gradient` is variational score distillation (Wang et al. 2023, "ProlificDreamer", eq. 9):
the fixed model's x0_hat is compared with that of a second copy, fine-tuned on the current renders
(:func:`vsd_finetune_step`), instead of with the render itself: grad_x = (x0_hat_phi - x0_hat) / sqrt(1 + sigma^2).

:func:`distill_views` runs the loop: every step renders a batch of views, each a target view
(yaw, elevation, class) jittered by up to ``jitter`` degrees, and steps Adam on the grid.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..core import SampleNoise
from ..guidance import ClassifierFreeGuidance
from ..nn.voxels import VoxelGrid, render_views


@dataclass(frozen=True)
class View:
    """A target view: the camera's yaw and elevation (degrees) and the class its render should read as."""
    yaw: float
    elevation: float
    label: int


@dataclass(frozen=True)
class SDSConfig:
    steps: int = 300
    views_per_step: int = 8         # renders per step, drawn in turn from the target views
    lr: float = 0.05                # Adam on the grid's raw values
    guidance_scale: float = 5.0     # classifier-free guidance of the prior (DreamFusion uses large scales)
    t_min: float = 0.02
    t_max: float = 0.98
    anneal: bool = True             # t_max decays linearly to (t_min + t_max) / 2 over the run
    jitter: float = 15.0            # each render's yaw and elevation move by up to this many degrees
    resolution: int = 16            # the voxel grid's size
    size: int = 8                   # render size (the prior's)
    supersample: int = 2
    sparsity: float = 0.0           # weight of the mean opacity penalty on the renders
    method: str = "sds"             # "sds" or "vsd"
    vsd_lr: float = 1e-4            # VSD: the fine-tuned copy's learning rate
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("sds", "vsd"):
            raise ValueError(f"method={self.method!r} must be 'sds' or 'vsd'")
        if not 0 < self.t_min < self.t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={self.t_min}, t_max={self.t_max}")
        if not (isinstance(self.steps, int) and self.steps >= 1 and isinstance(self.views_per_step, int) and self.views_per_step >= 1):
            raise ValueError(f"steps={self.steps!r} and views_per_step={self.views_per_step!r} must be integers >= 1")
        if self.jitter < 0:
            raise ValueError(f"jitter={self.jitter} must be >= 0 degrees")


def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
    """DreamFusion's t in (0, 1) as a canonical noise level through the cosine schedule: tan(pi t / 2)."""
    return torch.tan(math.pi / 2 * t)


def guided_prior(denoiser, guidance_scale: float, null_class: int | None = None):
    """The prior's denoiser with classifier-free guidance towards ``class_labels`` (null class:
    ``null_class``, default the network's ``num_classes``)."""
    if null_class is None:
        null_class = getattr(getattr(denoiser.net, "config", None), "num_classes", None)
    if null_class is None:
        raise ValueError("the prior is not class-conditional (its network has no config.num_classes); pass null_class")
    return ClassifierFreeGuidance(denoiser, guidance_scale, {"class_labels": torch.tensor(int(null_class))})


def sds_gradient(prior, x: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Poole et al. 2022, eq. 3: the score-distillation gradient w.r.t. renders ``x`` (B, ...) at
    noise levels ``sigma`` (B,) with noise ``eps``; no gradient flows through the prior."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    with torch.no_grad():
        x0 = prior(x.detach() + s * eps, sigma, class_labels=labels)
    return (x.detach() - x0) / (1 + s * s).sqrt()


def vsd_gradient(prior, tuned, x: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Wang et al. 2023, eq. 9: (x0_hat_tuned - x0_hat_prior) / sqrt(1 + sigma^2), with ``tuned`` the
    copy fine-tuned on the renders (its score of the renders' own distribution)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    z = x.detach() + s * eps
    with torch.no_grad():
        return (tuned(z, sigma, class_labels=labels) - prior(z, sigma, class_labels=labels)) / (1 + s * s).sqrt()


def vsd_finetune_step(tuned, optimizer, x: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> float:
    """One denoising step (x0 mean squared error) of the VSD copy on the detached renders."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    x0 = tuned(x.detach() + s * eps, sigma, class_labels=labels)
    loss = ((x0 - x.detach()) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def draw_views(views: list[View], step: int, n: int, jitter: float, generator: torch.Generator):
    """(yaw (n,), elevation (n,), labels (n,)) of step ``step``'s renders: the target views in turn,
    each moved by up to ``jitter`` degrees in yaw and in elevation."""
    idx = [(step * n + i) % len(views) for i in range(n)]
    yaw = torch.tensor([views[i].yaw for i in idx], dtype=torch.float64)
    elev = torch.tensor([views[i].elevation for i in idx], dtype=torch.float64)
    off = (torch.rand(2, n, generator=generator, dtype=torch.float64) * 2 - 1) * jitter
    return yaw + off[0], elev + off[1], torch.tensor([views[i].label for i in idx])


def distill_views(denoiser, views: list[View], config: SDSConfig = SDSConfig(), *, grid: VoxelGrid | None = None,
                  callback=None) -> tuple[VoxelGrid, list[dict]]:
    """Optimize a voxel grid so its renders from ``views`` read as their classes under the prior
    ``denoiser`` (a class-conditional image denoiser of ``config.size`` grey images in [-1, 1]).
    Returns (grid, history of {step, t_max, grad_norm}). The grid starts uniform; views, noise
    levels and noise come from generators seeded by ``config.seed``, so a run is deterministic. The
    prior is put in eval mode with its gradients off."""
    if not views:
        raise ValueError("views must hold at least one View(yaw, elevation, label)")
    num_classes = getattr(getattr(denoiser.net, "config", None), "num_classes", None)
    bad = [v.label for v in views if num_classes is not None and not 0 <= v.label < num_classes]
    if bad:
        raise ValueError(f"view labels {bad} are not classes of the prior (0 .. {num_classes - 1})")
    # 1. The representation and the prior (guided, frozen; a tuned copy for VSD).
    grid = VoxelGrid(config.resolution) if grid is None else grid
    denoiser.eval().requires_grad_(False)
    prior = guided_prior(denoiser, config.guidance_scale)
    opt = torch.optim.Adam([p for p in grid.parameters() if p.requires_grad], lr=config.lr)
    tuned = tuned_opt = None
    if config.method == "vsd":
        tuned_den = copy.deepcopy(denoiser).train().requires_grad_(True)
        tuned_opt = torch.optim.AdamW(tuned_den.parameters(), lr=config.vsd_lr)
        tuned = tuned_den
    g = torch.Generator().manual_seed(config.seed)
    history = []
    for step in range(config.steps):
        # 2. Renders of jittered target views.
        yaw, elev, labels = draw_views(views, step, config.views_per_step, config.jitter, g)
        x = render_views(grid, yaw, elev, config.size, supersample=config.supersample)
        # 3. Noise levels (annealed) and noise, per render from the step's generator.
        frac = step / max(1, config.steps - 1)
        t_hi = config.t_max - (config.t_max - (config.t_min + config.t_max) / 2) * frac if config.anneal else config.t_max
        t = config.t_min + (t_hi - config.t_min) * torch.rand(len(x), generator=g)
        sigma = sigma_of_t(t)
        eps = SampleNoise([config.seed * 1_000_003 + step * 4096 + i for i in range(len(x))], tuple(x.shape[1:]))()
        # 4. The distillation gradient, pushed through the renderer into the grid.
        if config.method == "vsd":
            grad = vsd_gradient(prior, tuned, x, labels, sigma, eps)
        else:
            grad = sds_gradient(prior, x, labels, sigma, eps)
        loss = (grad * x).sum() / len(x) + config.sparsity * ((x + 1) / 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tuned is not None:
            t2 = config.t_min + (config.t_max - config.t_min) * torch.rand(len(x), generator=g)
            vsd_finetune_step(tuned, tuned_opt, x, labels, sigma_of_t(t2), torch.randn(x.shape, generator=g))
        entry = {"step": step, "t_max": float(t_hi), "grad_norm": float(grad.norm())}
        history.append(entry)
        if callback is not None:
            callback(entry)
    return grid, history


@torch.no_grad()
def judge_views(grid: VoxelGrid, judge, views: list[View], offsets=(-15, -10, -5, 0, 5, 10, 15), *, size: int = 8,
                supersample: int = 2) -> dict:
    """The judge's reading of renders from every target view moved by each offset in yaw, and in
    elevation: {"accuracy": all renders, "on_target": offset 0, "by_view": per view}."""
    yaws, elevs, labels, on = [], [], [], []
    for v in views:
        for o in offsets:
            for dy, de in {(o, 0), (0, o)}:
                yaws.append(v.yaw + dy), elevs.append(v.elevation + de), labels.append(v.label), on.append(o == 0)
    x = render_views(grid, torch.tensor(yaws), torch.tensor(elevs), size, supersample=supersample)
    hit = judge.predict(x) == torch.tensor(labels)
    on = torch.tensor(on)
    per = hit.reshape(len(views), -1).float().mean(1).tolist()
    return {"accuracy": float(hit.float().mean()), "on_target": float(hit[on].float().mean()), "by_view": per, "n": len(hit)}


__all__ = ["View", "SDSConfig", "sigma_of_t", "guided_prior", "sds_gradient", "vsd_gradient", "vsd_finetune_step",
           "draw_views", "distill_views", "judge_views"]
