"""Classifier-free guidance as a denoiser -> denoiser wrapper."""
from __future__ import annotations

import math

import torch
from torch import nn


def stack_branches(name: str, c, u, batch: int):
    """Stack the conditional and unconditional values of one keyword along the batch."""
    if not (torch.is_tensor(c) and c.ndim > 0 and c.shape[0] == batch):
        raise ValueError(f"cond {name!r} has an unconditional value, so it must be a tensor with the batch "
                         f"size {batch} as its first dimension")
    u = torch.as_tensor(u, device=c.device, dtype=c.dtype)
    return torch.cat([c, u.expand(c.shape)])


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): D = D_u + scale (D_c - D_u).

    ``scale`` is diffusers' ``guidance_scale`` (the paper's 1 + w): 1 is the conditional
    denoiser, 0 the unconditional one. Guiding x0_hat is the same as guiding eps_hat or v_hat,
    since at fixed (x, sigma) they are affine in x0_hat with coefficients summing to one.

    ``forward(x, sigma, **cond)`` runs both branches in one batched call of ``denoiser`` on
    ``cat([x, x])``: the unconditional branch gets ``cond`` with the entries of ``uncond``
    replacing their keys (a null label, an empty-prompt embedding, or a negative prompt;
    values are broadcast to the conditional shape, so a (1, ...) embedding or a scalar label
    will do). Every key of ``uncond`` must be in ``cond`` as a (B, ...) tensor; other tensor
    keywords with batch size B are shared by both branches, anything else is passed unchanged.
    ``scale == 1`` skips the unconditional branch.

    ``guidance_rescale`` (phi; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", section 3.4) rescales the guided x0_hat to the per-sample standard
    deviation of the conditional x0_hat and mixes: ``phi * D * std(D_c) / std(D) + (1 - phi) * D``.
    This is diffusers' ``rescale_noise_cfg`` applied to x0_hat; diffusers applies it to the raw
    network output (eps or v), which agrees only for x0-predicting networks.
    """

    def __init__(self, denoiser, scale: float, uncond: dict, guidance_rescale: float = 0.0):
        super().__init__()
        try:
            value = float(scale)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"guidance scale={scale!r} must be a finite number (1 = no guidance)")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={guidance_rescale} must be in [0, 1]")
        self.denoiser, self.scale, self.uncond = denoiser, value, dict(uncond)
        self.guidance_rescale = float(guidance_rescale)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, **cond)
        d_c, d_u = self._call_both(self.denoiser, x, sigma, cond).chunk(2)
        return self._combine(d_c, d_u)

    def x0_and_v(self, x: torch.Tensor, sigma, **cond):
        """Guided x0_hat and the conditional branch's learned-variance interpolation v, as GLIDE
        does (Nichol et al. 2022, section 2.3), for DDPM sampling with ``variance="learned"``."""
        if self.scale == 1.0:
            return self.denoiser.x0_and_v(x, sigma, **cond)
        x0, v = self._call_both(self.denoiser.x0_and_v, x, sigma, cond)
        d_c, d_u = x0.chunk(2)
        return self._combine(d_c, d_u), v.chunk(2)[0]

    def _call_both(self, fn, x, sigma, cond):
        """Call ``fn`` once on the conditional and unconditional branches stacked along the batch."""
        missing = sorted(set(self.uncond) - set(cond))
        if missing:
            raise ValueError(f"uncond keys {missing} have no conditional counterpart in cond {sorted(cond)}")
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma
        both = {}
        for name, c in cond.items():
            if name in self.uncond:
                both[name] = stack_branches(name, c, self.uncond[name], batch)
            elif torch.is_tensor(c) and c.ndim > 0 and c.shape[0] == batch:
                both[name] = torch.cat([c, c])
            else:
                both[name] = c
        return fn(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)

    def _combine(self, d_c: torch.Tensor, d_u: torch.Tensor) -> torch.Tensor:
        guided = d_u + self.scale * (d_c - d_u)
        if self.guidance_rescale > 0:
            guided = rescale(guided, d_c, self.guidance_rescale)
        return guided


def rescale(guided: torch.Tensor, d_c: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, section 3.4): x_rescaled = x_cfg std(x_pos) / std(x_cfg)
    per sample, then phi x_rescaled + (1 - phi) x_cfg."""
    if guided.ndim < 2:
        raise ValueError("guidance_rescale needs (B, ...) samples with at least one non-batch dimension")
    dims = list(range(1, guided.ndim))
    ratio = d_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return phi * guided * ratio + (1 - phi) * guided
