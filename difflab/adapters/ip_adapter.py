"""IP-Adapter: an image prompt through decoupled cross-attention (Ye et al. 2023, "IP-Adapter: Text
Compatible Image Prompt Adapter for Text-to-Image Diffusion Models", Section 3.2).

1. An image encoder -- any module mapping an image to an embedding (the paper: a frozen CLIP image
   encoder; on the digits: a small CNN) -- gives a global embedding e.
2. A projection maps e to N image tokens, ``c_i = LayerNorm(reshape(W e + b))`` (Section 3.2.1:
   a linear layer and a LayerNorm; :class:`ImageProjection`).
3. Every cross-attention layer gets a second attention, over the image tokens, with its own key
   and value weights W'_k, W'_v and the text layer's queries (Section 3.2.2):

       Z_new = Attention(Q, K, V) + lambda * Attention(Q, K', V'),
       Q = Z W_q,  K = c_t W_k,  V = c_t W_v,  K' = c_i W'_k,  V' = c_i W'_v,

   (eq. 5 with the inference-time weight lambda of Section 3.2.3), both terms before the layer's
   output projection (as the authors' code and diffusers do). W'_k, W'_v start as copies of W_k,
   W_v (Section 3.2.2) and are the only new weights besides the projection; lambda (the *scale*)
   is set at sampling time, and lambda = 0 is the base model exactly.

Surgery (STYLE.md, rule 9): :func:`install_ip_adapter` replaces the cross-attention modules
(``attn2`` of the SD U-Net's transformer blocks, chosen by name pattern) by
:class:`DecoupledCrossAttention`, which *is* an :class:`~difflab.nn.transformer.Attention` holding
the same ``to_q/to_k/to_v/to_out`` modules (their state-dict keys do not change) plus ``to_k_ip``,
``to_v_ip``. :func:`remove_ip_adapter` puts plain ``Attention`` modules back.

The image tokens reach those layers as the last N tokens of the context, the way the authors'
code passes them: :class:`IPAdapterUNet` (a network, ``net(x_in, t, context=, image=)``) encodes
and projects the image and appends its tokens to the text context; each decoupled layer splits
them off again. With an adapter installed, call the U-Net through ``IPAdapterUNet`` (or append N
tokens yourself); an ``IPAdapterUNet`` call without an image appends N zero tokens, whose
attention output is exactly zero, so it computes the base model.

Files: :func:`ip_adapter_state_dict` / :func:`load_ip_adapter_state_dict` use the authors' layout
(``image_proj.proj.*``, ``image_proj.norm.*``, ``ip_adapter.{2k+1}.to_k_ip.weight``: k counts the
cross-attention layers in diffusers' order -- down blocks, up blocks, middle block), which is what
diffusers' ``load_ip_adapter`` reads for its ``ImageProjection`` adapters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import merge_heads, split_heads
from ..nn.transformer import Attention
from .surgery import matches, patterns_of, replace_module

DEFAULT_LAYERS = ("attn2",)  # every cross-attention layer of an SD U-Net


class ImageProjection(nn.Module):
    """Image embedding -> N tokens (Ye et al. 2023, Section 3.2.1): ``LayerNorm(reshape(W e + b))``.

    ``proj``: Linear(embed_dim, N * cross_attention_dim); ``norm``: LayerNorm(cross_attention_dim)
    (the authors' names; diffusers' ``ImageProjection`` calls ``proj`` ``image_embeds``).
    """

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        self.proj = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) -> (B, N, cross_attention_dim)."""
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.num_tokens, self.cross_attention_dim))


