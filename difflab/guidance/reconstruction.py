"""Reconstruction guidance (Ho et al. 2022, "Video Diffusion Models", Section 3.1, eq. 7) as a
denoiser -> denoiser wrapper: conditional sampling of the unknown part x^b of a sample given a
known part x^a from a model trained on whole samples.

In difflab's canonical frame (x = x0 + sigma eps, so the paper's alpha_t is 1)::

    x0_tilde = x0_hat - (w_r / 2) * grad_x || x^a - x0_hat^a ||^2

The gradient flows through the network, so the unknown part is pulled towards samples whose
known part agrees with x^a. Used together with replacement (:func:`~difflab.guidance.inpaint.sample_repaint`,
which puts x^a noised to the current level back after every step), as Ho et al. do.
"""
from __future__ import annotations

import torch
from torch import nn


class ReconstructionGuidance(nn.Module):
    """``D(x, sigma, **cond)`` = eq. 7 around ``denoiser``: ``known`` (B, ...) is x^a where
    ``mask`` (B or 1, ...) is 0 (1 = the model fills, as in inpainting); ``weight`` is w_r (0 =
    the plain denoiser)."""

    def __init__(self, denoiser, known: torch.Tensor, mask: torch.Tensor, weight: float = 1.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"reconstruction guidance weight={weight} must be >= 0")
        self.denoiser, self.weight = denoiser, float(weight)
        self.register_buffer("known", known, persistent=False)
        self.register_buffer("keep", (1 - mask.float()).expand_as(known).clone(), persistent=False)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        if self.weight == 0:
            return self.denoiser(x, sigma, **cond)
        if x.shape[0] != self.known.shape[0]:  # classifier-free guidance stacks two branches
            raise ValueError("wrap classifier-free guidance in reconstruction guidance, not the other way round")
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            x0 = self.denoiser(x, sigma, **cond)
            err = (self.keep * (self.known.to(x0.dtype) - x0)).square().sum()
            (grad,) = torch.autograd.grad(err, x)
        return (x0 - self.weight / 2 * grad).detach()

    @property
    def frame(self):
        return self.denoiser.frame

    def prior_std(self, sigma):
        return self.denoiser.prior_std(sigma)


__all__ = ["ReconstructionGuidance"]
