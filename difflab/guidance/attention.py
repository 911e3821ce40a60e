"""Attention-based guidance: self-attention guidance (SAG) and perturbed-attention guidance (PAG).

Both guide a denoiser away from a degraded second prediction, and both need to see or change
the network's self-attention. They do it by module surgery from outside the network (STYLE.md,
rules 4 and 9), for the duration of one denoiser call:

- :func:`identity_attention` (PAG) temporarily replaces the ``forward`` of the chosen
  self-attention modules by one whose attention map is the identity, Attention(Q, K, V) = V;
- :func:`record_attention` (SAG) temporarily hooks their query/key projections and records
  the attention probabilities softmax(Q K^T / sqrt(d)) of every call.

On exit every patch and hook is removed, so the network computes exactly what it did before.

Self-attention modules are :class:`difflab.nn.layers.SelfAttention` (the ADM U-Net's) and the
self-attention ``attn1`` of :class:`difflab.nn.transformer.BasicTransformerBlock` (the SD U-Net's
:class:`difflab.nn.transformer.Attention`; its ``attn2`` is cross-attention and is never touched).
They are chosen by name pattern (:func:`difflab.adapters.matches`: a glob matching the whole
name or a dotted tail of it, or ``"re:<regex>"``); by default the middle block's
(``middle.*`` in :class:`difflab.nn.unet.UNet`, ``mid_block.*`` in :class:`difflab.nn.unet_sd.UNetSD`).

The wrappers find the network as ``denoiser.net`` (following ``.denoiser`` through other
wrappers), or take it as ``net=``. Composition with classifier-free guidance: PAG composes in
either order; SAG goes inside CFG, ``ClassifierFreeGuidance(SelfAttentionGuidance(D), ...)``, so
that each branch is guided with its own attention map (the other order raises a ValueError).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import matches
from ..nn.layers import SelfAttention, split_heads
from ..nn.transformer import Attention

DEFAULT_PREFIXES = ("middle.", "mid_block.")
SAG_SPACES = ("eps", "x0")


# ----------------------------------------------------------------------------------------------
# Finding self-attention modules


def self_attention_modules(net: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the self-attention modules of ``net``, in model order:
    ``SelfAttention`` layers and the ``attn1`` of SD transformer blocks."""
    return {name: m for name, m in net.named_modules()
            if isinstance(m, SelfAttention) or (isinstance(m, Attention) and name.rsplit(".", 1)[-1] == "attn1")}


def find_self_attention(net: nn.Module, layers=None) -> dict[str, nn.Module]:
    """The self-attention modules matching any pattern of ``layers`` (a pattern or a sequence of
    them; see :func:`difflab.adapters.matches`), or by default those of the middle block. A pattern
    matching none is a ValueError naming it and some candidates."""
    candidates = self_attention_modules(net)
    if not candidates:
        raise ValueError(f"{type(net).__name__} has no self-attention module (SelfAttention or transformer attn1)")
    if layers is None:
        chosen = {n: m for n, m in candidates.items() if n.startswith(DEFAULT_PREFIXES)}
        if not chosen:
            raise ValueError(f"{type(net).__name__} has no self-attention in a middle block; name the layers "
                             f"(candidates: {', '.join(list(candidates)[:8])})")
        return chosen
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ValueError("layers must name at least one pattern")
    hit = set()
    for p in patterns:
        names = [n for n in candidates if matches(n, p)]
        if not names:
            raise ValueError(f"layer pattern {p!r} matches no self-attention module of {type(net).__name__} "
                             f"(candidates: {', '.join(list(candidates)[:8])}{' ...' if len(candidates) > 8 else ''})")
        hit.update(names)
    return {n: m for n, m in candidates.items() if n in hit}


def find_net(denoiser) -> nn.Module:
    """The network inside ``denoiser``: ``denoiser.net``, following ``.denoiser`` through wrappers."""
    d = denoiser
    while d is not None:
        if isinstance(getattr(d, "net", None), nn.Module):
            return d.net
        d = getattr(d, "denoiser", None)
    raise ValueError(f"cannot find the network inside {type(denoiser).__name__}: pass net=")


# ----------------------------------------------------------------------------------------------
# PAG's perturbation: identity self-attention