class DecoupledCrossAttention(Attention):
    """Cross-attention with a second attention over image tokens (Ye et al. 2023, eq. 5).

    ``forward(x, context, mask)``: the last ``num_tokens`` tokens of ``context`` are the image
    tokens c_i, the rest the text tokens c_t (``mask`` is split the same way). Returns

        Attention_text(x) + scale * W_out Attention(Q, c_i W'_k, c_i W'_v),

    where Attention_text is the base layer on the text tokens (zero when there are none), i.e.
    ``to_out(Attention(Q, K, V) + scale * Attention(Q, K', V'))`` up to float rounding. With
    ``scale == 0`` it is the base layer on the text tokens, bit for bit.
    """

    def __init__(self, base: Attention, num_tokens: int, scale: float = 1.0):
        nn.Module.__init__(self)
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens} must be positive")
        if "to_kv" in base._modules:
            raise ValueError("this cross-attention's key/value projections are fused (optimize's fuse_qkv): "
                             "attach the IP-Adapter before optimize")
        self.heads, self.num_tokens, self.scale = base.heads, int(num_tokens), float(scale)
        self.to_q, self.to_k, self.to_v, self.to_out = base.to_q, base.to_k, base.to_v, base.to_out
        # W'_k, W'_v initialized from W_k, W_v (Section 3.2.2)
        w = base.to_k.weight
        self.to_k_ip = nn.Linear(base.to_k.in_features, base.to_k.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.to_v_ip = nn.Linear(base.to_v.in_features, base.to_v.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.to_k_ip.weight.copy_(base.to_k.weight)
            self.to_v_ip.weight.copy_(base.to_v.weight)
        self.train(base.training)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        n = self.num_tokens
        if context is None or context.shape[1] < n:
            raise ValueError(f"an IP-Adapter layer needs its {n} image tokens at the end of the context "
                             f"(call the U-Net through IPAdapterUNet), got context of shape {None if context is None else tuple(context.shape)}")
        text, image = context[:, :-n], context[:, -n:]
        text_mask, image_mask = (None, None) if mask is None else (mask[:, :-n], mask[:, -n:])
        # Attention(Q, K, V) on the text tokens, through the base layer; none: no update
        out = super().forward(x, text, text_mask) if text.shape[1] else x.new_zeros(*x.shape[:-1], self.to_out[0].out_features)
        if self.scale == 0:
            return out
        return out + self.scale * self.image_attention(x, image, image_mask)

    def image_attention(self, x: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """W_out Attention(Q, c_i W'_k, c_i W'_v) (no output bias: it belongs to the text term); zero
        for a sample whose image tokens are all masked."""
        image = image.to(x.dtype)
        q, k, v = (split_heads(z, self.heads) for z in (self.to_q(x), self.to_k_ip(image), self.to_v_ip(image)))
        attn_mask = keep = None
        if mask is not None:
            keep = mask.any(dim=1)
            attn_mask = (mask | ~keep[:, None])[:, None, None, :]
        out = self.to_out[1](F.linear(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)), self.to_out[0].weight))
        return out if keep is None else out * keep[:, None, None].to(out.dtype)

    def to_base(self) -> Attention:
        """A plain :class:`Attention` holding the same ``to_q/to_k/to_v/to_out`` modules."""
        with torch.device("meta"):
            plain = Attention(self.to_q.in_features, self.to_k.in_features, self.heads, self.to_q.out_features // self.heads)
        plain.to_q, plain.to_k, plain.to_v, plain.to_out = self.to_q, self.to_k, self.to_v, self.to_out
        return plain.train(self.training)


# ----------------------------------------------------------------------------------------------
# Surgery


def cross_attention_modules(unet: nn.Module) -> dict[str, Attention]:
    """``{name: module}`` of the cross-attention layers (``attn2`` of the transformer blocks), in
    diffusers' order: down blocks, up blocks, middle block (the order of its ``attn_processors``)."""
    found = {n: m for n, m in unet.named_modules() if isinstance(m, Attention) and n.rsplit(".", 1)[-1] == "attn2"}
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    return dict(sorted(found.items(), key=lambda kv: group.get(kv[0].split(".", 1)[0], 3)))  # stable within a group


def ip_adapter_layers(unet: nn.Module) -> dict[str, DecoupledCrossAttention]:
    """``{name: layer}`` of the installed decoupled cross-attention layers, in diffusers' order."""
    return {n: m for n, m in cross_attention_modules(unet).items() if isinstance(m, DecoupledCrossAttention)}


def install_ip_adapter(unet: nn.Module, num_tokens: int, layers=DEFAULT_LAYERS, scale: float = 1.0) -> list[str]:
    """Replace the cross-attention layers matching ``layers`` (patterns as :func:`difflab.adapters.matches`;
    default every ``attn2``) by :class:`DecoupledCrossAttention` for ``num_tokens`` image tokens.
    Returns their names. Layers that already have an adapter are an error."""
    patterns = patterns_of(layers)
    candidates = cross_attention_modules(unet)
    chosen = [n for n in candidates if any(matches(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"layers {patterns} match no cross-attention layer of {type(unet).__name__} "
                         f"(they are: {list(candidates)[:6]}{' ...' if len(candidates) > 6 else ''})")
    taken = [n for n in chosen if isinstance(candidates[n], DecoupledCrossAttention)]
    if taken:
        raise ValueError(f"an IP-Adapter is already installed on {taken[:4]}: remove_ip_adapter first")
    for name in chosen:
        replace_module(unet, name, DecoupledCrossAttention(candidates[name], num_tokens, scale))
    return chosen


def remove_ip_adapter(unet: nn.Module) -> list[str]:
    """Put plain :class:`Attention` layers (the same weights) back in place of the decoupled ones; returns their names."""
    layers = ip_adapter_layers(unet)
    for name, layer in layers.items():
        replace_module(unet, name, layer.to_base())
    return list(layers)


def set_ip_adapter_scale(unet: nn.Module, scale: float | dict[str, float]) -> None:
    """Set lambda of every decoupled layer, or ``{pattern: scale}`` per layer (:func:`difflab.adapters.matches`)."""
    layers = ip_adapter_layers(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no IP-Adapter layer: install_ip_adapter first")
    for name, layer in layers.items():
        if isinstance(scale, dict):
            for pattern, s in scale.items():
                if matches(name, pattern):
                    layer.scale = float(s)
        else:
            layer.scale = float(scale)


# ----------------------------------------------------------------------------------------------
# The network


class IPAdapterUNet(nn.Module):
    """A U-Net with an image prompt (Ye et al. 2023, Section 3.2, Fig. 2), in difflab's network contract.

    ``net(x_in, t, context=, context_mask=, image=, image_embeds=)``: the embedding
    ``image_embeds`` (B, embed_dim), or ``image_encoder(image)``, is projected to N tokens by
    ``image_proj`` and appended to ``context`` (``context=None``: the tokens alone, for a U-Net
    without text); ``context_mask`` is extended with True. Neither image nor embedding: N zero
    tokens, i.e. exactly the base model. ``unet`` must have decoupled layers for N tokens
    (:func:`install_ip_adapter`, done here when it has none). Further keywords reach the U-Net.

    Training (the paper's recipe): freeze the U-Net and the image encoder, train ``image_proj`` and
    the layers' ``to_k_ip`` / ``to_v_ip`` (:func:`ip_adapter_parameters`, :func:`mark_only_ip_adapter_trainable`).
    """

    def __init__(self, unet: nn.Module, image_proj: ImageProjection, image_encoder: nn.Module | None = None):
        super().__init__()
        self.unet, self.image_proj, self.image_encoder = unet, image_proj, image_encoder
        if not ip_adapter_layers(unet):
            install_ip_adapter(unet, image_proj.num_tokens)
        counts = {layer.num_tokens for layer in ip_adapter_layers(unet).values()}
        if counts != {image_proj.num_tokens}:
            raise ValueError(f"the U-Net's IP-Adapter layers take {sorted(counts)} image tokens, image_proj makes {image_proj.num_tokens}")

    @property
    def config(self):
        return self.unet.config

    def image_tokens(self, batch: int, image=None, image_embeds=None, like: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, N, d) image tokens c_i of ``image_embeds`` or ``image`` (zeros when neither)."""
        if image_embeds is None and image is not None:
            if self.image_encoder is None:
                raise ValueError("image given, but this IPAdapterUNet has no image_encoder: pass image_embeds")
            image_embeds = self.image_encoder(image)
        p = self.image_proj
        if image_embeds is None:
            return torch.zeros(batch, p.num_tokens, p.cross_attention_dim, device=like.device, dtype=like.dtype)
        if image_embeds.shape[0] not in (1, batch):
            raise ValueError(f"image embeddings have batch {image_embeds.shape[0]}, x has {batch}")
        tokens = p(image_embeds.to(p.proj.weight.dtype))
        return tokens.expand(batch, -1, -1) if tokens.shape[0] != batch else tokens

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, image: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        b = x.shape[0]
        tokens = self.image_tokens(b, image, image_embeds, like=x if context is None else context)
        if context is not None:
            tokens = torch.cat([context, tokens.to(context.dtype)], dim=1)
            if context_mask is not None:
                context_mask = torch.cat([context_mask, context_mask.new_ones(b, tokens.shape[1] - context_mask.shape[1])], dim=1)
        return self.unet(x, t, context=tokens, context_mask=context_mask, **kwargs)


# ----------------------------------------------------------------------------------------------
# Parameters and files


def ip_adapter_parameters(net: IPAdapterUNet) -> list[nn.Parameter]:
    """The adapter's trainable parameters: ``image_proj`` and every layer's ``to_k_ip`` / ``to_v_ip``."""
    params = list(net.image_proj.parameters())
    for layer in ip_adapter_layers(net.unet).values():
        params += [layer.to_k_ip.weight, layer.to_v_ip.weight]
    return params


def mark_only_ip_adapter_trainable(net: IPAdapterUNet) -> int:
    """``requires_grad`` True on the adapter's parameters only; returns how many values train."""
    net.requires_grad_(False)
    params = ip_adapter_parameters(net)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def ip_adapter_state_dict(net: IPAdapterUNet) -> dict[str, torch.Tensor]:
    """The adapter's tensors in the authors' layout: ``image_proj.{proj,norm}.*`` and
    ``ip_adapter.{2k+1}.to_{k,v}_ip.weight`` for the k-th cross-attention layer in diffusers' order
    (odd numbers: the authors count every attention processor, self-attention ones included)."""
    out = {f"image_proj.{k}": v.detach() for k, v in net.image_proj.state_dict().items()}
    for k, layer in enumerate(_all_cross_layers(net.unet)):
        out[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = layer.to_k_ip.weight.detach()
        out[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = layer.to_v_ip.weight.detach()
    return out


def load_ip_adapter_state_dict(net: IPAdapterUNet, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`ip_adapter_state_dict`'s layout (also the authors' ``{"image_proj": ..., "ip_adapter": ...}``
    nesting); missing or unexpected keys raise ValueError naming them."""
    if set(state) == {"image_proj", "ip_adapter"}:  # the authors' nested dict
        state = {f"{group}.{k}": v for group in ("image_proj", "ip_adapter") for k, v in state[group].items()}
    want = ip_adapter_state_dict(net)
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"IP-Adapter weights do not match this U-Net: missing {missing[:6]}, unexpected {unexpected[:6]}")
    with torch.no_grad():
        for k, v in state.items():
            if v.shape != want[k].shape:
                raise ValueError(f"IP-Adapter tensor {k} has shape {tuple(v.shape)}, expected {tuple(want[k].shape)}")
            want[k].copy_(v)


def _all_cross_layers(unet: nn.Module) -> list[DecoupledCrossAttention]:
    layers = cross_attention_modules(unet)
    plain = [n for n, m in layers.items() if not isinstance(m, DecoupledCrossAttention)]
    if plain:
        raise ValueError(f"the authors' file layout numbers every cross-attention layer; these have no adapter: {plain[:4]}")
    return list(layers.values())


__all__ = ["ImageProjection", "DecoupledCrossAttention", "IPAdapterUNet", "install_ip_adapter", "remove_ip_adapter",
           "set_ip_adapter_scale", "ip_adapter_layers", "cross_attention_modules", "ip_adapter_parameters",
           "mark_only_ip_adapter_trainable", "ip_adapter_state_dict", "load_ip_adapter_state_dict"]
