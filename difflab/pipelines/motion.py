"""Motions from a motion diffusion model (Tevet et al. 2023, MDM): action-conditional sampling
with classifier-free guidance, and zero-shot editing by inpainting.

Samples live in the model's (normalized) space, (B, frames, joints, 3); the demo maps them to
metres with :class:`difflab.data.stick_figures.MotionNormalizer`.

- :func:`sample_motions`: stage 1, one starting noise per motion from its seed
  (:class:`~difflab.core.SampleNoise`, so a motion does not depend on the batch); stage 2,
  classifier-free guidance on the action (:class:`~difflab.guidance.ClassifierFreeGuidance`, the
  null class unconditional; MDM's Section 3); stage 3, the sampler on the denoiser's grid.
- :func:`edit_motions`: the same with the entries where ``mask`` is 0 fixed to ``known`` by
  RePaint replacement (:func:`~difflab.guidance.sample_repaint`); MDM's editing (their
  Section 4.3): in time with :func:`keyframe_mask` (in-betweening: the model fills the frames
  between given key poses) and in joints with :func:`joint_mask` (e.g. the legs generated for
  given upper-body motion). The given entries come back exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core import SampleNoise
from ..core.grids import for_denoiser
from ..guidance import ClassifierFreeGuidance, sample_repaint
from ..samplers import get_sampler


def check_steps(steps) -> int:
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    return steps


def check_labels(labels, seeds: Sequence[int], num_classes: int | None) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) != len(seeds) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer actions (B,), one per seed ({len(seeds)}), got {tuple(labels.shape)}")
    if num_classes is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be actions in [0, {num_classes - 1}], got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def guided(denoiser, guidance_scale: float):
    """The denoiser with classifier-free guidance on ``class_labels`` (the null class = ``num_classes``)."""
    num_classes = getattr(getattr(denoiser.net, "config", None), "num_classes", None)
    if guidance_scale == 1.0 or num_classes is None:
        return denoiser
    return ClassifierFreeGuidance(denoiser, guidance_scale, uncond={"class_labels": num_classes})


def _prepare(denoiser, labels, seeds, shape, sampler, steps):
    sample = get_sampler(sampler)
    steps = check_steps(steps)
    if len(seeds) == 0:
        raise ValueError("seeds must name at least one motion")
    labels = check_labels(labels, seeds, getattr(getattr(denoiser.net, "config", None), "num_classes", None))
    sigmas = for_denoiser(denoiser, steps)
    noise = SampleNoise(list(seeds), tuple(shape))
    return sample, labels, sigmas, noise


@torch.no_grad()
def sample_motions(denoiser, labels, seeds: Sequence[int], *, shape: tuple[int, int, int], guidance_scale: float = 2.5,
                   sampler: str = "ddim", steps: int = 50) -> torch.Tensor:
    """Motions (B, *shape) of the actions ``labels`` (B,), one per seed (see the module doc)."""
    sample, labels, sigmas, noise = _prepare(denoiser, labels, seeds, shape, sampler, steps)
    x = noise() * denoiser.prior_std(sigmas[0])
    return sample(guided(denoiser, guidance_scale), x, sigmas, extra_args={"class_labels": labels}, noise=noise)


@torch.no_grad()
def edit_motions(denoiser, known: torch.Tensor, mask: torch.Tensor, labels, seeds: Sequence[int], *,
                 guidance_scale: float = 2.5, sampler: str = "ddim", steps: int = 50, resample: int = 1,
                 callback=None) -> torch.Tensor:
    """Motions (B, F, J, C) equal to ``known`` where ``mask`` (B or 1, F, J, C) is 0 and generated
    for the actions ``labels`` where it is 1 (RePaint; Lugmayr et al. 2022, Algorithm 1, with
    ``resample`` passes per step). ``callback`` gets the sampler's dict after every step."""
    if known.ndim != 4 or len(known) != len(seeds):
        raise ValueError(f"known must be (B, frames, joints, C) with one row per seed ({len(seeds)}), got {tuple(known.shape)}")
    mask = torch.as_tensor(mask).float()
    if mask.ndim != 4 or mask.shape[1:] != known.shape[1:] or mask.shape[0] not in (1, len(known)):
        raise ValueError(f"mask must be (B or 1, {', '.join(map(str, known.shape[1:]))}), got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (keep) and 1 (fill)")
    sample, labels, sigmas, noise = _prepare(denoiser, labels, seeds, tuple(known.shape[1:]), sampler, steps)
    x = noise() * denoiser.prior_std(sigmas[0])
    return sample_repaint(guided(denoiser, guidance_scale), x, sigmas, known=known.float(), mask=mask, sampler=sample,
                          resample=resample, noise=noise, extra_args={"class_labels": labels}, callback=callback)


def keyframe_mask(shape: tuple[int, int, int], key_frames: Sequence[int]) -> torch.Tensor:
    """(1, F, J, C) mask for in-betweening: 0 (keep) on every joint of ``key_frames``, 1 elsewhere."""
    frames = shape[0]
    bad = [f for f in key_frames if not (isinstance(f, int) and -frames <= f < frames)]
    if bad or not key_frames:
        raise ValueError(f"key_frames must be frame indices in [0, {frames - 1}] (at least one), got {list(key_frames)}")
    mask = torch.ones(1, *shape)
    mask[:, list(key_frames)] = 0
    return mask


def joint_mask(shape: tuple[int, int, int], given_joints: Sequence[int]) -> torch.Tensor:
    """(1, F, J, C) mask for editing in joints: 0 (keep) on ``given_joints`` in every frame, 1 elsewhere."""
    joints = shape[1]
    bad = [j for j in given_joints if not (isinstance(j, int) and 0 <= j < joints)]
    if bad or not given_joints:
        raise ValueError(f"given_joints must be joint indices in [0, {joints - 1}] (at least one), got {list(given_joints)}")
    mask = torch.ones(1, *shape)
    mask[:, :, list(given_joints)] = 0
    return mask


__all__ = ["check_steps", "edit_motions", "guided", "joint_mask", "keyframe_mask", "sample_motions"]
