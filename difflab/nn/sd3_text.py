"""The three text encoders of Stable Diffusion 3 as one (Esser et al. 2024, Section 4 and Figure 2a).

SD3 conditions on CLIP-L/14 and OpenCLIP bigG/14 (both ``CLIPTextModelWithProjection``) and T5-XXL:

- each CLIP gives its penultimate hidden states (before the final LayerNorm) and its pooled
  vector through ``text_projection``;
- ``context`` = [CLIP-L hidden | CLIP-G hidden] along channels (768 + 1280), zero-padded to T5's
  width (4096), then T5's tokens after them along the sequence: (B, 77 + 256, 4096);
- ``pooled`` = [CLIP-L pooled | CLIP-G pooled]: (B, 2048).

Any encoder may be absent: its output is zeros of its shape, which is how SD3 was trained to see a
dropped encoder (each dropped independently 46.3% of the time in training) and what diffusers'
``StableDiffusion3Pipeline`` feeds for a missing T5 (zeros (B, max_sequence_length, 4096)).

T5 runs through transformers' ``T5EncoderModel`` (loaded by :func:`difflab.io.sd3_folder.load_sd3_folder`,
the only place transformers is imported); any module ``t5(input_ids)[0] -> (B, L, D)`` works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .text import CLIPTextEncoder, TextEncoder, _check_prompts

# (hidden width, projection width) of SD3's CLIP-L and CLIP-G: the zeros of a missing one
SD3_CLIP_WIDTHS = ((768, 768), (1280, 1280))


class SD3TextEncoder(TextEncoder):
    """CLIP-L, CLIP-G and T5 as one encoder: ``encode(prompts) -> (context, pooled)`` (see the module).

    ``clip_l``, ``clip_g``: :class:`~difflab.nn.text.CLIPTextEncoder` with a ``projection_dim``
    (transformers' ``CLIPTextModelWithProjection``) and tokenizers, or None; ``t5``: a
    ``T5EncoderModel`` (or None) with ``t5_tokenizer``; ``joint_dim``: the MMDiT's
    ``joint_attention_dim`` (T5's width); ``clip_widths``: (hidden, projection) widths of CLIP-L
    and CLIP-G, used for the zeros of a missing one. Prompts longer than CLIP's 75-token window
    are chunked into 77-token windows as :meth:`CLIPTextEncoder.encode` does (diffusers cuts them);
    a prompt longer than ``max_sequence_length`` T5 tokens is an error, never cut.
    """

    def __init__(self, clip_l: CLIPTextEncoder | None, clip_g: CLIPTextEncoder | None, t5: nn.Module | None = None,
                 t5_tokenizer=None, *, joint_dim: int = 4096, max_sequence_length: int = 256, clip_skip: int = 0,
                 clip_widths=SD3_CLIP_WIDTHS):
        super().__init__()
        if t5 is not None and t5_tokenizer is None:
            raise ValueError("t5 given without t5_tokenizer: T5 needs its tokenizer to encode prompts")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={max_sequence_length} must be >= 1")
        self.clip_l, self.clip_g, self.t5, self.t5_tokenizer = clip_l, clip_g, t5, t5_tokenizer
        self.hidden_size, self.max_sequence_length, self.clip_skip = joint_dim, max_sequence_length, clip_skip
        self.clip_widths = tuple((c.config.hidden_size, c.config.projection_dim or c.config.hidden_size) if c is not None
                                 else tuple(w) for c, w in zip((clip_l, clip_g), clip_widths))
        if sum(w[0] for w in self.clip_widths) > joint_dim:
            raise ValueError(f"the CLIP widths {self.clip_widths} exceed joint_dim={joint_dim}: they are zero-padded to it")

    @property
    def pooled_size(self) -> int:
        return sum(w[1] for w in self.clip_widths)

    def _device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    def encode_clip(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([CLIP-L | CLIP-G] hidden (B, 77 K, 768 + 1280), [CLIP-L | CLIP-G] pooled (B, 2048))``,
        zeros for a missing encoder; both encoders see the same K windows."""
        present = [c for c in (self.clip_l, self.clip_g) if c is not None]
        k = max([1] + [c.token_windows(prompts)[1] for c in present])  # the most windows any tokenizer needs
        window = present[0].config.max_position_embeddings if present else 77
        dtype = next((p.dtype for c in present for p in c.parameters()), torch.float32)
        b, hidden, pooled = len(prompts), [], []
        for c, (width, proj) in zip((self.clip_l, self.clip_g), self.clip_widths):
            if c is None:
                hidden.append(torch.zeros(b, window * k, width, device=self._device(), dtype=dtype))
                pooled.append(torch.zeros(b, proj, device=self._device(), dtype=dtype))
                continue
            ids, _ = c.token_windows(prompts, min_chunks=k)
            # diffusers' hidden_states[-(clip_skip + 2)] (no final LayerNorm) and the projected pooled vector
            h, p = c(ids, clip_skip=self.clip_skip + 1, final_norm=False)
            hidden.append(h.reshape(b, -1, h.shape[-1]).to(dtype))
            pooled.append(p.reshape(b, k, -1)[:, 0].to(dtype))
        return torch.cat(hidden, -1), torch.cat(pooled, -1)

    def encode_t5(self, prompts: list[str]) -> torch.Tensor:
        """T5's last hidden states (B, max_sequence_length, joint_dim); zeros without T5."""
        n = self.max_sequence_length
        if self.t5 is None:
            return torch.zeros(len(prompts), n, self.hidden_size, device=self._device())
        tok = self.t5_tokenizer
        lengths = [len(ids) for ids in tok(prompts, add_special_tokens=True)["input_ids"]]
        long = [(p, m) for p, m in zip(prompts, lengths) if m > n]
        if long:
            raise ValueError(f"prompts longer than max_sequence_length={n} T5 tokens (never cut silently; raise "
                             f"max_sequence_length, SD3 allows up to 512): {long}")
        ids = tok(prompts, padding="max_length", max_length=n, truncation=True, add_special_tokens=True,
                  return_tensors="pt")["input_ids"]
        return self.t5(ids.to(self._device()))[0]

    def encode(self, prompts, *, return_mask: bool = False):
        """``(context (B, 77 K + max_sequence_length, joint_dim), pooled (B, pooled_size))`` and a None
        mask (SD3 attends to every token): diffusers' ``StableDiffusion3Pipeline.encode_prompt``."""
        prompts = _check_prompts(prompts)
        clip_hidden, pooled = self.encode_clip(prompts)
        t5 = self.encode_t5(prompts)
        clip_hidden = F.pad(clip_hidden, (0, t5.shape[-1] - clip_hidden.shape[-1]))
        context = torch.cat([clip_hidden, t5.to(clip_hidden.dtype)], dim=-2)
        return (context, pooled, None) if return_mask else (context, pooled)
