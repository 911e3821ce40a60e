"""k-diffusion's U-Net blocks, as Stable Diffusion's x2 latent upscaler uses them (diffusers'
``KDownBlock2D`` / ``KCrossAttnDownBlock2D`` / ``KUpBlock2D`` / ``KCrossAttnUpBlock2D``).

:class:`~difflab.nn.unet_sd.UNetSD` builds its levels from these when its config says
``block_style="k"``; the names of modules and parameters are diffusers', so the weights load as
they are. What differs from the SD blocks (Crowson's k-diffusion "image_v1" U-Net):

- every GroupNorm is adaptive, ``AdaGroupNorm``: ``GN(x) * (1 + scale) + shift`` with
  ``(scale, shift)`` a linear map of the time embedding (Dhariwal & Nichol 2021, Section 3's
  AdaGN), groups of 32 channels;
- down- and upsampling are fixed [1, 3, 3, 1] / 8 blur filters (Zhang 2019, "Making
  Convolutional Networks Shift-Invariant Again", Section 3), reflect-padded, not convs;
- an attention block is cross-attention to the LayerNorm-ed text (after an optional
  self-attention), each behind an ``AdaGroupNorm``; q, k and v have biases;
- one skip connection per level: an up level concatenates the last output of its down level
  (none for the deepest cross-attention level, whose outputs diffusers records as None).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Attention

GROUP_SIZE = 32  # channels per group of every AdaGroupNorm (diffusers' resnet_group_size)
_BLUR = torch.tensor([1 / 8, 3 / 8, 3 / 8, 1 / 8])


def activation(name: str) -> nn.Module:
    """The activation named by a diffusers config (``act_fn`` / ``timestep_post_act``)."""
    acts = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU}
    if name not in acts:
        raise ValueError(f"activation {name!r} is not supported; choose one of {sorted(acts)}")
    return acts[name]()


class AdaGroupNorm(nn.Module):
    """GroupNorm whose scale and shift come from the time embedding: ``GN(x) (1 + s) + b``,
    ``[s, b] = linear(emb)`` (Dhariwal & Nichol 2021, Section 3, AdaGN); no affine of its own."""

    def __init__(self, emb_dim: int, channels: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.linear = nn.Linear(emb_dim, 2 * channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
        return F.group_norm(x, self.groups, eps=self.eps) * (1 + scale) + shift


class KResnetBlock(nn.Module):
    """``shortcut(x) + conv2(drop(act(AdaGN2(conv1(act(AdaGN1(x)))))))`` (diffusers'
    ``ResnetBlockCondNorm2D`` with ``ada_group``); ``conv2`` may change the width again
    (``conv_out``), and the 1x1 shortcut, present when the width changes, has no bias."""

    def __init__(self, cin: int, cout: int, emb_dim: int, act: str, eps: float, dropout: float = 0.0, conv_out: int | None = None):
        super().__init__()
        conv_out = conv_out or cout
        self.norm1 = AdaGroupNorm(emb_dim, cin, cin // GROUP_SIZE, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = AdaGroupNorm(emb_dim, cout, cout // GROUP_SIZE, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, conv_out, 3, padding=1)
        self.nonlinearity = activation(act)
        self.conv_shortcut = nn.Conv2d(cin, conv_out, 1, bias=False) if cin != conv_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x, emb)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h, emb))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


def _blur_weight(x: torch.Tensor, gain: float) -> torch.Tensor:
    """A per-channel (depthwise, as a dense diagonal weight) 4x4 blur kernel ``gain^2 k k^T``."""
    k = (_BLUR * gain).to(x)
    weight = x.new_zeros(x.shape[1], x.shape[1], 4, 4)
    idx = torch.arange(x.shape[1], device=x.device)
    weight[idx, idx] = torch.outer(k, k)
    return weight


class KDownsample(nn.Module):
    """Stride-2 blur with [1, 3, 3, 1] / 8, reflect padding 1 (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1,) * 4, "reflect"), _blur_weight(x, 1.0), stride=2)


