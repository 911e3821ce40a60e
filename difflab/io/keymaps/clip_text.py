"""Key maps of the CLIP text encoder (Radford et al. 2021), as data.

difflab's :class:`~difflab.nn.text.CLIPTextEncoder` uses the names transformers 5 saves a
``CLIPTextModel`` with (``embeddings.token_embedding.weight``, ``encoder.layers.{i}.self_attn.q_proj.weight``,
``final_layer_norm.weight``, ...). transformers 4 -- hence every Stable Diffusion ``text_encoder/``
folder and the ``cond_stage_model.transformer.*`` of SD 1.x single files -- put the same names
under ``text_model.`` (:data:`TRANSFORMERS`). Export writes that older layout, which both
transformers 4 and 5 read.

SD 2.x single files hold OpenCLIP's ViT-H/14 text tower under ``cond_stage_model.model.``
(:data:`OPEN_CLIP`), with the query, key and value projections fused into one
``attn.in_proj_weight`` (3D, D) / ``in_proj_bias`` (3D,) in that order (:data:`OPEN_CLIP_FUSED`:
split on load, concatenated on export). SD 2.x conditions on the penultimate layer, so, like
diffusers, difflab keeps all but the last of its 24 blocks (23 layers); the last block, the
projection to the joint embedding and the logit scale are unused (:data:`OPEN_CLIP_UNUSED`).
"""
from __future__ import annotations

import re

import torch

from . import from_difflab, prefixed, to_difflab

# (transformers 4 CLIPTextModel, difflab); keys without the prefix (transformers 5) keep their names;
# CLIPTextModelWithProjection's text_projection sits outside text_model. in both layouts
TRANSFORMERS = [("text_projection.", "text_projection."), ("text_model.", "")]
# a buffer older transformers versions saved; not a weight
TRANSFORMERS_UNUSED = ("text_model.embeddings.position_ids", "embeddings.position_ids")

# the text encoder's prefix in single-file checkpoints: SD 1.x (transformers layout), SD 2.x (OpenCLIP layout)
SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."
# SDXL single files (the sgm layout, Podell et al. 2023): base = CLIP ViT-L (transformers layout) and
# OpenCLIP ViT-bigG (OpenCLIP layout, all its blocks and its text_projection); the refiner has bigG only
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."
# SD3 single files: both CLIPs in the transformers layout (CLIP-L often without its text_projection)
SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."
# OpenCLIP's projection is a (hidden, projection) matrix applied as x @ P; transformers' a Linear (projection, hidden)
OPEN_CLIP_PROJECTION = "text_projection"

# (OpenCLIP, difflab)
OPEN_CLIP = [
    ("token_embedding.", "embeddings.token_embedding."),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.", "final_layer_norm."),
    *prefixed("transformer.resblocks.{i}.", "encoder.layers.{i}.", [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        # the pieces of the fused projection, after OPEN_CLIP_FUSED has split it
        ("attn.q_proj.", "self_attn.q_proj."),
        ("attn.k_proj.", "self_attn.k_proj."),
        ("attn.v_proj.", "self_attn.v_proj."),
    ]),
]
# fused OpenCLIP tensor suffix -> the suffixes of its three pieces, concatenated along dim 0
OPEN_CLIP_FUSED = {
    "attn.in_proj_weight": ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"),
    "attn.in_proj_bias": ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"),
}
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")

_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.*)")


def open_clip_num_blocks(tensors: dict) -> int:
    """How many ``transformer.resblocks.{i}`` an OpenCLIP state dict holds."""
    return len({m.group(1) for k in tensors for m in [_BLOCK.match(k)] if m})


def open_clip_to_difflab(tensors: dict[str, torch.Tensor], num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """An OpenCLIP text state dict (no prefix) in difflab's layout, keeping the first
    ``num_layers`` blocks (default: all but the last, as Stable Diffusion 2.x uses them)."""
    if num_layers is None:
        num_layers = open_clip_num_blocks(tensors) - 1
    split: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = _BLOCK.match(key)
        if key in OPEN_CLIP_UNUSED or (m and int(m.group(1)) >= num_layers):
            continue
        if m and m.group(2) in OPEN_CLIP_FUSED:
            for name, part in zip(OPEN_CLIP_FUSED[m.group(2)], value.chunk(3, dim=0)):
                split[f"transformer.resblocks.{m.group(1)}.{name}"] = part
        else:
            split[key] = value
    return to_difflab(split, OPEN_CLIP)


def difflab_to_open_clip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`open_clip_to_difflab` for the blocks difflab holds (the unused last block,
    text projection and logit scale are not recreated)."""
    out = from_difflab(tensors, OPEN_CLIP)
    for key in [k for k in out if _BLOCK.match(k)]:
        m = _BLOCK.match(key)
        for fused, parts in OPEN_CLIP_FUSED.items():
            if m.group(2) == parts[0]:
                prefix = f"transformer.resblocks.{m.group(1)}."
                out[prefix + fused] = torch.cat([out.pop(prefix + p) for p in parts])
    return out


def open_clip_projection(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's ``text_projection`` matrix (hidden, projection) as difflab's ``text_projection.weight``
    (projection, hidden); empty when the state dict has none."""
    if OPEN_CLIP_PROJECTION not in tensors:
        return {}
    return {"text_projection.weight": tensors[OPEN_CLIP_PROJECTION].T.contiguous()}


def transformers_to_difflab(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict (4.x or 5.x layout) in difflab's layout."""
    return to_difflab({k: v for k, v in tensors.items() if k not in TRANSFORMERS_UNUSED}, TRANSFORMERS)


def difflab_to_transformers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """difflab's layout -> the transformers 4.x layout (``text_model.*``) that SD folders use."""
    return from_difflab(tensors, TRANSFORMERS)


__all__ = ["TRANSFORMERS", "TRANSFORMERS_UNUSED", "SD1_PREFIX", "SD2_PREFIX", "OPEN_CLIP", "OPEN_CLIP_FUSED",
           "OPEN_CLIP_UNUSED", "SDXL_CLIP_L_PREFIX", "SDXL_CLIP_G_PREFIX",
           "SDXL_REFINER_CLIP_G_PREFIX", "SD3_CLIP_L_PREFIX", "SD3_CLIP_G_PREFIX", "SD3_T5_PREFIX", "OPEN_CLIP_PROJECTION",
           "open_clip_projection", "open_clip_num_blocks", "open_clip_to_difflab", "difflab_to_open_clip",
           "transformers_to_difflab", "difflab_to_transformers"]
