"""Two CLIP text encoders side by side, as SDXL conditions on them (Podell et al. 2023, Section 2.1).

SDXL's base model reads a prompt with CLIP ViT-L (``CLIPTextModel``) and OpenCLIP ViT-bigG
(``CLIPTextModelWithProjection``), takes each one's penultimate hidden states (transformers'
``hidden_states[-2]``, without the final LayerNorm: :class:`~difflab.nn.text.CLIPTextEncoder`
with ``clip_skip=1, norm_hidden=False``) and concatenates them along the features (768 + 1280 =
2048 = the U-Net's ``cross_attention_dim``); the pooled vector is the second encoder's, projected
(1280). :class:`DualCLIPTextEncoder` is that, behind the one :class:`~difflab.nn.text.TextEncoder`
interface. (The refiner reads with the second encoder only: a plain ``CLIPTextEncoder``.)
"""
from __future__ import annotations

import torch

from .text import CLIPTextEncoder, TextEncoder


class DualCLIPTextEncoder(TextEncoder):
    """``encode(prompts)`` -> ``(cat([h_1, h_2], -1) (B, L, D_1 + D_2), pooled_2 (B, P))``.

    Each encoder tokenizes with its own tokenizer (SDXL's second pads with ``!``, the first with
    the end token); long prompts are chunked into the same number K of 77-token windows for both
    (see :meth:`CLIPTextEncoder.encode`), so their hidden states line up token by token.
    """

    def __init__(self, text_encoder: CLIPTextEncoder, text_encoder_2: CLIPTextEncoder):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.hidden_size = text_encoder.hidden_size + text_encoder_2.hidden_size

    @property
    def pooled_size(self) -> int:
        """Width of the pooled vector: the second encoder's projection (or hidden) width."""
        c = self.text_encoder_2.config
        return c.hidden_size if c.projection_dim is None else c.projection_dim

    def encode(self, prompts, *, return_mask: bool = False, min_chunks: int = 1):
        """As :meth:`CLIPTextEncoder.encode`, with the hidden states of both encoders concatenated
        along the features and the second encoder's pooled vector; the mask is None."""
        encoders = (self.text_encoder, self.text_encoder_2)
        k = max(enc.token_windows(prompts, min_chunks)[1] for enc in encoders)
        (h1, _), (h2, pooled) = (enc.encode(prompts, min_chunks=k) for enc in encoders)
        hidden = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
        return (hidden, pooled, None) if return_mask else (hidden, pooled)

