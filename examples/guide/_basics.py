"""What the basics chapters (2, 3, 4, 11, 12, 25, 40) share: the 2-D ring mixture with its exact
denoiser (difflab.oracle), a tiny time-conditioned MLP for 2-D toy data, a seeded training loop on
difflab's own loss, and digits sampling with a named sampler on a discrete model's grid."""
from __future__ import annotations


import torch
from torch import nn

from difflab.core import Denoiser, SampleNoise, VPDiscrete, grids
from difflab.data import ring_means
from difflab.nn.layers import timestep_embedding
from difflab.oracle import GaussianMixture
from difflab.samplers import get_sampler
from difflab.train import diffusion_loss, draw_sigmas


def ring_mixture(modes: int = 8, std: float = 0.1) -> GaussianMixture:
    """Eight equal Gaussians of std ``std`` on a circle, unit variance per axis (``ring_means``)."""
    return GaussianMixture(torch.full((modes,), 1 / modes), ring_means(modes, std=std), torch.full((modes,), std**2))


def discrete_grid(frame: VPDiscrete, steps: int) -> torch.Tensor:
    """``steps`` of the frame's training steps, "trailing" spacing (Lin et al. 2024: the first is
    always the last training step, where the sampler's noise starts), then 0."""
    return grids.timestep_sigmas(frame, grids.discrete_timesteps(frame.T, steps, "trailing"))


class ToyNet(nn.Module):
    """net(x_in, t) for 2-D points: an MLP on [x_in, emb(t)] where emb is ``embedding``:
    ``"sinusoidal"`` (Vaswani et al. 2017, the U-Net's ``timestep_embedding``), ``"fourier"``
    (Gaussian random features, Tancik et al. 2020; NCSN++), ``"raw"`` (t itself, scaled) or
    ``"none"`` (zeros: the net cannot tell the noise level)."""

    def __init__(self, embedding: str = "sinusoidal", dim: int = 2, hidden: int = 128, emb_dim: int = 32,
                 t_scale: float = 1.0, seed: int = 0):
        super().__init__()
        if embedding not in ("sinusoidal", "fourier", "raw", "none"):
            raise ValueError(f"embedding={embedding!r}: choose sinusoidal, fourier, raw or none")
        g = torch.Generator().manual_seed(seed)
        self.embedding, self.emb_dim, self.t_scale = embedding, emb_dim, t_scale
        self.register_buffer("freqs", torch.randn(emb_dim // 2, generator=g) * 16.0)
        self.net = nn.Sequential(nn.Linear(dim + emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        with torch.no_grad():
            for p in self.net.parameters():  # seeded init, independent of torch's global generator
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.0))

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float().reshape(-1) * self.t_scale
        if self.embedding == "sinusoidal":
            return timestep_embedding(t, self.emb_dim)
        if self.embedding == "fourier":  # t_scale maps t into [0, 1] for these
            a = 2 * torch.pi * t[:, None] * self.freqs[None]
            return torch.cat([a.cos(), a.sin()], -1)
        if self.embedding == "raw":
            return t[:, None].expand(-1, self.emb_dim).contiguous()
        return torch.zeros(len(t), self.emb_dim)

    def forward(self, x_in: torch.Tensor, t, **cond) -> torch.Tensor:
        t = torch.as_tensor(t).expand(x_in.shape[0])
        return self.net(torch.cat([x_in.float(), self.embed(t)], -1)).to(x_in.dtype)


def train_toy(denoiser: Denoiser, data: torch.Tensor, steps: int, *, batch: int = 256, lr: float = 3e-3, seed: int = 0,
              noise_level: str | None = None, sigma_fn=None) -> list[float]:
    """Adam on difflab's denoising loss (``diffusion_loss``, weighting "simple": L_simple in the
    net's own parameterization), seeded; ``sigma_fn(n, g)`` overrides the training levels.
    Returns the per-step losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(denoiser.net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (batch,), generator=g)].float()
        sigma = (sigma_fn(batch, g) if sigma_fn else draw_sigmas(denoiser.frame, batch, g, noise_level)).float()
        noise = torch.randn(x0.shape, generator=g)
        loss = diffusion_loss(denoiser, x0, sigma, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def x0_mse(denoiser, data: torch.Tensor, sigmas: torch.Tensor, seed: int = 1) -> float:
    """Mean squared error of D(x0 + sigma eps, sigma) against x0 over ``data`` at the given levels
    (one level per row, drawn in turn): the same yardstick for every parameterization."""
    g = torch.Generator().manual_seed(seed)
    sig = sigmas[torch.arange(len(data)) % len(sigmas)].float()
    x0 = data.float()
    x = x0 + sig[:, None] * torch.randn(x0.shape, generator=g)
    return (denoiser(x, sig) - x0).pow(2).sum(-1).mean().item()


@torch.no_grad()
def sample_digits(denoiser, labels: torch.Tensor, sigmas: torch.Tensor, sampler: str = "ddpm", seed: int = 0,
                  **kw) -> torch.Tensor:
    """Class-conditional digits (no guidance) from ``sampler`` on ``sigmas``; sample i's noise comes
    from its own generator (``SampleNoise``), so it does not depend on the batch."""
    noise = SampleNoise.for_run(seed, len(labels), (1, 8, 8))
    x = noise() * float(denoiser.prior_std(sigmas[0]))
    out = get_sampler(sampler)(denoiser, x, sigmas, noise=noise, extra_args={"class_labels": labels}, **kw)
    return out.clamp(-1, 1)
