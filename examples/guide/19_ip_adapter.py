"""Chapter 19: IP-Adapter, an image as the prompt through decoupled cross-attention.

Adds an IP-Adapter (Ye et al. 2023) to the frozen Stable-Diffusion-style digits model of the
adapter chapters (``_editing.sd_base``, unconditional). The "image encoder" is the digits judge's
64-dimensional penultimate features; an ImageProjection turns them into 4 tokens, and every
cross-attention layer gets new key/value weights for them. Trained briefly with, as the reference
image, *another* digit of the same class, so that the adapter must carry the class and not the
pixels. Prints that scale 0 is the base model exactly, then how often a sample's class (judged)
matches the reference's, by scale, and whether samples copy their reference.
``python examples/guide/19_ip_adapter.py [--fast --out DIR]`` (45 s of CPU time on one thread, the
adapter's 500 training steps included, the base of chapter 18 cached; --fast trains 80).
"""
from __future__ import annotations

import torch
from torch import nn

import _editing as ed
import _guide as guide
from difflab.adapters.ip_adapter import ImageProjection, IPAdapterUNet, mark_only_ip_adapter_trainable, set_ip_adapter_scale
from difflab.core import Denoiser
from difflab.data import load_digits, same_class_partner
from difflab.samplers import sample_ddim

BOUNDS = {
    "scale0_max_change": (0.0, 0.0),        # scale 0 skips the image branch: the base, bit for bit
    "scale1_max_change": (1e-3, 10.0),      # at scale 1 the trained adapter does move the output
    "match_scale_0": (0.0, 0.3),            # the base ignores the reference: about chance (10%)
    "match_scale_1": (0.2, 1.0),            # chance is 10%
    "trainable_parameters": (5_000, 50_000),
}


class JudgeFeatures(nn.Module):
    """The image encoder: the digits judge's penultimate features (N, 64), frozen."""

    def __init__(self, judge):
        super().__init__()
        self.judge = judge.requires_grad_(False)

    def forward(self, images):
        return self.judge.embed(self.judge.prepare(images))


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    base, context = ed.sd_base(args.fast, seed=args.seed)
    held, held_labels = world["held"], world["held_labels"]
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    sigma, ctx = torch.logspace(-1.5, 1.5, 16), context.expand(16, -1, -1)
    with torch.no_grad():
        before = base(x, sigma, context=ctx)  # the base model, before any adapter is installed

    # 1. Install the adapter (a copy of each cross-attention's to_k / to_v for the image tokens).
    encoder = JudgeFeatures(world["judge"])
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        net = IPAdapterUNet(base.net, ImageProjection(64, ed.SD_CONTEXT_DIM, num_tokens=4), image_encoder=encoder)
    trainable = mark_only_ip_adapter_trainable(net)
    adapted = Denoiser(net, base.frame, base.prediction, base.sigma_data)

    # 2. Train it: each training digit's reference is another digit of its class (embedded once).
    images, labels = load_digits(split="train")
    g = torch.Generator().manual_seed(args.seed)
    reps = 2 if args.fast else 4
    pick = torch.cat([same_class_partner(labels, g) for _ in range(reps)])
    with torch.no_grad():
        embeds = encoder(images)[pick]
    data = (images.repeat(reps, 1, 1, 1), None,
            {"context": context.expand(len(pick), -1, -1).contiguous(), "image_embeds": embeds})
    ed.trained_module("ip_adapter_digits", adapted, data, args.fast, (80, 500), seed=args.seed, lr=5e-3)

    # 3. Scale 0 is the base exactly; then sample from held-out references at three scales.
    refs = held[16:32]
    with torch.no_grad():
        set_ip_adapter_scale(net.unet, 0.0)
        scale0 = float((adapted(x, sigma, context=ctx, image=refs) - before).abs().max())
        set_ip_adapter_scale(net.unet, 1.0)
        scale1 = float((adapted(x, sigma, context=ctx, image=refs) - before).abs().max())
    n, steps = (40, 10) if args.fast else (300, 25)
    ref, ref_labels = held[:n], held_labels[:n]
    sigmas = ed.grid(base, steps)
    start = ed.noise_for(args.seed, n)() * float(base.prior_std(sigmas[0]))
    cond = {"context": context.expand(n, -1, -1), "image": ref}
    judge, out = world["judge"], {}
    figures = {"scale0_max_change": scale0, "scale1_max_change": scale1, "trainable_parameters": trainable}
    for scale in (0.0, 0.5, 1.0):
        set_ip_adapter_scale(net.unet, scale)
        with torch.no_grad():
            out[scale] = sample_ddim(adapted, start, sigmas, extra_args=cond).clamp(-1, 1)
        figures[f"match_scale_{scale:g}".replace(".", "_")] = judge.accuracy(out[scale], ref_labels)
    other = held[same_class_partner(held_labels, torch.Generator().manual_seed(1))][:n]
    figures["mse_to_reference_scale_1"] = float(((out[1.0] - ref) ** 2).mean())
    figures["mse_to_other_same_class_scale_1"] = float(((out[1.0] - other) ** 2).mean())
    figures = guide.report(figures)

    plt = guide.pyplot()
    fig = plt.figure(figsize=(9, 3.6))
    ed.draw_rows(fig, [("image prompt", ref), ("scale 0 (base)", out[0.0]), ("scale 0.5", out[0.5]),
                       ("scale 1", out[1.0])], 12)
    guide.save(fig, guide.picture(args, "19_ip_adapter.png"))
    return figures


if __name__ == "__main__":
    main()
