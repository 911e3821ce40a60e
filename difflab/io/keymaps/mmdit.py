"""Key maps of the SD3 MMDiT (Esser et al. 2024), as data.

difflab's :class:`~difflab.nn.mmdit.MMDiT` uses diffusers' ``SD3Transformer2DModel`` names, so a
diffusers ``transformer/`` state dict loads as it is.

Stability's release files (``sd3_medium.safetensors``, ``sd3.5_large.safetensors``; the MMDiT
under ``model.diffusion_model.``, without that prefix here) use the names of the reference
implementation: ``x_embedder`` / ``t_embedder`` / ``y_embedder`` for the embeddings, per block
``joint_blocks.{i}.x_block`` (image stream) and ``.context_block`` (text stream), each with one
fused ``attn.qkv`` (q, k, v stacked along dim 0: :data:`FUSED`, split on load), ``attn.proj``,
``attn.ln_q`` / ``ln_k`` (SD 3.5's QK RMSNorm), ``mlp.fc1`` / ``fc2`` and ``adaLN_modulation.1``;
SD 3.5 medium's second image attention is ``x_block.attn2.*``. The adaptive LayerNorms that keep
only a scale and a shift -- the last block's text stream and ``final_layer`` -- store them as
(shift, scale), diffusers as (scale, shift): those rows carry the ``swap_halves`` transform, which
needs the block count, so the table is generated from the config (:func:`original_table`).
"""
from __future__ import annotations

from . import prefixed

# the prefix of the MMDiT in a single-file SD3 checkpoint
ORIGINAL_PREFIX = "model.diffusion_model."

# (original, difflab) outside the blocks
TOP = [
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    ("y_embedder.mlp.0.", "time_text_embed.text_embedder.linear_1."),
    ("y_embedder.mlp.2.", "time_text_embed.text_embedder.linear_2."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear.", "swap_halves"),
]

# (original, difflab) inside joint_blocks.{i} -> transformer_blocks.{i}; q/k/v pieces after FUSED split them
BLOCK = [
    ("x_block.attn.q.", "attn.to_q."), ("x_block.attn.k.", "attn.to_k."), ("x_block.attn.v.", "attn.to_v."),
    ("x_block.attn.proj.", "attn.to_out.0."),
    ("x_block.attn.ln_q.", "attn.norm_q."), ("x_block.attn.ln_k.", "attn.norm_k."),
    ("x_block.attn2.q.", "attn2.to_q."), ("x_block.attn2.k.", "attn2.to_k."), ("x_block.attn2.v.", "attn2.to_v."),
    ("x_block.attn2.proj.", "attn2.to_out.0."),
    ("x_block.attn2.ln_q.", "attn2.norm_q."), ("x_block.attn2.ln_k.", "attn2.norm_k."),
    ("x_block.adaLN_modulation.1.", "norm1.linear."),
    ("x_block.mlp.fc1.", "ff.net.0.proj."), ("x_block.mlp.fc2.", "ff.net.2."),
    ("context_block.attn.q.", "attn.add_q_proj."), ("context_block.attn.k.", "attn.add_k_proj."),
    ("context_block.attn.v.", "attn.add_v_proj."),
    ("context_block.attn.proj.", "attn.to_add_out."),
    ("context_block.attn.ln_q.", "attn.norm_added_q."), ("context_block.attn.ln_k.", "attn.norm_added_k."),
    ("context_block.mlp.fc1.", "ff_context.net.0.proj."), ("context_block.mlp.fc2.", "ff_context.net.2."),
]
# the text stream's modulation: six vectors in the same order in both layouts, except in the last
# block, where it is an adaptive LayerNorm (shift, scale) -> (scale, shift)
CONTEXT_MODULATION = ("context_block.adaLN_modulation.1.", "norm1_context.linear.")

# fused q/k/v of each attention (split on load, in equal thirds)
FUSED = [(f"joint_blocks.{{i}}.{part}.qkv.", tuple(f"joint_blocks.{{i}}.{part}.{p}." for p in "qkv"), (1, 1, 1))
         for part in ("x_block.attn", "x_block.attn2", "context_block.attn")]


def original_table(num_layers: int) -> list[tuple]:
    """The (original, difflab[, transform]) rows of an MMDiT with ``num_layers`` joint blocks; use
    with :func:`difflab.io.keymaps.to_difflab` after :func:`~difflab.io.keymaps.split_fused` (:data:`FUSED`)."""
    last = num_layers - 1
    rows = list(TOP)
    rows.append((f"joint_blocks.{last}.{CONTEXT_MODULATION[0]}", f"transformer_blocks.{last}.{CONTEXT_MODULATION[1]}",
                 "swap_halves"))
    rows += prefixed("joint_blocks.{i}.", "transformer_blocks.{i}.", [*BLOCK, CONTEXT_MODULATION])
    return rows


__all__ = ["ORIGINAL_PREFIX", "TOP", "BLOCK", "CONTEXT_MODULATION", "FUSED", "original_table"]