def _identity_forward(m: nn.Module):
    """A forward for ``m`` computing its usual output with the attention map replaced by the
    identity (each token attends only to itself), i.e. Attention(Q, K, V) = V."""
    if isinstance(m, SelfAttention):
        def forward(x):  # x + proj(V), V from qkv(norm(x)); merging V's heads gives the V projection itself
            b, c, h, w = x.shape
            v = m.qkv(m.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)[2]
            return x + m.proj(v).transpose(1, 2).reshape(b, c, h, w)
        return forward

    original = m.__dict__.get("forward") or type(m).forward.__get__(m)

    def forward(x, context=None, mask=None):  # to_out(V); a call with context is cross-attention: unchanged
        if context is not None:
            return original(x, context, mask)
        return m.to_out[1](m.to_out[0](m.value(x)))
    return forward


@contextlib.contextmanager
def identity_attention(net: nn.Module, layers=None):
    """Within the block, the chosen self-attention modules of ``net`` use the identity as their
    attention map (Ahn et al. 2024: A = I, so SA(Q, K, V) = V). Yields their names.
    Their previous ``forward`` is restored on exit, even after an exception."""
    modules = find_self_attention(net, layers)
    missing = object()
    saved = {}
    try:
        for name, m in modules.items():
            saved[name] = m.__dict__.get("forward", missing)
            m.forward = _identity_forward(m)
        yield list(modules)
    finally:
        for name, prev in saved.items():
            m = modules[name]
            if prev is missing:
                del m.forward
            else:
                m.forward = prev


