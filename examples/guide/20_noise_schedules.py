"""Chapter 20: noise schedules compared by training the same digits model under each.

Trains the guide's class-conditional digits U-Net (v-prediction) with the same budget and seed
under DDPM's linear betas, the cosine schedule, Stable Diffusion's scaled-linear betas and GeoDiff's
sigmoid betas (the cosine schedule rescaled to zero terminal SNR stays within 4.9e-5 of it: closed form only); samples each with DDIM at 20
steps on its own trailing timesteps from the same noise and prints the judge accuracy and the
Frechet distance. Also prints where each schedule puts its training noise levels (the fraction of
timesteps with sigma below 1, i.e. SNR above 1): a closed-form figure.
``python examples/guide/20_noise_schedules.py [--fast --out DIR]`` (55 CPU seconds on one
thread, training four models 150 steps included (once, then cached); the fast run trains two for 40 steps, about 9 s).
"""
from __future__ import annotations


import _guide as guide
import _sampling as S
from difflab.core.schedules import discrete_alpha_bars, log_snr_from_sigma, sigma_from_alpha_bar

SCHEDULES = {  # name -> (schedule, zero terminal SNR)
    "linear": ("linear", False),
    "cosine": ("cosine", False),
    "scaled_linear": ("scaled_linear", False),
    "sigmoid": ("sigmoid", False),
    "cosine_ztsnr": ("cosine", True),
}
FAST = ("linear", "cosine")
TRAINED = ("linear", "scaled_linear", "sigmoid", "cosine")  # cosine_ztsnr: within 4.9e-5 of cosine, closed form only

BOUNDS = {
    "linear_snr_above_one": (0.25, 0.27),     # closed form: t <= 259 of 1000
    "cosine_snr_above_one": (0.49, 0.50),     # t <= 496
    "scaled_linear_snr_above_one": (0.35, 0.36),
    "sigmoid_snr_above_one": (0.43, 0.45),
    "cosine_ztsnr_snr_above_one": (0.49, 0.50),
    "linear_accuracy": (0.05, 1.0),           # fast: 40 training steps, barely trained (16%)
    "cosine_accuracy": (0.05, 1.0),           # (18%)
    "cosine_frechet": (5.0, 350.0),           # (191)
}


def spec_for(name: str) -> dict:
    schedule, ztsnr = SCHEDULES[name]
    spec = guide.digits_spec(schedule=schedule)
    spec["diffusion"]["zero_terminal_snr"] = ztsnr
    return spec


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    names = FAST if args.fast else TRAINED
    steps = 40 if args.fast else 150
    figures = {}
    log_snr = {}
    for name in SCHEDULES:
        schedule, ztsnr = SCHEDULES[name]
        ab = discrete_alpha_bars(schedule, 1000, zero_terminal_snr=ztsnr)
        log_snr[name] = log_snr_from_sigma(sigma_from_alpha_bar(ab))
        figures[f"{name}_snr_above_one"] = float((log_snr[name] > 0).double().mean())

    world = guide.digits_world()
    per_class = 10 if args.fast else 30
    asked = S.asked_labels(per_class)
    shown = {}
    for name in names:
        model, _ = guide.digits_model(args.fast, steps=steps, spec=spec_for(name), seed=args.seed)
        samples = S.sample(model, len(asked), 20, labels=asked, seed=args.seed)
        r = guide.judge_samples(world, samples, asked)
        figures[f"{name}_accuracy"], figures[f"{name}_frechet"] = r["accuracy"], r["frechet"]
        shown[name] = samples
    figures["frechet_floor"] = r["frechet_floor"]
    guide.report(figures)

    plt = guide.pyplot()
    fig = plt.figure(figsize=(11, 6.5))
    ax = fig.add_subplot(2, 3, 1)
    for name, ls in log_snr.items():
        ax.plot(range(1, 1001), ls.clamp(min=-25), label=name)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xlabel="t", ylabel="log-SNR (clamped at -25)", title="where each schedule trains")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 3, 2)
    xs = range(len(names))
    ax.bar(xs, [figures[f"{n}_frechet"] for n in names])
    ax.axhline(figures["frechet_floor"], color="gray", ls="--", lw=0.8, label="train vs held-out")
    ax.set_xticks(list(xs), names, fontsize=7, rotation=20)
    ax.set(ylabel="Frechet distance", title=f"same model, {steps} training steps")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 3, 3)
    ax.bar(xs, [figures[f"{n}_accuracy"] for n in names])
    ax.set_xticks(list(xs), names, fontsize=7, rotation=20)
    ax.set(ylabel="judge accuracy", ylim=(0, 1.05))
    for i, name in enumerate(names):
        S.show_grid(fig.add_subplot(2, len(names), len(names) + i + 1), S.class_grid(shown[name], per_class, 3), 10, name)
    guide.save(fig, guide.picture(args, "20_noise_schedules.png"))
    return figures


main = guide.on_one_thread(run)  # small convolutions: one thread is faster than two contending ones

if __name__ == "__main__":
    main()
