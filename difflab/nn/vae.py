"""The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, Section 3 and appendix G).

An encoder E maps an image x (B, C, H, W) to the parameters of a diagonal Gaussian posterior
q(z | x) = N(mu, sigma^2) over latents z (B, latent_channels, H / f, W / f) with
f = 2 ** (len(block_out_channels) - 1); a decoder D maps z back to x. A small KL penalty toward
N(0, I) keeps the latent space from drifting (the "KL-reg." variant, Section 3). The same
architecture and parameter names as diffusers' ``AutoencoderKL`` (see
:mod:`difflab.io.keymaps.vae` for the few renamed keys), so its weights load as they are.

Layout, for ``block_out_channels = (c_0, ..., c_{n-1})``:

- encoder: conv_in; per level i, ``layers_per_block`` ResBlocks to c_i channels, then (not after
  the last level) a stride-2 conv with asymmetric padding (0, 1, 0, 1) as in LDM; a middle of
  ResBlock, single-head self-attention, ResBlock; GroupNorm, SiLU, conv to 2 * latent channels;
- quant_conv (1x1) -> (mean, logvar); post_quant_conv (1x1) on z;
- decoder: the mirror: conv_in, middle, per level from the deepest, ``layers_per_block + 1``
  ResBlocks then nearest x2 + conv (not after the last), GroupNorm, SiLU, conv_out.

Latents given to a diffusion model are scaled: ``z_model = (z - shift_factor) * scaling_factor``
(:meth:`AutoencoderKL.encode_latents`), with ``scaling_factor = 1 / std(z)`` measured on data
(Section 4.3.2; :func:`estimate_scaling_factor`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSONConfig
from .layers import Downsample, Upsample

GROUP_NORM_EPS = 1e-6  # LDM and diffusers use eps = 1e-6 in every GroupNorm of the autoencoder


@dataclass(frozen=True)
class VAEConfig(JSONConfig):
    """Everything that shapes an AutoencoderKL; JSON-safe through ``to_dict`` / ``from_dict``."""

    in_channels: int = 3  # image channels
    out_channels: int = 3  # reconstructed image channels
    latent_channels: int = 4  # channels of z
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one width per level; H, W halve between levels
    layers_per_block: int = 2  # ResBlocks per encoder level (decoder: one more)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every width (exactly, as in pretrained weights)
    scaling_factor: float = 0.18215  # z_model = (z - shift_factor) * scaling_factor (SD 1.x/2.x: 0.18215)
    shift_factor: float | None = None  # None = 0 (SD 1.x/2.x/XL); SD3: 0.0609
    mid_block_attention: bool = True  # self-attention in the middle of encoder and decoder
    use_quant_conv: bool = True  # 1x1 conv on (mean, logvar) after the encoder (SD3 / Flux: False)
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder (SD3 / Flux: False)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must have at least one level")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every entry of block_out_channels; it does not divide {bad}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """f: images are f times larger than latents in H and W; 2 ** (len(block_out_channels) - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)



