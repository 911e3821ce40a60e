"""The spatial transformer of latent diffusion: self-attention, cross-attention to text, GEGLU MLP.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Section 3.3
and Appendix (the ``SpatialTransformer`` of Stable Diffusion): the (B, C, H, W) feature map is
normalized (GroupNorm), projected to H*W tokens, run through ``depth`` transformer blocks and
projected back, with a residual around the whole::

    x + proj_out(blocks(proj_in(norm(x))))

Each ``BasicTransformerBlock`` is pre-LayerNorm (Vaswani et al. 2017, "Attention Is All You
Need", Section 3.2; the pre-norm placement of GPT-2)::

    h = h + attn1(norm1(h))                 # self-attention over the H*W tokens
    h = h + attn2(norm2(h), context)        # cross-attention to the text tokens (Section 3.3)
    h = h + ff(norm3(h))                    # GEGLU feed-forward (Shazeer 2020)

Module and parameter names are those of diffusers' ``Transformer2DModel`` /
``BasicTransformerBlock`` / ``Attention`` (and of the original ``ldm`` code, which uses the same
names inside the block), so their state dicts load without renaming. ``use_linear_projection``
(Stable Diffusion 2.x) makes ``proj_in``/``proj_out`` linear maps on tokens instead of 1x1
convolutions on the map (Stable Diffusion 1.x); the two are the same function with weights of
different shape.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with its default
scale ``1 / sqrt(dim_head)`` (Vaswani et al. 2017, eq. 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import _maybe_checkpoint, merge_heads, split_heads


class Attention(nn.Module):
    """Multi-head attention, Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1).

    Queries come from ``x`` (B, N, query_dim); keys and values from ``context`` (B, L,
    context_dim), or from ``x`` itself when ``context_dim`` is None (self-attention). ``to_q``,
    ``to_k``, ``to_v`` have no bias (as in Stable Diffusion); ``to_out`` is ``[Linear, Dropout]``.

    ``mask`` (B, L) bool marks the context tokens to attend to (True = attend). A sample with no
    token to attend to gets a zero output (no update), as difflab's ``CrossAttention`` does; this
    differs from diffusers, whose -10000 bias would make it attend uniformly to every token.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``q, k, v`` (B, N or L, heads * dim_head): ``x W_q``, ``c W_k``, ``c W_v`` with ``c`` the
        context (``x`` itself when None), through one matmul where :meth:`fuse_projections` fused them."""
        modules = self._modules
        if "to_qkv" in modules:  # fused self-attention
            if context is None:
                return modules["to_qkv"](x).chunk(3, dim=-1)
            w_q, w_kv = modules["to_qkv"].weight.split([self.heads_dim, 2 * self.heads_dim])
            return (F.linear(x, w_q), *F.linear(context, w_kv).chunk(2, dim=-1))
        context = x if context is None else context
        if "to_kv" in modules:  # fused cross-attention: keys and values share their input
            return (self.to_q(x), *modules["to_kv"](context).chunk(2, dim=-1))
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def value(self, context: torch.Tensor) -> torch.Tensor:
        """``c W_v`` alone (PAG's identity attention needs no q or k)."""
        for name in ("to_qkv", "to_kv"):
            if name in self._modules:
                return F.linear(context, self._modules[name].weight[-self.heads_dim:])
        return self.to_v(context)

    @property
    def heads_dim(self) -> int:
        """``heads * dim_head``: the width of q, k and v."""
        return self.to_out[0].in_features

    def fuse_projections(self) -> bool:
        """Fuse the input projections into one matmul: ``to_qkv`` = [W_q; W_k; W_v] for
        self-attention, ``to_kv`` = [W_k; W_v] for cross-attention (keys and values share the
        context). The same function, one larger GEMM and fewer kernel launches (diffusers'
        ``fuse_qkv_projections``). The state dict keeps the separate ``to_q/to_k/to_v`` keys (split
        on save, joined on load), so checkpoints do not change. Returns False, changing nothing,
        when a projection is not a plain ``nn.Linear`` (a LoRA layer: merge it first)."""
        if "to_qkv" in self._modules or "to_kv" in self._modules:
            return True
        fused_name, names = _fusion(self.is_cross)
        linears = [getattr(self, n) for n in names]
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return False
        weight = torch.cat([m.weight.detach() for m in linears])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        fused.weight.data.copy_(weight)
        fused.weight.requires_grad_(linears[0].weight.requires_grad)
        for n in names:
            delattr(self, n)
        setattr(self, fused_name, fused)
        self.register_state_dict_post_hook(_split_fused_projections)
        self.register_load_state_dict_pre_hook(_join_fused_projections)
        return True

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (split_heads(z, self.heads) for z in self.project(x, None if context is None else context.to(x.dtype)))
        attn_mask = keep = None
        if mask is not None:
            keep = mask.any(dim=1)  # (B,): samples with at least one token to attend to
            # a fully masked row would give NaN: let it attend everywhere, then zero its output
            attn_mask = (mask | ~keep[:, None])[:, None, None, :]
        out = self.to_out[1](self.to_out[0](merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))))
        if keep is not None:
            out = out * keep[:, None, None].to(out.dtype)
        return out


