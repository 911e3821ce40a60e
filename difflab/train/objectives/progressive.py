"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2): a student learns to take in one DDIM step what its teacher
takes in two, so that N/2 student steps sample like N teacher steps; rounds halve the steps
again and again (64 -> 32 -> ... -> 1), the student of one round teaching the next.

In difflab's canonical frame x = x0 + sigma eps, one deterministic DDIM step of a denoiser D from
sigma to sigma' is ``x' = D(x; sigma) + (sigma' / sigma) (x - D(x; sigma))``
(:func:`difflab.samplers.ddim.sample_ddim`). The teacher takes two, sigma -> sigma' -> sigma''; the
student's one step sigma -> sigma'' lands on the teacher's x'' exactly when its x0 is::

    x~ = (x'' - (sigma'' / sigma) x) / (1 - sigma'' / sigma)

Algorithm 2's target ``(z_t'' - (s_t''/s_t) z_t) / (a_t'' - (s_t''/s_t) a_t)`` in VP notation
(z = a x, s = a sigma; the a's cancel). The loss is the x0 error weighted by the paper's
section 4 weightings, SNR = 1 / sigma^2: "truncated SNR" max(SNR, 1), i.e. ``max(||x - x^||^2,
||eps - eps^||^2)``, or "SNR+1", i.e. the v-loss ``||v - v^||^2``. Use a student predicting
x0, v or flow: an eps-predicting student cannot produce x0 at the top of the grid, where
sigma is large (section 4).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from difflab.core import Denoiser, append_dims, grids
from difflab.io.checkpoint import checkpoint_path, load_checkpoint, load_model_state, read_metadata

from ..loop import TrainConfig, fit

DRAWN = ("x0", "sigma", "noise", "level")  # every other key of a batch is a keyword of the nets (class_labels, ...)


# ----------------------------------------------------------------------------------------------
# The target and the weighting (Salimans & Ho 2022, Algorithm 2 and section 4)


def snr_weight(weighting: str, sigma: torch.Tensor) -> torch.Tensor:
    """The weight on the squared x0 error at canonical ``sigma`` (SNR = 1 / sigma^2; Salimans & Ho
    2022, section 4): ``"truncated_snr"`` max(SNR, 1), ``"snr+1"`` SNR + 1, ``"snr"`` SNR (the eps-loss)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is unknown; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[weighting](sigma**-2)


WEIGHTINGS = {"truncated_snr": lambda snr: snr.clamp(min=1.0), "snr+1": lambda snr: snr + 1, "snr": lambda snr: snr}


def ddim_step(denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, **cond) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12) from per-example ``sigma`` (B,) to
    ``sigma_next`` (B,): x0 + (sigma_next / sigma) (x - x0), x0 = D(x; sigma)."""
    x0 = denoiser(x, sigma, **cond)
    return x0 + append_dims(sigma_next / sigma, x.ndim) * (x - x0)


def progressive_target(teacher, x: torch.Tensor, sigma: torch.Tensor, sigma_mid: torch.Tensor, sigma_next: torch.Tensor,
                       **cond) -> torch.Tensor:
    """The student's x0 target x~ (Salimans & Ho 2022, Algorithm 2): two teacher DDIM steps
    sigma -> sigma_mid -> sigma_next give x'', and x~ = (x'' - r x) / (1 - r) with
    r = sigma_next / sigma is the x0 whose one DDIM step sigma -> sigma_next lands on x''."""
    x_mid = ddim_step(teacher, x, sigma, sigma_mid, **cond)
    x_next = ddim_step(teacher, x_mid, sigma_mid, sigma_next, **cond)
    r = append_dims(sigma_next / sigma, x.ndim)
    return (x_next - r * x) / (1 - r)


# ----------------------------------------------------------------------------------------------
# The objective: one round


class ProgressiveDistillation:
    """One round of progressive distillation (Salimans & Ho 2022, Algorithm 2, the inner loop).

    ``teacher``: a frozen denoiser (put in eval mode; called without gradients), sampled with DDIM
    on ``sigmas``, a grid of N = 2M steps (decreasing, ending in 0; :mod:`difflab.core.grids`).
    ``student``: what trains (its ``net`` is the module), sampled with DDIM on
    ``student_sigmas = sigmas[::2]``; default a copy of the teacher (Algorithm 2: theta <- eta).
    Each example is x0 from the data at a student level i drawn uniformly, x = x0 + sigma_i eps;
    the loss is ``snr_weight(weighting, sigma_i) * mean((student(x) - x~)^2)``
    (:func:`progressive_target`). ``draw_cond(batch, generator) -> dict``: more per-example
    draws that reach both nets as keywords (the guidance scale of guided distillation);
    the data's other columns (``class_labels``, ...) reach them too."""

    name = "progressive_distillation"

    def __init__(self, teacher, sigmas, *, student: Denoiser | None = None, weighting: str = "truncated_snr",
                 draw_cond: Callable[[dict, torch.Generator], dict] | None = None):
        self.sigmas = grids.check_sigmas(sigmas)
        if len(self.sigmas) < 3 or (len(self.sigmas) - 1) % 2 or float(self.sigmas[-1]) != 0:
            raise ValueError(f"the teacher's grid must have an even number of steps and end in 0, got {self.sigmas.tolist()}")
        snr_weight(weighting, torch.ones(1))  # check the name
        if student is None:
            student = copy.deepcopy(teacher).requires_grad_(True)
        self.teacher, self.student, self.module = teacher, student, student.net
        if isinstance(teacher, torch.nn.Module):
            teacher.eval()
        self.weighting, self.draw_cond = weighting, draw_cond

    @property
    def student_sigmas(self) -> torch.Tensor:
        """The student's grid: every other level of the teacher's."""
        return self.sigmas[::2]

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        x0 = batch["x0"].float()
        level = torch.randint(0, len(self.student_sigmas) - 1, (len(x0),), generator=generator)
        out = {"x0": x0, "level": level, "sigma": self.student_sigmas[level].float(),
               "noise": torch.randn(x0.shape, generator=generator)}
        if self.draw_cond is not None:
            out.update(self.draw_cond(batch, generator))
        return out

    def loss(self, batch: dict) -> torch.Tensor:
        x0, i = batch["x0"], 2 * batch["level"].cpu()
        cond = {k: v for k, v in batch.items() if k not in DRAWN and v is not None}
        sigma, sigma_mid, sigma_next = (self.sigmas[j].to(x0.device, x0.dtype) for j in (i, i + 1, i + 2))
        x = x0 + append_dims(sigma, x0.ndim) * batch["noise"]
        with torch.no_grad():
            target = progressive_target(self.teacher, x, sigma, sigma_mid, sigma_next, **cond)
        err = (self.student(x, sigma, **cond) - target) ** 2
        return snr_weight(self.weighting, sigma) * err.reshape(len(x), -1).mean(1)


# ----------------------------------------------------------------------------------------------
# The rounds: N -> N/2 -> ... (Algorithm 2, the outer loop)


@dataclass(frozen=True)
class DistilledRound:
    """One finished round: the student, sampled with DDIM on ``sigmas`` (``steps`` steps), and its run folder."""

    steps: int
    sigmas: torch.Tensor
    denoiser: Denoiser
    out_dir: Path


def round_count(sigmas: torch.Tensor, rounds: int | None) -> int:
    """``rounds``, checked against the grid (each round needs an even number of steps), or as many
    as halve it down to an odd count (64 steps: 6 rounds, to 1 step)."""
    n, most = len(sigmas) - 1, 0
    while n % 2 == 0 and n > 0:
        n, most = n // 2, most + 1
    if rounds is None:
        rounds = most
    if not 1 <= rounds <= most:
        raise ValueError(f"a grid of {len(sigmas) - 1} steps can be halved {most} times, not rounds={rounds}")
    return rounds


def _finished(folder: Path, config: TrainConfig, sigmas: torch.Tensor) -> bool:
    """Whether ``folder`` holds a checkpoint of a round that ran all its ``config.steps``, on this grid."""
    if not checkpoint_path(folder).exists():
        return False
    meta = read_metadata(folder)
    saved = meta.get("metadata", {}).get("student_sigmas")
    if saved is not None and not torch.allclose(torch.tensor(saved, dtype=torch.float64), sigmas, rtol=1e-12, atol=0):
        raise ValueError(f"{folder} holds a round distilled on another grid ({saved}); use another out_dir")
    return int(meta["step"]) >= config.steps


def progressive_distillation(teacher: Denoiser, data, config: TrainConfig | Sequence[TrainConfig], out_dir, *,
                             start_steps: int | None = None, sigmas=None, grid: str = "default", rounds: int | None = None,
                             student: Denoiser | None = None, weighting: str = "truncated_snr",
                             draw_cond: Callable | None = None, use_ema: bool = True, spec: dict | None = None,
                             callback: Callable[[dict], None] | None = None, resume: bool = True) -> list[DistilledRound]:
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2): ``rounds`` rounds of
    :class:`ProgressiveDistillation`, each through :func:`difflab.train.fit`, each halving the steps.

    The teacher's grid is ``sigmas`` or ``grids.for_denoiser(teacher, start_steps, grid)``; round
    k (from 1) distils ``sigmas[::2**(k-1)]`` into ``sigmas[::2**k]``. Round 1's student is
    ``student`` or a copy of the teacher; round k+1's is a copy of round k's, which is its teacher.
    ``config``: one :class:`~difflab.train.TrainConfig` for every round, or one per round.
    ``data``: x0 (N, ...) or a dict of per-example tensors with ``"x0"`` (the others reach the nets
    as keywords). ``use_ema``: a round's student is its EMA weights when the config keeps an EMA.

    Resumable: round k runs in ``out_dir/round{k:02d}_{steps}steps``; on a rerun a round whose
    checkpoint holds all its steps is loaded, not trained, and an unfinished one resumes
    (:func:`~difflab.train.fit`). Once a round trains, the rounds after it start afresh (their
    old checkpoints learned from another teacher); ``resume=False`` starts every round afresh. The checkpoint's metadata holds the student's grid, so
    ``difflab.io.load_denoiser`` (with ``spec``) and ``sample_ddim`` on that grid sample it.
    Returns the rounds, last the fewest steps.
    """
    if sigmas is None:
        if start_steps is None:
            raise ValueError("give the teacher's grid: start_steps= (with grid=) or sigmas=")
        sigmas = grids.for_denoiser(teacher, start_steps, grid)
    sigmas = grids.check_sigmas(sigmas)
    rounds = round_count(sigmas, rounds)
    configs = [config] * rounds if isinstance(config, TrainConfig) else list(config)
    if len(configs) != rounds:
        raise ValueError(f"config: one TrainConfig, or one per round ({rounds}), got {len(configs)}")
    rows = {"x0": data} if torch.is_tensor(data) else dict(data)
    done = []
    trained = not resume  # whether an earlier round's student changed in this call
    for k, cfg in enumerate(configs, start=1):
        objective = ProgressiveDistillation(teacher, sigmas[::2 ** (k - 1)], student=student if k == 1 else None,
                                            weighting=weighting, draw_cond=draw_cond)
        low = objective.student_sigmas
        folder = Path(out_dir) / f"round{k:02d}_{len(low) - 1}steps"
        if not trained and _finished(folder, cfg, low):
            tensors, meta = load_checkpoint(folder)
            load_model_state(objective.module, tensors, "ema." if use_ema and meta.get("ema") else "model.")
        else:
            meta = {"round": k, "teacher_steps": len(objective.sigmas) - 1, "student_steps": len(low) - 1,
                    "student_sigmas": low.tolist(), "weighting": weighting}
            state = fit(objective, rows, cfg, folder, metadata=meta, spec=spec, callback=callback, resume=not trained,
                        denoiser={"frame": type(objective.student.frame).__name__, "prediction": objective.student.prediction,
                                  "sigma_data": objective.student.sigma_data})
            if use_ema and state.ema is not None:
                state.ema.copy_to(objective.module)
            trained = True
        done.append(DistilledRound(len(low) - 1, low, objective.student.eval(), folder))
        teacher = objective.student
    return done


__all__ = ["ProgressiveDistillation", "progressive_distillation", "progressive_target", "ddim_step", "snr_weight",
           "WEIGHTINGS", "DistilledRound", "round_count"]
