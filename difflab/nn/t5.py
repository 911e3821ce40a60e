"""The T5 text encoder behind difflab's text-encoder interface (Raffel et al. 2020, "Exploring the
Limits of Transfer Learning with a Unified Text-to-Text Transformer", Section 2.1: the encoder
stack only), as Flux and SD3 condition on it (T5 v1.1 XXL, 4096 channels).

The network itself is transformers' ``T5EncoderModel`` (an optional dependency, the ``sd`` extra),
handed in already built; :func:`difflab.io.flux_folder.load_t5_encoder` reads one from a local
folder. This module only tokenizes and calls it, so it imports no transformers.
"""
from __future__ import annotations

import warnings

import torch

from .text import TextEncoder, _check_prompts


class T5TextEncoder(TextEncoder):
    """``encode(prompts) -> (hidden_states (B, max_length, D), None)``: T5 has no pooled vector.

    Prompts are padded to ``max_length`` tokens (Flux: 512 for FLUX.1-dev, 256 for schnell) and
    every position is attended to, padding included, exactly as diffusers' Flux pipeline feeds
    the encoder (no attention mask). Longer prompts are cut at ``max_length`` as diffusers does,
    with a warning naming how many tokens were dropped.
    """

    def __init__(self, model, tokenizer=None, max_length: int = 512):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, int(max_length)
        self.hidden_size = int(model.config.d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The last hidden states (B, L, D) of token ids (B, L)."""
        return self.model(input_ids=input_ids)[0]

    def token_ids(self, prompts, max_length: int | None = None) -> torch.Tensor:
        """Token ids (B, max_length): the prompt's tokens, the end token, padding (cut at max_length)."""
        if self.tokenizer is None:
            raise ValueError("this T5TextEncoder has no tokenizer: load it with a tokenizer folder or call it on token ids")
        prompts = _check_prompts(prompts)
        n = self.max_length if max_length is None else int(max_length)
        if n < 1:
            raise ValueError(f"max_length={n} must be >= 1")
        full = self.tokenizer(prompts)["input_ids"]
        cut = [len(ids) - n for ids in full if len(ids) > n]
        if cut:
            warnings.warn(f"T5 prompts longer than max_length={n} tokens were cut ({max(cut)} tokens dropped), as diffusers does",
                          stacklevel=3)
        ids = self.tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        return ids.to(next(self.model.parameters()).device)

    def encode(self, prompts, *, return_mask: bool = False, max_length: int | None = None):
        hidden = self(self.token_ids(prompts, max_length))
        return (hidden, None, None) if return_mask else (hidden, None)


__all__ = ["T5TextEncoder"]
