"""Chapter 26: training objectives and loss functions.

Every diffusion loss in difflab is one weighted squared error (``difflab.train.diffusion_loss``):
the network's own output against its own target, times a weight per noise level. Written as a
weight on the x0 error, eps-MSE, x0-MSE, the v-loss, min-SNR, EDM's weighting and flow matching
differ only in how much each log-SNR counts; the hybrid loss adds a variational-bound term that
trains only the variance. The example prints those x0 weights (from ``loss_weight`` and
``params.x0_error_scale``), draws them against log-SNR (alone, and times each frame's training
density of noise levels), then trains one small digits model per objective at the same budget
(same net, data, steps, optimizer, seed) and judges 200 samples of each.
``python examples/guide/26_objectives.py [--fast --out DIR]`` (about 55 CPU seconds with one thread
the first time, seven trainings; then cached; --fast about 7 CPU seconds).
"""
from __future__ import annotations


import torch

import _guide as guide
import _training as tr
from difflab.core import params
from difflab.io.spec import build_frame
from difflab.train import draw_sigmas, loss_weight

# (name, spec arguments, TrainConfig fields): one trained model each
OBJECTIVES = {
    "eps": (dict(prediction="eps"), {}),
    "x0": (dict(prediction="x0"), {}),
    "v": (dict(prediction="v"), {}),
    "eps_min_snr": (dict(prediction="eps"), dict(weighting="min_snr")),
    "edm": (dict(prediction="edm", frame="edm"), dict(weighting="edm")),
    "flow": (dict(prediction="flow", frame="flow"), {}),
    "hybrid": (dict(prediction="eps", learned_variance=True), dict(loss="hybrid")),
}

BOUNDS = {
    # the weight each objective puts on the x0 error at log-SNR +4 (SNR = e^4 = 54.6) and -4
    "x0_weight_eps_at_plus4": (54.5, 54.7),       # SNR
    "x0_weight_v_at_plus4": (55.5, 55.7),         # SNR + 1
    "x0_weight_min_snr_at_plus4": (4.99, 5.01),   # min(SNR, 5)
    "x0_weight_edm_at_plus4": (58.5, 58.7),       # (sigma^2 + 0.25) / (0.25 sigma^2)
    "x0_weight_flow_at_plus4": (70.3, 70.5),      # (1 + sqrt(SNR))^2
    "x0_weight_eps_at_minus4": (0.0182, 0.0184),
    "x0_weight_v_at_minus4": (1.018, 1.019),
    "x0_weight_edm_at_minus4": (4.01, 4.03),
    "x0_weight_flow_at_minus4": (1.28, 1.30),
    # the short trainings: every objective's loss falls (last tenth of the steps vs the first)
    "worst_loss_ratio": (0.0, 0.95),
}


def levels(spec: dict, sigma: torch.Tensor):
    """(alpha, sigma_in) of the network input x_in = alpha x0 + sigma_in eps at canonical sigma."""
    frame = build_frame({k: v for k, v in spec["diffusion"].items() if k != "learned_variance"})
    alpha = frame.scale(sigma)
    return alpha, alpha * sigma


def x0_weight(name: str, log_snr: torch.Tensor) -> torch.Tensor:
    """The weight an objective puts on |x0_hat - x0|^2 at each log-SNR: its weight on the network's
    own error (``loss_weight``) over k^2, k = d x0_hat / d output (``params.x0_error_scale``)."""
    spec_args, cfg = OBJECTIVES[name]
    spec = tr.tiny_spec(**spec_args)
    sigma = (-log_snr / 2).exp()
    alpha, sigma_in = levels(spec, sigma)
    prediction = spec["diffusion"]["prediction"]
    w = loss_weight(cfg.get("weighting", "simple"), prediction, alpha, sigma_in)
    return w / params.x0_error_scale(prediction, alpha, sigma_in) ** 2


