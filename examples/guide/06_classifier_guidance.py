"""Chapter 6: classifier guidance versus classifier-free guidance, measured.

1. On the closed-form test bed, with exact parts: classifier-free guidance (Ho & Salimans 2022,
   eq. 6) built from the exact conditional denoisers of a Gaussian mixture's components equals
   classifier guidance (Dhariwal & Nichol 2021, eq. 14) with the exact noisy classifier, at every
   scale; the example prints the largest difference.
2. On the guide's digits model: classifier guidance of its unconditional branch (the null label)
   with a small noise-aware classifier trained here (seeded, cached), and classifier-free guidance
   of the same model, each swept over its scale; the judge's accuracy for the asked class and the
   Frechet distance to held-out digits trace the fidelity/diversity trade-off.
``python examples/guide/06_classifier_guidance.py [--fast --out DIR]`` (49 CPU seconds on one
thread, after the cached digits model; the fast run about 4 CPU seconds beyond loading it).
"""
from __future__ import annotations

import torch
from torch import nn

import _guide as guide
import _sampling as S
from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance, classifier_accuracy
from difflab.oracle import GaussianMixture, MixtureClassifier

BOUNDS = {
    "oracle_cfg_minus_cg_max": (0.0, 1e-8),       # the two are one formula with exact parts
    "oracle_guided_moves_max": (0.01, 100.0),     # ... and guidance does move the denoiser
    "classifier_accuracy_sigma_0_5": (0.3, 1.0),  # the noisy classifier (fast: 150 steps)
    "cg_accuracy_0": (0.0, 0.35),                 # unconditional: about one in ten by chance
    "cg_accuracy_top": (0.35, 1.0),               # guided towards the asked class
    "cfg_accuracy_1": (0.4, 1.0),                 # the conditional model (fast: 80 training steps)
    "cfg_accuracy_top": (0.4, 1.0),
}
CG_SCALES = (0.0, 1.0, 2.0, 4.0, 8.0)
CFG_SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)
SIGMA_MAX = 1000.0   # classifier guidance below this level (see difflab.guidance.ClassifierGuidance)


class MixtureByClass(nn.Module):
    """The exact class-conditional denoiser of a mixture: component ``k``'s own denoiser for label
    k, the whole mixture's for the null label K (what classifier-free guidance is trained to be)."""

    def __init__(self, gm: GaussianMixture):
        super().__init__()
        self.gm = gm
        self.parts = [GaussianMixture([1.0], gm.means[k:k + 1], gm.covs[k:k + 1]) for k in range(len(gm.weights))]

    def forward(self, x, sigma, class_labels):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        out = self.gm.denoiser(x, sigma)
        for k, part in enumerate(self.parts):
            i = (class_labels == k).nonzero()[:, 0]
            if len(i):
                out[i] = part.denoiser(x[i], sigma[i])
        return out


