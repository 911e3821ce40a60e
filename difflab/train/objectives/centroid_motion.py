"""The diffusion objective for clips plus a centre-of-mass velocity loss on the clean estimate: an
engineering choice, no paper's, in the spirit of MDM's velocity loss (Tevet et al. 2023, eq. 5) with
the digit's centre of mass in place of joint positions.

With x0_hat the denoiser's clean estimate of a clip (B, C, F, H, W) in [-1, 1], c_f its intensity-
weighted centre of mass in frame f (ink (x + 1) / 2 clamped to [0, 1], the judge's reading,
:func:`difflab.data.moving_digits.ink_centres`), per example:

    L_vel = mean_f || (c_{f+1} - c_f)(x0_hat) - (c_{f+1} - c_f)(x0) ||^2   (pixels^2)
    loss  = L_simple + lambda_vel L_vel

at every noise level (weight 1): on moving digits the true steps are fixed by the direction label
alone (1 px a frame along its axis), so even the blurry high-noise estimate has a well-defined
target, and it is there that the motion modules' estimate moved the end frames too little
(docs/video.md, stop 36). Examples whose ``skip_key`` condition was dropped to ``skip_value`` (the
null direction of classifier-free guidance) get no velocity term: their motion is not asked.
"""
from __future__ import annotations

import torch

from difflab.core.params import to_x0_eps
from difflab.data.moving_digits import ink_centres

from ..losses import weighted_mse
from .diffusion import DRAWN, DiffusionObjective


def centroid_velocity_loss(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """(B,) mean over frame pairs and channels of the squared difference (pixels^2) between the
    frame-to-frame steps of the centre of mass of ``x0_hat`` and of ``x0`` (B, C, F, H, W)."""
    if x0.ndim != 5 or x0.shape[2] < 2:
        raise ValueError(f"clips must be (B, C, F, H, W) with F >= 2, got {tuple(x0.shape)}")
    c_hat, c = ink_centres(x0_hat, eps=1e-3), ink_centres(x0, eps=1e-3)          # (B, C, F, 2)
    v_hat, v = c_hat[:, :, 1:] - c_hat[:, :, :-1], c[:, :, 1:] - c[:, :, :-1]
    return ((v_hat - v) ** 2).flatten(1).mean(1)


class CentroidMotionObjective(DiffusionObjective):
    """:class:`DiffusionObjective` (``loss="mse"``; its weighting, dropout and ``frame_weights``)
    plus ``lambda_vel`` times :func:`centroid_velocity_loss` of the clean estimate. ``skip_key`` /
    ``skip_value``: examples whose batch[skip_key] equals skip_value get no velocity term (None: all)."""

    name = "centroid_motion"

    def __init__(self, denoiser, *, lambda_vel: float = 1.0, skip_key: str | None = None, skip_value=None, **kwargs):
        if not lambda_vel >= 0:
            raise ValueError(f"lambda_vel={lambda_vel} must be >= 0")
        if kwargs.get("loss", "mse") != "mse":
            raise ValueError(f"loss={kwargs['loss']!r}: the centre-of-mass velocity term goes with loss='mse' only")
        super().__init__(denoiser, **kwargs)
        self.lambda_vel, self.skip_key, self.skip_value = lambda_vel, skip_key, skip_value

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        d = self.denoiser
        x0, sigma, noise = batch["x0"], batch["sigma"].to(batch["x0"]), batch["noise"].to(batch["x0"])
        extra = {k: v for k, v in batch.items() if k not in DRAWN and v is not None}
        sigma_b = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        out, x_in, alpha, sigma_in = d.net_output(x0 + sigma_b * noise, sigma, **extra)
        simple = weighted_mse(d, out, d.target(x0, noise, sigma), alpha, sigma_in, weighting=self.weighting,
                              min_snr_gamma=self.min_snr_gamma, element_weight=self.frame_weights)
        x0_hat, _ = to_x0_eps(out.float(), d.prediction, x_in.float(), alpha, sigma_in, d.sigma_data)
        vel = centroid_velocity_loss(x0_hat, x0.float())
        if self.skip_key is not None and batch.get(self.skip_key) is not None:
            vel = vel * (batch[self.skip_key] != self.skip_value).to(vel)
        return {"loss": simple + self.lambda_vel * vel, "simple": simple, "vel": vel}


__all__ = ["CentroidMotionObjective", "centroid_velocity_loss"]
