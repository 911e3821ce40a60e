"""Key maps of the KL autoencoder (Rombach et al. 2022, appendix G), as data.

difflab's names (:mod:`difflab.nn.vae`) follow diffusers' ``AutoencoderKL`` except where diffusers'
names carry implementation detail: a block's single resampler (``downsamplers.0`` ->
``downsample``), the one mid-block attention (``attentions.0`` -> ``attention``), its output
projection (``to_out.0``, a ModuleList with a dropout, -> ``to_out``) and ``conv_norm_out`` ->
``norm_out``. Everything not listed keeps its name (``conv_in``, ``quant_conv``, resnets' ``norm1``
/ ``conv1`` / ``norm2`` / ``conv2`` / ``conv_shortcut``, ...).

The original Stable Diffusion / latent-diffusion layout (``first_stage_model.*`` of a single-file
checkpoint, without that prefix here) differs more: ``down.{i}.block.{j}``, ``mid.block_1``,
``mid.attn_1.{q,k,v,proj_out}`` as 1x1 convolutions, ``nin_shortcut``, and decoder levels
``up.{k}`` numbered from the top (``{k:rev}``: original level ``n - 1 - k`` is difflab's ``k``).
Pass ``num_levels = len(block_out_channels)`` when converting it.
"""
from __future__ import annotations

# (diffusers AutoencoderKL, difflab) -- the first matching row wins, so specific rows come first
DIFFUSERS = [
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down_blocks.{i}.downsample."),
    ("decoder.up_blocks.{i}.upsamplers.0.", "decoder.up_blocks.{i}.upsample."),
    ("{part}.mid_block.attentions.0.group_norm.", "{part}.mid_block.attention.norm."),
    ("{part}.mid_block.attentions.0.to_q.", "{part}.mid_block.attention.to_q."),
    ("{part}.mid_block.attentions.0.to_k.", "{part}.mid_block.attention.to_k."),
    ("{part}.mid_block.attentions.0.to_v.", "{part}.mid_block.attention.to_v."),
    ("{part}.mid_block.attentions.0.to_out.0.", "{part}.mid_block.attention.to_out."),
    ("{part}.conv_norm_out.", "{part}.norm_out."),
    # read-only aliases: older diffusers versions saved the attention as query/key/value/proj_attn
    # (e.g. the sd-vae-ft-mse folders); export always writes the names above
    ("{part}.mid_block.attentions.0.query.", "{part}.mid_block.attention.to_q."),
    ("{part}.mid_block.attentions.0.key.", "{part}.mid_block.attention.to_k."),
    ("{part}.mid_block.attentions.0.value.", "{part}.mid_block.attention.to_v."),
    ("{part}.mid_block.attentions.0.proj_attn.", "{part}.mid_block.attention.to_out."),
]

# (original latent-diffusion / Stable Diffusion, difflab)
ORIGINAL = [
    ("encoder.down.{i}.block.{j}.nin_shortcut.", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut."),
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsample."),
    ("decoder.up.{k:rev}.block.{j}.nin_shortcut.", "decoder.up_blocks.{k}.resnets.{j}.conv_shortcut."),
    ("decoder.up.{k:rev}.block.{j}.", "decoder.up_blocks.{k}.resnets.{j}."),
    ("decoder.up.{k:rev}.upsample.", "decoder.up_blocks.{k}.upsample."),
    ("{part}.mid.block_1.", "{part}.mid_block.resnets.0."),
    ("{part}.mid.block_2.", "{part}.mid_block.resnets.1."),
    ("{part}.mid.attn_1.norm.", "{part}.mid_block.attention.norm."),
    ("{part}.mid.attn_1.q.weight", "{part}.mid_block.attention.to_q.weight", "conv1x1"),
    ("{part}.mid.attn_1.k.weight", "{part}.mid_block.attention.to_k.weight", "conv1x1"),
    ("{part}.mid.attn_1.v.weight", "{part}.mid_block.attention.to_v.weight", "conv1x1"),
    ("{part}.mid.attn_1.proj_out.weight", "{part}.mid_block.attention.to_out.weight", "conv1x1"),
    ("{part}.mid.attn_1.q.", "{part}.mid_block.attention.to_q."),
    ("{part}.mid.attn_1.k.", "{part}.mid_block.attention.to_k."),
    ("{part}.mid.attn_1.v.", "{part}.mid_block.attention.to_v."),
    ("{part}.mid.attn_1.proj_out.", "{part}.mid_block.attention.to_out."),
]

# the prefix of the autoencoder in a single-file Stable Diffusion checkpoint
ORIGINAL_PREFIX = "first_stage_model."
# keys under this prefix (after ORIGINAL_PREFIX) are training state of the original repository
# (its LPIPS network, discriminator and learned log-variance), not part of the autoencoder
ORIGINAL_IGNORED_PREFIXES = ("loss.",)

__all__ = ["DIFFUSERS", "ORIGINAL", "ORIGINAL_PREFIX", "ORIGINAL_IGNORED_PREFIXES"]
