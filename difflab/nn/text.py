"""Text encoders: prompts in, a token sequence for cross-attention and a pooled vector out.

Every encoder implements one interface (:class:`TextEncoder`)::

    hidden_states, pooled = encoder.encode(prompts)                    # (B, L, D), (B, D)
    hidden_states, pooled, mask = encoder.encode(prompts, return_mask=True)

``hidden_states`` go to the U-Net as ``context``; ``mask`` (B, L) bool (True = a token to attend
to) as ``context_mask``, or None when every token is attended to.

- :class:`CLIPTextEncoder`: the CLIP text transformer (Radford et al. 2021, "Learning Transferable
  Visual Models From Natural Language Supervision", Section 2.4) that Stable Diffusion conditions
  on, with the parameter names of transformers' ``CLIPTextModel``, so its ``model.safetensors``
  loads as it is. Prompts longer than the 77-token window are chunked (see :meth:`CLIPTextEncoder.encode`).
- :class:`TinyTextEncoder`: a word-level tokenizer and a small transformer encoder trained from
  scratch, for the embedded digits demo.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSONConfig
from .layers import merge_heads, split_heads
from .transformer import Attention, FeedForward

SD_EXTRA = "pip install 'difflab[sd]' (or pip install transformers)"


class TextEncoder(nn.Module):
    """The interface every text encoder implements (a module, so ``.to(device)`` and ``.eval()`` work).

    ``encode(prompts, *, return_mask=False)`` takes a non-empty list of strings and returns
    ``(hidden_states (B, L, D), pooled (B, D))``, plus ``mask`` (B, L) bool or None when
    ``return_mask``. ``hidden_size`` is D.
    """

    hidden_size: int


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is an empty list: give at least one prompt (use '' for the unconditional prompt)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in bad]}")
    return prompts


# ----------------------------------------------------------------------------------------------
# CLIP


@dataclass(frozen=True)
class CLIPTextEncoderConfig(JSONConfig):
    """The shape of a CLIP text transformer; field names are those of transformers' ``CLIPTextConfig``.

    Defaults: CLIP ViT-L/14's text tower (Stable Diffusion 1.x). SD 2.x's OpenCLIP ViT-H/14:
    hidden 1024, intermediate 4096, 23 layers (the 24th is unused), 16 heads, ``gelu``.
    ``eos_token_id == 2`` is transformers' legacy marker: the pooled token is then the argmax of
    the input ids (the end token has the largest id in CLIP's vocabulary).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77  # the token window, start and end tokens included
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    projection_dim: int | None = None  # CLIPTextModelWithProjection: the pooled vector through text_projection (SDXL's ViT-bigG: 1280)

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; choose one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={self.hidden_size}")

    @classmethod
    def from_transformers_config(cls, d: dict) -> "CLIPTextEncoderConfig":
        """Read a transformers ``CLIPTextModel`` ``config.json`` dict (keys that do not change
        inference, such as dropout or initializer ranges, are ignored)."""
        if d.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
            raise ValueError(f"config.json describes a {d.get('model_type')!r} model, not a CLIP text model")
        projected = "CLIPTextModelWithProjection" in (d.get("architectures") or [])
        if "text_config" in d:  # a full CLIPModel config: use its text tower
            d = d["text_config"]
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "projection_dim"}
        values = {k: d.get(k, v) if d.get(k) is not None else v for k, v in fields.items()}
        return cls(**values, projection_dim=d.get("projection_dim", 512) if projected else None)

    def to_transformers_config(self) -> dict:
        """The transformers ``config.json`` dict of the same model (``CLIPTextModelWithProjection``
        when it has a projection)."""
        arch = "CLIPTextModel" if self.projection_dim is None else "CLIPTextModelWithProjection"
        return {"architectures": [arch], "model_type": "clip_text_model", "attention_dropout": 0.0,
                "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
                **self.to_dict(), "projection_dim": self.projection_dim or 768}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's approximation of GELU (Hendrycks & Gimpel 2016, Section 2)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (Vaswani et al. 2017, eq. 1; CLIP)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    """Pre-LayerNorm transformer layer: h + attn(ln1(h)), then h + mlp(ln2(h)) (Radford et al. 2019, Section 2.3)."""

    def __init__(self, c: CLIPTextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.layer_norm1(h), attn_mask)
        return h + self.mlp(self.layer_norm2(h))


