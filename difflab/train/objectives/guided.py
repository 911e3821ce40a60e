"""Guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models",
section 4.1): a classifier-free-guided teacher costs two network calls a step and many steps;
its student costs one call and few steps.

- Stage one (:class:`GuidedDistillation`): a student that takes the guidance scale w as an input
  (:class:`difflab.nn.GuidanceEmbedding`: a Fourier embedding of w added to the time embedding)
  learns the guided teacher's x0, ``x0_u + w (x0_c - x0_u)``, at w uniform in [w_min, w_max]
  and noise levels of the frame's training distribution, under the same x0-error weighting as
  progressive distillation (:func:`~difflab.train.objectives.progressive.snr_weight`).
- Stage two (:func:`guided_progressive_distillation`): progressive distillation of that student
  (:func:`~difflab.train.objectives.progressive.progressive_distillation`), w drawn per example
  and passed to teacher and student alike.

w is difflab's guidance scale (``ClassifierFreeGuidance(scale=)``, diffusers' ``guidance_scale``):
1 is the conditional model, 0 the unconditional one; the paper's w is this minus one.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from difflab.core import Denoiser, append_dims
from difflab.nn import GuidanceEmbedding

from ..loop import TrainConfig
from ..losses import draw_sigmas
from .progressive import DistilledRound, progressive_distillation, snr_weight

DRAWN = ("x0", "sigma", "noise", "guidance_scale")  # every other key of a batch is a keyword of the nets


def guided_x0(teacher, x: torch.Tensor, sigma: torch.Tensor, scale: torch.Tensor, uncond: dict, **cond) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) with a per-example ``scale`` (B,):
    x0_u + scale (x0_c - x0_u), from one call of ``teacher`` on the conditional and unconditional
    branches stacked along the batch (``uncond``'s values replace those keys of ``cond``; other
    (B, ...) tensors are shared). The combination of ``difflab.guidance.ClassifierFreeGuidance``
    with one scale per example (that wrapper takes one number for the whole batch)."""
    missing = sorted(set(uncond) - set(cond))
    if missing:
        raise ValueError(f"uncond keys {missing} have no conditional counterpart in the batch's {sorted(cond)}")
    B, both = x.shape[0], {}
    for name, c in cond.items():
        if name in uncond:
            both[name] = torch.cat([c, torch.as_tensor(uncond[name], dtype=c.dtype, device=c.device).expand(c.shape)])
        else:
            both[name] = torch.cat([c, c]) if torch.is_tensor(c) and c.ndim > 0 and c.shape[0] == B else c
    d_c, d_u = teacher(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
    return d_u + append_dims(scale.to(x.dtype), x.ndim) * (d_c - d_u)


class UniformScale:
    """``draw(batch, generator) -> {"guidance_scale": (B,)}``, w ~ U[w_min, w_max] (Meng et al. 2023, section 4.1)."""

    def __init__(self, w_min: float, w_max: float):
        if not w_min <= w_max:
            raise ValueError(f"need w_min <= w_max, got {w_min} and {w_max}")
        self.w_min, self.w_max = float(w_min), float(w_max)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        B = len(next(iter(batch.values())))
        return {"guidance_scale": self.w_min + (self.w_max - self.w_min) * torch.rand(B, generator=generator)}


def guided_student(teacher: Denoiser, embed: str = "time_embed", **kwargs) -> Denoiser:
    """The stage-one student: a copy of the teacher's net, trainable, wrapped in
    :class:`difflab.nn.GuidanceEmbedding` (``embed``: the net's time-embedding submodule; ``kwargs``
    go to it), in the teacher's frame and prediction. It equals the conditional teacher at every w
    before training."""
    net = GuidanceEmbedding(copy.deepcopy(teacher.net).requires_grad_(True), embed, **kwargs)
    return Denoiser(net, teacher.frame, teacher.prediction, teacher.sigma_data)


class GuidedDistillation:
    """Stage one of guided distillation (Meng et al. 2023, section 4.1): per example,
    ``snr_weight(weighting, sigma) * mean((student(x, sigma, guidance_scale=w) - guided_x0)^2)`` with
    x = x0 + sigma eps, sigma from the frame's training distribution (``noise_level``; see
    :func:`~difflab.train.losses.draw_sigmas`) and w ~ U[w_min, w_max]. ``teacher`` is frozen
    (eval mode, no gradients); ``uncond`` its unconditional keywords (``{"class_labels": null}``);
    ``student`` defaults to :func:`guided_student` of the teacher. The data's columns besides x0
    (``class_labels``, ...) reach both nets as keywords."""

    name = "guided_distillation"

    def __init__(self, teacher: Denoiser, uncond: dict, *, w_min: float = 1.0, w_max: float = 5.0,
                 student: Denoiser | None = None, embed: str = "time_embed", weighting: str = "truncated_snr",
                 noise_level: str | None = None, noise_level_kwargs: dict | None = None):
        snr_weight(weighting, torch.ones(1))  # check the name
        self.teacher, self.uncond, self.scales = teacher.eval(), dict(uncond), UniformScale(w_min, w_max)
        self.student = student if student is not None else guided_student(teacher, embed)
        self.module, self.weighting = self.student.net, weighting
        self.noise_level, self.noise_level_kwargs = noise_level, dict(noise_level_kwargs or {})

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        x0 = batch["x0"].float()
        sigma = draw_sigmas(self.teacher.frame, len(x0), generator, self.noise_level, **self.noise_level_kwargs).float()
        return {"x0": x0, "sigma": sigma, "noise": torch.randn(x0.shape, generator=generator),
                **self.scales(batch, generator)}

    def loss(self, batch: dict) -> torch.Tensor:
        x0, sigma, w = batch["x0"], batch["sigma"].to(batch["x0"].dtype), batch["guidance_scale"]
        cond = {k: v for k, v in batch.items() if k not in DRAWN and v is not None}
        x = x0 + append_dims(sigma, x0.ndim) * batch["noise"]
        with torch.no_grad():
            target = guided_x0(self.teacher, x, sigma, w, self.uncond, **cond)
        err = (self.student(x, sigma, guidance_scale=w, **cond) - target) ** 2
        return snr_weight(self.weighting, sigma) * err.reshape(len(x), -1).mean(1)


def guided_progressive_distillation(student: Denoiser, data, config: TrainConfig | Sequence[TrainConfig], out_dir, *,
                                    w_min: float = 1.0, w_max: float = 5.0, **kwargs) -> list[DistilledRound]:
    """Stage two of guided distillation (Meng et al. 2023, section 4.1): progressive distillation
    (Salimans & Ho 2022, Algorithm 2) of the w-conditioned stage-one ``student``, with w ~ U[w_min,
    w_max] drawn per example and given to teacher and student as ``guidance_scale``. ``kwargs`` go
    to :func:`~difflab.train.objectives.progressive.progressive_distillation` (``start_steps``,
    ``sigmas``, ``rounds``, ``weighting``, ...). Sample a round with
    ``sample_ddim(r.denoiser, x, r.sigmas, extra_args={"guidance_scale": w, ...})``."""
    return progressive_distillation(student, data, config, out_dir, draw_cond=UniformScale(w_min, w_max), **kwargs)


__all__ = ["GuidedDistillation", "guided_progressive_distillation", "guided_student", "guided_x0", "UniformScale"]
