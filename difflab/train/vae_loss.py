"""Training losses of the KL autoencoder (Rombach et al. 2022, appendix G; Esser et al. 2021, Section 3.2).

Per example: ``L = L_rec + beta * KL(q(z | x) || N(0, I)) [+ lambda * L_adv]``.

- ``L_rec``: the sum over pixels of ``|x - x_hat|`` (``"l1"``) or ``(x - x_hat)^2`` (``"l2"``).
  Sums, not means, as in LDM's ``LPIPSWithDiscriminator``, so ``kl_weight`` has LDM's meaning
  (1e-6 for its KL-f8 autoencoder). LDM adds LPIPS and a learned log-variance; neither is here.
- ``KL``: :meth:`difflab.nn.vae.DiagonalGaussian.kl`, summed over latent elements.
- ``L_adv``: optional, a patch discriminator (PatchGAN, Isola et al. 2017) trained with the hinge
  loss; the autoencoder gets ``-mean D(x_hat)`` weighted by the adaptive weight
  ``lambda = |grad L_rec| / (|grad L_adv| + 1e-4)`` (gradients with respect to the decoder's
  last layer; Esser et al. 2021, eq. 7) times ``disc_weight``.

Every function returns per-example values (B,); the training loop takes the mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import group_norm

RECONSTRUCTIONS = ("l1", "l2")


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Sum over all but the batch dimension of ``|x - x_hat|`` (l1) or ``(x - x_hat)^2`` (l2); (B,)."""
    if kind not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction kind must be one of {RECONSTRUCTIONS}, got {kind!r}")
    err = (x - x_hat).abs() if kind == "l1" else (x - x_hat) ** 2
    return err.flatten(1).sum(dim=1)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, Section 3.2.2; LDM's ``NLayerDiscriminator``).

    A 4x4 stride-2 conv + LeakyReLU(0.2), ``n_layers - 1`` more stride-2 convs with doubling
    width (at most 8x), one stride-1 conv, and a 1-channel stride-1 conv: one real/fake logit per
    overlapping patch, (B, 1, h, w). GroupNorm replaces LDM's BatchNorm so a sample's logits do
    not depend on the rest of its batch. Images must be at least ``3 * 2 ** n_layers`` pixels.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False), group_norm(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.min_size = 3 * 2 ** n_layers  # n_layers halvings, then two 4x4 convs each remove a pixel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(f"PatchDiscriminator with these layers needs images of at least {self.min_size}x{self.min_size}, got {tuple(x.shape[2:])}")
        return self.net(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017; LDM's ``hinge_d_loss``), per example:
    ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))`` over each example's patches."""
    real = F.relu(1.0 - logits_real).flatten(1).mean(dim=1)
    fake = F.relu(1.0 + logits_fake).flatten(1).mean(dim=1)
    return 0.5 * (real + fake)


def discriminator_loss(discriminator: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss on real ``x`` and reconstructions ``x_hat`` (detached); (B,)."""
    return hinge_discriminator_loss(discriminator(x), discriminator(x_hat.detach()))


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor, *, delta: float = 1e-4,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = |grad_{G_L} L_rec| / (|grad_{G_L} L_adv| + delta), clamped to [0, max_weight] and
    detached (Esser et al. 2021, eq. 7); ``G_L`` = ``last_layer``, ``rec`` and ``adv`` scalars."""
    g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + delta)).clamp(0.0, max_weight).detach()


def vae_loss(vae, x: torch.Tensor, *, reconstruction: str = "l1", kl_weight: float = 1e-6,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             discriminator: nn.Module | None = None, disc_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """The autoencoder's loss on images ``x``, per example (see the module docstring).

    Returns a dict of (B,) tensors ``loss``, ``reconstruction``, ``kl``, ``adversarial`` (zeros
    without a discriminator), the scalar ``adaptive_weight`` (0 without a discriminator, or when
    gradients are disabled, as in LDM's evaluation) and ``x_hat``, the reconstructions, to give
    to :func:`discriminator_loss`. z is sampled from q(z | x) with ``generator``, or is
    mean + std ``noise`` when ``noise`` (shaped like the latents) is given.
    """
    if noise is None:
        x_hat, posterior = vae(x, sample=True, generator=generator)
    else:
        posterior = vae.encode(x)
        x_hat = vae.decode(posterior.sample(noise=noise))
    rec = reconstruction_loss(x, x_hat, reconstruction)
    kl = posterior.kl()
    loss = rec + kl_weight * kl
    adv = torch.zeros_like(rec)
    weight = torch.zeros((), dtype=rec.dtype, device=rec.device)
    if discriminator is not None:
        adv = -discriminator(x_hat).flatten(1).mean(dim=1)
        if torch.is_grad_enabled():
            weight = disc_weight * adaptive_weight(rec.mean(), adv.mean(), vae.decoder.conv_out.weight)
        loss = loss + weight * adv
    return {"loss": loss, "reconstruction": rec, "kl": kl, "adversarial": adv, "adaptive_weight": weight, "x_hat": x_hat}


__all__ = ["RECONSTRUCTIONS", "reconstruction_loss", "PatchDiscriminator", "hinge_discriminator_loss",
           "discriminator_loss", "adaptive_weight", "vae_loss"]
