"""A point transformer over point clouds (B, N, 3): the denoiser network of point-cloud diffusion.

A network, not a denoiser: ``net(x_in, t, class_labels=None)`` maps the network-scale points and a
(B,) float time to the raw prediction, shaped like ``x_in``. Points are a set: every layer is
per-point or attention, and no position is given, so permuting the input points permutes the
output the same way and changes nothing else (permutation equivariance; Zaheer et al. 2017,
"Deep Sets", Lemma 3; Lee et al. 2019, "Set Transformer", Property 1).

- embedding: each point's coordinates through Linear-SiLU-Linear to ``width`` channels;
- conditioning: the sinusoidal time embedding through an MLP plus a learned class embedding
  (label ``num_classes`` is the null class of classifier-free guidance), as DiT's adaLN-Zero
  (Peebles & Xie 2023, Section 3.2): every block's LayerNorms are shifted and scaled, and its
  residual branches gated, by linear maps of it, zero-initialized (an untrained block is the identity);
- blocks: attention then an MLP (GELU, ``mlp_ratio``), pre-norm. With ``num_inducing`` = 0 the
  attention is full self-attention over the N points (O(N^2)); with ``num_inducing`` = M > 0 it is
  the Set Transformer's induced set attention block (Lee et al. 2019, eq. 9): M learned inducing
  tokens attend to the points, then the points attend to those M summaries (O(N M));
- out: LayerNorm, adaLN, a zero-initialized linear to 3 (an untrained net outputs 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSONConfig
from .layers import TimestepMLP, timestep_embedding, zero_


@dataclass(frozen=True)
class PointTransformerConfig(JSONConfig):
    """Everything that shapes a PointTransformer; JSON-safe for checkpoints."""

    in_channels: int = 3           # coordinates per point
    num_points: int = 2048         # the cloud size it is trained on (one sample is (num_points, in_channels)); any N runs
    width: int = 128               # channels per point
    depth: int = 4                 # blocks
    num_heads: int = 4             # attention heads; must divide width
    num_inducing: int = 0          # 0: full self-attention; M > 0: induced set attention with M inducing tokens
    mlp_ratio: int = 2             # hidden width of each block's MLP, in widths
    num_classes: int | None = None  # class-conditional when set; label num_classes is the null class (CFG)
    knn: int = 0                   # 0: no local branch; k > 0: each block adds a local layer over each point's k nearest neighbours
    local: str = "vector_attention"  # that layer: "vector_attention" (Zhao et al. 2021) or "edgeconv" (Wang et al. 2019)
    local_blocks: int | None = None  # with knn > 0: the first local_blocks blocks get the local layer (None: all)

    def __post_init__(self):
        bad = [f"{k}={getattr(self, k)!r}" for k in ("in_channels", "num_points", "width", "depth", "num_heads", "mlp_ratio")
               if not (isinstance(getattr(self, k), int) and not isinstance(getattr(self, k), bool) and getattr(self, k) >= 1)]
        bad += [f"{k}={getattr(self, k)!r}" for k in ("num_inducing", "knn")
                if not (isinstance(getattr(self, k), int) and not isinstance(getattr(self, k), bool) and getattr(self, k) >= 0)]
        bad += [] if self.num_classes is None or (isinstance(self.num_classes, int) and self.num_classes >= 1) else \
            [f"num_classes={self.num_classes!r}"]
        if bad:
            raise ValueError(f"PointTransformerConfig sizes must be positive integers (num_inducing, knn >= 0): {', '.join(bad)}")
        if self.local_blocks is not None and not (isinstance(self.local_blocks, int) and not isinstance(self.local_blocks, bool)
                                                  and 1 <= self.local_blocks <= self.depth):
            raise ValueError(f"PointTransformerConfig local_blocks={self.local_blocks!r} must be None or 1..depth={self.depth}")
        if self.local not in LOCAL_LAYERS:
            raise ValueError(f"PointTransformerConfig local={self.local!r} is not one of {', '.join(LOCAL_LAYERS)}")
        if self.width % self.num_heads:
            raise ValueError(f"PointTransformerConfig num_heads={self.num_heads} must divide width={self.width}")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, C) modulations broadcast over the points."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention of queries ``q_in`` (B, Nq, C) over ``kv_in`` (B, Nk, C)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        b, nq, c = q_in.shape
        h = self.heads
        q = self.q(q_in).reshape(b, nq, h, c // h).transpose(1, 2)
        k, v = self.kv(kv_in).reshape(b, kv_in.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, nq, c))


class SetAttention(nn.Module):
    """Self-attention over the set, full (``inducing`` = 0) or induced through ``inducing`` learned
    tokens (Lee et al. 2019, ISAB: H = MAB(I, X), then MAB(X, H))."""

    def __init__(self, width: int, heads: int, inducing: int):
        super().__init__()
        self.attn = Attention(width, heads)
        if inducing:
            self.inducing = nn.Parameter(torch.randn(inducing, width) * width ** -0.5)
            self.gather = Attention(width, heads)
            self.norm = nn.LayerNorm(width)
        else:
            self.inducing = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inducing is None:
            return self.attn(x, x)
        i = self.inducing[None].expand(x.shape[0], -1, -1)
        summary = i + self.gather(i, x)
        return self.attn(x, self.norm(summary))


def knn_indices(points: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, k) indices of each point's ``k`` nearest points (itself first) by Euclidean distance; k <= N."""
    d = torch.cdist(points, points)
    return d.topk(min(k, points.shape[1]), dim=-1, largest=False).indices


