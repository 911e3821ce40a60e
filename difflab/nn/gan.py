"""A small class-conditional GAN for 8x8 images: the baseline the guide compares diffusion with.

DCGAN's shape (Radford et al. 2016: transposed-conv-free upsampling by nearest + conv, no pooling,
LeakyReLU in the discriminator), a projection discriminator (Miyato & Koyama 2018, eq. 3:
D(x, y) = psi(phi(x)) + embed(y) . phi(x)) with spectral normalization on every layer of D (Miyato
et al. 2018), and the hinge loss (Lim & Ye 2017; Miyato et al. 2018, eq. 16):

    L_D = E[max(0, 1 - D(x, y))] + E[max(0, 1 + D(G(z, y), y))],    L_G = -E[D(G(z, y), y)]

(``loss="non_saturating"``: Goodfellow et al. 2014's -log sigmoid form, L_G = E[softplus(-D(G(z)))]).
Two Adam optimizers with beta1 = 0 (the SNGAN / BigGAN setting). :func:`gan_step` is one update of
D then G; :func:`train_gan` repeats it for a number of steps or of CPU seconds. The generator's
latent is drawn per sample from :class:`difflab.core.SampleNoise`, so a sample depends only on its
seed and index, never on the batch it was drawn in. This is not a denoiser and has no entry in
``NETWORKS``: it is the comparison, not a model difflab samples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from ..core import SampleNoise

LOSSES = ("hinge", "non_saturating")


@dataclass(frozen=True)
class GANConfig:
    """``latent_dim``: z's size; ``channels``: the widest layer; ``image_size``: 8 (two 2x
    upsamplings from 2x2); ``spectral_norm``: on D's layers; ``loss``: one of :data:`LOSSES`."""
    latent_dim: int = 32
    channels: int = 64
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 8
    spectral_norm: bool = True
    loss: str = "hinge"

    def __post_init__(self):
        if self.image_size != 8:
            raise ValueError(f"image_size={self.image_size}: this GAN makes 8x8 images")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} must be one of {list(LOSSES)}")
        if self.latent_dim < 1 or self.channels < 4 or self.num_classes < 1:
            raise ValueError(f"latent_dim={self.latent_dim}, channels={self.channels}, num_classes={self.num_classes} "
                             "must be >= 1, >= 4, >= 1")


