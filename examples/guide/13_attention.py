"""Chapter 13: attention (self and cross) inside the diffusion U-Net.

Reads the attention weights out of two trained models with forward hooks: the self-attention of
the guide's digits U-Net (16 tokens at its 4x4 level) and the cross-attention of the text model
(the text demo at guide scale) from latent pixels to the prompt's tokens. Then measures what
attention costs as the token grid grows (8, 16, 32 tokens per side): FLOPs, time, and the memory
of the score matrix, with PyTorch's fused ``scaled_dot_product_attention`` against the written-out
softmax(QK^T / sqrt(d)) V.
``python examples/guide/13_attention.py [--fast --out DIR]`` (full: 7.5 s on the quiet 2-core CPU with the
shared digits model and chapter 9's text model cached; training the shared model adds about 40 CPU s
the first time; --fast: 18 s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import _arch as arch
import _guide as guide
from difflab.nn.layers import CrossAttention, SelfAttention, split_heads
from _arch import cross_attention_weights, record

BOUNDS = {
    "self_attention_entropy_ratio": (0.2, 0.995),   # mean entropy / log(16): below 1, the maps are not uniform
    "cross_attention_number_word": (0.05, 1.0),     # share of a pixel's attention on the word that names the digit
    "flops_ratio_32_over_8": (256.0, 256.0),        # score FLOPs grow as N^2: (1024 / 64)^2
    "score_mib_32": (15.9, 16.1),                   # batch 4 x 1 head x 1024^2 floats
    "sdpa_vs_naive_max_diff": (0.0, 1e-4),
}
SIDES = (8, 16, 32)


@torch.no_grad()
def self_attention_weights(module: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) of ``module`` on its input ``x`` (B, C, H, W): (B, heads, HW, HW)."""
    tokens = module.norm(x).flatten(2).transpose(1, 2)
    q, k, _ = (split_heads(z, module.num_heads) for z in module.qkv(tokens).chunk(3, dim=-1))
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)


def naive_attention(q, k, v):
    """The written-out softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1): the score matrix is stored."""
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def cost(side: int, channels: int = 64, batch: int = 4, repeats: int = 5) -> dict:
    """One head of attention over side^2 tokens: FLOPs of Q K^T and A V, the score matrix's MiB,
    and the best-of-``repeats`` seconds of the naive and fused versions."""
    n = side * side
    g = torch.Generator().manual_seed(side)
    q, k, v = (torch.randn(batch, 1, n, channels, generator=g) for _ in range(3))
    with torch.no_grad():
        diff = float((naive_attention(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max())
        naive = arch.best_time(lambda: naive_attention(q, k, v), repeats)
        fused = arch.best_time(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    return {"flops": 4 * batch * n * n * channels, "score_mib": batch * n * n * 4 / 2**20, "naive_s": naive,
            "sdpa_s": fused, "max_diff": diff}


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()

    # 1. Self-attention in the digits U-Net: 16 tokens (4x4), every pixel attends to every pixel.
    denoiser, _ = guide.digits_model(args.fast)
    x0 = world["held"][:8]
    sigma = torch.full((8,), 0.5)
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    calls = record(denoiser.net, SelfAttention, lambda: denoiser(x, sigma, class_labels=world["held_labels"][:8]))
    maps = {name: self_attention_weights(m, a[0]) for name, m, a in calls}
    name0 = next(iter(maps))
    w = maps[name0]                                         # (B, heads, 16, 16)
    entropy = float(-(w * w.clamp_min(1e-12).log()).sum(-1).mean())

    # 2. Cross-attention in the text model: latent pixels attend to the prompt's tokens.
    tm = arch.text_model(args.fast, args.seed)
    text, net = tm["text"], tm["net"]
    prompt = "a handwritten seven"
    ids, mask = text.tokenize([prompt] * 4)
    z = torch.randn((4, 4, 4, 4), generator=torch.Generator().manual_seed(args.seed))
    zsig = torch.full((4,), 1.0)
    ccalls = record(net, CrossAttention, lambda: tm["denoiser"](z, zsig, input_ids=ids))
    cross = torch.stack([cross_attention_weights(m, a[0], a[1], a[2]).mean((1, 2)) for _, m, a in ccalls])  # (calls, B, L)
    per_token = cross.mean((0, 1))                          # (L,)
    tokens = [t for t in prompt.split()]
    n_real = int(mask[0].sum())
    number_share = float(per_token[tokens.index("seven")]) if n_real == len(tokens) else float("nan")

    # 3. The cost of attention against the number of tokens.
    costs = {s: cost(s, repeats=2 if args.fast else 7) for s in SIDES}
    figures = guide.report({
        "self_attention_layers": len(maps), "self_attention_tokens": w.shape[-1],
        "self_attention_entropy_ratio": entropy / math.log(w.shape[-1]),
        "cross_attention_layers": len(ccalls), "cross_attention_tokens": n_real,
        "cross_attention_number_word": number_share,
        **{f"flops_{s}": c["flops"] for s, c in costs.items()},
        "flops_ratio_32_over_8": costs[32]["flops"] / costs[8]["flops"],
        **{f"score_mib_{s}": c["score_mib"] for s, c in costs.items()},
        **{f"naive_ms_{s}": 1e3 * c["naive_s"] for s, c in costs.items()},
        **{f"sdpa_ms_{s}": 1e3 * c["sdpa_s"] for s, c in costs.items()},
        "time_ratio_32_over_8": costs[32]["sdpa_s"] / costs[8]["sdpa_s"],
        "sdpa_vs_naive_max_diff": max(c["max_diff"] for c in costs.values()),
    })

    # 4. The picture: a digit and where four of its pixels look; attention per token; cost curves.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 6, figsize=(19, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.6, 1.6], "wspace": 0.4})
    axes[0].imshow(x0[0, 0], cmap="gray", vmin=-1, vmax=1), axes[0].set_title("held-out digit (seen at sigma 0.5)", fontsize=8)
    for ax, q in zip(axes[1:4], (0, 5, 10)):
        ax.imshow(w[0, :, q].mean(0).reshape(4, 4), cmap="magma", vmin=0)
        ax.plot(q % 4, q // 4, "c+", ms=14, mew=2), ax.set_title(f"where 4x4 token {q} looks", fontsize=8)
    for ax in axes[:4]:
        ax.set_xticks([]), ax.set_yticks([])
    axes[4].bar(range(n_real), per_token[:n_real].tolist()), axes[4].set_xticks(range(n_real), tokens[:n_real])
    axes[4].set(title=f"text model: cross-attention\nover '{prompt}'", ylabel="mean weight per token")
    n = [s * s for s in SIDES]
    axes[5].loglog(n, [costs[s]["naive_s"] * 1e3 for s in SIDES], "o-", label="naive softmax(QK^T)V")
    axes[5].loglog(n, [costs[s]["sdpa_s"] * 1e3 for s in SIDES], "s-", label="scaled_dot_product_attention")
    axes[5].loglog(n, [costs[8]["sdpa_s"] * 1e3 * (m / n[0]) ** 2 for m in n], ":", color="gray", label="N^2")
    axes[5].set(xlabel="tokens N (8^2, 16^2, 32^2)", ylabel="ms (best of runs)", title="one head, d = 64, batch 4")
    axes[5].legend(fontsize=7)
    guide.save(fig, guide.picture(args, "13_attention.png"))
    return figures


if __name__ == "__main__":
    main()