def _fusion(is_cross: bool) -> tuple[str, tuple[str, ...]]:
    """The fused projection's name and the projections it joins."""
    return ("to_kv", ("to_k", "to_v")) if is_cross else ("to_qkv", ("to_q", "to_k", "to_v"))


def _fused_names(module: Attention) -> tuple[str, tuple[str, ...]]:
    return _fusion("to_kv" in module._modules)


def _split_fused_projections(module: Attention, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook of a fused :class:`Attention`: ``to_qkv.weight`` back to the
    ``to_q/to_k/to_v.weight`` keys (copies: safetensors refuses tensors sharing storage)."""
    fused, names = _fused_names(module)
    own = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}  # the last keys
    split = dict(zip((prefix + n + ".weight" for n in names), own.pop(prefix + fused + ".weight").chunk(len(names))))
    state_dict.update({k: split[k].detach().clone() if k in split else own.pop(k)
                       for k in [prefix + n + ".weight" for n in ("to_q", "to_k", "to_v")]})  # the unfused order
    state_dict.update(own)


def _join_fused_projections(module: Attention, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:
    """Load-state-dict pre-hook of a fused :class:`Attention`: ``to_q/to_k/to_v.weight`` joined into
    ``to_qkv.weight``; of a partial set, the absent keys are reported missing by their own names."""
    fused, names = _fused_names(module)
    keys = [prefix + n + ".weight" for n in names]
    present = [k in state_dict for k in keys]
    if all(present):
        state_dict[prefix + fused + ".weight"] = torch.cat([state_dict.pop(k) for k in keys])
    elif any(present):
        missing_keys += [k for k, p in zip(keys, present) if not p]


class GEGLU(nn.Module):
    """GELU-gated linear unit, GEGLU(x) = (x W + b) * GELU(x V + c) (Shazeer 2020, "GLU Variants
    Improve Transformer", Section 2). ``proj`` computes both halves at once: [x W + b, x V + c]."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's position-wise MLP with a GEGLU hidden layer of ``mult * dim`` units
    (Vaswani et al. 2017, eq. 2, with Shazeer 2020's gated unit). ``net = [GEGLU, Dropout, Linear]``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to ``context``, GEGLU feed-forward
    (Rombach et al. 2022, Section 3.3; Vaswani et al. 2017, Section 3.1).

    ``context=None`` skips the cross-attention (the same as a fully masked context), as in
    difflab's ``UNet``; diffusers would run ``attn2`` as self-attention instead.
    ``only_cross_attention`` (diffusers' setting, the x4 upscaler's): ``attn1`` attends to the
    context too, so the block has no self-attention (skipped, like ``attn2``, without context).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0, eps: float = 1e-5,
                 only_cross_attention: bool = False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, context_dim if only_cross_attention else None, heads, dim_head, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, dropout)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.only_cross_attention:
            h = h + self.attn1(self.norm1(h))
        elif context is not None:
            h = h + self.attn1(self.norm1(h), context, mask)
        if context is not None:
            h = h + self.attn2(self.norm2(h), context, mask)
        return h + self.ff(self.norm3(h))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W pixels of a feature map, conditioned on a token sequence
    (Rombach et al. 2022, Section 3.3; diffusers' ``Transformer2DModel`` for continuous input).

    ``x + proj_out(blocks(proj_in(norm(x))))``, with ``inner = heads * dim_head`` channels inside.
    ``norm`` is GroupNorm(``groups``, eps 1e-6) as in Stable Diffusion; ``proj_in``/``proj_out``
    are 1x1 convs, or linear maps on the tokens when ``use_linear_projection``.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int = 1, groups: int = 32,
                 use_linear_projection: bool = False, dropout: float = 0.0, eps: float = 1e-5, only_cross_attention: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear_projection else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, eps, only_cross_attention) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels) if use_linear_projection else nn.Conv2d(inner, channels, 1)
        self.checkpoint = False

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _maybe_checkpoint(self.checkpoint, self._forward, x, context, mask)

    def _forward(self, x, context, mask):
        b, _, hgt, wid = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, h.shape[1])  # (B, HW, C) tokens
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(b, hgt, wid, h.shape[-1]).permute(0, 3, 1, 2)
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return x + h
