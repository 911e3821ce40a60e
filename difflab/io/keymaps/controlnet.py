"""Key maps of ControlNet checkpoints (Zhang et al. 2023), as data.

difflab's :class:`~difflab.adapters.controlnet.ControlNet` uses diffusers' ``ControlNetModel``
names, so the diffusers table is empty: a diffusers ControlNet folder loads as it is.

The authors' layout (``control_model.*`` in lllyasviel's ``cldm`` checkpoints, without that prefix
here) numbers the trainable encoder as the original Stable Diffusion U-Net does
(``input_blocks.{m}``, ``middle_block.{0,1,2}``: :func:`difflab.io.keymaps.unet_sd.original_blocks`),
the condition encoder E as one ``nn.Sequential`` with a SiLU after every convolution
(``input_hint_block.{0, 2, 4, ...}``), the zero convolutions as ``zero_convs.{k}.0`` and
``middle_block_out.0``. Where each piece sits depends on the config, so the table is generated
from it by :func:`original_table`, as rows of literal prefixes that :mod:`difflab.io.keymaps`
applies in both directions.
"""
from __future__ import annotations

from . import prefixed
from .unet_sd import EMBEDDING, RESNET, original_blocks

# (diffusers ControlNetModel, difflab ControlNet): identical names
DIFFUSERS: list[tuple[str, str]] = []

# the prefix of the ControlNet in the authors' checkpoints
ORIGINAL_PREFIX = "control_model."

# (original, difflab) of the time embedding and the first convolution (the U-Net's names), and the middle zero convolution
TOP = [*EMBEDDING, ("middle_block_out.0.", "controlnet_mid_block.")]


def original_table(config) -> list[tuple[str, str]]:
    """The (original, difflab) rows for a :class:`~difflab.adapters.controlnet.ControlNetConfig`;
    use with :func:`difflab.io.keymaps.to_difflab` / :func:`~difflab.io.keymaps.from_difflab`."""
    rows = list(TOP)
    # E: conv_in, then 2 convolutions per further width, then conv_out; a SiLU between each (odd indices)
    inner = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    rows.append(("input_hint_block.0.", "controlnet_cond_embedding.conv_in."))
    rows += [(f"input_hint_block.{2 * (k + 1)}.", f"controlnet_cond_embedding.blocks.{k}.") for k in range(inner)]
    rows.append((f"input_hint_block.{2 * (inner + 1)}.", "controlnet_cond_embedding.conv_out."))
    # one zero convolution per skip: conv_in's, then per level its blocks' and its downsampler's (not the last level's)
    n, lpb = len(config.unet.block_out_channels), config.unet.layers_per_block
    skips = 1 + sum(lpb + (1 if i < n - 1 else 0) for i in range(n))
    rows += [(f"zero_convs.{k}.0.", f"controlnet_down_blocks.{k}.") for k in range(skips)]
    for original, ours, kind in original_blocks(config.unet):
        if original.startswith(("input_blocks.", "middle_block.")):
            rows += prefixed(original, ours, RESNET) if kind == "resnet" else [(original, ours)]
    return rows


__all__ = ["DIFFUSERS", "ORIGINAL_PREFIX", "TOP", "original_table"]
