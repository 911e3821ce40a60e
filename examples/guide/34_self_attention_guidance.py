"""Chapter 34: self-attention guidance (SAG) and perturbed-attention guidance (PAG), measured.

Both guide a denoiser away from a worse copy of itself: SAG (Hong et al. 2023) blurs the parts
of the predicted image that the middle self-attention attends to most and denoises again; PAG
(Ahn et al. 2024) replaces the middle self-attention map by the identity. On the guide's digits
model (class-conditional, no classifier-free guidance), each is swept over its scale and the judge
accuracy and Frechet distance printed (PAG perturbs all six self-attention layers); the picture shows SAG's mask and blur on one digit.
``python examples/guide/34_self_attention_guidance.py [--fast --out DIR]`` (41 CPU seconds on one
thread, after the cached digits model; the fast run about 2.5 CPU seconds beyond loading it).
"""
from __future__ import annotations

import torch

import _guide as guide
import _sampling as S
from difflab.guidance import (PerturbedAttentionGuidance, SelfAttentionGuidance, gaussian_blur, identity_attention,
                              record_attention, sag_mask)

SAG_SCALES = (0.0, 0.25, 0.5, 1.0, 2.0)
PAG_SCALES = (0.0, 0.5, 1.0, 2.0, 3.0)
PAG_LAYERS = "*"   # every self-attention layer: the middle one alone hardly changes this small model

BOUNDS = {
    "mask_fraction": (0.05, 0.95),          # SAG blurs part of the image, not none or all of it
    "pag_prediction_change": (3e-3, 1.0),   # identity attention in all six layers changes the prediction
    "sag_accuracy_0": (0.4, 1.0),           # fast model: 80 training steps
    "sag_accuracy_1": (0.3, 1.0),
    "pag_accuracy_1": (0.3, 1.0),
}


def one_digit_views(model, world, sigma: float = 1.0, seed: int = 0) -> dict:
    """A held-out digit noised to ``sigma``: the model's x0_hat, SAG's mask and blurred x0_hat,
    and the prediction with identity attention (PAG's perturbed branch)."""
    x0 = world["held"][:1].float()
    label = world["held_labels"][:1]
    x = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    s = torch.full((1,), sigma)
    with torch.no_grad():
        with record_attention(model.net) as maps:
            d = model(x, s, class_labels=label)
        (attn,) = maps.values()
        mask = sag_mask(attn[0], x.shape[-2:])
        blurred = mask * gaussian_blur(d, 1.0, 9) + (1 - mask) * d
        with identity_attention(model.net):
            middle = model(x, s, class_labels=label)
        with identity_attention(model.net, PAG_LAYERS):
            perturbed = model(x, s, class_labels=label)
    return {"clean": x0, "noisy": x, "x0_hat": d, "mask": mask * 2 - 1, "blurred": blurred, "perturbed": perturbed,
            "middle_only": middle}


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    model, _ = guide.digits_model(args.fast)
    views = one_digit_views(model, world, seed=args.seed)
    middle = views.pop("middle_only")
    figures = {"mask_fraction": float((views["mask"] > 0).float().mean()),
               "pag_prediction_change": float((views["x0_hat"] - views["perturbed"]).abs().mean()),
               "pag_middle_only_prediction_change": float((views["x0_hat"] - middle).abs().mean())}

    per_class = 10 if args.fast else 30
    asked = S.asked_labels(per_class)
    steps = 10 if args.fast else 20
    sweeps = {"sag": (0.0, 1.0) if args.fast else SAG_SCALES, "pag": (1.0,) if args.fast else PAG_SCALES}
    results, shown = {}, {}
    for kind, scales in sweeps.items():
        for w in scales:
            guided = SelfAttentionGuidance(model, w) if kind == "sag" else PerturbedAttentionGuidance(model, w, PAG_LAYERS)
            samples = S.sample(guided, len(asked), steps, labels=asked, seed=args.seed)
            r = guide.judge_samples(world, samples, asked)
            results[kind, w], shown[kind, w] = r, samples
            tag = f"{w:g}".replace(".", "_")
            figures[f"{kind}_accuracy_{tag}"], figures[f"{kind}_frechet_{tag}"] = r["accuracy"], r["frechet"]
    base = shown["sag", 0.0]
    for (kind, w), samples in shown.items():
        if w:
            figures[f"{kind}_mean_change_{f'{w:g}'.replace('.', '_')}"] = float((samples - base).abs().mean())
    figures["frechet_floor"] = r["frechet_floor"]
    guide.report(figures)

    plt = guide.pyplot()
    fig = plt.figure(figsize=(11, 6.5))
    for i, (name, img) in enumerate(views.items()):
        ax = fig.add_subplot(3, 6, i + 1)
        ax.imshow(img[0, 0], cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title({"mask": "SAG mask", "blurred": "SAG: blurred where masked",
                      "perturbed": "PAG: identity attention"}.get(name, name), fontsize=7)
    for j, key in enumerate(("accuracy", "frechet")):
        ax = fig.add_subplot(3, 2, 3 + j)
        for kind, scales in sweeps.items():
            ax.plot(scales, [results[kind, w][key] for w in scales], "o-", ms=3, label=kind.upper())
        if key == "frechet":
            ax.axhline(figures["frechet_floor"], color="gray", ls="--", lw=0.8, label="train vs held-out")
        ax.set(xlabel="scale", ylabel="judge accuracy" if key == "accuracy" else "Frechet distance")
        ax.legend(fontsize=7)
    picks = [("sag", 0.0), ("sag", sweeps["sag"][-1]), ("pag", sweeps["pag"][-1])]
    for i, (kind, w) in enumerate(picks):
        S.show_grid(fig.add_subplot(3, 3, 7 + i), S.class_grid(shown[kind, w], per_class, 2), 10,
                    "unguided" if w == 0 else f"{kind.upper()} scale {w:g}")
    guide.save(fig, guide.picture(args, "34_self_attention_guidance.png"))
    return figures


if __name__ == "__main__":
    main()