# ----------------------------------------------------------------------------------------------
# SAG's map: recording attention probabilities


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) per head (Vaswani et al. 2017, eq. 1; SDPA's default scale):
    q, k (B, N, heads * d) -> (B, heads, N, N), rows summing to 1."""
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    return (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(dim=-1)


def _record_hooks(m: nn.Module, store: list) -> list:
    fused = m.qkv if isinstance(m, SelfAttention) else m._modules.get("to_qkv")  # one q/k/v matmul
    if fused is not None:
        heads = m.num_heads if isinstance(m, SelfAttention) else m.heads

        def on_qkv(_, __, out):
            q, k, _v = out.chunk(3, dim=-1)
            store.append(attention_probs(q.detach(), k.detach(), heads))
        return [fused.register_forward_hook(on_qkv)]
    state = {}  # Attention.forward computes to_q, then to_k (attn1: both on x)

    def on_q(_, __, out):
        state["q"] = out.detach()

    def on_k(_, __, out):
        store.append(attention_probs(state.pop("q"), out.detach(), m.heads))
    return [m.to_q.register_forward_hook(on_q), m.to_k.register_forward_hook(on_k)]


@contextlib.contextmanager
def record_attention(net: nn.Module, layers=None):
    """Within the block, every call of the chosen self-attention modules appends its attention
    probabilities (B, heads, N, N) to a list; yields ``{name: list}``. Hooks removed on exit."""
    modules = find_self_attention(net, layers)
    maps = {name: [] for name in modules}
    handles = []
    try:
        for name, m in modules.items():
            handles += _record_hooks(m, maps[name])
        yield maps
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# SAG's degradation: blur where the attention map looks


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (as diffusers' SAG pipeline
    and torchvision's GaussianBlur). The kernel is truncated to fit the image: reflect padding
    needs kernel_size // 2 < min(H, W)."""
    size = min(kernel_size, 2 * min(x.shape[-2:]) - 1)
    size -= 1 - size % 2  # odd
    t = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c, pad = x.shape[1], size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.reshape(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(x, k.reshape(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def sag_mask(attn: torch.Tensor, size: tuple[int, int], threshold: float = 1.0) -> torch.Tensor:
    """SAG's self-attention mask (Hong et al. 2023, Section 4, as in the authors' code): average the attention map over
    heads, sum it over the queries (how much attention each key position receives; the mean is 1),
    keep the positions above ``threshold``, and upsample (nearest) to ``size`` = (H, W).
    ``attn`` (B, heads, N, N) -> (B, 1, H, W) float in {0, 1}. The map's grid (h, w) has h w = N
    and the aspect ratio of ``size``."""
    b, _, n, _ = attn.shape
    H, W = size
    f = math.sqrt(H * W / n)
    h, w = round(H / f), round(W / f)
    if h * w != n:
        raise ValueError(f"an attention map over {n} tokens does not tile a {H}x{W} image")
    received = attn.mean(dim=1).sum(dim=1)  # (B, N): column sums
    mask = (received > threshold).to(attn.dtype).reshape(b, 1, h, w)
    return F.interpolate(mask, size=(H, W), mode="nearest")


# ----------------------------------------------------------------------------------------------
# The wrappers


class PerturbedAttentionGuidance(nn.Module):
    """Perturbed-attention guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with
    Perturbed-Attention Guidance", eq. 8): D_guided = D + scale (D - D_perturbed), where
    D_perturbed is the same denoiser at the same (x, sigma, cond) with the self-attention maps of
    ``layers`` replaced by the identity (:func:`identity_attention`; default: the middle block).

    The paper guides eps; at fixed (x, sigma) eps_hat = (x - x0_hat) / sigma is affine in x0_hat
    with the same coefficients for both passes, so guiding x0_hat is identical. ``scale = 0``
    is the base denoiser (one call). ``net`` defaults to the network inside ``denoiser``.
    """

    def __init__(self, denoiser, scale: float, layers=None, *, net: nn.Module | None = None):
        super().__init__()
        self.denoiser, self.scale, self.layers = denoiser, float(scale), layers
        self.net = net if net is not None else find_net(denoiser)
        find_self_attention(self.net, layers)  # fail now on a bad pattern

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        d = self.denoiser(x, sigma, **cond)
        if self.scale == 0:
            return d
        with identity_attention(self.net, self.layers):
            d_perturbed = self.denoiser(x, sigma, **cond)
        return d + self.scale * (d - d_perturbed)


class SelfAttentionGuidance(nn.Module):
    """Self-attention guidance (Hong et al. 2023, "Improving Sample Quality of Diffusion Models
    Using Self-Attention Guidance", Algorithm 1 and eq. 16), in the canonical frame.

    1. x0_hat = D(x, sigma), recording the attention map A of ``layer`` (one module; default
       the middle block's);
    2. M = :func:`sag_mask` (A): the positions that receive more than average attention;
    3. x0_bar = M blur(x0_hat) + (1 - M) x0_hat (Gaussian blur, ``blur_sigma``, ``kernel_size``);
    4. re-noise with the same noise estimate eps_hat = (x - x0_hat) / sigma:
       x_bar = x0_bar + sigma eps_hat = x + (x0_bar - x0_hat);
    5. x0_bar_hat = D(x_bar, sigma), and guide:

       - ``space="eps"`` (the paper's eq. 16 and its code, and diffusers): eps_tilde = eps_hat +
         scale (eps_hat - eps(x_bar)), decoded at x, which in x0 terms is
         D_guided = x0_hat + scale (x0_bar - x0_bar_hat);
       - ``space="x0"``: D_guided = x0_hat + scale (x0_hat - x0_bar_hat).

       The two differ because the second pass sees another input (x_bar, not x): guiding eps
       and guiding x0 agree only at a shared input (as in CFG and PAG).

    The paper's guidance scale is 1 + ``scale`` (its code: eps_bar + g (eps - eps_bar)).
    ``scale = 0`` is the base denoiser (one call). ``cond`` goes to both passes.
    """

    def __init__(self, denoiser, scale: float, layer=None, *, net: nn.Module | None = None, blur_sigma: float = 1.0,
                 kernel_size: int = 9, threshold: float = 1.0, space: str = "eps"):
        super().__init__()
        if space not in SAG_SPACES:
            raise ValueError(f"space={space!r} must be one of {list(SAG_SPACES)}")
        self.denoiser, self.scale, self.layer, self.space = denoiser, float(scale), layer, space
        self.blur_sigma, self.kernel_size, self.threshold = float(blur_sigma), int(kernel_size), float(threshold)
        self.net = net if net is not None else find_net(denoiser)
        chosen = find_self_attention(self.net, layer)
        if len(chosen) != 1:
            raise ValueError(f"SAG reads one attention map; layer={layer!r} selects {len(chosen)}: {list(chosen)}")

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        if self.scale == 0:
            return self.denoiser(x, sigma, **cond)
        # 1. Denoise, recording the attention map
        with record_attention(self.net, self.layer) as maps:
            x0 = self.denoiser(x, sigma, **cond)
        (recorded,) = maps.values()
        if len(recorded) != 1 or recorded[0].shape[0] != x.shape[0]:
            shapes = [tuple(a.shape) for a in recorded]
            raise ValueError(f"SAG expected one attention map of batch {x.shape[0]}, recorded {shapes}; "
                             "put SAG inside other wrappers that batch calls, e.g. ClassifierFreeGuidance(SelfAttentionGuidance(D), ...)")
        # 2-3. Mask and blur
        mask = sag_mask(recorded[0], x.shape[-2:], self.threshold).to(x0.dtype)
        x0_bar = mask * gaussian_blur(x0, self.blur_sigma, self.kernel_size) + (1 - mask) * x0
        # 4. Re-noise with the same noise estimate
        x_bar = x + (x0_bar - x0)
        # 5. Second pass and guidance
        x0_bar_hat = self.denoiser(x_bar, sigma, **cond)
        target = x0_bar if self.space == "eps" else x0
        return x0 + self.scale * (target - x0_bar_hat)