class KUpsample(nn.Module):
    """Stride-2 transposed blur with [1, 3, 3, 1] / 4, reflect padding 1 (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(F.pad(x, (1,) * 4, "reflect"), _blur_weight(x, 2.0), stride=2, padding=3)


class KCrossAttention(Attention):
    """:class:`~difflab.nn.transformer.Attention` with biased q, k, v and, for cross-attention,
    the context LayerNorm-ed first (``norm_cross``; diffusers' ``cross_attention_norm="layer_norm"``)."""

    def __init__(self, dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__(dim, context_dim, heads, dim_head)
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(context_dim or dim, inner)
        self.to_v = nn.Linear(context_dim or dim, inner)
        self.norm_cross = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x, context=None, mask=None):
        if self.norm_cross is not None and context is not None:
            context = self.norm_cross(context.to(x.dtype))
        return super().forward(x, context, mask)


class KAttentionBlock(nn.Module):
    """[``x + attn1(AdaGN1(x))``, self-attention, when ``self_attention``] then
    ``x + attn2(AdaGN2(x), LN(context))`` over the H*W tokens (diffusers' ``KAttentionBlock``)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, emb_dim: int, self_attention: bool):
        super().__init__()
        groups = max(1, dim // GROUP_SIZE)
        if self_attention:
            self.norm1 = AdaGroupNorm(emb_dim, dim, groups)
            self.attn1 = KCrossAttention(dim, None, heads, dim_head)
        self.self_attention = self_attention
        self.norm2 = AdaGroupNorm(emb_dim, dim, groups)
        self.attn2 = KCrossAttention(dim, context_dim, heads, dim_head)

    @staticmethod
    def _tokens(fn, h: torch.Tensor, *args) -> torch.Tensor:
        b, c, hh, ww = h.shape
        out = fn(h.permute(0, 2, 3, 1).reshape(b, hh * ww, c), *args)
        return out.permute(0, 2, 1).reshape(b, -1, hh, ww)

    def forward(self, x, emb, context=None, mask=None):
        if self.self_attention:
            x = x + self._tokens(self.attn1, self.norm1(x, emb))
        if context is None:  # no text: skip the cross-attention (as difflab's SD blocks do)
            return x
        return x + self._tokens(self.attn2, self.norm2(x, emb), context, mask)


def _no_temporal(temporal) -> None:
    if temporal is not None:
        raise ValueError("motion modules (temporal=) need SD blocks; this UNetSD has block_style='k' (the latent upscaler's)")


class KDownBlock(nn.Module):
    """One level down: ``resnets[k]`` (+ ``attentions[k]``), each output a skip (None at the
    deepest cross-attention level, as diffusers records it), then the blur downsampling."""

    def __init__(self, resnets, attentions, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([KDownsample()]) if downsample else None

    def forward(self, h, emb, context, mask, temporal=None):
        _no_temporal(temporal)
        skips = []
        for k, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[k](h, emb, context, mask)
            skips.append(None if self.attentions is not None and self.downsamplers is None else h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
        return h, skips


class KUpBlock(nn.Module):
    """One level up: takes its level's skips (the last one is concatenated unless None), then
    ``resnets[k]`` (+ ``attentions[k]``) and the blur upsampling."""

    def __init__(self, resnets, attentions, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.upsamplers = nn.ModuleList([KUpsample()]) if upsample else None

    def forward(self, h, skips: list, emb, context, mask, temporal=None):
        _no_temporal(temporal)
        taken = [skips.pop() for _ in self.resnets]
        if taken[0] is not None:
            h = torch.cat([h, taken[0]], dim=1)
        for k, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[k](h, emb, context, mask)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


def k_down_block(cin: int, cout: int, emb_dim: int, layers: int, cross: bool, last: bool, head_dim: int, context_dim: int,
                 act: str, eps: float, dropout: float) -> KDownBlock:
    """diffusers' ``KDownBlock2D`` (``cross=False``) or ``KCrossAttnDownBlock2D``: every level but
    the deepest (``last``) downsamples; the deepest level's attention adds self-attention."""
    resnets = [KResnetBlock(cin if k == 0 else cout, cout, emb_dim, act, eps, dropout) for k in range(layers)]
    attns = [KAttentionBlock(cout, cout // head_dim, head_dim, context_dim, emb_dim, self_attention=last)
             for _ in range(layers)] if cross else []
    return KDownBlock(resnets, attns, downsample=not last)


def k_up_block(cin: int, cout: int, emb_dim: int, layers: int, cross: bool, last: bool, head_dim: int, context_dim: int,
               act: str, eps: float, dropout: float) -> KUpBlock:
    """diffusers' ``KUpBlock2D`` / ``KCrossAttnUpBlock2D`` for an up level of width ``cout`` whose
    output goes on at width ``cin`` (the next level's): ``layers`` ResnetBlocks, the first taking
    the concatenated skip (none, and self-attention, when cin == cout == emb_dim, diffusers' "first
    block"), the last switching to ``cin``."""
    first = cross and cin == cout == emb_dim
    k_in = cout if first else 2 * cout
    resnets, attns = [], []
    for k in range(layers):
        end = k == layers - 1
        rin = k_in if k == 0 else cout
        if cross:
            resnets.append(KResnetBlock(rin, cout, emb_dim, act, eps, dropout, conv_out=cin if end and cin != cout else None))
            dim = cin if end else cout
            attns.append(KAttentionBlock(dim, dim // head_dim, head_dim, context_dim, emb_dim, self_attention=first))
        else:
            resnets.append(KResnetBlock(rin, cin if end else cout, emb_dim, act, eps, dropout))
    return KUpBlock(resnets, attns, upsample=not last)


__all__ = ["AdaGroupNorm", "KResnetBlock", "KDownsample", "KUpsample", "KCrossAttention", "KAttentionBlock", "KDownBlock",
           "KUpBlock", "k_down_block", "k_up_block", "activation", "GROUP_SIZE"]