class Generator(nn.Module):
    """G(z, y): [z, embed(y)] -> linear -> (C, 2, 2) -> 2x (nearest up, conv 3x3, GroupNorm, ReLU) -> conv -> tanh."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.num_classes, c.latent_dim)
        self.fc = nn.Linear(2 * c.latent_dim, c.channels * 4)
        self.up1 = nn.Sequential(nn.Conv2d(c.channels, c.channels, 3, padding=1), nn.GroupNorm(4, c.channels), nn.ReLU())
        self.up2 = nn.Sequential(nn.Conv2d(c.channels, c.channels // 2, 3, padding=1), nn.GroupNorm(4, c.channels // 2),
                                 nn.ReLU())
        self.out = nn.Conv2d(c.channels // 2, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(torch.cat([z, self.embed(labels)], 1))).view(len(z), self.config.channels, 2, 2)
        h = self.up1(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up2(F.interpolate(h, scale_factor=2, mode="nearest"))
        return torch.tanh(self.out(h))


class Discriminator(nn.Module):
    """D(x, y) = psi(phi(x)) + embed(y) . phi(x) (projection, Miyato & Koyama 2018, eq. 3); phi: three
    spectrally normalized 3x3 convs (stride 1, 2, 2) with LeakyReLU 0.2, summed over space."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = c = config
        sn = spectral_norm if c.spectral_norm else (lambda m: m)
        self.convs = nn.ModuleList([sn(nn.Conv2d(c.in_channels, c.channels // 2, 3, padding=1)),
                                    sn(nn.Conv2d(c.channels // 2, c.channels, 3, stride=2, padding=1)),
                                    sn(nn.Conv2d(c.channels, c.channels, 3, stride=2, padding=1))])
        self.psi = sn(nn.Linear(c.channels, 1))
        self.embed = sn(nn.Embedding(c.num_classes, c.channels))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
        phi = h.sum((2, 3))
        return self.psi(phi).squeeze(1) + (self.embed(labels) * phi).sum(1)


def build_gan(config: GANConfig = GANConfig(), seed: int = 0) -> tuple[Generator, Discriminator]:
    """A generator and a discriminator, initialized from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(config), Discriminator(config)


def gan_optimizers(gen: Generator, disc: Discriminator, lr_g: float = 2e-4, lr_d: float = 4e-4,
                   betas=(0.0, 0.9)) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and for D, beta1 = 0 and D's rate twice G's (two time-scale update rule,
    Heusel et al. 2017)."""
    return torch.optim.Adam(gen.parameters(), lr_g, betas=betas), torch.optim.Adam(disc.parameters(), lr_d, betas=betas)


def latents(seed: int, n: int, dim: int, start: int = 0) -> torch.Tensor:
    """z for samples ``start .. start + n - 1`` of run ``seed``, one generator per sample."""
    return SampleNoise.for_run(seed, n, (dim,), start=start)()


def gan_losses(d_real: torch.Tensor, d_fake: torch.Tensor, loss: str = "hinge") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_D, L_G) of the module doc from D's scores on real and generated images (for L_G the
    scores of the generated images must keep their graph to G)."""
    if loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean(), -d_fake.mean()
    if loss == "non_saturating":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean(), F.softplus(-d_fake).mean()
    raise ValueError(f"loss={loss!r} must be one of {list(LOSSES)}")


def gan_step(gen: Generator, disc: Discriminator, opt_g, opt_d, real: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> dict:
    """One update of D on a real batch and as many generated images, then one of G (fresh z, the
    same labels). Returns ``d_loss``, ``g_loss`` (floats) and D's mean scores on real and fake."""
    loss = gen.config.loss
    z = torch.randn(len(real), gen.config.latent_dim, generator=generator)
    with torch.no_grad():
        fake = gen(z, labels)
    d_real, d_fake = disc(real, labels), disc(fake, labels)
    d_loss, _ = gan_losses(d_real, d_fake, loss)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    z = torch.randn(len(real), gen.config.latent_dim, generator=generator)
    _, g_loss = gan_losses(d_real.detach(), disc(gen(z, labels), labels), loss)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return {"d_loss": d_loss.item(), "g_loss": g_loss.item(), "d_real": d_real.detach().mean().item(), "d_fake": d_fake.detach().mean().item()}


def train_gan(images: torch.Tensor, labels: torch.Tensor, config: GANConfig = GANConfig(), *, steps: int | None = None,
              cpu_seconds: float | None = None, batch_size: int = 64, seed: int = 0, lr_g: float = 2e-4,
              lr_d: float = 4e-4, ema_decay: float | None = 0.999, log_every: int = 10, callback=None):
    """Train a GAN on ``images`` (N, C, 8, 8) in [-1, 1] with ``labels`` (N,) for ``steps`` updates or
    until the process has used ``cpu_seconds`` of CPU time (``time.process_time``), whichever comes
    first. Batches and z come from generators seeded by ``seed``: the same seed, the same run.
    ``ema_decay``: the generator returned is an exponential moving average of G's weights (as in
    BigGAN; None: the last weights). Returns ``(generator (eval mode), discriminator, history)``;
    ``history`` holds every ``log_every``-th step's losses and its CPU time. ``callback(entry,
    generator)`` runs at each logged step (e.g. to measure the samples); its CPU time is not counted."""
    if steps is None and cpu_seconds is None:
        raise ValueError("give steps= or cpu_seconds= (or both)")
    gen, disc = build_gan(config, seed)
    opt_g, opt_d = gan_optimizers(gen, disc, lr_g, lr_d)
    ema = None
    if ema_decay is not None:
        ema = build_gan(config, seed)[0]
        ema.load_state_dict(gen.state_dict())
        ema.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    history, start, step, spent_outside = [], time.process_time(), 0, 0.0
    while (steps is None or step < steps) and (cpu_seconds is None or time.process_time() - start - spent_outside < cpu_seconds):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        out = gan_step(gen, disc, opt_g, opt_d, images[idx], labels[idx], g)
        step += 1
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), gen.parameters()):
                    pe.lerp_(p, 1 - min(ema_decay, (1 + step) / (10 + step)))
        if step % log_every == 0:
            history.append(dict(out, step=step, cpu_s=time.process_time() - start - spent_outside))
            if callback is not None:
                t = time.process_time()
                callback(history[-1], (ema if ema is not None else gen).eval())
                (ema if ema is not None else gen).train()
                spent_outside += time.process_time() - t
    result = ema if ema is not None else gen
    return result.eval(), disc.eval(), history


@torch.no_grad()
def sample_gan(gen: Generator, labels: torch.Tensor, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Images for ``labels`` (N,): sample i uses z of index i of run ``seed`` (batch size changes nothing)."""
    out = []
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size]
        out.append(gen(latents(seed, len(y), gen.config.latent_dim, start=i), y))
    return torch.cat(out) if out else torch.zeros(0, gen.config.in_channels, 8, 8)


__all__ = ["GANConfig", "Generator", "Discriminator", "build_gan", "gan_optimizers", "gan_losses", "gan_step",
           "train_gan", "sample_gan", "latents", "LOSSES"]
