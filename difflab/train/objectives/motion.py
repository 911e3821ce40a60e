"""The motion diffusion objective of MDM (Tevet et al. 2023, Section 3, eq. 2-5): the simple
denoising loss plus geometric losses on the predicted clean motion's joint positions.

With x0_hat the denoiser's clean prediction and p = denormalize(x), per example:

- L_simple: the denoising loss in the network's parameterization (eq. 2; for MDM's
  ``prediction="x0"`` it is ||x0 - x0_hat||^2 in the normalized space);
- L_pos = ||p(x0) - p(x0_hat)||^2 in metres (eq. 3; the positions are the representation here,
  so no forward kinematics is needed);
- L_vel = ||(p_{t+1} - p_t)(x0) - (p_{t+1} - p_t)(x0_hat)||^2 (eq. 5);
- L_foot = ||(p_{t+1} - p_t)(x0_hat) * f_t||^2 over the feet, f_t the binary contact of the clean
  motion (eq. 4; :func:`difflab.data.stick_figures.foot_contacts`): feet on the ground stay put.

loss = L_simple + lambda_pos L_pos + lambda_vel L_vel + lambda_foot L_foot (eq. 6's weighted sum).
Labels are dropped to the null class with probability ``cfg_dropout`` for classifier-free
guidance (:func:`~difflab.train.objectives.diffusion.draw_diffusion`).
"""
from __future__ import annotations

import torch

from difflab.core import append_dims
from difflab.core.params import to_x0_eps

from ...data.stick_figures import FEET, foot_contacts
from .diffusion import DRAWN, draw_diffusion


def geometric_losses(p_hat: torch.Tensor, p: torch.Tensor, feet=FEET, contact_height: float = 0.05,
                     contact_speed: float = 0.01) -> dict[str, torch.Tensor]:
    """(B,) L_pos, L_vel and L_foot of predicted positions ``p_hat`` against clean ``p`` (B, F, J, 3),
    each a mean over frames, joints (feet) and coordinates."""
    v_hat, v = p_hat[:, 1:] - p_hat[:, :-1], p[:, 1:] - p[:, :-1]
    contact = foot_contacts(p, contact_height, contact_speed).to(p_hat.dtype)            # (B, F - 1, 2)
    return {"pos": ((p_hat - p) ** 2).flatten(1).mean(1), "vel": ((v_hat - v) ** 2).flatten(1).mean(1),
            "foot": ((v_hat[:, :, list(feet)] * contact[..., None]) ** 2).flatten(1).mean(1)}


class MotionObjective:
    """MDM's training objective; ``mean`` and ``std`` (broadcastable to one motion (F, J, 3)) map
    the normalized data back to metres (:class:`difflab.data.stick_figures.MotionNormalizer`)."""

    name = "motion"

    def __init__(self, denoiser, mean: torch.Tensor, std: torch.Tensor, *, lambda_pos: float = 1.0, lambda_vel: float = 1.0,
                 lambda_foot: float = 1.0, cfg_dropout: float = 0.1, null_class: int | None = None):
        if min(lambda_pos, lambda_vel, lambda_foot) < 0:
            raise ValueError(f"lambda_pos={lambda_pos}, lambda_vel={lambda_vel}, lambda_foot={lambda_foot} must be >= 0")
        if cfg_dropout > 0 and null_class is None:
            null_class = getattr(getattr(denoiser.net, "config", None), "num_classes", None)
        self.denoiser, self.module = denoiser, denoiser.net
        self.mean, self.std = torch.as_tensor(mean).float(), torch.as_tensor(std).float()
        self.weights = {"pos": lambda_pos, "vel": lambda_vel, "foot": lambda_foot}
        self.cfg_dropout, self.null_class = cfg_dropout, null_class

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        return draw_diffusion(batch, generator, self.denoiser.frame, cfg_dropout=self.cfg_dropout, null_class=self.null_class)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        d = self.denoiser
        x0, sigma, noise = batch["x0"], batch["sigma"].to(batch["x0"]), batch["noise"].to(batch["x0"])
        extra = {k: v for k, v in batch.items() if k not in DRAWN and v is not None}
        out, x_in, alpha, sigma_in = d.net_output(x0 + append_dims(sigma, x0.ndim) * noise, sigma, **extra)
        simple = ((out.float() - d.target(x0, noise, sigma).float()) ** 2).flatten(1).mean(1)
        x0_hat, _ = to_x0_eps(out.float(), d.prediction, x_in.float(), alpha, sigma_in, d.sigma_data)
        mean, std = self.mean.to(x0.device), self.std.to(x0.device)
        terms = geometric_losses(x0_hat * std + mean, x0.float() * std + mean)
        total = simple + sum(self.weights[k] * terms[k] for k in terms)
        return {"loss": total, "simple": simple, **terms}


__all__ = ["MotionObjective", "geometric_losses"]