def training_density(name: str, grid: torch.Tensor, n: int = 200_000) -> torch.Tensor:
    """p(log-SNR) of the objective's training noise levels (its frame's default), a histogram on ``grid``."""
    spec = tr.tiny_spec(**OBJECTIVES[name][0])
    frame = build_frame({k: v for k, v in spec["diffusion"].items() if k != "learned_variance"})
    lam = -2 * draw_sigmas(frame, n, torch.Generator().manual_seed(0)).log()
    step = float(grid[1] - grid[0])
    hist = torch.histc(lam.float(), bins=len(grid), min=float(grid[0]) - step / 2, max=float(grid[-1]) + step / 2)
    return hist.double() / (n * step)


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    # 1. The weights, exactly.
    at = torch.tensor([4.0, -4.0], dtype=torch.float64)
    w = {name: x0_weight(name, at) for name in ("eps", "v", "eps_min_snr", "edm", "flow")}
    figures = {}
    for sign, i in (("plus4", 0), ("minus4", 1)):
        for name, label in (("eps", "eps"), ("v", "v"), ("eps_min_snr", "min_snr"), ("edm", "edm"), ("flow", "flow")):
            if sign == "minus4" and name == "eps_min_snr":
                continue
            figures[f"x0_weight_{label}_at_{sign}"] = float(w[name][i])

    # 2. One small model per objective, the same budget.
    world = guide.digits_world()
    steps, n, width = (10, 20, 4) if args.fast else (200, 100, 8)
    results = {}
    chosen = ("eps", "edm", "flow", "hybrid") if args.fast else tuple(OBJECTIVES)  # the fast run: one per frame / loss
    for name in chosen:
        spec_args, cfg = OBJECTIVES[name]
        out = tr.run(tr.tiny_spec(width, **spec_args), steps, seed=args.seed, batch_size=16 if args.fast else 64, **cfg)
        losses = out["losses"]
        tenth = max(1, steps // 10)
        ratio = float(losses[-tenth:].mean() / losses[:tenth].mean())
        judged = tr.judge(world, out["raw"], n, steps=5 if args.fast else 20, seed=args.seed)
        results[name] = {**judged, "ratio": ratio, "cpu": out["cpu"]}
        figures[f"{name}_accuracy"] = judged["accuracy"]
        figures[f"{name}_frechet"] = judged["frechet"]
    figures["worst_loss_ratio"] = max(r["ratio"] for r in results.values())
    figures["frechet_floor"] = results["eps"]["frechet_floor"]
    guide.report(figures)

    # 3. The picture: x0 weight against log-SNR, alone and times the training density; the scores.
    plt = guide.pyplot()
    grid = torch.linspace(-10, 10, 201, dtype=torch.float64)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in ("eps", "x0", "v", "eps_min_snr", "edm", "flow"):
        wx0 = x0_weight(name, grid)
        axes[0].plot(grid, wx0, label=name)
        eff = wx0 * training_density(name, grid)
        axes[1].plot(grid, eff / eff.sum() / 0.1, label=name)
    axes[0].plot(grid, grid.exp(), "k:", lw=1, label="ELBO (per unit log-SNR)")
    axes[0].set(yscale="log", xlabel="log-SNR", ylabel="weight on |x0_hat - x0|^2", title="weight per noise level")
    axes[1].set(xlabel="log-SNR", ylabel="weight x training density (normalized)", title="what training sees")
    axes[0].legend(fontsize=7), axes[1].legend(fontsize=7)
    names = list(results)
    axes[2].bar(names, [results[k]["accuracy"] for k in names], color="tab:blue")
    ax2 = axes[2].twinx()
    ax2.plot(names, [results[k]["frechet"] for k in names], "o-", color="tab:red")
    axes[2].set(ylabel="judge accuracy (bars)", title=f"{steps} steps each, {n} samples")
    ax2.set_ylabel("Frechet distance (dots)")
    axes[2].tick_params(axis="x", rotation=45)
    guide.save(fig, guide.picture(args, "26_objectives.png"))
    return figures


if __name__ == "__main__":
    main()
