"""Steering away from a concept: safety guidance with a noise-aware classifier, and reward
guidance with a differentiable reward on the denoised estimate.

Both are the score shift of classifier guidance (:mod:`difflab.guidance.classifier`),
D + scale sigma^2 grad_x log q(x), with a different log q:

- :class:`SafetyGuidance`, ``mode="complement"``: log q = log p(y not in U | x, sigma), the
  probability that the sample is *not* of an unwanted class in U. With scale 1 and an exact
  classifier this is exact conditioning on the event y not in U: the guided denoiser is the
  denoiser of the data with the unwanted classes removed (p(x | y not in U) is proportional to
  p(x) (1 - p(U | x))). Its gradient vanishes where p(U | x) is already small, so samples that
  were never heading for U are left nearly alone.
- :class:`SafetyGuidance`, ``mode="negative"``: log q = -log p(y in U | x, sigma), negative
  classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 with the sign flipped): it keeps
  pushing even when p(U | x) is already small.
- :class:`RewardGuidance`: log q = r(x0_hat(x)), a differentiable reward of the denoised
  estimate, differentiated through the denoiser: the forward guidance of Bansal et al. 2023,
  "Universal Guidance for Diffusion Models", Algorithm 1, in the canonical frame.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .classifier import _sigma_vector, interval_scale, log_prob_gradient, score_shift

SAFETY_MODES = ("complement", "negative")


def unwanted_log_probs(logits: torch.Tensor, unwanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y in U | x), log p(y not in U | x)) from logits (B, K) and a (K,) bool mask of U,
    each (B,), computed as logsumexp over the classes of each side minus logsumexp over all."""
    total = logits.logsumexp(dim=1)
    neg_inf = torch.finfo(logits.dtype).min
    inside = logits.masked_fill(~unwanted, neg_inf).logsumexp(dim=1) - total
    outside = logits.masked_fill(unwanted, neg_inf).logsumexp(dim=1) - total
    return inside, outside


class SafetyGuidance(nn.Module):
    """Safety guidance with a noise-aware classifier (classifier guidance, Dhariwal & Nichol 2021,
    eq. 14, towards the complement of the unwanted classes; see the module docstring):

    - ``mode="complement"`` (default): D + scale sigma^2 grad_x log p(y not in U | x, sigma);
      scale 1 is the exact denoiser of the data without the classes in U;
    - ``mode="negative"``: D - scale sigma^2 grad_x log p(y in U | x, sigma).

    ``unwanted_class`` is one class index or a sequence of them (U); ``classifier(x, sigma) ->
    logits`` sees the canonical x and sigma. ``cond`` passes to the denoiser unchanged.
    ``scale = 0`` is the base denoiser. ``sigma_max``: guide only at sigma <= sigma_max, as in
    :class:`difflab.guidance.ClassifierGuidance`.
    """

    def __init__(self, denoiser, classifier, unwanted_class, scale: float, *, mode: str = "complement",
                 sigma_max: float | None = None):
        super().__init__()
        if mode not in SAFETY_MODES:
            raise ValueError(f"mode={mode!r} must be one of {list(SAFETY_MODES)}")
        unwanted = torch.as_tensor(unwanted_class, dtype=torch.long).reshape(-1)
        if len(unwanted) == 0:
            raise ValueError("unwanted_class must name at least one class")
        self.denoiser, self.classifier, self.scale, self.mode = denoiser, classifier, float(scale), mode
        self.unwanted, self.sigma_max = unwanted, sigma_max

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x0 = self.denoiser(x, sigma, **cond)
        sigma = _sigma_vector(x, sigma)
        scale = interval_scale(sigma, self.scale, self.sigma_max)
        if not bool(scale.any()):
            return x0

        def log_q(z):
            logits = self.classifier(z, sigma)
            if int(self.unwanted.max()) >= logits.shape[1] or int(self.unwanted.min()) < 0:
                raise ValueError(f"unwanted classes {self.unwanted.tolist()} are not among the classifier's {logits.shape[1]}")
            mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            mask[self.unwanted.to(logits.device)] = True
            inside, outside = unwanted_log_probs(logits, mask)
            return outside if self.mode == "complement" else -inside

        return score_shift(x0, sigma, log_prob_gradient(log_q, x), scale)


class RewardGuidance(nn.Module):
    """Reward guidance (Bansal et al. 2023, Algorithm 1, forward universal guidance, in the
    canonical frame): D_guided = D + scale sigma^2 grad_x r(D(x, sigma)).

    ``reward_fn(x0_hat) -> (B,)`` is any differentiable reward of the denoised estimate (a clean
    classifier's log-probability, minus a concept score, an aesthetic model); the gradient flows
    through the denoiser, as in universal guidance. ``through_denoiser=False`` takes the gradient
    with respect to x0_hat instead (treating dD/dx as the identity): one denoiser call without a
    backward pass through it, a cruder direction. With r = log p(y | x0) the score form matches
    classifier guidance's (Dhariwal & Nichol 2021, eq. 14) evaluated at x0_hat.
    ``cond`` passes to the denoiser; ``scale = 0`` is the base denoiser.
    """

    def __init__(self, denoiser, reward_fn: Callable[[torch.Tensor], torch.Tensor], scale: float, *,
                 through_denoiser: bool = True):
        super().__init__()
        self.denoiser, self.reward_fn, self.scale = denoiser, reward_fn, float(scale)
        self.through_denoiser = bool(through_denoiser)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        if self.scale == 0:
            return self.denoiser(x, sigma, **cond)
        sigma = _sigma_vector(x, sigma)
        if not self.through_denoiser:
            x0 = self.denoiser(x, sigma, **cond)
            return score_shift(x0, sigma, log_prob_gradient(self.reward_fn, x0), self.scale)
        kept = {}

        def reward_of_x(z):
            x0 = self.denoiser(z, sigma, **cond)
            kept["x0"] = x0.detach()
            return self.reward_fn(x0)

        grad = log_prob_gradient(reward_of_x, x)
        return score_shift(kept["x0"], sigma, grad, self.scale)
