"""Consistency functions: the boundary-condition parameterization of consistency models.

A consistency function maps any point of a probability-flow ODE trajectory to its origin,
f(x_sigma, sigma) = x_{sigma_min} (Song et al. 2023, "Consistency Models", eq. 3), and meets
the boundary condition f(x, sigma_min) = x by construction (eq. 5)::

    f(x, sigma) = c_skip(sigma) x_skip + c_out(sigma) F(x, sigma)

with c_skip(sigma_min) = 1 and c_out(sigma_min) = 0. Two forms, both written once here:

- ``cm`` (Song et al. 2023, Appendix C; diffusers' ``CMStochasticIterativeScheduler``):
  c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sd^2 + sigma^2),
  x_skip the canonical x (:func:`cm_scalings`).
- ``lcm`` (Luo et al. 2023, latent consistency models; diffusers' ``LCMScheduler``): the same
  shape in the scaled timestep u = 10 t of a VP model, c_skip = sd^2 / (u^2 + sd^2),
  c_out = u / sqrt(u^2 + sd^2), x_skip the network input x / sqrt(1 + sigma^2) (:func:`lcm_scalings`).

:class:`ConsistencyFunction` wraps a :class:`~difflab.core.Denoiser` (F = its x0 estimate, whatever
the network predicts: LCM's eps or v U-Net) or a raw network ``net(x_in, t, **cond)`` with a frame
(F = the network output itself, Song et al.'s F_theta), and is itself a denoiser
``f(x, sigma, **cond) -> x0``: every sampler, guidance wrapper and pipeline takes it.
"""
from __future__ import annotations

import torch
from torch import nn

from .denoiser import Denoiser, VPContinuous, VPDiscrete, append_dims

FORMS = ("cm", "lcm")


# ----------------------------------------------------------------------------------------------
# The scalings (Song et al. 2023, Appendix C; Luo et al. 2023)


def cm_scalings(sigma: torch.Tensor, sigma_min: float = 0.002, sigma_data: float = 0.5):
    """(c_skip, c_out) of Song et al. 2023, Appendix C (with t = sigma, epsilon = sigma_min):
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sd^2 + sigma^2).

    Computed in the dtype of ``sigma``, so at sigma = sigma_min they are exactly 1 and 0."""
    shifted = sigma - sigma_min
    return sigma_data**2 / (shifted**2 + sigma_data**2), shifted * sigma_data / (sigma_data**2 + sigma**2).sqrt()


def lcm_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of latent consistency models (Luo et al. 2023; their code's
    ``scalings_for_boundary_conditions`` and diffusers' ``LCMScheduler``): with the scaled timestep
    u = timestep_scaling t, c_skip = sd^2 / (u^2 + sd^2) and c_out = u / sqrt(u^2 + sd^2).
    At t = 0, 1 and 0; for large t, c_skip ~ sd^2 / u^2 (t = 999: 2.5e-9)."""
    u = t * timestep_scaling
    return sigma_data**2 / (u**2 + sigma_data**2), u / (u**2 + sigma_data**2).sqrt()


# ----------------------------------------------------------------------------------------------
# The wrapper


class ConsistencyFunction(nn.Module):
    """f(x, sigma, **cond) = c_skip x_skip + c_out F(x, sigma, **cond), a denoiser (module doc).

    ``model``: a denoiser ``D(x, sigma, **cond) -> x0`` (a :class:`~difflab.core.Denoiser`, for
    LCM the eps or v network wrapped in its VP frame), or, with ``frame``, a raw network
    ``net(x_in, t, **cond)`` whose output is F itself (``Denoiser(net, frame, "x0")``: Song et
    al.'s F_theta(c_in x, c_noise) with the EDM frame's c_in and c_noise).

    ``form="cm"``: ``sigma_min`` is the boundary epsilon (default: the model's ``sigma_min``,
    0.002 for the EDM and VE frames); f(x, sigma_min) = x exactly. ``form="lcm"``: the scalings of
    the frame's timestep t = frame.time(sigma) with ``timestep_scaling``, the skip on the network
    input x / sqrt(1 + sigma^2) as LCM was distilled (VP frames only); f equals that input at t = 0.
    """

    def __init__(self, model, frame=None, *, form: str = "cm", sigma_min: float | None = None,
                 sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form={form!r} is unknown; choose one of {list(FORMS)}")
        self.denoiser = Denoiser(model, frame, "x0") if frame is not None else model
        if not callable(self.denoiser):
            raise ValueError(f"model must be a denoiser D(x, sigma) or a network with a frame, got {type(model).__name__}")
        self.form, self.sigma_data, self.timestep_scaling = form, float(sigma_data), float(timestep_scaling)
        model_frame = getattr(self.denoiser, "frame", None)
        if form == "lcm" and not isinstance(model_frame, (VPDiscrete, VPContinuous)):
            raise ValueError(f"form='lcm' needs a denoiser in a VP frame (VPDiscrete or VPContinuous): its scalings "
                             f"use the frame's timestep; got {type(model_frame).__name__}")
        if sigma_min is None:
            sigma_min = getattr(self.denoiser, "sigma_min", None)
            if sigma_min is None:
                raise ValueError("pass sigma_min=: the boundary noise level (the model has no sigma_min)")
        if not sigma_min >= 0:
            raise ValueError(f"sigma_min={sigma_min} must be >= 0")
        self.boundary_sigma = float(sigma_min)

    def scalings(self, sigma: torch.Tensor):
        """(c_skip, c_out) at ``sigma`` (a tensor), in its dtype: :func:`cm_scalings` or :func:`lcm_scalings`."""
        if self.form == "cm":
            return cm_scalings(sigma, self.boundary_sigma, self.sigma_data)
        return lcm_scalings(self.frame.time(sigma), self.sigma_data, self.timestep_scaling)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        c_skip, c_out = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        x_skip = x if self.form == "cm" else append_dims(self.frame.scale(sigma), x.ndim) * x
        return c_skip * x_skip + c_out * self.denoiser(x, sigma, **cond)

    # what samplers, grids and pipelines ask a denoiser
    @property
    def frame(self):
        return getattr(self.denoiser, "frame", None)

    @property
    def net(self):
        return getattr(self.denoiser, "net", None)

    @property
    def sigma_min(self) -> float:
        return self.boundary_sigma

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max

    def prior_std(self, sigma):
        return self.denoiser.prior_std(sigma)

    def extra_repr(self) -> str:
        return f"form={self.form!r}, sigma_min={self.boundary_sigma:g}, sigma_data={self.sigma_data:g}"


__all__ = ["FORMS", "cm_scalings", "lcm_scalings", "ConsistencyFunction"]