def gather_neighbours(f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (B, N, k) of ``f`` (B, N, C), per batch element: (B, N, k, C)."""
    b, n, c = f.shape
    flat = (idx + torch.arange(b, device=idx.device)[:, None, None] * n).reshape(-1)
    return f.reshape(b * n, c)[flat].reshape(*idx.shape, c)


class VectorAttention(nn.Module):
    """The Point Transformer layer (Zhao et al. 2021, eq. 3) over each point's k nearest neighbours:
    y_i = sum_j softmax_j(gamma(phi(x_i) - psi(x_j) + delta_ij)) * (alpha(x_j) + delta_ij), with
    delta_ij = theta(p_i - p_j) the relative-position encoding; then a linear output. As the authors'
    code, theta is Linear(3, 3)-ReLU-Linear(3, C) and gamma is Linear(C, C/s)-ReLU-Linear(C/s, C/s),
    each of its C/s weights shared by s = ``share`` channels.

    Computed without any (k, C) tensor but the gathered values: gamma's first layer and theta's last
    are linear, so gamma_1(phi_i - psi_j + delta_ij) = G phi_i - G psi_j + (G W_theta) h_ij (+ biases),
    h_ij = ReLU(theta_1(p_i - p_j)), and sum_j w_ij * delta_ij = W_theta (sum_j w_ij h_ij) + b_theta
    (the weights sum to 1)."""

    def __init__(self, width: int, coords: int = 3, share: int = 8):
        super().__init__()
        self.share = share if width % share == 0 else 1
        g = width // self.share
        self.qkv = nn.Linear(width, 3 * width)                                   # phi, psi, alpha
        self.theta1, self.theta2 = nn.Linear(coords, coords), nn.Linear(coords, width)
        self.gamma1, self.gamma2 = nn.Linear(width, g), nn.Linear(g, g)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        k, s = idx.shape[-1], self.share
        g = c // s
        q, key, v = self.qkv(x).chunk(3, dim=-1)
        G, Wt, bt = self.gamma1.weight, self.theta2.weight, self.theta2.bias
        h = F.relu(self.theta1(points[:, :, None] - gather_neighbours(points, idx)))   # (B, N, k, 3)
        a = F.linear(q, G, self.gamma1.bias + G @ bt)                                 # (B, N, g)
        u = a[:, :, None] - gather_neighbours(F.linear(key, G), idx) + h @ (G @ Wt).T    # gamma_1 of the relation
        w = self.gamma2(F.relu(u)).softmax(dim=2)                                     # (B, N, k, g)
        vals = gather_neighbours(v, idx).reshape(b, n, k, s, g)
        y = (w[:, :, :, None] * vals).sum(dim=2)                                     # (B, N, s, g)
        hw = (w[..., None] * h[:, :, :, None]).sum(dim=2)                            # (B, N, g, 3): sum_j w_ij h_ij
        y = (y + (hw[:, :, None] * Wt.reshape(s, g, -1)).sum(dim=-1)).reshape(b, n, c) + bt
        return self.out(y)


class EdgeConv(nn.Module):
    """DGCNN's EdgeConv (Wang et al. 2019, eq. 8): x_i' = max_j ReLU(theta . (x_j - x_i) + phi . x_i), over
    each point's k nearest neighbours, here with the relative position p_j - p_i in the edge too; then
    a linear output. The edge map is linear, so it is applied per point and gathered (cheap)."""

    def __init__(self, width: int, coords: int = 3):
        super().__init__()
        self.theta, self.phi = nn.Linear(width, width, bias=False), nn.Linear(width, width)
        self.pos = nn.Linear(coords, width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t, p = self.theta(x), self.pos(points)
        centre = self.phi(x) - t - p                                                     # (B, N, C)
        edges = F.relu(centre[:, :, None] + gather_neighbours(t + p, idx))              # (B, N, k, C)
        return self.out(edges.amax(dim=2))


LOCAL_LAYERS = {"vector_attention": VectorAttention, "edgeconv": EdgeConv}


class PointBlock(nn.Module):
    """Pre-norm attention and MLP, each modulated and gated by the conditioning (adaLN-Zero); with
    ``knn`` > 0 a local layer over the k nearest neighbours first, modulated and gated the same way."""

    def __init__(self, c: PointTransformerConfig, local: bool = True):
        super().__init__()
        w = c.width
        if c.knn and local:
            self.norm0 = nn.LayerNorm(w, elementwise_affine=False)
            self.local = LOCAL_LAYERS[c.local](w, c.in_channels)
            self.ada0 = zero_(nn.Linear(w, 3 * w))
        else:
            self.local = None
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False)
        self.attn = SetAttention(w, c.num_heads, c.num_inducing)
        self.norm2 = nn.LayerNorm(w, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(w, c.mlp_ratio * w), nn.GELU(), nn.Linear(c.mlp_ratio * w, w))
        self.ada = zero_(nn.Linear(w, 6 * w))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, points: torch.Tensor | None = None,
                idx: torch.Tensor | None = None) -> torch.Tensor:
        if self.local is not None:
            s0, c0, g0 = self.ada0(F.silu(emb)).chunk(3, dim=1)
            x = x + g0[:, None] * self.local(modulate(self.norm0(x), s0, c0), points, idx)
        s1, c1, g1, s2, c2, g2 = self.ada(F.silu(emb)).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, c1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, c2))


class PointTransformer(nn.Module):
    """``forward(x (B, N, in_channels), t (B,), class_labels=None (B,) long) -> (B, N, in_channels)``."""

    def __init__(self, config: PointTransformerConfig = PointTransformerConfig()):
        super().__init__()
        self.config = c = config
        w = c.width
        self.embed = nn.Sequential(nn.Linear(c.in_channels, w), nn.SiLU(), nn.Linear(w, w))
        self.time_embed = TimestepMLP(w, w)
        self.class_embed = nn.Embedding(c.num_classes + 1, w) if c.num_classes is not None else None
        self.blocks = nn.ModuleList(PointBlock(c, c.local_blocks is None or i < c.local_blocks) for i in range(c.depth))
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False)
        self.ada_out = zero_(nn.Linear(w, 2 * w))
        self.out = zero_(nn.Linear(w, c.in_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.in_channels:
            raise ValueError(f"PointTransformer takes points (B, N, {c.in_channels}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, c.width).to(x.dtype))
        if self.class_embed is not None:
            if class_labels is None:   # no label: the null class
                class_labels = torch.full((x.shape[0],), c.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(class_labels.long())
        elif class_labels is not None:
            raise ValueError("class_labels given to a PointTransformer built with num_classes=None")
        h = self.embed(x)
        idx = knn_indices(x.detach(), c.knn) if c.knn else None   # from the current (noisy) coordinates
        for block in self.blocks:
            h = block(h, emb, x, idx)
        shift, scale = self.ada_out(F.silu(emb)).chunk(2, dim=1)
        return self.out(modulate(self.norm_out(h), shift, scale))


def points_shape(config: PointTransformerConfig, meta: dict) -> tuple:
    """(N, in_channels) of one sample: N the cloud size recorded in the checkpoint's metadata
    (``metadata.num_points``), else the config's ``num_points``."""
    n = (meta or {}).get("metadata", {}).get("num_points") or config.num_points
    return (int(n), int(config.in_channels))


__all__ = ["PointTransformer", "PointTransformerConfig", "PointBlock", "SetAttention", "VectorAttention", "EdgeConv",
           "knn_indices", "points_shape"]
