"""Slot diffusion (Wu et al. 2023, SlotDiffusion; Jiang et al. 2023, LSD): images -> slots ->
images, and scenes recomposed by editing the slots in between.

- :func:`encode_slots`: the slots (B, K, D) of images and their attention masks (B, K, H, W),
  the object discovery of slot attention (Locatello et al. 2020);
- :func:`decode_slots`: sample an image from the diffusion decoder cross-attending to given
  slots (``slot_mask`` (B, K) bool leaves some out);
- :func:`remove_slot`, :func:`swap_slots`, :func:`add_slot`: edits of a slot set (composition);
- :func:`segment`: the masks as one segment id per pixel.

Works with :class:`difflab.nn.slot_attention.SlotUNet` (``denoiser.net``) and, for
:func:`encode_slots`, any module with a ``SlotEncoder`` at ``.encoder``.
"""
from __future__ import annotations

import torch

from ..core.rng import SampleNoise
from .common import denoise, run_options, sample_device, sampling_grid
from .options import CLASS_DEFAULTS, SampleOptions, resolve


def _encoder(model):
    net = getattr(model, "net", model)
    encoder = getattr(net, "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(net).__name__} has no slot encoder (.encoder); give a SlotUNet's denoiser or a SlotAutoencoder")
    return encoder


@torch.no_grad()
def encode_slots(model, images: torch.Tensor, *, seed: int = 0, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots (N, K, D), masks (N, K, H, W)) of images (N, C, H, W) in [-1, 1]. The slots'
    initial noise of image i comes from its own generator seeded by (``seed``, i)."""
    encoder = _encoder(model)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    c = encoder.config
    slots, masks = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        noise = SampleNoise.for_run(seed, len(x), (c.num_slots, c.slot_dim), start=start)()
        s, m = encoder(x.float(), noise)
        slots.append(s)
        masks.append(m)
    return torch.cat(slots), torch.cat(masks)


@torch.no_grad()
def decode_slots(denoiser, slots: torch.Tensor, *, slot_mask: torch.Tensor | None = None, size: int = 16,
                 channels: int = 3, options: SampleOptions | None = None, **overrides) -> torch.Tensor:
    """Images (N, C, size, size) sampled from the slot-conditioned decoder given ``slots`` (N, K, D);
    ``slot_mask`` (N, K) bool, True = the slot takes part (all by default). Options as
    :func:`difflab.pipelines.generate` (no guidance: the decoder has no unconditional branch)."""
    # 1. Check inputs.
    opts = resolve(options, CLASS_DEFAULTS, overrides)
    if opts.guidance_scale != 1.0:
        raise ValueError("guidance_scale must be 1: the slot decoder is trained without an unconditional branch")
    if slots.ndim != 3:
        raise ValueError(f"slots must be (N, K, D), got shape {tuple(slots.shape)}")
    n, k, _ = slots.shape
    if slot_mask is not None and (slot_mask.shape != (n, k) or slot_mask.dtype != torch.bool):
        raise ValueError(f"slot_mask must be a bool tensor (N, K) = ({n}, {k}), got {slot_mask.dtype} {tuple(slot_mask.shape)}")
    _, device = sample_device(denoiser, opts)

    # 2. The grid.
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset).to(device, torch.float32)
    prior = float(denoiser.prior_std(sigmas[0].double()))

    def sample_batch(start, b, noise):
        # 3. Per-sample starting noise; 4. the slots as cross-attention context; 5. the sampler.
        x = noise() * prior
        cond = {"context": slots[start:start + b].to(device)}
        if slot_mask is not None:
            cond["context_mask"] = slot_mask[start:start + b].to(device)
        return denoise(denoiser, x, sigmas, opts, noise, cond).clamp(-1, 1)

    return run_options(n, (channels, size, size), sample_batch, opts, device=device,
                       desc=f"decoding slots ({opts.sampler}, {opts.steps} steps)")


def remove_slot(slot_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``slot_mask`` (N, K) bool with slot ``index[i]`` of each row i switched off."""
    out = slot_mask.clone()
    out[torch.arange(len(out)), index] = False
    return out


def swap_slots(slots: torch.Tensor, index: torch.Tensor, other: torch.Tensor, other_index: torch.Tensor) -> torch.Tensor:
    """``slots`` (N, K, D) with slot ``index[i]`` of row i replaced by slot ``other_index[i]`` of
    ``other[i]`` (another scene's slots)."""
    out = slots.clone()
    rows = torch.arange(len(out))
    out[rows, index] = other[rows, other_index]
    return out


def add_slot(slots: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``slots`` (N, K, D) with one more slot (N, D) appended: (N, K + 1, D)."""
    return torch.cat([slots, slot[:, None]], 1)


def segment(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) long: the slot with the largest mask at each pixel (argmax over K)."""
    return masks.argmax(1)


__all__ = ["encode_slots", "decode_slots", "remove_slot", "swap_slots", "add_slot", "segment"]