def oracle_check(args) -> dict:
    """Largest |CFG - CG| over random x, sigma, labels and scales, both built from exact parts."""
    gm = GaussianMixture.random(dim=8, components=4, seed=args.seed, mean_scale=0.5)
    by_class, clf = MixtureByClass(gm), MixtureClassifier(gm)
    uncond = lambda x, sigma, **cond: gm.denoiser(x, sigma)  # noqa: E731
    g = torch.Generator().manual_seed(args.seed)
    worst, moved = 0.0, 0.0
    for sigma in (0.05, 0.3, 1.0, 5.0):
        x0 = gm.sample(64, g)
        x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (64,), generator=g)
        for w in (0.5, 1.0, 3.0, 7.5):
            cfg = ClassifierFreeGuidance(by_class, w, uncond={"class_labels": 4})(x, sigma, class_labels=y)
            cg = ClassifierGuidance(uncond, clf, w)(x, torch.tensor(sigma, dtype=torch.float64), class_labels=y)
            worst = max(worst, (cfg - cg).abs().max().item())
            moved = max(moved, (cfg - gm.denoiser(x, sigma)).abs().max().item())
    return {"oracle_cfg_minus_cg_max": worst, "oracle_guided_moves_max": moved}


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    figures = oracle_check(args)
    world = guide.digits_world()
    model, _ = guide.digits_model(args.fast)
    clf = S.noisy_classifier(model.frame, steps=150 if args.fast else 600, seed=args.seed)
    figures["classifier_accuracy_sigma_0_5"] = classifier_accuracy(clf, world["held"], world["held_labels"], 0.5)

    per_class = 10 if args.fast else 30
    asked = S.asked_labels(per_class)
    steps = 10 if args.fast else 20
    null = S.null_label(model)
    cg_scales = (0.0, 4.0) if args.fast else CG_SCALES
    cfg_scales = (1.0, 3.0) if args.fast else CFG_SCALES
    results, shown = {}, {}
    for w in cg_scales:
        guided = ClassifierGuidance(S.WithLabel(model, null), clf, w, sigma_max=SIGMA_MAX)
        samples = S.sample(guided, len(asked), steps, labels=asked, seed=args.seed)
        results["cg", w] = guide.judge_samples(world, samples, asked)
        shown["cg", w] = samples
    for w in cfg_scales:
        guided = ClassifierFreeGuidance(model, w, uncond={"class_labels": null})
        samples = S.sample(guided, len(asked), steps, labels=asked, seed=args.seed)
        results["cfg", w] = guide.judge_samples(world, samples, asked)
        shown["cfg", w] = samples
    for (kind, w), r in results.items():
        tag = f"{w:g}".replace(".", "_")
        figures[f"{kind}_accuracy_{tag}"] = r["accuracy"]
        figures[f"{kind}_frechet_{tag}"] = r["frechet"]
    figures["cg_accuracy_top"] = results["cg", cg_scales[-1]]["accuracy"]
    figures["cfg_accuracy_top"] = results["cfg", cfg_scales[-1]]["accuracy"]
    figures["frechet_floor"] = next(iter(results.values()))["frechet_floor"]
    guide.report(figures)

    plt = guide.pyplot()
    fig = plt.figure(figsize=(11, 6.5))
    for i, (key, label) in enumerate((("accuracy", "judge accuracy (asked class)"), ("frechet", "Frechet distance"))):
        ax = fig.add_subplot(2, 3, i + 1)
        for kind, scales, name in (("cg", cg_scales, "classifier guidance"), ("cfg", cfg_scales, "classifier-free")):
            ax.plot(scales, [results[kind, w][key] for w in scales], "o-", ms=3, label=name)
        if key == "frechet":
            ax.axhline(figures["frechet_floor"], color="gray", ls="--", lw=0.8, label="train vs held-out")
        ax.set(xlabel="guidance scale", ylabel=label)
        ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 3, 3)
    for kind, scales, name in (("cg", cg_scales, "classifier guidance"), ("cfg", cfg_scales, "classifier-free")):
        ax.plot([results[kind, w]["accuracy"] for w in scales], [results[kind, w]["frechet"] for w in scales], "o-", ms=3,
                label=name)
        for w in scales:
            ax.annotate(f"{w:g}", (results[kind, w]["accuracy"], results[kind, w]["frechet"]), fontsize=6)
    ax.set(xlabel="accuracy", ylabel="Frechet distance", title="the trade-off (scale at each point)")
    ax.legend(fontsize=7)
    picks = [("cg", cg_scales[0]), ("cg", cg_scales[-1]), ("cfg", cfg_scales[1] if len(cfg_scales) > 2 else cfg_scales[0]),
             ("cfg", cfg_scales[-1])]
    for i, (kind, w) in enumerate(picks):
        S.show_grid(fig.add_subplot(2, 4, 5 + i), S.class_grid(shown[kind, w], per_class, 3), 10,
                    f"{'classifier' if kind == 'cg' else 'classifier-free'} scale {w:g}")
    guide.save(fig, guide.picture(args, "06_classifier_guidance.png"))
    return figures


if __name__ == "__main__":
    main()