class CLIPTextEncoder(TextEncoder):
    """The CLIP text transformer (Radford et al. 2021, Section 2.4): token + position embeddings,
    causally masked pre-LN transformer layers, a final LayerNorm; the pooled vector is the final
    hidden state at the end-of-text token.

    ``tokenizer``: a transformers ``CLIPTokenizer`` (or anything with its call signature and
    ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``), needed by :meth:`encode` only;
    :meth:`forward` takes token ids. ``clip_skip`` takes the hidden states that many layers before
    the last (then the final LayerNorm), as diffusers' ``clip_skip`` does (A1111's "Clip skip" is
    this plus one); the pooled vector always comes from the last layer. ``norm_hidden=False``
    leaves the chosen hidden states without the final LayerNorm: SDXL conditions on transformers'
    ``hidden_states[-2]`` as they are (Podell et al. 2023, Section 2.1), which is ``clip_skip=1,
    norm_hidden=False``. A config with ``projection_dim`` adds ``text_projection`` (no bias, as
    transformers' ``CLIPTextModelWithProjection``): the pooled vector is then projected.
    """

    def __init__(self, config: CLIPTextEncoderConfig, tokenizer=None, clip_skip: int = 0, norm_hidden: bool = True):
        super().__init__()
        self.config = c = config
        self.hidden_size = c.hidden_size
        self.tokenizer, self.clip_skip, self.norm_hidden = tokenizer, clip_skip, norm_hidden
        if not 0 <= clip_skip < c.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {c.num_hidden_layers - 1}]")
        self.embeddings = nn.ModuleDict({"token_embedding": nn.Embedding(c.vocab_size, c.hidden_size),
                                         "position_embedding": nn.Embedding(c.max_position_embeddings, c.hidden_size)})
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList([CLIPLayer(c) for _ in range(c.num_hidden_layers)])})
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        if c.projection_dim is not None:
            self.text_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                clip_skip: int | None = None, final_norm: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden_states (B, L, D), pooled (B, D or projection_dim))`` for token ids (B, L), L <= max_position_embeddings.

        ``attention_mask`` (B, L), 1/True for real tokens, is combined with the causal mask
        (Stable Diffusion passes none: it attends to the padding tokens too). ``final_norm=False``
        returns the chosen layer's hidden states without the final LayerNorm (default: the encoder's
        ``norm_hidden``; transformers'
        ``hidden_states[-1 - clip_skip]``; SD3 and SDXL condition on ``clip_skip=1``).
        """
        c = self.config
        skip = self.clip_skip if clip_skip is None else clip_skip
        b, n = input_ids.shape
        if n > c.max_position_embeddings:
            raise ValueError(f"{n} tokens exceed the window of {c.max_position_embeddings}: use encode(), which chunks long prompts")
        positions = torch.arange(n, device=input_ids.device)
        h = self.embeddings["token_embedding"](input_ids) + self.embeddings["position_embedding"](positions)
        mask = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()[None, None]  # causal: token i sees j <= i
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        layers = self.encoder["layers"]
        chosen = None
        for i, layer in enumerate(layers):
            h = layer(h, mask)
            if i == len(layers) - 1 - skip:
                chosen = h
        last = self.final_layer_norm(h)
        normed = self.norm_hidden if final_norm is None else final_norm
        hidden = chosen if not normed else last if skip == 0 else self.final_layer_norm(chosen)
        if c.eos_token_id == 2:  # transformers' legacy config: the end token has the largest id
            eos = input_ids.to(torch.int).argmax(dim=-1)
        else:  # the first end token (padding may repeat it)
            eos = (input_ids == c.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(b, device=h.device), eos]
        return hidden, pooled if c.projection_dim is None else self.text_projection(pooled)

    def token_windows(self, prompts, min_chunks: int = 1) -> tuple[torch.Tensor, int]:
        """Token ids (B * K, window) of the prompts, K windows each, and K (see :meth:`encode`)."""
        if self.tokenizer is None:
            raise ValueError("this CLIPTextEncoder has no tokenizer: load it with a tokenizer folder "
                             "(load_clip_text_encoder(folder, tokenizer=...)) or call it on token ids")
        prompts = _check_prompts(prompts)
        tok, window = self.tokenizer, self.config.max_position_embeddings
        body = window - 2
        ids = tok(prompts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        k = max(min_chunks, 1, *(math.ceil(len(x) / body) for x in ids))
        rows = []
        for x in ids:
            for j in range(k):
                chunk = list(x[j * body:(j + 1) * body])
                rows.append([tok.bos_token_id, *chunk, tok.eos_token_id] + [tok.pad_token_id] * (body - len(chunk)))
        return torch.tensor(rows, dtype=torch.long, device=self.final_layer_norm.weight.device), k

    def encode(self, prompts, *, return_mask: bool = False, min_chunks: int = 1):
        """Encode prompts of any length, never cutting them.

        Each prompt's tokens are split into windows of ``window - 2`` = 75 tokens; each window is
        wrapped as ``[start] + tokens + [end] + [pad] * (75 - len)`` (77 tokens), encoded on its
        own, and the hidden states of a prompt's windows are concatenated: (B, 77 K, D), as
        A1111's web UI does. Every prompt of the batch gets the same K (the largest needed, at
        least ``min_chunks``) by appending windows of no tokens, which encode like the empty
        prompt; encode a prompt and its negative prompt in one call so that they match for
        classifier-free guidance. A prompt of at most 75 tokens gives exactly the 77 ids that
        diffusers' ``StableDiffusionPipeline`` feeds the encoder. The pooled vector is that of
        the first window. The mask is None: Stable Diffusion attends to every position.
        """
        ids, k = self.token_windows(prompts, min_chunks)
        hidden, pooled = self(ids)
        b = ids.shape[0] // k
        hidden = hidden.reshape(b, k * ids.shape[1], -1)
        pooled = pooled.reshape(b, k, -1)[:, 0]
        return (hidden, pooled, None) if return_mask else (hidden, pooled)


def load_clip_tokenizer(folder):
    """transformers' ``CLIPTokenizer`` from a local folder (``vocab.json`` + ``merges.txt``, or
    ``tokenizer.json``); never downloads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer folder {folder}")
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no CLIP tokenizer files in {folder}: expected vocab.json and merges.txt (or tokenizer.json)")
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise ImportError(f"the CLIP tokenizer needs transformers: {SD_EXTRA}") from e
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