# ----------------------------------------------------------------------------------------------
# The posterior


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) from the encoder's moments (Kingma & Welling 2014; Rombach et al. 2022, Section 3).

    ``moments`` (B, 2 * C, h, w) is split into ``mean`` and ``logvar`` along channels; ``logvar``
    is clamped to [-30, 20] (as LDM and diffusers do) so exp() stays finite.
    """

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise=None) -> torch.Tensor:
        """z = mean + std * eps (the reparameterization trick, Kingma & Welling 2014, Section 2.4).

        ``eps`` is ``noise`` (a tensor shaped like ``mean``, or a callable returning one, e.g.
        :class:`difflab.core.SampleNoise`) or drawn with ``torch.randn(generator=generator)``
        on the mean's device, in its dtype (the same draw as diffusers' posterior).
        """
        if noise is None:
            eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        else:
            eps = noise() if callable(noise) else noise
            if eps.shape != self.mean.shape:
                raise ValueError(f"noise must have the posterior's shape {tuple(self.mean.shape)}, got {tuple(eps.shape)}")
            eps = eps.to(self.mean.device, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The posterior's mode, its mean."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(q || p) per example, (B,); p = N(0, I) by default (Kingma & Welling 2014, appendix B).

        ``0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)``; against another diagonal Gaussian
        ``0.5 * sum((mu - mu_p)^2 / sigma_p^2 + sigma^2 / sigma_p^2 - 1 - log sigma^2 + log sigma_p^2)``.
        """
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar, dim=dims)

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """-log q(z | x) per example, (B,): ``0.5 * sum(log 2 pi + log sigma^2 + (z - mu)^2 / sigma^2)``."""
        dims = tuple(range(1, self.mean.ndim))
        log_two_pi = torch.log(torch.tensor(2.0 * torch.pi, dtype=self.mean.dtype, device=self.mean.device))
        return 0.5 * torch.sum(log_two_pi + self.logvar + (z - self.mean) ** 2 / self.var, dim=dims)


# ----------------------------------------------------------------------------------------------
# Blocks


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


class VAEResBlock(nn.Module):
    """Residual block without a time embedding (LDM's ``ResnetBlock`` with ``temb_channels=0``).

    ``h = conv2(silu(norm2(conv1(silu(norm1(x))))))``; returns ``shortcut(x) + h``, the shortcut a
    1x1 conv when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over the h*w pixels with a residual (LDM's ``AttnBlock``).

    ``x + to_out(softmax(q k^T / sqrt(C)) v)`` with ``q, k, v = to_q/to_k/to_v(norm(x))``.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, hw, C)
        q, k, v = (lin(tokens)[:, None] for lin in (self.to_q, self.to_k, self.to_v))  # (B, 1, hw, C)
        out = self.to_out(F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """One encoder or decoder level: ResBlocks, then an optional resampling, ``"down"`` (the encoder's
    asymmetric stride-2 conv, LDM's ``Downsample``) or ``"up"`` (the decoder's nearest x2 + conv),
    stored as diffusers names it (``downsample`` / ``upsample``)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, resample: str | None):
        super().__init__()
        if resample not in ("down", "up", None):
            raise ValueError(f"resample={resample!r} must be 'down', 'up' or None")
        self.resnets = nn.ModuleList(VAEResBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers))
        self.downsample = Downsample(out_channels, asymmetric=True) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
        return x


