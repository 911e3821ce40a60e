"""Chapter 3: DDPM, the model, its objective and its sampler.

Takes the guide's digits U-Net (``guide.digits_model``: trained with L_simple in its
v-parameterization, Algorithm 1) and samples it with DDPM's ancestral sampler (Algorithm 2,
``difflab.samplers.sample_ddpm``) on 1000, 100 and 25 of its 1000 steps, printing the judge's
accuracy and Frechet distance beside the floor (real training digits vs held-out); prints the
model's L_simple (eps-MSE) on held-out digits. On the 2-D ring mixture with its exact denoiser
(``difflab.oracle``) it shows that DDPM's samples follow the data distribution, with both of
DDPM's variances (beta~_t and beta_t), at 1000 and at 25 steps.
``python examples/guide/03_ddpm.py [--fast --out DIR]`` (55 CPU s beyond the cached model, one thread; --fast 2.3 CPU s).
"""
from __future__ import annotations

import torch

import _basics
import _guide as guide
from difflab.core import Denoiser, VPDiscrete, params
from difflab.samplers import sample_ddpm

BOUNDS = {
    "accuracy_50": (0.3, 1.0),           # fast: the 80-step model, 30 samples, 50 DDPM steps
    "frechet_50": (0.0, 400.0),          # judge FD at 30 samples (the floor is about 80 there)
    "frechet_floor": (10.0, 200.0),
    "l_simple_held": (0.05, 0.6),        # eps-MSE of the model on held-out digits, uniform t
    "oracle_nll_gap_small_many": (-0.45, 0.3),  # DDPM's samples vs the mixture's entropy (exact denoiser;
    "oracle_nll_gap_large_many": (-0.3, 0.4),   # 1000 steps, 200 in --fast)
    "oracle_frechet_small_many": (0.0, 0.05),
    "oracle_nll_gap_large_minus_small_25": (0.1, 2.0),  # with 25 steps beta_t leaves too much noise, beta~_t too little
}


@torch.no_grad()
def l_simple(denoiser, images: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """Ho et al. 2020, eq. 14: E |eps - eps_theta(sqrt(ab) x0 + sqrt(1 - ab) eps, t)|^2, t uniform,
    with the v-model's output converted to eps (``params.convert``)."""
    g = torch.Generator().manual_seed(seed)
    frame = denoiser.frame
    sigma = frame.sigmas[torch.randint(0, frame.T, (len(images),), generator=g)].float()
    eps = torch.randn(images.shape, generator=g)
    x = images + sigma[:, None, None, None] * eps
    out, x_in, alpha, s_in = denoiser.net_output(x, sigma, class_labels=labels)
    eps_hat = params.convert(out, denoiser.prediction, "eps", x_in, alpha, s_in)
    return (eps_hat - eps).pow(2).mean().item()


def oracle_ddpm(n: int, seed: int, many: int) -> tuple[dict, dict]:
    """DDPM on the ring mixture's exact eps-model: NLL above the entropy and Frechet distance,
    fixed_small (beta~_t) and fixed_large (beta_t), at ``many`` (1000; 200 in --fast) and 25 steps."""
    gm = _basics.ring_mixture()
    frame = VPDiscrete.from_name("linear")
    model = Denoiser(gm.network(frame, "eps"), frame, "eps")
    g = torch.Generator().manual_seed(seed)
    entropy = gm.mean_nll(gm.sample(100_000, g))
    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64) * float(frame.prior_std(torch.tensor(frame.sigma_max)))
    out, pts = {}, {}
    for steps in (many, 25):
        for var in ("small", "large"):
            gen = torch.Generator().manual_seed(seed + 1)
            s = sample_ddpm(model, x_T, _basics.discrete_grid(frame, steps), variance=f"fixed_{var}",
                            noise=lambda gen=gen: torch.randn(n, 2, generator=gen, dtype=torch.float64))
            name = "many" if steps == many else steps
            out[f"oracle_nll_gap_{var}_{name}"] = gm.mean_nll(s) - entropy
            out[f"oracle_frechet_{var}_{name}"] = gm.frechet_to_truth(s)
            pts[(var, steps)] = s
    out["oracle_nll_gap_large_minus_small_25"] = out["oracle_nll_gap_large_25"] - out["oracle_nll_gap_small_25"]
    return out, pts


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    denoiser, _ = guide.digits_model(args.fast)
    n = 30 if args.fast else 100
    step_counts = (50, 10) if args.fast else (1000, 100, 25)
    labels = torch.arange(n) % 10
    figures, grids_ = {}, {}
    for steps in step_counts:
        samples = _basics.sample_digits(denoiser, labels, _basics.discrete_grid(denoiser.frame, steps), "ddpm", args.seed)
        judged = guide.judge_samples(world, samples, labels)
        figures[f"accuracy_{steps}"] = judged["accuracy"]
        figures[f"frechet_{steps}"] = judged["frechet"]
        grids_[steps] = samples
    figures["frechet_floor"] = judged["frechet_floor"]
    figures["l_simple_held"] = l_simple(denoiser, world["held"], world["held_labels"], args.seed)
    oracle, pts = oracle_ddpm(200 if args.fast else 4000, args.seed, 200 if args.fast else 1000)
    figures.update(oracle)
    figures = guide.report(figures)

    # The picture: 10 digits per row (classes 0-9) for each step count; the oracle's DDPM samples at 25 steps.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, len(step_counts) + 2, figsize=(3.2 * (len(step_counts) + 2), 3.4))
    for ax, steps in zip(axes, step_counts):
        s = grids_[steps][:100]
        rows = len(s) // 10
        tile = s[:rows * 10, 0].reshape(rows, 10, 8, 8).permute(1, 2, 0, 3).reshape(10 * 8, rows * 8)
        ax.imshow(tile, cmap="gray", vmin=-1, vmax=1)
        ax.set(xticks=[], yticks=[], title=f"DDPM, {steps} steps\nacc {figures[f'accuracy_{steps}']:.2f}, "
                                           f"FD {figures[f'frechet_{steps}']:.1f}")
    for ax, var in zip(axes[len(step_counts):], ("small", "large")):
        p = pts[(var, 25)][:2000]
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.4)
        ax.set(xlim=(-2.3, 2.3), ylim=(-2.3, 2.3), aspect="equal", xticks=[], yticks=[],
               title=f"oracle, 25 steps, fixed_{var}\nNLL gap {figures[f'oracle_nll_gap_{var}_25']:.2f}")
    guide.save(fig, guide.picture(args, "03_ddpm.png"))
    return figures


main = guide.on_one_thread(run)  # one thread: small operations, CPU seconds quoted for one

if __name__ == "__main__":
    main()
