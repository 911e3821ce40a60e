"""Acting with diffusion: action chunks of a diffusion policy (Chi et al. 2023) and guided,
inpainted trajectory plans (Janner et al. 2022, Diffuser).

- :func:`sample_action_chunks`: observations (B, n_obs, obs_dim) -> action chunks (B, horizon,
  action_dim), sampled by a few-step sampler from the denoiser of a conditional
  :class:`~difflab.nn.temporal_unet.TemporalUNet` (``obs=``). The starting noise of chunk i comes
  from its own seed (:class:`~difflab.core.SampleNoise`), so a chunk does not depend on the batch.
- :func:`diffusion_policy`: that as a receding-horizon policy for
  :func:`difflab.data.detour.run_episodes`; chunk seeds are functions of (seed, episode, replan).
- :func:`plan_trajectories`: Diffuser's planning: an unconditional denoiser over state-action
  trajectories, its start (and goal) states fixed by inpainting (RePaint replacement,
  :func:`difflab.guidance.sample_repaint`; Janner et al. 2022, Section 3.3, "conditioning as
  inpainting") and, with ``value_fn``, guided up the gradient of a learned return
  (:class:`difflab.guidance.RewardGuidance`; their Section 3.2, eq. 3).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..core import SampleNoise, sample_seed
from ..core.grids import for_denoiser
from ..guidance import RewardGuidance, sample_repaint
from ..samplers import get_sampler

REPLANS_PER_EPISODE = 4096  # chunk seeds: sample_seed(seed, episode * REPLANS_PER_EPISODE + replan)


def check_steps(steps) -> int:
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    return steps


@torch.no_grad()
def sample_action_chunks(denoiser, obs: torch.Tensor, seeds: Sequence[int], *, shape: tuple[int, int],
                         sampler: str = "ddim", steps: int = 10) -> torch.Tensor:
    """Stage 1: one starting noise per chunk from ``seeds`` (B,); stage 2: ``steps`` steps of
    ``sampler`` on the denoiser's own grid with ``obs=`` (B, n_obs, obs_dim); stage 3: clip to the
    action range [-1, 1]. ``shape`` is one chunk's (horizon, action_dim)."""
    sample = get_sampler(sampler)
    steps = check_steps(steps)
    if obs.ndim < 2 or len(obs) != len(seeds):
        raise ValueError(f"obs must be (B, ...) with one row per seed ({len(seeds)}), got {tuple(obs.shape)}")
    sigmas = for_denoiser(denoiser, steps)
    noise = SampleNoise(list(seeds), shape)
    x = noise() * denoiser.prior_std(sigmas[0])
    x = sample(denoiser, x, sigmas, extra_args={"obs": obs.float()}, noise=noise)
    return x.clamp(-1, 1)


def diffusion_policy(denoiser, *, shape: tuple[int, int], seed: int = 0, sampler: str = "ddim",
                     steps: int = 10) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """A receding-horizon policy ``(obs_history, episodes, replan) -> chunks`` for
    :func:`difflab.data.detour.run_episodes` (Chi et al. 2023, Section 3.1): every replan samples a
    fresh chunk whose noise is seeded by (seed, episode, replan) alone."""
    get_sampler(sampler), check_steps(steps)

    def act(obs, episodes, replan):
        seeds = [sample_seed(seed, int(e) * REPLANS_PER_EPISODE + int(replan)) for e in episodes]
        return sample_action_chunks(denoiser, obs, seeds, shape=shape, sampler=sampler, steps=steps)

    return act


def regression_policy(model) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """A receding-horizon policy from a deterministic chunk regressor ``model(obs) -> (B, horizon, A)``
    (the behaviour-cloning baseline), clipped to [-1, 1]."""

    @torch.no_grad()
    def act(obs, episodes, replan):
        return model(obs.float()).clamp(-1, 1)

    return act


@torch.no_grad()
def plan_trajectories(denoiser, known: torch.Tensor, mask: torch.Tensor, seeds: Sequence[int], *,
                      value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, scale: float = 0.0,
                      sampler: str = "ddim", steps: int = 20) -> torch.Tensor:
    """Diffuser's planning (Janner et al. 2022, Algorithm 1 with a deterministic sampler).

    Stage 1: per-plan noise from ``seeds``; stage 2: wrap the denoiser in
    :class:`~difflab.guidance.RewardGuidance` with ``value_fn(trajectory (B, H, C)) -> (B,)`` at
    ``scale`` (none when ``value_fn`` is None or ``scale`` is 0); stage 3: sample with
    :func:`~difflab.guidance.sample_repaint` so the entries where ``mask`` is 0 (the start and goal
    states) are ``known`` exactly at the end. ``known`` (B, H, C) holds the fixed values,
    ``mask`` (B or 1, H, C) is 1 where the model plans."""
    steps = check_steps(steps)
    if known.ndim != 3 or len(known) != len(seeds):
        raise ValueError(f"known must be (B, horizon, channels) with one row per seed ({len(seeds)}), got {tuple(known.shape)}")
    if mask.ndim != 3 or mask.shape[1:] != known.shape[1:] or mask.shape[0] not in (1, len(known)):
        raise ValueError(f"mask must be (B or 1, {known.shape[1]}, {known.shape[2]}), got {tuple(mask.shape)}")
    model = denoiser if value_fn is None or scale == 0 else RewardGuidance(denoiser, value_fn, scale)
    sigmas = for_denoiser(denoiser, steps)
    noise = SampleNoise(list(seeds), tuple(known.shape[1:]))
    x = noise() * denoiser.prior_std(sigmas[0])
    return sample_repaint(model, x, sigmas, known=known.float(), mask=mask.float(), sampler=get_sampler(sampler), noise=noise)


__all__ = ["sample_action_chunks", "diffusion_policy", "regression_policy", "plan_trajectories", "REPLANS_PER_EPISODE"]
