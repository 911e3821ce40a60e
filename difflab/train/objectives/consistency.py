"""Consistency distillation and consistency training (Song et al. 2023, "Consistency Models",
Algorithms 2 and 3), with the improved recipe of Song & Dhariwal 2023 ("Improved Techniques for
Training Consistency Models", iCT).

Both train a consistency function f_theta (:class:`difflab.core.consistency.ConsistencyFunction`)
to agree with itself at adjacent levels sigma_i < sigma_{i+1} of a discretization of
[sigma_min, sigma_max] (:func:`difflab.core.noise_levels.karras_levels`)::

    loss = lambda(sigma_i) d(f_theta(x + sigma_{i+1} z, sigma_{i+1}), f_theta-(x_hat_i, sigma_i))

where x_hat_i is one step of the teacher's probability-flow ODE from x + sigma_{i+1} z down to
sigma_i (distillation, Algorithm 2) or simply x + sigma_i z with the same z (training without a
teacher, Algorithm 3), and theta- is the stop-gradient student (iCT, section 3.2) or an EMA of it.

The objective's ``module`` is an ``nn.ModuleDict`` ``{"student": f_theta}`` (plus ``"target"``, the
EMA copy, when ``target_ema > 0``) with a buffer ``step``: the optimizer steps taken, advanced in
``after_step`` and saved in the checkpoint, so the curriculum of consistency training resumes
bit-exactly. ``draw`` makes every random choice (levels, noise) from the loop's generator.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from difflab.core import append_dims
from difflab.core.noise_levels import adjacent_levels, karras_levels
from difflab.samplers.common import ode_derivative
from difflab.samplers.euler import heun_step

DRAWN = ("x0", "sigma", "sigma_lower", "noise")  # every other key of a batch is a keyword of the nets (class_labels, ...)
DISTANCES = ("pseudo_huber", "l2")
WEIGHTINGS = ("uniform", "inverse_step")
SOLVERS = ("euler", "heun")


# ----------------------------------------------------------------------------------------------
# The pieces, each once


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """d(a, b) = sqrt(||a - b||^2 + c^2) - c per example (Song & Dhariwal 2023, section 3.3)."""
    return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c


def huber_c(x: torch.Tensor) -> float:
    """iCT's c = 0.00054 sqrt(d), d the number of elements of one example (section 3.3)."""
    return 0.00054 * math.sqrt(x[0].numel())


def consistency_distance(a: torch.Tensor, b: torch.Tensor, kind: str, c: float | None = None) -> torch.Tensor:
    """``pseudo_huber`` (c default :func:`huber_c`) or ``l2``, the mean squared error (Song et al. 2023's
    squared l2 metric divided by d), per example (B,)."""
    if kind == "pseudo_huber":
        return pseudo_huber(a, b, huber_c(a) if c is None else c)
    return (a - b).flatten(1).pow(2).mean(1)


