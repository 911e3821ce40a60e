"""Outpainting: extend the canvas and inpaint the new border; the original pixels are kept."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import as_images, image_channels
from .inpaint import inpaint


def extend_canvas(images: torch.Tensor, left: int, right: int, top: int, bottom: int, fill: float = 0.0):
    """``(canvas, mask)``: ``images`` (B, C, H, W) padded by the given pixels with the value ``fill``
    (0 = mid-grey in [-1, 1]), and the mask (1, 1, H', W') that is 1 on the new border."""
    pads = {"left": left, "right": right, "top": top, "bottom": bottom}
    bad = {k: v for k, v in pads.items() if not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"padding must be non-negative ints, got {bad}")
    if not any(pads.values()):
        raise ValueError("outpaint needs some padding: give left, right, top and/or bottom pixels")
    canvas = F.pad(images, (left, right, top, bottom), value=fill)
    mask = F.pad(torch.zeros(1, 1, *images.shape[2:]), (left, right, top, bottom), value=1.0)
    return canvas, mask


@torch.no_grad()
def outpaint(denoiser, text_encoder, vae, prompts, image, *, left: int = 0, right: int = 0, top: int = 0,
             bottom: int = 0, fill: float = 0.0, keep_known_pixels: bool = True, **inpaint_kwargs):
    """Outpainting as inpainting of an extended canvas (RePaint, Lugmayr et al. 2022, or a
    mask-channel model; see :func:`difflab.pipelines.inpaint`).

    Extends ``image`` (N or 1, C, H, W in [-1, 1], or Pillow images) by ``left``/``right``/
    ``top``/``bottom`` pixels of value ``fill`` and fills that border with ``inpaint`` (any of its
    keywords: ``mode``, ``resample``, ``guidance_scale``, ``sampler``, ``steps``, ``seed``,
    ``output_type``, ...). The padded size must stay divisible by the VAE factor (times the U-Net's
    where it needs it). With ``keep_known_pixels`` (the default) the original pixels come back
    exactly (``"pt"`` output), also through a VAE.
    """
    # 1. Check inputs: the padded canvas must fit the model.
    n = len(prompts) if isinstance(prompts, (list, tuple)) else 1
    if inpaint_kwargs.get("prompt_embeds") is not None:
        n = inpaint_kwargs["prompt_embeds"].shape[0]
    images = as_images(image, n, None if vae is None else image_channels(denoiser, vae))
    # 2. Extend the canvas; the mask is the new border.
    canvas, mask = extend_canvas(images, left, right, top, bottom, fill)
    # 3. Inpaint the border.
    try:
        return inpaint(denoiser, text_encoder, vae, prompts, canvas, mask, keep_known_pixels=keep_known_pixels, **inpaint_kwargs)
    except ValueError as e:
        if "image height" in str(e) or "image width" in str(e):
            h, w = images.shape[2:]
            raise ValueError(f"the extended canvas {h} + top {top} + bottom {bottom} = {canvas.shape[2]} by {w} + left {left} "
                             f"+ right {right} = {canvas.shape[3]} does not fit the model: {e}") from None
        raise
