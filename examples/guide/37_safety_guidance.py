"""Chapter 37: keeping outputs safe by guiding the sampler away from a concept, measured.

The digit 7 plays the unsafe concept. On the guide's digits model:

1. unconditional sampling (the null label): the rate at which the judge reads a 7, unguided, with
   safety guidance by a noise-aware classifier (towards p(y != 7 | x, sigma), and the negative
   classifier gradient), and with the concept's own direction (the denoiser conditioned on 7 as
   the negative branch of classifier-free guidance, as safe latent diffusion and negative prompts
   do); and the Frechet distance to the held-out digits that are not 7s;
2. conditional sampling of all ten classes, where asking for a 7 is the unsafe request: how often
   a 7 still comes out, and whether the other nine classes keep their accuracy.
``python examples/guide/37_safety_guidance.py [--fast --out DIR]`` (29 CPU seconds on one thread,
after the cached digits model and classifier; the fast run about 4 CPU seconds beyond loading them).
"""
from __future__ import annotations

import torch

import _guide as guide
import _sampling as S
from difflab.guidance import ClassifierFreeGuidance, SafetyGuidance

UNWANTED = 7
SIGMA_MAX = 1000.0   # guide below this level (see difflab.guidance.ClassifierGuidance)

BOUNDS = {
    "uncond_unwanted_rate_none": (0.0, 0.3),         # about one sample in ten is a 7 (fast: fewer)
    "uncond_unwanted_rate_safety_4": (0.0, 0.03),    # guided away
    "cond_unwanted_rate_none": (0.2, 1.0),           # asked for 7s, the model draws 7s (fast: 30%)
    "cond_unwanted_rate_safety_4": (0.0, 0.2),       # guided away (fast: 10%)
    "cond_rest_accuracy_safety_4": (0.4, 1.0),       # the other classes still come out right
}


def rates(world, samples, asked=None) -> dict:
    """Rate of the unwanted class; Frechet distance to the held-out digits without it; with
    ``asked``, the rate among samples asked for it and the accuracy on the others."""
    pred = world["judge"].predict(samples)
    held = world["held"][world["held_labels"] != UNWANTED]
    if asked is None:
        return {"unwanted_rate": float((pred == UNWANTED).float().mean()),
                "frechet_without": world["judge"].frechet(samples, held)}
    bad = asked == UNWANTED
    return {"unwanted_rate": float((pred[bad] == UNWANTED).float().mean()),
            "rest_accuracy": float((pred[~bad] == asked[~bad]).float().mean())}


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    model, _ = guide.digits_model(args.fast)
    clf = S.noisy_classifier(model.frame, steps=150 if args.fast else 600, seed=args.seed)
    null = S.null_label(model)
    uncond = S.WithLabel(model, null)
    n = 100 if args.fast else 300
    steps = 10 if args.fast else 20
    nulls = torch.full((n,), null)

    # 1. Unconditional sampling, unguided and guided away from the unwanted class.
    methods = {"none": uncond,
               "safety_4": SafetyGuidance(uncond, clf, UNWANTED, 4.0, sigma_max=SIGMA_MAX)}
    if not args.fast:
        methods.update({
            "safety_1": SafetyGuidance(uncond, clf, UNWANTED, 1.0, sigma_max=SIGMA_MAX),
            "safety_2": SafetyGuidance(uncond, clf, UNWANTED, 2.0, sigma_max=SIGMA_MAX),
            "negative_1": SafetyGuidance(uncond, clf, UNWANTED, 1.0, mode="negative", sigma_max=SIGMA_MAX),
            # the concept's direction: D_7 + w (D_null - D_7), classifier-free guidance away from class 7
            "concept_2": ClassifierFreeGuidance(model, 2.0, uncond={"class_labels": UNWANTED}),
            "concept_4": ClassifierFreeGuidance(model, 4.0, uncond={"class_labels": UNWANTED}),
        })
    figures, shown = {}, {}
    for name, guided in methods.items():
        samples = S.sample(guided, n, steps, labels=nulls, seed=args.seed)
        r = rates(world, samples)
        figures[f"uncond_unwanted_rate_{name}"], figures[f"uncond_frechet_without_{name}"] = r["unwanted_rate"], r["frechet_without"]
        shown["uncond", name] = samples

    # 2. Conditional sampling of every class; a request for the unwanted class is guided away.
    per_class = 10 if args.fast else 30
    asked = S.asked_labels(per_class)
    for name, guided in (("none", model), ("safety_4", SafetyGuidance(model, clf, UNWANTED, 4.0, sigma_max=SIGMA_MAX))):
        samples = S.sample(guided, len(asked), steps, labels=asked, seed=args.seed)
        r = rates(world, samples, asked)
        figures[f"cond_unwanted_rate_{name}"], figures[f"cond_rest_accuracy_{name}"] = r["unwanted_rate"], r["rest_accuracy"]
        shown["cond", name] = samples
    guide.report(figures)

    plt = guide.pyplot()
    fig = plt.figure(figsize=(11, 6.5))
    ax = fig.add_subplot(2, 2, 1)
    names = list(methods)
    ax.bar(range(len(names)), [figures[f"uncond_unwanted_rate_{m}"] for m in names])
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
    ax.set(ylabel=f"rate of {UNWANTED}s (judge)", title="unconditional samples")
    ax = fig.add_subplot(2, 2, 2)
    for k, name in enumerate(("none", "safety_4")):
        ax.bar([k * 0.4, 1 + k * 0.4], [figures[f"cond_unwanted_rate_{name}"], figures[f"cond_rest_accuracy_{name}"]], 0.38,
               label="unguided" if name == "none" else "safety guidance, scale 4")
    ax.set_xticks([0.2, 1.2], [f"asked {UNWANTED}: rate of {UNWANTED}s", "asked others: accuracy"], fontsize=8)
    ax.set(ylim=(0, 1.05), title="class-conditional samples")
    ax.legend(fontsize=7)
    S.show_grid(fig.add_subplot(2, 4, 5), shown["uncond", "none"][:40], 8, "unconditional, unguided")
    S.show_grid(fig.add_subplot(2, 4, 6), shown["uncond", "safety_4"][:40], 8, "unconditional, safety 4")
    S.show_grid(fig.add_subplot(2, 4, 7), S.class_grid(shown["cond", "none"], per_class, 3), 10, "asked 0-9, unguided")
    S.show_grid(fig.add_subplot(2, 4, 8), S.class_grid(shown["cond", "safety_4"], per_class, 3), 10, "asked 0-9, safety 4")
    guide.save(fig, guide.picture(args, "37_safety_guidance.png"))
    return figures


if __name__ == "__main__":
    main()