def discretization_steps(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)): the
    number of levels at step k of K, doubling from s0 + 1 to s1 + 1 (Song & Dhariwal 2023, section 3.4)."""
    k_prime = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def teacher_ode_step(teacher, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, solver: str = "heun",
                     **cond) -> torch.Tensor:
    """One step of the teacher's probability-flow ODE from sigma to sigma_next (per example, (B,)):
    Euler, x + (sigma_next - sigma) (x - D(x; sigma)) / sigma, or Heun's step (Karras et al. 2022,
    Algorithm 2; :func:`difflab.samplers.euler.heun_step`), the solver Phi of Song et al. 2023, Algorithm 2."""
    s, s_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    model = lambda x_, level: teacher(x_, level.reshape(-1), **cond)  # noqa: E731  (levels shaped like x)
    denoised = model(x, s)
    if solver == "euler":
        return x + (s_next - s) * ode_derivative(x, s, denoised)
    return heun_step(model, x, s, s_next, denoised)


def _check(distance_kind: str, weighting: str) -> None:
    if distance_kind not in DISTANCES:
        raise ValueError(f"distance={distance_kind!r} is unknown; choose one of {list(DISTANCES)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is unknown; choose one of {list(WEIGHTINGS)}")


def _module(student: nn.Module, target_ema: float) -> nn.ModuleDict:
    """``{"student"[, "target"]}`` with the ``step`` buffer (module doc)."""
    if not 0.0 <= target_ema < 1.0:
        raise ValueError(f"target_ema={target_ema} must be in [0, 1) (0: the stop-gradient student)")
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("the student has no trainable parameter")
    module = nn.ModuleDict({"student": student})
    if target_ema > 0:
        module["target"] = copy.deepcopy(student).requires_grad_(False)
    module.register_buffer("step", torch.zeros((), dtype=torch.long))
    return module


class _ConsistencyLoss:
    """What both objectives share: the module, the loss of a drawn batch, after_step."""

    def loss(self, batch: dict) -> torch.Tensor:
        x0, z, s_hi, s_lo = batch["x0"], batch["noise"], batch["sigma"], batch["sigma_lower"]
        cond = {k: v for k, v in batch.items() if k not in DRAWN and v is not None}
        student = self.module["student"]
        target = self.module["target"] if "target" in self.module else student
        x_hi = x0 + append_dims(s_hi, x0.ndim) * z
        with torch.no_grad():
            target_x0 = target(self.lower_point(x0, z, x_hi, s_hi, s_lo, cond), s_lo, **cond)
        weight = 1 / (s_hi - s_lo) if self.weighting == "inverse_step" else torch.ones_like(s_hi)
        return weight * consistency_distance(student(x_hi, s_hi, **cond), target_x0, self.distance, self.huber_c)

    @torch.no_grad()
    def after_step(self) -> None:
        self.module.step += 1
        if "target" in self.module:  # theta- <- mu theta- + (1 - mu) theta (Song et al. 2023, Algorithm 2)
            for t, s in zip(self.module["target"].state_dict().values(), self.module["student"].state_dict().values()):
                t.lerp_(s, 1 - self.target_ema) if t.is_floating_point() else t.copy_(s)

    def _draw(self, batch: dict, generator: torch.Generator, levels: torch.Tensor) -> dict:
        x0 = batch["x0"]
        i = adjacent_levels(levels, len(x0), generator, p_mean=self.p_mean, p_std=self.p_std)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return {"sigma": levels[i + 1].to(x0.dtype), "sigma_lower": levels[i].to(x0.dtype), "noise": noise}


# ----------------------------------------------------------------------------------------------
# The objectives


class ConsistencyDistillation(_ConsistencyLoss):
    """Consistency distillation (Song et al. 2023, Algorithm 2): the student at sigma_{i+1} matches
    the target at the point one ``solver`` step ("euler" or "heun") of the frozen ``teacher``
    denoiser's ODE takes it to, on ``N`` Karras levels (:func:`~difflab.core.noise_levels.karras_levels`
    from the student's ``sigma_min`` to ``sigma_max``, ``rho``), i uniform (or iCT's log-normal with
    ``p_mean``). ``target_ema``: 0 is the stop-gradient student (iCT, section 3.2); mu > 0 an EMA of
    it updated after every step (the paper's mu = 0.95). ``distance``: ``l2`` (the paper's squared
    l2, per element) or ``pseudo_huber`` (``huber_c``, default 0.00054 sqrt(d)); ``weighting``:
    ``uniform`` (lambda = 1, the paper's) or ``inverse_step`` (iCT's 1 / (sigma_{i+1} - sigma_i)).

    On the closed-form test bed (tests/test_consistency_training.py) the paper's choices, the
    defaults, distil best at sigma_max; iCT's log-normal pairs rarely visit sigma_max, and the
    pseudo-Huber distance with uniform weights learned slowest there.
    """

    name = "consistency_distillation"

    def __init__(self, student: nn.Module, teacher, *, N: int = 18, solver: str = "heun", target_ema: float = 0.0,
                 sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
                 p_mean: float | None = None, p_std: float = 2.0, distance: str = "l2",
                 huber_c: float | None = None, weighting: str = "uniform"):
        _check(distance, weighting)
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r} is unknown; choose one of {list(SOLVERS)}")
        self.module, self.teacher, self.solver, self.target_ema = _module(student, target_ema), teacher, solver, target_ema
        sigma_min = student.sigma_min if sigma_min is None else sigma_min
        sigma_max = student.sigma_max if sigma_max is None else sigma_max
        self.levels = karras_levels(N, sigma_min, sigma_max, rho)
        self.p_mean, self.p_std, self.distance, self.huber_c, self.weighting = p_mean, p_std, distance, huber_c, weighting

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        return self._draw(batch, generator, self.levels)

    def lower_point(self, x0, z, x_hi, s_hi, s_lo, cond):
        return teacher_ode_step(self.teacher, x_hi, s_hi, s_lo, self.solver, **cond)


class ConsistencyTraining(_ConsistencyLoss):
    """Consistency training without a teacher (Song et al. 2023, Algorithm 3) with the improved
    recipe (Song & Dhariwal 2023): the target is the stop-gradient student at x + sigma_i z with the
    student's own z (section 3.2), the pseudo-Huber distance (3.3), the curriculum N(k) doubling
    from ``s0`` + 1 to ``s1`` + 1 levels over ``total_steps`` (:func:`discretization_steps`, 3.4),
    log-normal level pairs with ``p_mean`` -1.1 and ``p_std`` 2.0 (3.5) and lambda(sigma_i) =
    1 / (sigma_{i+1} - sigma_i) (3.1). ``total_steps`` is the run's ``TrainConfig.steps``."""

    name = "consistency_training"

    def __init__(self, student: nn.Module, *, total_steps: int, s0: int = 10, s1: int = 1280,
                 sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
                 p_mean: float | None = -1.1, p_std: float = 2.0, distance: str = "pseudo_huber",
                 huber_c: float | None = None, weighting: str = "inverse_step", target_ema: float = 0.0):
        _check(distance, weighting)
        if total_steps < 1 or not 1 <= s0 <= s1:
            raise ValueError(f"need total_steps >= 1 and 1 <= s0 <= s1, got {total_steps}, {s0}, {s1}")
        self.module, self.target_ema = _module(student, target_ema), target_ema
        self.sigma_min = student.sigma_min if sigma_min is None else sigma_min
        self.sigma_max = student.sigma_max if sigma_max is None else sigma_max
        self.total_steps, self.s0, self.s1, self.rho = total_steps, s0, s1, rho
        self.p_mean, self.p_std, self.distance, self.huber_c, self.weighting = p_mean, p_std, distance, huber_c, weighting

    def levels(self, step: int) -> torch.Tensor:
        """The Karras levels of the curriculum at 0-based ``step``."""
        N = discretization_steps(step, self.total_steps, self.s0, self.s1)
        return karras_levels(N, self.sigma_min, self.sigma_max, self.rho)

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        return self._draw(batch, generator, self.levels(int(self.module.step)))

    def lower_point(self, x0, z, x_hi, s_hi, s_lo, cond):
        return x0 + append_dims(s_lo, x0.ndim) * z


__all__ = ["ConsistencyDistillation", "ConsistencyTraining", "pseudo_huber", "huber_c", "consistency_distance",
           "discretization_steps", "teacher_ode_step", "DISTANCES", "WEIGHTINGS", "SOLVERS"]
