"""Key maps of DiT checkpoints (Peebles & Xie 2023), as data.

difflab's :class:`~difflab.nn.dit.DiT` keeps the original repository's names inside a block
(``blocks.{i}.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``) and in
the ``final_layer``; its embeddings take difflab's U-Net names (``patch_embed``, ``time_embed.net.{0,2}``,
``label_embed``), so :class:`~difflab.nn.GuidanceEmbedding` finds ``time_embed`` in either network.

The original layout (facebookresearch/DiT ``models.py``; the released ``DiT-XL-2-256x256.pt`` is a
plain state dict of these names) differs only in the embeddings, and stores ``pos_embed`` (the
fixed sine-cosine table, a frozen parameter): :data:`ORIGINAL_COMPUTED` lists it; difflab computes
it and the loader checks the stored one against it.

diffusers' ``DiTTransformer2DModel`` differs more:

- every block holds its own copy of the time and class embeddings
  (``transformer_blocks.{i}.norm1.emb.*``, all equal in converted checkpoints; the final layer reads
  block 0's): block 0's map to the one shared embedding (:data:`DIFFUSERS`), the others are
  :data:`DIFFUSERS_COPIES` of it (checked equal on load, written on save);
- attention is three projections ``attn1.to_q/to_k/to_v`` that difflab fuses into ``attn.qkv``
  (:data:`DIFFUSERS_JOINED`: one difflab key from several foreign keys, concatenated along dim 0).
"""
from __future__ import annotations

# (original facebookresearch/DiT, difflab) -- everything else (blocks.*, final_layer.*) has the same name
ORIGINAL = [
    ("x_embedder.proj.", "patch_embed."),
    ("t_embedder.mlp.0.", "time_embed.net.0."),
    ("t_embedder.mlp.2.", "time_embed.net.2."),
    ("y_embedder.embedding_table.", "label_embed."),
]
# keys of the original layout difflab computes instead of loading
ORIGINAL_COMPUTED = ("pos_embed",)

# (diffusers DiTTransformer2DModel, difflab)
DIFFUSERS = [
    ("pos_embed.proj.", "patch_embed."),
    ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.", "time_embed.net.0."),
    ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.", "time_embed.net.2."),
    ("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.", "label_embed."),
    ("transformer_blocks.{i}.norm1.linear.", "blocks.{i}.adaLN_modulation.1."),
    ("transformer_blocks.{i}.attn1.to_out.0.", "blocks.{i}.attn.proj."),
    ("transformer_blocks.{i}.ff.net.0.proj.", "blocks.{i}.mlp.fc1."),
    ("transformer_blocks.{i}.ff.net.2.", "blocks.{i}.mlp.fc2."),
    ("proj_out_1.", "final_layer.adaLN_modulation.1."),
    ("proj_out_2.", "final_layer.linear."),
]
# the per-block copies of the conditioning embeddings: block {i}'s equals block 0's
DIFFUSERS_COPIES = "transformer_blocks.{i}.norm1.emb."
DIFFUSERS_SHARED = "transformer_blocks.0.norm1.emb."

# difflab key template <- foreign key templates, concatenated along dim 0 (one fused projection)
DIFFUSERS_JOINED = [
    ("blocks.{i}.attn.qkv.", ("transformer_blocks.{i}.attn1.to_q.", "transformer_blocks.{i}.attn1.to_k.",
                              "transformer_blocks.{i}.attn1.to_v.")),
]

__all__ = ["ORIGINAL", "ORIGINAL_COMPUTED", "DIFFUSERS", "DIFFUSERS_COPIES", "DIFFUSERS_SHARED", "DIFFUSERS_JOINED"]