# ----------------------------------------------------------------------------------------------
# A small encoder trained from scratch


@dataclass(frozen=True)
class TinyTextConfig(JSONConfig):
    """A word-level tokenizer's vocabulary and a small transformer encoder's shape."""

    vocab: tuple[str, ...] = ("<pad>", "<unk>")  # index 0 pads, 1 stands for unknown words
    max_length: int = 8  # tokens per prompt; longer prompts are an error, never cut
    width: int = 64
    layers: int = 2
    heads: int = 4
    seed: int = 0  # the initial weights are a function of this seed alone

    def __post_init__(self):
        object.__setattr__(self, "vocab", tuple(self.vocab))
        if self.vocab[:2] != ("<pad>", "<unk>"):
            raise ValueError(f"vocab must start with '<pad>', '<unk>', got {list(self.vocab[:2])}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocab has repeated words")
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads} does not divide width={self.width}")



def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: ``"The digit 3!"`` -> ``["the", "digit", "3"]``."""
    return re.findall(r"[a-z0-9]+", text.lower())


def build_vocab(texts, min_count: int = 1) -> tuple[str, ...]:
    """``("<pad>", "<unk>", *sorted words seen at least min_count times)`` over ``texts``."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in words(t):
            counts[w] = counts.get(w, 0) + 1
    return ("<pad>", "<unk>", *sorted(w for w, n in counts.items() if n >= min_count))


class EncoderLayer(nn.Module):
    """Pre-LN transformer encoder layer over the unmasked tokens (Vaswani et al. 2017, Section 3.1)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, None, heads, width // heads)
        self.ff = FeedForward(width)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), mask=mask)
        return h + self.ff(self.norm2(h))


class TinyTextEncoder(TextEncoder):
    """Word-level tokens -> learned token + position embeddings -> bidirectional transformer with a
    padding mask -> LayerNorm (Vaswani et al. 2017, Section 3). Pooled = mean of the real tokens.

    Returns ``max_length`` tokens per prompt; the mask marks the real ones. The empty prompt has
    no real token: its mask is all False (the U-Net then skips cross-attention for it) and its
    pooled vector is 0, a natural null condition for classifier-free guidance. On disk:
    :func:`difflab.io.text.save_tiny_text` / :func:`~difflab.io.text.load_tiny_text`.
    """

    def __init__(self, config: TinyTextConfig):
        super().__init__()
        self.config = c = config
        self.hidden_size = c.width
        self.index = {w: i for i, w in enumerate(c.vocab)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.token_embedding = nn.Embedding(len(c.vocab), c.width)
            self.position_embedding = nn.Embedding(c.max_length, c.width)
            self.layers = nn.ModuleList([EncoderLayer(c.width, c.heads) for _ in range(c.layers)])
            self.final_norm = nn.LayerNorm(c.width)

    @classmethod
    def from_texts(cls, texts, **config) -> "TinyTextEncoder":
        """An untrained encoder whose vocabulary is the words of ``texts`` (e.g. the captions)."""
        return cls(TinyTextConfig(vocab=build_vocab(texts), **config))

    def tokenize(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (B, max_length) long, mask (B, max_length) bool)``; unknown words become ``<unk>``."""
        prompts = _check_prompts(prompts)
        n = self.config.max_length
        rows = [[self.index.get(w, 1) for w in words(p)] for p in prompts]
        long = [(p, len(r)) for p, r in zip(prompts, rows) if len(r) > n]
        if long:
            raise ValueError(f"prompts longer than the encoder's window of {n} words (never cut silently): {long}")
        device = self.token_embedding.weight.device
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows], dtype=torch.long, device=device)
        return ids, ids != 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden_states (B, L, D), pooled (B, D))``; padded positions of the hidden states are 0."""
        h = self.token_embedding(ids) + self.position_embedding(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            h = layer(h, mask)
        h = self.final_norm(h) * mask[..., None].to(h.dtype)
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(h.dtype)
        return h, pooled

    def encode(self, prompts, *, return_mask: bool = False):
        ids, mask = self.tokenize(prompts)
        hidden, pooled = self(ids, mask)
        return (hidden, pooled, mask) if return_mask else (hidden, pooled)