class MidBlock(nn.Module):
    """ResBlock, self-attention (optional), ResBlock."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResBlock(channels, channels, groups), VAEResBlock(channels, channels, groups)])
        self.attention = VAEAttention(channels, groups) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H / f, W / f), before quant_conv."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        chs, n = c.block_out_channels, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(chs[max(i - 1, 0)], chs[i], c.layers_per_block, c.norm_num_groups, "down" if i < n - 1 else None) for i in range(n))
        self.mid_block = MidBlock(chs[-1], c.norm_num_groups, c.mid_block_attention)
        self.norm_out = _norm(chs[-1], c.norm_num_groups)
        self.conv_out = nn.Conv2d(chs[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> x (B, out_channels, h * f, w * f), after post_quant_conv."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        chs, n = tuple(reversed(c.block_out_channels)), len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], c.norm_num_groups, c.mid_block_attention)
        self.up_blocks = nn.ModuleList(
            Level(chs[max(i - 1, 0)], chs[i], c.layers_per_block + 1, c.norm_num_groups, "up" if i < n - 1 else None) for i in range(n))
        self.norm_out = _norm(chs[-1], c.norm_num_groups)
        self.conv_out = nn.Conv2d(chs[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Tiling


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """``b`` with its first ``extent`` rows (dim 2) or columns (dim 3) faded in from the last
    ``extent`` of ``a``: weight on ``b`` rises linearly 0, 1/extent, ... (diffusers' blend_v / blend_h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w = (torch.arange(extent, device=b.device, dtype=torch.float64) / extent).to(b.dtype).reshape(shape)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + b.narrow(dim, 0, extent) * w
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def _tile_plan(tile_size: int, f: int, overlap: float) -> tuple[int, int]:
    """``(tile_latent, overlap_latent)``: a tile of ``tile_size`` pixels is ``tile_size // f`` latent
    pixels, neighbours overlap by ``int(tile_latent * overlap)`` of them."""
    if tile_size < f or tile_size % f:
        raise ValueError(f"tile_size={tile_size} must be a positive multiple of the downsampling factor {f}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile_overlap={overlap} must be in [0, 1)")
    tile_latent = tile_size // f
    return tile_latent, int(tile_latent * overlap)


def _tiled(x: torch.Tensor, fn, tile_in: int, stride_in: int, keep: int, blend: int) -> torch.Tensor:
    """Apply ``fn`` to ``tile_in``-sized tiles of ``x`` starting every ``stride_in`` pixels and stitch
    the outputs: each output tile is faded in over ``blend`` rows and columns from its upper and
    left neighbours (linearly), then its first ``keep`` rows and columns are kept (diffusers'
    tiled_encode / tiled_decode)."""
    rows = []
    for i in range(0, x.shape[2], stride_in):
        rows.append([fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride_in)])
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend, dim=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend, dim=3)
            row[j] = tile  # later tiles blend against this blended one, as in diffusers
        out_rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
    return torch.cat(out_rows, dim=2)


# ----------------------------------------------------------------------------------------------
# The autoencoder


