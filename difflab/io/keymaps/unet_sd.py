"""Key maps of the Stable Diffusion U-Net (Rombach et al. 2022), as data.

difflab's :class:`~difflab.nn.unet_sd.UNetSD` uses diffusers' ``UNet2DConditionModel`` names, so
the diffusers table is empty: a diffusers ``unet/`` state dict loads as it is.

The original latent-diffusion layout (``model.diffusion_model.*`` of a single-file checkpoint,
without that prefix here) numbers its blocks in one flat sequence per direction:
``input_blocks.{m}`` (m = 0 is ``conv_in``; then, per level, ``layers_per_block`` x
[ResBlock, SpatialTransformer] and a downsampler), ``middle_block.{0,1,2}``, ``output_blocks.{m}``
(per level, ``layers_per_block + 1`` x [ResBlock, SpatialTransformer, upsampler]). Where a block
sits in that sequence depends on the config (layers per block, which levels have attention), so
the table is generated from the config by :func:`original_table` -- as rows of literal prefixes,
data that :mod:`difflab.io.keymaps` applies in both directions. Inside a SpatialTransformer the
names are the same in both layouts; inside a ResBlock they differ (:data:`RESNET`). SDXL's
single files (Podell et al. 2023; the ``sgm`` layout) number their blocks the same way and add
``label_emb.0.{0,2}`` for the added-condition embedding (:data:`ADDED`).
"""
from __future__ import annotations

from . import prefixed

# (diffusers UNet2DConditionModel, difflab UNetSD): identical names
DIFFUSERS: list[tuple[str, str]] = []

# the prefix of the U-Net in a single-file Stable Diffusion checkpoint
ORIGINAL_PREFIX = "model.diffusion_model."

# (original, difflab) of the time embedding and the first convolution (a ControlNet's too)
EMBEDDING = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
]

# (original, difflab) outside the down / middle / up blocks
TOP = [*EMBEDDING, ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]

# (original sgm, difflab) of SDXL's added-condition embedding (Podell et al. 2023, Section 2.2),
# present when the config has addition_embed_type="text_time"
ADDED = [("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]

# (original ResBlock, difflab ResnetBlock) inside a residual block
RESNET = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
]


def original_blocks(config) -> list[tuple[str, str, str]]:
    """``(original prefix, difflab prefix, kind)`` for every block of ``config``'s layout, kind in
    ``resnet`` (renamed inside by :data:`RESNET`) or ``same`` (identical names inside)."""
    n, lpb = len(config.block_out_channels), config.layers_per_block
    rows, m = [], 1
    for i in range(n):
        for k in range(lpb):
            rows.append((f"input_blocks.{m}.0.", f"down_blocks.{i}.resnets.{k}.", "resnet"))
            if config.down_attention[i]:
                rows.append((f"input_blocks.{m}.1.", f"down_blocks.{i}.attentions.{k}.", "same"))
            m += 1
        if i < n - 1:
            rows.append((f"input_blocks.{m}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", "same"))
            m += 1
    rows += [("middle_block.0.", "mid_block.resnets.0.", "resnet"), ("middle_block.1.", "mid_block.attentions.0.", "same"),
             ("middle_block.2.", "mid_block.resnets.1.", "resnet")]
    m = 0
    for j in range(n):
        for k in range(lpb + 1):
            rows.append((f"output_blocks.{m}.0.", f"up_blocks.{j}.resnets.{k}.", "resnet"))
            if config.up_attention[j]:
                rows.append((f"output_blocks.{m}.1.", f"up_blocks.{j}.attentions.{k}.", "same"))
            if k == lpb and j < n - 1:
                pos = 2 if config.up_attention[j] else 1
                rows.append((f"output_blocks.{m}.{pos}.conv.", f"up_blocks.{j}.upsamplers.0.conv.", "same"))
            m += 1
    return rows


def original_table(config) -> list[tuple[str, str]]:
    """The (original, difflab) rows for a :class:`~difflab.nn.unet_sd.UNetSDConfig`; use with
    :func:`difflab.io.keymaps.to_difflab` / :func:`~difflab.io.keymaps.from_difflab`."""
    rows = list(TOP) + (list(ADDED) if getattr(config, "addition_embed_type", None) else [])
    for original, ours, kind in original_blocks(config):
        rows += prefixed(original, ours, RESNET) if kind == "resnet" else [(original, ours)]
    return rows


__all__ = ["DIFFUSERS", "ORIGINAL_PREFIX", "EMBEDDING", "TOP", "ADDED", "RESNET", "original_blocks", "original_table"]
