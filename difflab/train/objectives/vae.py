"""The KL autoencoder's objective (Rombach et al. 2022, appendix G; without LPIPS or a
discriminator): per example, the reconstruction error of a posterior sample plus ``kl_weight``
KL(q(z | x) || N(0, I)) (:func:`difflab.train.vae_loss.vae_loss`). The posterior's noise eps of
z = mean + std eps is drawn on the CPU from the loop's generator."""
from __future__ import annotations

import torch

from ..vae_loss import vae_loss


class VAEObjective:
    """``vae_loss`` of images ``x`` (B, C, H, W); logs the reconstruction error and the KL too."""

    name = "vae"

    def __init__(self, vae, *, reconstruction: str = "l1", kl_weight: float = 1e-6):
        self.module, self.reconstruction, self.kl_weight = vae, reconstruction, kl_weight

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        c, f = self.module.config, self.module.config.downsample_factor
        x = batch["x"]
        return {"eps": torch.randn((len(x), c.latent_channels, x.shape[2] // f, x.shape[3] // f), generator=generator)}

    def loss(self, batch: dict) -> dict:
        out = vae_loss(self.module, batch["x"], reconstruction=self.reconstruction, kl_weight=self.kl_weight,
                       noise=batch["eps"])
        return {"loss": out["loss"], "reconstruction": out["reconstruction"], "kl": out["kl"]}


__all__ = ["VAEObjective"]