class AutoencoderKL(nn.Module):
    """The KL autoencoder of latent diffusion (Rombach et al. 2022, Section 3); see the module docstring."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.decoder = Decoder(c)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # -- checks

    def _check_image(self, x: torch.Tensor, name: str = "x") -> None:
        c, f = self.config, self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"{name} must be (B, {c.in_channels}, H, W) images (in_channels={c.in_channels}), got shape {tuple(x.shape)}")
        h, w = x.shape[2:]
        if h % f or w % f:
            raise ValueError(f"{name}'s height and width must be divisible by the VAE's downsampling factor {f} "
                             f"(2 ** (len(block_out_channels) - 1)), got {h}x{w}")

    def _check_latent(self, z: torch.Tensor, name: str = "z") -> None:
        c = self.config
        if z.ndim != 4 or z.shape[1] != c.latent_channels:
            raise ValueError(f"{name} must be (B, {c.latent_channels}, h, w) latents (latent_channels={c.latent_channels}), got shape {tuple(z.shape)}")

    # -- encode / decode

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def encode(self, x: torch.Tensor, *, tiled: bool = False, tile_size: int = 512, tile_overlap: float = 0.25) -> DiagonalGaussian:
        """The posterior q(z | x) of images ``x`` (B, in_channels, H, W), H and W divisible by f.

        ``tiled`` (used only when the image is larger than a tile): encode ``tile_size``-pixel
        tiles that overlap by ``int(tile_size / f * tile_overlap)`` latent pixels and blend their
        moments linearly across the overlap, so memory stays bounded for large images (the
        arithmetic of diffusers' tiled encode). Not identical to untiled encoding: GroupNorm
        statistics and the mid-block attention see one tile, convolutions see zero padding at
        tile borders.
        """
        self._check_image(x)
        f = self.config.downsample_factor
        if tiled and max(x.shape[2:]) > tile_size:
            tile, overlap = _tile_plan(tile_size, f, tile_overlap)  # in latent pixels
            stride = tile - overlap
            return DiagonalGaussian(_tiled(x, self._moments, tile_size, stride * f, keep=stride, blend=overlap))
        return DiagonalGaussian(self._moments(x))

    def decode(self, z: torch.Tensor, *, tiled: bool = False, tile_size: int = 512, tile_overlap: float = 0.25) -> torch.Tensor:
        """Images (B, out_channels, h * f, w * f) from latents ``z`` (B, latent_channels, h, w) (unscaled).

        ``tiled`` (used only when z is larger than a tile): decode tiles of ``tile_size // f``
        latent pixels overlapping by ``int(tile_size / f * tile_overlap)``, blended linearly over
        the overlap's ``f`` times as many image pixels (see :meth:`encode`)."""
        self._check_latent(z)
        f = self.config.downsample_factor
        if tiled and max(z.shape[2:]) > tile_size // f:
            tile, overlap = _tile_plan(tile_size, f, tile_overlap)  # in latent pixels
            stride = tile - overlap
            return _tiled(z, self._decode, tile, stride, keep=stride * f, blend=overlap * f)
        return self._decode(z)

    def forward(self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """``(reconstruction, posterior)``: decode a sample of q(z | x) (or its mode when not ``sample``)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    # -- the latents a diffusion model sees

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True, *,
                       noise=None, **tiling) -> torch.Tensor:
        """Scaled latents of images ``x``: ``(z - shift_factor) * scaling_factor`` with z drawn from
        q(z | x) (``generator`` or ``noise``, see :meth:`DiagonalGaussian.sample`), or its mean when
        not ``sample`` (Rombach et al. 2022, Section 4.3.2). ``tiling``: ``tiled=``, ``tile_size=``, ..."""
        posterior = self.encode(x, **tiling)
        z = posterior.sample(generator, noise) if sample else posterior.mode()
        c = self.config
        return (z - (c.shift_factor or 0.0)) * c.scaling_factor

    def decode_latents(self, z: torch.Tensor, **tiling) -> torch.Tensor:
        """Images from scaled latents: ``decode(z / scaling_factor + shift_factor)``."""
        c = self.config
        return self.decode(z / c.scaling_factor + (c.shift_factor or 0.0), **tiling)


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, *, batch_size: int = 64,
                            generator: torch.Generator | None = None, sample: bool = True) -> float:
    """1 / std of the latents of ``images`` (Rombach et al. 2022, Section 4.3.2 and appendix G).

    Latent diffusion rescales z "by the component-wise standard deviation" so the diffusion model
    sees roughly unit-variance latents: ``scaling_factor = 1 / std(z)`` over all elements of the
    latents of a batch of data (z sampled from the posterior, or its mean when not ``sample``).
    Use the result with ``dataclasses.replace(vae.config, scaling_factor=...)``.
    """
    zs = []
    for chunk in images.split(batch_size):
        posterior = vae.encode(chunk)
        zs.append((posterior.sample(generator) if sample else posterior.mode()).double().flatten())
    z = torch.cat(zs)
    if z.numel() < 2:
        raise ValueError("estimate_scaling_factor needs at least two latent elements")
    std = float(z.std())
    if not std > 0:
        raise ValueError("the latents have zero standard deviation; cannot estimate a scaling factor")
    return 1.0 / std


PRESETS = {
    # for smoke tests: factor 2, 8 and 16 channels
    "tiny": VAEConfig(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
    # the embedded digits at 16x16, factor 4: 16x16x1 images <-> 4x4x4 latents (scaling factor to be estimated)
    "digits": VAEConfig(in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                        norm_num_groups=8, scaling_factor=1.0),
    # Stable Diffusion 1.x / 2.x (factor 8)
    "sd": VAEConfig(),
    # Stable Diffusion XL: the same architecture, another scaling factor
    "sdxl": VAEConfig(scaling_factor=0.13025),
    # Stable Diffusion 3: 16 latent channels, a shift, no quant convs
    "sd3": VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
}

__all__ = ["VAEConfig", "AutoencoderKL", "DiagonalGaussian", "estimate_scaling_factor", "PRESETS", "VAEResBlock",
           "VAEAttention", "Encoder", "Decoder"]
