"""Slot diffusion (Wu et al. 2023, SlotDiffusion; Jiang et al. 2023, LSD): images -> slots ->
images, and scenes recomposed by editing the slots in between.

- :func:`encode_slots`: the slots (B, K, D) of images and their attention masks (B, K, H, W),
  the object discovery of slot attention (Locatello et al. 2020);
- :func:`decode_slots`: sample an image from the diffusion decoder cross-attending to given
  slots (``slot_mask`` (B, K) bool leaves some out);
- :func:`remove_slot`, :func:`swap_slots`, :func:`add_slot`: edits of a slot set (composition);
  :func:`swap_slot_sets` swaps objects that several slots hold;
- :func:`edit_region`: where an edit acts, from the slots' masks; :func:`decode_slots` with
  ``known=`` and ``region=`` regenerates only there and keeps the rest of the scene (RePaint,
  Lugmayr et al. 2022; Blended Diffusion, Avrahami et al. 2022: a mask-localised edit);
- :func:`segment`: the masks as one segment id per pixel.

Works with :class:`difflab.nn.slot_attention.SlotUNet` (``denoiser.net``) and, for
:func:`encode_slots`, any module with a ``SlotEncoder`` at ``.encoder``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..guidance.inpaint import check_mask, sample_repaint
from ..samplers import get_sampler
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
def decode_slots(denoiser, slots: torch.Tensor, *, slot_mask: torch.Tensor | None = None,
                 absorb: torch.Tensor | None = None, size: int = 16,
                 channels: int = 3, known: torch.Tensor | None = None, region: torch.Tensor | None = None,
                 resample: int = 1, options: SampleOptions | None = None, **overrides) -> torch.Tensor:
    """Images (N, C, size, size) sampled from the slot-conditioned decoder given ``slots`` (N, K, D);
    ``slot_mask`` (N, K) bool, True = the slot takes part (all by default). Options as
    :func:`difflab.pipelines.generate` (no guidance: the decoder has no unconditional branch).
    ``absorb`` (N, K) bool, with ``slot_mask`` and a :class:`~difflab.nn.slot_attention.SlotUNet`
    with a mixture hint: the left-out slots' alpha goes to these kept slots in the hint (removal
    as alpha -> background, :func:`difflab.nn.slot_attention.absorbed_masks`).

    A localised edit: with ``known`` (N, C, size, size) in [-1, 1] (the scene before the edit) and
    ``region`` (N, 1, size, size) of 0/1 (1 = regenerate; :func:`edit_region`), every step puts
    ``known`` noised to the step's level back outside ``region`` (RePaint, ``resample`` passes over
    every step, :func:`difflab.guidance.inpaint.sample_repaint`), and the result is ``known`` exactly there."""
    # 1. Check inputs.
    opts = resolve(options, CLASS_DEFAULTS, overrides)
    if opts.guidance_scale != 1.0:
        raise ValueError("guidance_scale must be 1: the slot decoder is trained without an unconditional branch")
    if slots.ndim != 3:
        raise ValueError(f"slots must be (N, K, D), got shape {tuple(slots.shape)}")
    n, k, _ = slots.shape
    if slot_mask is not None and (slot_mask.shape != (n, k) or slot_mask.dtype != torch.bool):
        raise ValueError(f"slot_mask must be a bool tensor (N, K) = ({n}, {k}), got {slot_mask.dtype} {tuple(slot_mask.shape)}")
    if absorb is not None:
        if slot_mask is None or absorb.shape != (n, k) or absorb.dtype != torch.bool:
            raise ValueError(f"absorb must be a bool tensor (N, K) = ({n}, {k}) given with slot_mask, got "
                             f"{absorb.dtype} {tuple(absorb.shape)}")
        if getattr(denoiser.net, "mixture", None) is None:
            raise ValueError("absorb acts on the mixture hint: the denoiser's SlotUNet has none (mixture=None)")
    if (known is None) != (region is None):
        raise ValueError("a localised edit needs both known (the scene) and region (where to regenerate)")
    if known is not None:
        if known.shape != (n, channels, size, size):
            raise ValueError(f"known must be (N, C, size, size) = {(n, channels, size, size)}, got {tuple(known.shape)}")
        region = check_mask(region, known.float(), "region")
        if region.shape[0] != n:
            raise ValueError(f"region must have one mask per scene ({n}), got {region.shape[0]}")
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
        if absorb is not None:
            cond["hint_absorb"] = absorb[start:start + b].to(device)
        sampler = None
        if known is not None:
            sampler = functools.partial(sample_repaint, sampler=get_sampler(opts.sampler), resample=resample,
                                        known=known[start:start + b].to(device, torch.float32),
                                        mask=region[start:start + b].to(device))
        return denoise(denoiser, x, sigmas, opts, noise, cond, sampler=sampler).clamp(-1, 1)

    out = run_options(n, (channels, size, size), sample_batch, opts, device=device,
                      desc=f"decoding slots ({opts.sampler}, {opts.steps} steps)")
    if known is None:
        return out
    return torch.where(region.bool().cpu(), out, known.to(out.dtype).cpu())


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


def swap_slot_sets(slots: torch.Tensor, leaving: torch.Tensor, other: torch.Tensor, arriving: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap objects held by sets of slots: row i keeps its slots not in ``leaving[i]`` ((N, K) bool)
    and takes the slots of ``other[i]`` in ``arriving[i]`` ((N, K') bool). Returns (slots (N, L, D),
    slot_mask (N, L) bool) for :func:`decode_slots`, the taken slots first in each row and padded
    (mask False) to the longest row's L; with one slot each way it is :func:`swap_slots` up to order."""
    taken = torch.cat([~leaving, arriving], 1)
    pool = torch.cat([slots, other], 1)
    order = torch.sort(taken.long(), dim=1, descending=True, stable=True).indices
    length = int(taken.sum(1).max())
    order = order[:, :length]
    return pool.gather(1, order[:, :, None].expand(-1, -1, pool.shape[2])), taken.gather(1, order)


def add_slot(slots: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``slots`` (N, K, D) with one more slot (N, D) appended: (N, K + 1, D)."""
    return torch.cat([slots, slot[:, None]], 1)


def edit_region(masks: torch.Tensor, index: torch.Tensor, *, threshold: float = 0.3, dilate: int = 1) -> torch.Tensor:
    """(N, 1, H, W) float of 0/1: where slot ``index[i]`` of scene i holds more than ``threshold`` of
    the attention (``masks`` (N, K, H, W) from :func:`encode_slots`), grown by ``dilate`` pixels
    (max pooling), the region a localised :func:`decode_slots` regenerates. ``index`` (N, K) bool:
    the union of the regions of the slots marked True (an object held by several slots). Take the
    union (``torch.maximum``) of two for a swap: the object leaving and the object arriving."""
    if index.dtype == torch.bool:
        if index.shape != masks.shape[:2]:
            raise ValueError(f"index as a bool slot set must be (N, K) = {tuple(masks.shape[:2])}, got {tuple(index.shape)}")
        region = ((masks > threshold) & index[:, :, None, None]).any(1, keepdim=True).float()
    else:
        region = (masks[torch.arange(len(masks)), index] > threshold).float()[:, None]
    if dilate > 0:
        region = F.max_pool2d(region, 2 * dilate + 1, stride=1, padding=dilate)
    return region


def segment(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) long: the slot with the largest mask at each pixel (argmax over K)."""
    return masks.argmax(1)


__all__ = ["encode_slots", "decode_slots", "remove_slot", "swap_slots", "swap_slot_sets", "add_slot", "edit_region", "segment"]
