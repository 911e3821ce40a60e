"""Key maps of the Flux transformer (Black Forest Labs 2024), as data.

difflab's :class:`~difflab.nn.flux.FluxTransformer` uses diffusers' ``FluxTransformer2DModel``
names, so a diffusers ``transformer/`` state dict loads as it is.

Black Forest Labs' release files (``flux1-dev.safetensors``, ``flux1-schnell.safetensors``: the
transformer alone, no prefix; some repacks put it under ``model.diffusion_model.``) use the names
of their reference code: ``img_in`` / ``txt_in`` / ``time_in`` / ``vector_in`` / ``guidance_in``
(``in_layer``, ``out_layer``), per double-stream block ``double_blocks.{i}.{img,txt}_mod.lin``,
``{img,txt}_attn.qkv`` (q, k, v fused), ``{img,txt}_attn.norm.{query,key}_norm.scale``,
``{img,txt}_attn.proj``, ``{img,txt}_mlp.{0,2}``; per single-stream block
``single_blocks.{i}.modulation.lin``, ``linear1`` (q, k, v and the 4x-wide MLP input fused:
proportions 1:1:1:4), ``linear2``, ``norm.{query,key}_norm.scale``; and ``final_layer`` with its
modulation as (shift, scale) -- diffusers' ``AdaLayerNormContinuous`` holds (scale, shift).
"""
from __future__ import annotations

from . import prefixed

# the prefix some repacked single files put the transformer under (the release files have none)
ORIGINAL_PREFIX = "model.diffusion_model."


def _mlp(src: str, dst: str):
    return [(f"{src}.in_layer.", f"{dst}.linear_1."), (f"{src}.out_layer.", f"{dst}.linear_2.")]


# (original BFL, difflab)
ORIGINAL = [
    *_mlp("time_in", "time_text_embed.timestep_embedder"),
    *_mlp("vector_in", "time_text_embed.text_embedder"),
    *_mlp("guidance_in", "time_text_embed.guidance_embedder"),
    ("txt_in.", "context_embedder."),
    ("img_in.", "x_embedder."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear.", "swap_halves"),
    *prefixed("double_blocks.{i}.", "transformer_blocks.{i}.", [
        ("img_mod.lin.", "norm1.linear."),
        ("txt_mod.lin.", "norm1_context.linear."),
        ("img_attn.q.", "attn.to_q."), ("img_attn.k.", "attn.to_k."), ("img_attn.v.", "attn.to_v."),
        ("txt_attn.q.", "attn.add_q_proj."), ("txt_attn.k.", "attn.add_k_proj."), ("txt_attn.v.", "attn.add_v_proj."),
        ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
        ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
        ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
        ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
        ("img_attn.proj.", "attn.to_out.0."),
        ("txt_attn.proj.", "attn.to_add_out."),
        ("img_mlp.0.", "ff.net.0.proj."), ("img_mlp.2.", "ff.net.2."),
        ("txt_mlp.0.", "ff_context.net.0.proj."), ("txt_mlp.2.", "ff_context.net.2."),
    ]),
    *prefixed("single_blocks.{i}.", "single_transformer_blocks.{i}.", [
        ("modulation.lin.", "norm.linear."),
        ("linear1_q.", "attn.to_q."), ("linear1_k.", "attn.to_k."), ("linear1_v.", "attn.to_v."),
        ("linear1_mlp.", "proj_mlp."),
        ("linear2.", "proj_out."),
        ("norm.query_norm.scale", "attn.norm_q.weight"),
        ("norm.key_norm.scale", "attn.norm_k.weight"),
    ]),
]

# fused tensors: split on load into the pieces ORIGINAL names (mlp_ratio 4 in the single blocks)
FUSED = [
    ("double_blocks.{i}.img_attn.qkv.", tuple(f"double_blocks.{{i}}.img_attn.{p}." for p in "qkv"), (1, 1, 1)),
    ("double_blocks.{i}.txt_attn.qkv.", tuple(f"double_blocks.{{i}}.txt_attn.{p}." for p in "qkv"), (1, 1, 1)),
    ("single_blocks.{i}.linear1.", tuple(f"single_blocks.{{i}}.linear1_{p}." for p in ("q", "k", "v", "mlp")), (1, 1, 1, 4)),
]

__all__ = ["ORIGINAL_PREFIX", "ORIGINAL", "FUSED"]
