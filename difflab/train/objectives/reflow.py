"""Rectified-flow reflow (Liu et al. 2023, "Flow Straight and Fast: Learning to Generate and
Transfer Data with Rectified Flow", section 2.3 and Algorithm 1): retrain a flow on the coupling
its own ODE makes, noise z -> sample x, so that its paths straighten and few Euler steps suffice.

difflab's flow convention (:class:`difflab.core.Flow`): x_t = (1 - t) x0 + t eps, t = 1 noise and
t = 0 data, velocity u = eps - x0, canonical x = x_t / (1 - t) = x0 + sigma eps with
sigma = t / (1 - t). Reflow keeps the loss of flow matching (Liu et al. 2023, eq. 1) and replaces
the independent pair (x0, eps) by the teacher's (x, z): x_t = (1 - t) x + t z, target u = z - x.
In the canonical frame that is the diffusion loss (:func:`difflab.train.losses.diffusion_loss`)
of the pair's x at sigma with ``noise = z``: :class:`Reflow` draws only the levels.

1. ``pairs = reflow_pairs(teacher, n, steps, seed, shape=(d,))``: z from
   :class:`difflab.core.SampleNoise` (sample i of ``seed`` is the same in any batch), x the
   teacher's flow ODE sample from z;
2. ``fit(Reflow(student), pairs, config, out_dir)`` (the student usually starts as a copy of the
   teacher: the 2-rectified flow of the paper);
3. sample with ``sample_flow_euler`` on ``grids.flow_sigmas(1)`` or ``(2)``.

:func:`straightness` measures what reflow improves (Liu et al. 2023, section 2.3, S(Z)).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from difflab.core import Denoiser, SampleNoise, grids
from difflab.core.schedules import flow_t
from difflab.samplers.flow import sample_flow_euler, sample_flow_heun

from ..losses import diffusion_loss, draw_sigmas

DRAWN = ("x0", "sigma", "noise")  # every other key of a batch is a keyword of the net


@torch.no_grad()
def reflow_pairs(teacher: Denoiser, n: int, steps: int, seed: int, *, shape: Sequence[int], batch_size: int = 256,
                 sampler: Callable = sample_flow_heun, sigmas=None, cond: dict | None = None, device="cpu",
                 dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The teacher's coupling (Liu et al. 2023, Algorithm 1, "reflow"): ``{"noise": z, "x0": x, **cond}``,
    n pairs of standard-normal z (n, *shape), sample i from ``SampleNoise.for_run(seed, ..., start=i)``,
    and x = the teacher's ODE sample from z: ``sampler`` (flow Heun by default) on ``sigmas``
    (default ``grids.for_denoiser(teacher, steps)``, the flow grid for a flow model) from
    ``z * prior_std(sigmas[0])``, which is z itself in the flow frame at t = 1. ``cond``:
    per-example keywords (n, ...) of the teacher, returned with the pairs. On ``device`` in ``dtype``,
    ``batch_size`` samples at a time (the result does not depend on it)."""
    sigmas = grids.check_sigmas(grids.for_denoiser(teacher, steps) if sigmas is None else sigmas)
    cond = dict(cond or {})
    for name, rows in cond.items():
        if not torch.is_tensor(rows) or len(rows) != n:
            raise ValueError(f"cond[{name!r}] must be a tensor with one row per pair ({n}, ...)")
    scale = float(teacher.prior_std(sigmas[0]))
    zs, xs = [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = SampleNoise.for_run(seed, b, shape, start=start, device=device, dtype=dtype)()
        extra = {k: v[start:start + b].to(device) for k, v in cond.items()}
        xs.append(sampler(teacher, z * scale, sigmas, extra_args=extra))
        zs.append(z)
    return {"noise": torch.cat(zs), "x0": torch.cat(xs), **cond}


class Reflow:
    """Reflow's loss (Liu et al. 2023, eq. 1 on the coupling of Algorithm 1): per example, the
    flow-matching loss of ``denoiser`` (its net trains) at x = x0 + sigma z for the data's pair
    (``x0``, ``noise`` = z; :func:`reflow_pairs`), in the net's own parameterization
    (:func:`~difflab.train.losses.diffusion_loss`, ``weighting`` of
    :func:`~difflab.train.losses.loss_weight`). ``draw`` takes only sigma: t ~ U(0, 1) as in the
    paper (``noise_level="continuous_uniform"``), or any of :data:`~difflab.train.losses.NOISE_LEVELS`."""

    name = "reflow"

    def __init__(self, denoiser: Denoiser, *, noise_level: str = "continuous_uniform", noise_level_kwargs: dict | None = None,
                 weighting: str = "simple"):
        self.denoiser, self.module = denoiser, denoiser.net
        self.noise_level, self.noise_level_kwargs, self.weighting = noise_level, dict(noise_level_kwargs or {}), weighting

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        if "noise" not in batch:
            raise ValueError("reflow trains on pairs: the data needs 'x0' and 'noise' columns (see reflow_pairs)")
        n = len(batch["x0"])
        sigma = draw_sigmas(self.denoiser.frame, n, generator, self.noise_level, **self.noise_level_kwargs)
        return {"x0": batch["x0"].float(), "noise": batch["noise"].float(), "sigma": sigma.float()}

    def loss(self, batch: dict) -> torch.Tensor:
        extra = {k: v for k, v in batch.items() if k not in DRAWN and v is not None}
        return diffusion_loss(self.denoiser, batch["x0"], batch["sigma"], batch["noise"], weighting=self.weighting,
                              extra_args=extra)


@torch.no_grad()
def straightness(denoiser, noise: torch.Tensor, steps: int, *, extra_args: dict | None = None) -> float:
    """The straightness S(Z) = int E ||(Z_1 - Z_0) - dZ_t/dt||^2 dt of a flow's ODE paths (Liu et al.
    2023, section 2.3), in difflab's flow frame (data at t = 0): the paths of ``steps``
    :func:`~difflab.samplers.flow.sample_flow_euler` steps on ``grids.flow_sigmas(steps)`` from
    ``noise`` (x_t = noise at the grid's first t), u_i = (x_t - x0_hat) / t the velocity of step i,
    and S = sum_i dt_i ||(x_start - x_end) / t_0 - u_i||^2 / t_0, the squared norm averaged over
    coordinates and samples. 0 for straight paths, on which one Euler step is exact."""
    sigmas = grids.flow_sigmas(steps)
    ts = flow_t(sigmas).tolist()
    x_start = noise / (1 - ts[0])  # canonical x = x_t / (1 - t)
    xs, us = [x_start], []

    def record(step):
        t = ts[step["i"]]
        us.append(((1 - t) * xs[-1] - step["denoised"]) / t)
        xs.append(step["x"])

    end = sample_flow_euler(denoiser, x_start, sigmas, extra_args=extra_args, callback=record)
    chord = (noise - end) / ts[0]  # the straight path's velocity from (t_0, noise) to (0, end)
    errors = [(ts[i] - ts[i + 1]) * (chord - u).pow(2).mean() for i, u in enumerate(us)]
    return float(torch.stack(errors).sum() / ts[0])


__all__ = ["Reflow", "reflow_pairs", "straightness"]
