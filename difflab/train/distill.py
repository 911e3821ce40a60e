"""Distil a trained checkpoint into a few-step student: the library side of ``difflab distill``.

:func:`distill` loads nothing itself: it takes the teacher denoiser (with its spec), the data the
teacher learned and a :class:`DistillConfig`, trains the student with one of :data:`METHODS`
through the objectives of :mod:`difflab.train.objectives` (each run resumable, in
``out_dir/runs/``), and writes the student to ``out_dir/checkpoint.safetensors``: its spec (with
the ``"student"`` section saying what distillation added, :data:`difflab.io.spec.STUDENT_KEYS`)
and its ``"sampling"`` defaults (sampler, steps, grid, guidance scale), so that
``difflab sample --checkpoint out_dir`` samples it the way it was distilled to be sampled.

| method | paper | student | samples with |
| --- | --- | --- | --- |
| ``progressive`` | Salimans & Ho 2022, Algorithm 2 | the teacher's network | DDIM, ``student_steps`` on the halved grid |
| ``guided`` | Meng et al. 2023, section 4.1 | + the guidance scale as an input | the same, w as an input |
| ``consistency`` | Song et al. 2023, Algorithm 2 | a consistency function of it | multistep consistency sampling |
| ``reflow`` | Liu et al. 2023, Algorithm 1 | a flow model (flow teachers) | flow Euler |

A teacher with classifier-free guidance (``guidance_scale != 1``) is distilled guided: the
student learns the guided map and samples without an unconditional branch.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.config import JSONConfig
from difflab.core import grids
from difflab.core.consistency import ConsistencyFunction
from difflab.core.noise_levels import karras_levels
from difflab.guidance import ClassifierFreeGuidance
from difflab.io.checkpoint import checkpoint_path, read_metadata, save_checkpoint

from .loop import TrainConfig, fit
from .objectives.consistency import ConsistencyDistillation
from .objectives.guided import GuidedDistillation, guided_progressive_distillation
from .objectives.progressive import progressive_distillation
from .objectives.reflow import Reflow, reflow_pairs

METHODS = ("progressive", "guided", "consistency", "reflow")
STUDENT_KIND = "difflab.student"


@dataclass(frozen=True)
class DistillConfig(JSONConfig):
    method: str = "progressive"     # one of METHODS
    steps: int = 500                # optimizer steps of each run (each progressive round, each guided stage)
    batch_size: int = 64
    lr: float = 1e-4
    ema_decay: float | None = 0.999
    guidance_scale: float = 1.0     # the teacher's classifier-free guidance (guided: the student's default w)
    w_min: float = 1.0              # guided: the range of w the student learns
    w_max: float = 4.0
    teacher_steps: int = 64         # progressive / guided: the teacher's DDIM grid, halved each round
    student_steps: int = 1          # the evaluations the student is made for (its sampling default)
    levels: int = 18                # consistency: N Karras levels (Song et al. 2023)
    pairs: int = 4096               # reflow: noise / teacher-sample pairs
    seed: int = 0
    checkpoint_every: int = 250
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "teacher_steps", "student_steps", "levels", "pairs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        for name in ("lr", "guidance_scale", "w_min", "w_max"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number")
        if self.method in ("progressive", "guided"):
            ratio = self.teacher_steps // self.student_steps
            if self.teacher_steps % self.student_steps or ratio < 2 or ratio & (ratio - 1):
                raise ValueError(f"teacher_steps={self.teacher_steps} must be student_steps={self.student_steps} "
                                 "times a power of two >= 2 (each round halves the steps)")

    def train_config(self, **changes) -> TrainConfig:
        """The :class:`~difflab.train.TrainConfig` of one run."""
        return TrainConfig(**{**dict(steps=self.steps, batch_size=self.batch_size, lr=self.lr, ema_decay=self.ema_decay,
                                     seed=self.seed, checkpoint_every=self.checkpoint_every, progress=self.progress,
                                     log_every=max(1, self.steps // 4)), **changes})


def guided_teacher(teacher, guidance_scale: float, null_class: int | None):
    """The teacher the student copies: with classifier-free guidance towards the labels (Ho &
    Salimans 2022) when ``guidance_scale != 1`` and the model has a null class."""
    if guidance_scale == 1.0:
        return teacher
    if null_class is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional teacher (it has no null class)")
    return ClassifierFreeGuidance(teacher, guidance_scale, uncond={"class_labels": null_class})


def distill(teacher, spec: dict, data: dict, config: DistillConfig, out_dir, *, null_class: int | None = None,
            metadata: dict | None = None) -> Path:
    """Distil ``teacher`` (a :class:`~difflab.core.Denoiser` built from ``spec``) on ``data``
    (``{"x0": (N, ...), "class_labels": (N,)?}``) by ``config.method``; returns the student's
    checkpoint path (module doc). Reruns resume each run from ``out_dir/runs/``."""
    out_dir = Path(out_dir)
    runs = out_dir / "runs"
    teacher = teacher.eval().requires_grad_(False)
    student, student_section, sampling = METHOD_RUNS[config.method](teacher, data, config, runs, null_class)
    student_spec = {**spec, "student": student_section} if student_section else dict(spec)
    state = {k: v.detach() for k, v in student.net.state_dict().items()}
    tensors = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.{k}": v.clone() for k, v in state.items()}}
    meta = {"kind": STUDENT_KIND, "method": config.method, "spec": student_spec, "sampling": sampling,
            "distill_config": config.to_dict(), "null_class": null_class, "metadata": dict(metadata or {})}
    return save_checkpoint(out_dir, tensors, meta)


# ----------------------------------------------------------------------------------------------
# The methods: (teacher, data, config, runs folder, null class) -> (student, spec "student" section, sampling)


def _progressive(teacher, data, config: DistillConfig, runs: Path, null_class):
    """Salimans & Ho 2022: DDIM on the teacher's grid of ``teacher_steps``, halved to ``student_steps``."""
    sigmas = grids.for_denoiser(teacher, config.teacher_steps, "default")
    rounds = int(math.log2(config.teacher_steps // config.student_steps))
    done = progressive_distillation(guided_teacher(teacher, config.guidance_scale, null_class), data,
                                    config.train_config(), runs / "progressive", sigmas=sigmas, rounds=rounds,
                                    student=copy.deepcopy(teacher).requires_grad_(True))
    last = done[-1]
    return last.denoiser, {}, {"sampler": "ddim", "steps": last.steps, "grid": last.sigmas.tolist(), "guidance_scale": 1.0}


def _guided(teacher, data, config: DistillConfig, runs: Path, null_class):
    """Meng et al. 2023: stage one (the w-conditioned student), then progressive distillation of it."""
    if null_class is None:
        raise ValueError("method 'guided' needs a class-conditional teacher (classifier-free guidance has a null class)")
    one = GuidedDistillation(teacher, {"class_labels": null_class}, w_min=config.w_min, w_max=config.w_max)
    stage1 = runs / "guided_stage1"
    finished = checkpoint_path(stage1).exists() and int(read_metadata(stage1)["step"]) >= config.steps
    state = fit(one, data, config.train_config(), stage1)
    if state.ema is not None:
        state.ema.copy_to(one.module)
    sigmas = grids.for_denoiser(teacher, config.teacher_steps, "default")
    rounds = int(math.log2(config.teacher_steps // config.student_steps))
    done = guided_progressive_distillation(one.student, data, config.train_config(), runs / "guided_stage2",
                                           w_min=config.w_min, w_max=config.w_max, sigmas=sigmas, rounds=rounds,
                                           resume=finished)  # a stage one that trained now makes stage two start afresh
    section = {"guidance_input": {"embed": one.student.net.embed, "features": one.student.net.features,
                                  "w_scale": one.student.net.w_scale}}
    last = done[-1]
    return last.denoiser, section, {"sampler": "ddim", "steps": last.steps, "grid": last.sigmas.tolist(),
                                    "guidance_scale": config.guidance_scale}


def consistency_grid(student, steps: int, levels: int) -> list[float]:
    """The sigmas of ``steps``-step consistency sampling: sigma_max, then ``steps - 1`` of the
    training levels spread evenly in index down the Karras ladder, then 0 (Song et al. 2023, Algorithm 1)."""
    ladder = karras_levels(levels, student.sigma_min, student.sigma_max).flip(0)  # decreasing
    idx = torch.linspace(0, len(ladder) - 1, steps + 1).round().long()[:-1]
    return [float(ladder[i]) for i in idx] + [0.0]


def _consistency(teacher, data, config: DistillConfig, runs: Path, null_class):
    """Song et al. 2023, Algorithm 2: the student is a consistency function of a copy of the teacher
    (LCM's form in a VP frame, whose f equals the teacher's x0 estimate away from t = 0)."""
    form = "lcm" if type(teacher.frame).__name__ in ("VPDiscrete", "VPContinuous") else "cm"
    section = {"consistency": {"form": form}}
    student = ConsistencyFunction(copy.deepcopy(teacher).requires_grad_(True), form=form)
    objective = ConsistencyDistillation(student, guided_teacher(teacher, config.guidance_scale, null_class), N=config.levels)
    state = fit(objective, data, config.train_config(), runs / "consistency")
    if state.ema is not None:
        state.ema.copy_to(objective.module)
    return student.eval(), section, {"sampler": "consistency", "steps": config.student_steps,
                                     "grid": consistency_grid(student, config.student_steps, config.levels),
                                     "guidance_scale": 1.0}


def _reflow(teacher, data, config: DistillConfig, runs: Path, null_class):
    """Liu et al. 2023: pairs (noise, the teacher's ODE sample), then flow matching on straight lines."""
    if type(teacher.frame).__name__ != "Flow":
        raise ValueError("method 'reflow' straightens a flow model: the teacher's frame must be 'flow' "
                         f"(it is {type(teacher.frame).__name__})")
    labels = data.get("class_labels")
    n = config.pairs
    cond = {"class_labels": labels[torch.arange(n) % len(labels)]} if labels is not None else None
    pairs = reflow_pairs(guided_teacher(teacher, config.guidance_scale, null_class), n, config.teacher_steps, config.seed,
                         shape=tuple(data["x0"].shape[1:]), cond=cond)
    student = copy.deepcopy(teacher).requires_grad_(True)
    objective = Reflow(student)
    state = fit(objective, pairs, config.train_config(), runs / "reflow")
    if state.ema is not None:
        state.ema.copy_to(objective.module)
    return student.eval(), {}, {"sampler": "flow_euler", "steps": config.student_steps, "grid": "default",
                                "guidance_scale": 1.0}


METHOD_RUNS = {"progressive": _progressive, "guided": _guided, "consistency": _consistency, "reflow": _reflow}

__all__ = ["DistillConfig", "distill", "guided_teacher", "consistency_grid", "METHODS", "STUDENT_KIND", "METHOD_RUNS"]
