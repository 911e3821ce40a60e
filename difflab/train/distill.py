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
| ``lcm`` | Luo et al. 2023a, Algorithm 1 | + w as an input, a consistency function | LCM, w as an input |
| ``lcm-lora`` | Luo et al. 2023b | a LoRA on the teacher's network | LCM, guidance 1 |

``lcm`` and ``lcm-lora`` distil a latent text-to-image model (:func:`distill_text`, on
:func:`caption_data`) and write a text-model folder (:mod:`difflab.io.text_model`).

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
from difflab.io.text_model import save_text_model

from .loop import TrainConfig, fit
from .objectives.consistency import ConsistencyDistillation
from .objectives.guided import GuidedDistillation, guided_progressive_distillation
from .objectives.lcm import LatentConsistencyDistillation, caption_conditioning, lcm_lora_student, lcm_student, save_lcm_lora
from .objectives.progressive import progressive_distillation
from .objectives.reflow import Reflow, reflow_pairs

IMAGE_METHODS = ("progressive", "guided", "consistency", "reflow")
TEXT_METHODS = ("lcm", "lcm-lora")  # latent text-to-image teachers (difflab.io.text_model): distill_text
METHODS = IMAGE_METHODS + TEXT_METHODS
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
    original_steps: int = 50        # lcm: the skipping schedule, k = T / original_steps (Luo et al. 2023, section 4.3)
    rank: int = 64                  # lcm-lora: the adapter's rank
    seed: int = 0
    checkpoint_every: int = 250
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "teacher_steps", "student_steps", "levels", "pairs", "original_steps", "rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        for name in ("lr", "guidance_scale", "w_min", "w_max"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number")
        if self.w_min > self.w_max:
            raise ValueError(f"w_min={self.w_min} must be at most w_max={self.w_max}")
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
    if config.method in TEXT_METHODS:
        raise ValueError(f"method {config.method!r} distils a text-to-image model: use distill_text")
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


# ----------------------------------------------------------------------------------------------
# Latent text-to-image teachers: LCM and LCM-LoRA (Luo et al. 2023a, 2023b)


def caption_data(text_encoder, vae, images: torch.Tensor, captions, seed: int = 0) -> tuple[dict, dict]:
    """``(data, uncond)`` for :func:`distill_text`: one posterior draw of the VAE's latents per
    (image, caption) pair (``images`` (N, C, H, W), one caption each) and the captions' encodings
    (:func:`~difflab.train.objectives.lcm.caption_conditioning`), and the empty prompt's."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = torch.cat([vae.encode_latents(x, g) for x in images.split(2048)]) if vae is not None else images
    cond, uncond = caption_conditioning(text_encoder, captions)
    return {"x0": latents, **cond}, uncond


def distill_text(teacher, text_encoder, vae, spec: dict, data: dict, uncond: dict, config: DistillConfig, out_dir, *,
                 metadata: dict | None = None, sampling_size: dict | None = None) -> Path:
    """Latent consistency distillation of a text-to-image ``teacher`` (a VP-discrete denoiser
    ``D(x, sigma, context=, ...)`` built from ``spec``) on ``data`` (:func:`caption_data`), by
    ``config.method``: ``lcm`` (the whole network, w as an input, Luo et al. 2023a, Algorithm 1)
    or ``lcm-lora`` (a rank-``config.rank`` adapter, no w input, Luo et al. 2023b). Writes the
    student as ``out_dir/model.safetensors`` (:func:`difflab.io.text_model.save_text_model`;
    LCM-LoRA: the base model naming ``lcm_lora.safetensors``, the adapter in diffusers' LoRA
    layout) sampled by default with the LCM sampler at ``config.student_steps`` (and
    ``sampling_size``'s height and width); reruns resume from ``out_dir/runs/``. Returns the model file."""
    if config.method not in TEXT_METHODS:
        raise ValueError(f"distill_text runs {', '.join(TEXT_METHODS)}, not {config.method!r}")
    out_dir = Path(out_dir)
    teacher = teacher.eval().requires_grad_(False)
    w = min(max(config.guidance_scale, config.w_min), config.w_max)
    if config.method == "lcm":
        embed = "time_embed" if hasattr(teacher.net, "time_embed") else "time_embedding"
        student = lcm_student(teacher, embed)
    else:
        student = lcm_lora_student(teacher, rank=config.rank, generator=torch.Generator().manual_seed(config.seed))
    objective = LatentConsistencyDistillation(teacher, uncond, student=student, w_min=config.w_min, w_max=config.w_max,
                                              original_steps=config.original_steps)
    state = fit(objective, data, config.train_config(), out_dir / "runs" / config.method)
    if state.ema is not None:
        state.ema.copy_to(objective.module)
    student.eval()
    sampling = {"sampler": "lcm", "grid": "lcm", "steps": config.student_steps}
    sampling.update({k: v for k, v in (sampling_size or {}).items() if k in ("height", "width")})
    meta = {**(metadata or {}), "method": config.method, "distill_config": config.to_dict()}
    if config.method == "lcm-lora":
        save_lcm_lora(out_dir / "lcm_lora.safetensors", student)
        return save_text_model(out_dir, teacher, text_encoder, spec, meta, vae=vae, lora="lcm_lora.safetensors",
                               sampling={**sampling, "guidance_scale": 1.0})
    net = student.net  # the GuidanceEmbedding around the teacher's network
    section = {"guidance_input": {"embed": net.embed, "features": net.features, "w_scale": net.w_scale},
               "consistency": {"form": "lcm"}}
    return save_text_model(out_dir, student, text_encoder, {**spec, "student": section}, meta, vae=vae,
                           sampling={**sampling, "guidance_scale": w})

__all__ = ["DistillConfig", "distill", "distill_text", "caption_data", "IMAGE_METHODS", "TEXT_METHODS", "guided_teacher", "consistency_grid", "METHODS", "STUDENT_KIND", "METHOD_RUNS"]
