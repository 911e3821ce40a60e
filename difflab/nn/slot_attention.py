"""Slot attention (Locatello et al. 2020): a set of K slots competes for the features of an image
through attention normalized over the slots, refined by a GRU for a few iterations; each slot
ends up describing one object. Here:

- :class:`SlotAttention`: the module of their Algorithm 1;
- :class:`SlotEncoder`: their object-discovery encoder (a CNN, a soft position embedding, an MLP,
  then slot attention; Section 3 and Appendix E), returning the slots and their attention masks;
- :class:`SlotAutoencoder`: their decoder, for comparison: each slot broadcast over the image
  (the spatial broadcast decoder; Watters et al. 2019), decoded to RGB and an alpha logit,
  alphas normalized over slots (a mixture) and the RGB mixed by them;
- :class:`SlotUNet`: slot diffusion's decoder (Wu et al. 2023, SlotDiffusion; Jiang et al. 2023,
  LSD): a U-Net that cross-attends to the slots of the clean image, ``net(x_in, t, image=)``,
  trained end to end with the encoder by the diffusion loss. ``context=`` (slots given directly,
  e.g. edited ones) bypasses the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import JSONConfig
from .unet import UNet


@dataclass(frozen=True)
class SlotConfig(JSONConfig):
    """The slot encoder's sizes."""
    in_channels: int = 3
    size: int = 16          # image side (the position embedding's grid)
    num_slots: int = 5      # K
    slot_dim: int = 64      # D
    iters: int = 3          # T, slot-attention iterations
    hidden: int = 64        # CNN width and MLP hidden size
    mlp_hidden: int = 128   # the slot update MLP's hidden size
    kernel_size: int = 5    # the encoder CNN's kernels (1: per-pixel features, e.g. colour)
    decoder_kernel_size: int = 3  # the mixture decoder's kernels (1: a per-pixel MLP of slot + position)
    learned_init: bool = False  # a learned mean per slot (Jia et al. 2023, BO-QSA) instead of one shared mean
    straight_through: bool = False  # the last iteration's gradient only, passed to the initial slots (BO-QSA; Chang et al. 2022)
    center_keys: bool = False  # keys minus their mean over the image's pixels: no slot wins every pixel by a bias
    position_scale: float = 1.0  # a factor on the encoder's soft position embedding (small: features group by appearance)

    def __post_init__(self):
        for name in ("kernel_size", "decoder_kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value % 2 == 0:
                raise ValueError(f"SlotConfig.{name} must be an odd positive int (1, 3, 5, ...), got {value!r}")


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al. 2020, Algorithm 1). ``forward(inputs (B, N, D_in), slots
    (B, K, D))`` returns the slots after ``iters`` iterations and the last attention (B, N, K),
    normalized over the slots (each input's weights sum to one over the K slots)."""

    def __init__(self, in_dim: int, slot_dim: int, iters: int = 3, mlp_hidden: int = 128, eps: float = 1e-8,
                 straight_through: bool = False, center_keys: bool = False):
        super().__init__()
        self.center_keys = center_keys
        self.iters, self.eps, self.scale, self.straight_through = iters, eps, slot_dim ** -0.5, straight_through
        self.norm_inputs, self.norm_slots, self.norm_mlp = nn.LayerNorm(in_dim), nn.LayerNorm(slot_dim), nn.LayerNorm(slot_dim)
        self.q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.k = nn.Linear(in_dim, slot_dim, bias=False)
        self.v = nn.Linear(in_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, slot_dim))

    def forward(self, inputs: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.norm_inputs(inputs)
        k, v = self.k(inputs), self.v(inputs)
        if self.center_keys:
            k = k - k.mean(1, keepdim=True)  # a slot's logits have zero mean over the pixels
        b, n_slots, d = slots.shape
        init = slots
        for i in range(self.iters):
            if self.straight_through and i == self.iters - 1:
                # BO-QSA (Jia et al. 2023, Eq. 5): the fixed point's gradient goes to the initial slots as is.
                slots = slots.detach() + init - init.detach()
            previous = slots
            q = self.q(self.norm_slots(slots))
            attn = torch.softmax(self.scale * k @ q.transpose(1, 2), dim=-1)  # (B, N, K): softmax over the slots
            weights = attn + self.eps
            weights = weights / weights.sum(1, keepdim=True)  # weighted mean over the inputs
            updates = weights.transpose(1, 2) @ v  # (B, K, D)
            slots = self.gru(updates.reshape(-1, d), previous.reshape(-1, d)).reshape(b, n_slots, d)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


def position_grid(size: int) -> torch.Tensor:
    """(size * size, 4): (y, x, 1 - y, 1 - x) per pixel, row-major (the soft position embedding's input)."""
    r = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([y, x, 1 - y, 1 - x], -1).reshape(-1, 4)


class SlotEncoder(nn.Module):
    """CNN features plus a soft position embedding, an MLP, then :class:`SlotAttention` from slots
    drawn from a learned Gaussian N(mu, diag(sigma^2)) (Locatello et al. 2020, Section 3).
    ``forward(images (B, C, H, W), noise=None)`` -> (slots (B, K, D), masks (B, K, H, W));
    ``noise`` (B, K, D) standard normal fixes the slots' initialization (drawn otherwise)."""

    def __init__(self, config: SlotConfig = SlotConfig()):
        super().__init__()
        self.config = c = config
        k, p = c.kernel_size, c.kernel_size // 2
        self.cnn = nn.Sequential(nn.Conv2d(c.in_channels, c.hidden, k, padding=p), nn.ReLU(),
                                 nn.Conv2d(c.hidden, c.hidden, k, padding=p), nn.ReLU(),
                                 nn.Conv2d(c.hidden, c.hidden, k, padding=p), nn.ReLU())
        self.position = nn.Linear(4, c.hidden)
        self.register_buffer("grid", position_grid(c.size), persistent=False)
        self.mlp = nn.Sequential(nn.LayerNorm(c.hidden), nn.Linear(c.hidden, c.hidden), nn.ReLU(), nn.Linear(c.hidden, c.hidden))
        self.mu = nn.Parameter(torch.randn(1, c.num_slots if c.learned_init else 1, c.slot_dim) * c.slot_dim ** -0.5)
        self.log_sigma = nn.Parameter(torch.full((1, 1, c.slot_dim), -1.0))
        self.slot_attention = SlotAttention(c.hidden, c.slot_dim, c.iters, c.mlp_hidden,
                                            straight_through=c.straight_through, center_keys=c.center_keys)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        b, _, h, w = images.shape
        if (h, w) != (c.size, c.size) or images.shape[1] != c.in_channels:
            raise ValueError(f"the slot encoder takes (B, {c.in_channels}, {c.size}, {c.size}) images, got {tuple(images.shape)}")
        position = self.position(self.grid.to(images.dtype))
        features = self.cnn(images).flatten(2).transpose(1, 2) + c.position_scale * position
        features = self.mlp(features)
        if noise is None:
            noise = torch.randn(b, c.num_slots, c.slot_dim, device=images.device, dtype=images.dtype)
        slots, attn = self.slot_attention(features, self.mu + self.log_sigma.exp() * noise)
        return slots, attn.transpose(1, 2).reshape(b, c.num_slots, h, w)


def absorbed_masks(masks: torch.Tensor, slot_mask: torch.Tensor, absorb: torch.Tensor) -> torch.Tensor:
    """Mixture masks (B, K, H, W) with the slots off in ``slot_mask`` (B, K) bool zeroed and their
    mass given, pixel by pixel, to the kept slots on in ``absorb`` (B, K) bool, in proportion to
    those slots' masks (a removed slot's alpha -> the background). Rows with no kept absorbing
    slot fall back to renormalising over all kept slots (the plain softmax without the slot)."""
    kept = slot_mask[:, :, None, None].to(masks.dtype)
    takers = (slot_mask & absorb)[:, :, None, None].to(masks.dtype)
    freed = (masks * (1 - kept)).sum(1, keepdim=True)
    share = masks * takers
    total = share.sum(1, keepdim=True)
    fallback = masks * kept / (masks * kept).sum(1, keepdim=True).clamp_min(1e-12)
    out = masks * kept + freed * share / total.clamp_min(1e-12)
    has_takers = takers.flatten(1).any(1)[:, None, None, None]
    return torch.where(has_takers, out, fallback)


class SlotAutoencoder(nn.Module):
    """Slot attention's object-discovery model (Locatello et al. 2020): :class:`SlotEncoder`, then
    the spatial broadcast decoder on each slot (slot + position embedding at every pixel, 1x1 and
    3x3 convolutions) to RGB and an alpha logit; alphas softmaxed over slots are the masks and the
    reconstruction is sum_k mask_k * rgb_k. ``forward(images)`` -> (reconstruction, masks (B, K, H, W))."""

    def __init__(self, config: SlotConfig = SlotConfig()):
        super().__init__()
        self.config = c = config
        self.encoder = SlotEncoder(config)
        self.position = nn.Linear(4, c.slot_dim)
        self.register_buffer("grid", position_grid(c.size), persistent=False)
        k, p = c.decoder_kernel_size, c.decoder_kernel_size // 2
        self.decoder = nn.Sequential(nn.Conv2d(c.slot_dim, c.hidden, k, padding=p), nn.ReLU(),
                                     nn.Conv2d(c.hidden, c.hidden, k, padding=p), nn.ReLU(),
                                     nn.Conv2d(c.hidden, c.hidden, k, padding=p), nn.ReLU(),
                                     nn.Conv2d(c.hidden, c.in_channels + 1, k, padding=p))

    def decode(self, slots: torch.Tensor, slot_mask: torch.Tensor | None = None,
               absorb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (B, C, H, W), masks (B, K, H, W)) of slots (B, K, D); ``slot_mask`` (B, K)
        bool leaves the slots marked False out of the mixture (their masks are 0): the softmax
        renormalises their alpha onto all the kept slots. ``absorb`` (B, K) bool (with ``slot_mask``):
        the left-out slots' alpha goes to the kept slots marked True only (e.g. the background's),
        in proportion to their own alpha there, so a removed object becomes background rather
        than a faded copy drawn by its neighbours; rows with no kept absorbing slot renormalise."""
        b, k, d = slots.shape
        s = self.config.size
        x = slots[:, :, None, :] + self.position(self.grid.to(slots.dtype))[None, None]  # (B, K, HW, D)
        x = x.reshape(b * k, s, s, d).permute(0, 3, 1, 2)
        out = self.decoder(x).reshape(b, k, -1, s, s)
        rgb, alpha = out[:, :, :-1], out[:, :, -1]
        if slot_mask is not None and absorb is not None:
            masks = absorbed_masks(torch.softmax(alpha, dim=1), slot_mask, absorb)
        else:
            if slot_mask is not None:
                alpha = alpha.masked_fill(~slot_mask[:, :, None, None], float("-inf"))
            masks = torch.softmax(alpha, dim=1)
        return (masks[:, :, None] * rgb).sum(1), masks

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        slots, _ = self.encoder(images, noise)
        return self.decode(slots)


class SlotUNet(nn.Module):
    """Slot diffusion's network (Wu et al. 2023; Jiang et al. 2023): ``net(x_in, t, image=)``
    encodes the clean ``image`` into slots (:class:`SlotEncoder`) and a :class:`UNet` with
    ``context_dim = slot_dim`` cross-attends to them; ``context=`` (B, K', D) with an optional
    ``context_mask`` (B, K') bool uses given slots instead (removed, swapped or added ones).

    ``mixture``: a :class:`SlotAutoencoder` sharing ``encoder``; its mixture decoder's render of
    the slots (the kept ones under ``context_mask``) is concatenated to the U-Net's input as a
    spatial hint (the U-Net takes 2 C channels and predicts C), so the diffusion decoder refines
    a layout the slots already fix, as a cascade's low-resolution image does (Ho et al. 2022);
    ``hint_absorb`` (B, K) bool: the render gives the left-out slots' alpha to these kept slots
    only (:meth:`SlotAutoencoder.decode`'s ``absorb``). The cross-attention is unchanged by it."""

    def __init__(self, encoder: SlotEncoder, unet: UNet, mixture: SlotAutoencoder | None = None):
        super().__init__()
        c = encoder.config
        if unet.config.context_dim != c.slot_dim:
            raise ValueError(f"the U-Net's context_dim ({unet.config.context_dim}) must be the slots' dim ({c.slot_dim})")
        if mixture is not None and mixture.encoder is not encoder:
            raise ValueError("mixture must be the SlotAutoencoder whose .encoder is the encoder given")
        channels = (unet.config.in_channels, unet.config.out_channels or unet.config.in_channels)
        if mixture is not None and channels != (2 * c.in_channels, c.in_channels):
            raise ValueError(f"with a mixture hint the U-Net takes {2 * c.in_channels} channels (x and the render) and "
                             f"predicts {c.in_channels}: in_channels={2 * c.in_channels}, out_channels={c.in_channels}; "
                             f"got {channels}")
        self.encoder, self.unet, self.mixture = encoder, unet, mixture
        self.config = unet.config

    def forward(self, x, t, image=None, context=None, context_mask=None, hint_absorb=None, **cond):
        if context is None:
            if image is None:
                raise ValueError("SlotUNet needs image= (slots are encoded from it) or context= (slots given)")
            context, _ = self.encoder(image)
        if self.mixture is not None:
            hint = self.mixture.decode(context, context_mask, hint_absorb)[0].clamp(-1, 1)
            x = torch.cat([x, hint.to(x.dtype)], 1)
        return self.unet(x, t, context=context, context_mask=context_mask, **cond)


__all__ = ["SlotConfig", "SlotAttention", "SlotEncoder", "SlotAutoencoder", "SlotUNet", "position_grid", "absorbed_masks"]
