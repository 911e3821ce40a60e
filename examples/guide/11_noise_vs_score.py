"""Chapter 11: predicting the noise versus matching the score.

On the 2-D ring mixture with its exact denoiser (``difflab.oracle``): the exact networks that
predict eps, x0, v, the score and the flow velocity all decode to the same x0 and convert into
one another (``difflab.core.params``) to rounding, and eps = -sigma * score holds exactly. Then
three tiny MLPs with the same budget learn eps, x0 and the score (each with the unweighted
"simple" loss in its own parameterization) and are compared by their x0 error against the
exact denoiser's, and by the NLL of their DDIM samples. Draws the exact score field at three
noise levels and the eps-model's.
``python examples/guide/11_noise_vs_score.py [--fast --out DIR]`` (23-27 CPU s; --fast 3.5 CPU s).
"""
from __future__ import annotations

import torch

import _basics
import _guide as guide
from difflab.core import Denoiser, VPDiscrete, params
from difflab.samplers import sample_ddim

BOUNDS = {
    "conversion_max_error": (0.0, 1e-9),     # every exact network -> every other target, vs direct
    "decode_max_error": (0.0, 1e-9),         # each exact network's decoded x0 vs the mixture's D
    "eps_vs_minus_sigma_score": (0.0, 1e-9),
    "x0_excess_high_eps": (1.0, 50.0),       # eps-models guess x0 badly at sigma > 10 (x0 = (x - s eps) / alpha)
    "x0_excess_high_x0": (0.0, 0.5),         # x0-models do not
    "x0_excess_low_score": (0.0, 1.0),       # a score model trained unweighted: error in x0 at sigma < 0.1
    "nll_gap_eps": (-0.5, 40.0),             # DDIM-50 samples of a 200-step eps-model, NLL minus entropy
}

PREDICTIONS = ("eps", "x0", "v", "score", "flow")


def check_conversions(gm, frame, g) -> dict:
    """Exact networks of every prediction; their outputs converted into each other and decoded."""
    t = torch.randint(0, frame.T, (256,), generator=g)
    sigma = frame.sigmas[t]
    x = gm.sample(256, g) + sigma[:, None] * torch.randn(256, 2, generator=g, dtype=torch.float64)
    alpha = frame.scale(sigma)[:, None]
    x_in, s_in = alpha * x, alpha * sigma[:, None]  # the network's frame: x_in = alpha x0 + s_in eps
    out = {p: gm.network(frame, p)(x_in, t.double()) for p in PREDICTIONS}
    conv = max((params.convert(out[a], a, b, x_in, alpha, s_in) - out[b]).abs().max().item()
               for a in PREDICTIONS for b in PREDICTIONS)
    exact = gm.denoiser(x, sigma)
    decode = max((Denoiser(gm.network(frame, p), frame, p)(x, sigma) - exact).abs().max().item() for p in PREDICTIONS)
    eps_score = (out["eps"] + s_in * out["score"]).abs().max().item()
    return {"conversion_max_error": conv, "decode_max_error": decode, "eps_vs_minus_sigma_score": eps_score}


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    g = torch.Generator().manual_seed(args.seed)
    gm = _basics.ring_mixture()
    frame = VPDiscrete.from_name("linear")
    figures = check_conversions(gm, frame, g)

    # 2. Three tiny models, same net, same data, same steps: eps, x0 and score parameterizations,
    #    judged by their x0 error above the exact denoiser's at low (sigma < 0.1) and high (sigma > 10) noise.
    steps = 200 if args.fast else 2000
    data = gm.sample(20_000, g).float()
    held = gm.sample(1000 if args.fast else 8000, g)
    exact = Denoiser(gm.network(frame, "x0"), frame, "x0")
    bands = {"low": frame.sigmas[frame.sigmas < 0.1], "high": frame.sigmas[frame.sigmas > 10]}
    models = {}
    for p in ("eps", "x0", "score"):
        models[p] = Denoiser(_basics.ToyNet("sinusoidal", seed=args.seed), frame, p)
        _basics.train_toy(models[p], data, steps, seed=args.seed)
        models[p].eval()
        for band, lv in bands.items():
            excess = _basics.x0_mse(models[p], held, lv) - _basics.x0_mse(exact, held, lv)
            figures[f"x0_excess_{band}_{p}"] = excess
    n = 500 if args.fast else 4000
    x_T = torch.randn(n, 2, generator=g) * float(frame.prior_std(torch.tensor(frame.sigma_max)))
    grid = _basics.discrete_grid(frame, 50)
    entropy = gm.mean_nll(gm.sample(100_000, g))
    for p in ("eps", "x0", "score"):
        with torch.no_grad():
            figures[f"nll_gap_{p}"] = gm.mean_nll(sample_ddim(models[p], x_T, grid)) - entropy
    figures = guide.report(figures)

    # 3. The picture: the exact score field grad log p_sigma = (D(x) - x) / sigma^2 at three levels, and the eps-model's.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    grid_pts = torch.stack(torch.meshgrid(torch.linspace(-2.1, 2.1, 15), torch.linspace(-2.1, 2.1, 15), indexing="xy"), -1).reshape(-1, 2).double()
    panels = [("exact", 0.1), ("exact", 0.4), ("exact", 1.5), ("eps-model", 0.4)]
    for ax, (who, s) in zip(axes, panels):
        with torch.no_grad():
            d = gm.denoiser(grid_pts, s) if who == "exact" else models["eps"](grid_pts.float(), torch.tensor(s)).double()
        score = (d - grid_pts) / s**2
        length = score.norm(dim=-1, keepdim=True)
        u = score / length.clamp(min=1e-9)  # unit arrows, colour = log |score|
        ax.scatter(data[:1500, 0], data[:1500, 1], s=1, color="0.75")
        ax.quiver(grid_pts[:, 0], grid_pts[:, 1], u[:, 0], u[:, 1], length.log()[:, 0], cmap="plasma", scale=16,
                  width=0.007)
        ax.set(xlim=(-2.3, 2.3), ylim=(-2.3, 2.3), aspect="equal", xticks=[], yticks=[])
        ax.set_title(f"{who} score, sigma = {s}\n(direction; colour = log |score|)", fontsize=8)
    guide.save(fig, guide.picture(args, "11_noise_vs_score.png"))
    return figures


main = guide.on_one_thread(run)  # one thread: small operations, CPU seconds quoted for one

if __name__ == "__main__":
    main()
