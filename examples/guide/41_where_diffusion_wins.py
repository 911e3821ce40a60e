"""Chapter 41: where diffusion beats GANs, and where it does not.

Trains a small GAN (``difflab.nn.gan``) for 10 CPU seconds (``--fast``: 30 updates) and sets it beside the guide's digits
diffusion model: samples per CPU second (one GAN forward pass against 50 and 10 DDIM steps), mode
coverage (recall over all digits and the worst single class's recall, in the judge's features), and
one thing the diffusion model does with no extra training: class-conditional inpainting (RePaint) of
held-out digits whose lower half is hidden, judged against the true digit, beside filling the hidden
half with the mean training digit.
``python examples/guide/41_where_diffusion_wins.py [--fast --out DIR]`` (about 24 s with the cached model).
"""
from __future__ import annotations

import time

import torch

import _guide as guide
from difflab.core import SampleNoise
from difflab.core.grids import for_denoiser
from difflab.eval import precision_recall
from difflab.guidance.inpaint import sample_repaint
from difflab.nn.gan import GANConfig, sample_gan, train_gan
from difflab.pipelines import generate
from difflab.samplers import SAMPLERS

BOUNDS = {
    "diffusion_worst_class_recall": (0.1, 1.0),          # every class is drawn in more than a few shapes
    "diffusion_recall": (0.2, 1.0),
    "inpaint_accuracy": (0.6, 1.0),                      # the completed digits read as the digit asked
    "inpaint_gain_over_mean_fill": (0.1, 1.0),
    "inpaint_known_pixels_error": (0.0, 1e-6),           # RePaint keeps the known pixels exactly
}


def coverage(world, samples, asked) -> dict:
    """Precision, recall and the worst class's recall (Kynkaanniemi et al. 2019, k = 3), judge features."""
    judge, held, held_labels = world["judge"], world["held"], world["held_labels"]
    fake, real = judge.features(samples).double(), judge.features(held).double()
    precision, recall = precision_recall(real, fake, k=3)
    per_class = [precision_recall(real[held_labels == c], fake[asked == c], k=3)[1] for c in range(10)]
    return {"precision": precision, "recall": recall, "worst_class_recall": min(per_class)}


def timed(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def inpaint(denoiser, known, mask, labels, steps, seed):
    """RePaint around DDIM, asked for the digit ``labels``: the same model, no new training."""
    sigmas = for_denoiser(denoiser, steps)
    noise = SampleNoise.for_run(seed, len(known), known.shape[1:])
    x = noise() * float(denoiser.prior_std(sigmas[0]))
    with torch.no_grad():
        return sample_repaint(denoiser, x, sigmas, known=known, mask=mask, sampler=SAMPLERS["ddim"], noise=noise,
                              extra_args={"class_labels": labels}).clamp(-1, 1)


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    denoiser, _ = guide.digits_model(args.fast)
    n = 60 if args.fast else 300
    asked = torch.arange(n) % 10

    # 1. A small GAN, trained here for a few CPU seconds (chapter 10 gives both the same budget).
    gen, _, history = train_gan(world["train"], world["train_labels"], GANConfig(), seed=args.seed, batch_size=64,
                                **({"steps": 30} if args.fast else {"cpu_seconds": 10}))
    gan_x, gan_cpu = timed(lambda: sample_gan(gen, asked, seed=args.seed))
    dif = {}
    for steps in (50, 10):
        dif[steps] = timed(lambda: generate(denoiser, asked.tolist(), shape=(1, 8, 8), steps=steps, seed=args.seed,
                                            batch_size=n, progress=False))
    gan_cov, dif_cov = coverage(world, gan_x, asked), coverage(world, dif[50][0], asked)

    # 2. Inpainting for free: hide the lower half of held-out digits.
    k = 30 if args.fast else 100
    known, labels = world["held"][:k], world["held_labels"][:k]
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1
    filled = inpaint(denoiser, known, mask, labels, 10 if args.fast else 20, args.seed)
    mean_fill = torch.where(mask.bool(), world["train"].mean(0, keepdim=True), known)
    judge = world["judge"]
    figures = guide.report({
        "gan_train_steps": history[-1]["step"] if history else 0,
        "gan_samples_per_s": n / gan_cpu, "ddim_50_samples_per_s": n / dif[50][1], "ddim_10_samples_per_s": n / dif[10][1],
        "gan_samples_per_s_over_ddim_50": dif[50][1] / gan_cpu,
        "gan_accuracy": judge.accuracy(gan_x, asked), "diffusion_accuracy": judge.accuracy(dif[50][0], asked),
        "gan_recall": gan_cov["recall"], "diffusion_recall": dif_cov["recall"],
        "gan_precision": gan_cov["precision"], "diffusion_precision": dif_cov["precision"],
        "gan_worst_class_recall": gan_cov["worst_class_recall"], "diffusion_worst_class_recall": dif_cov["worst_class_recall"],
        "inpaint_accuracy": judge.accuracy(filled, labels), "mean_fill_accuracy": judge.accuracy(mean_fill, labels),
        "inpaint_gain_over_mean_fill": judge.accuracy(filled, labels) - judge.accuracy(mean_fill, labels),
        "inpaint_known_pixels_error": float((filled - known)[..., :4, :].abs().max()),
    })

    # 3. The picture: GAN and diffusion samples (a row per class), and inpainted digits.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    for ax, x, title in ((axes[0], gan_x, f"GAN ({history[-1]['step'] if history else 0} updates): one pass"),
                         (axes[1], dif[50][0], "diffusion: DDIM 50 steps")):
        m = min(8, len(x) // 10)
        grid = x[:10 * m].reshape(m, 10, 8, 8).permute(1, 2, 0, 3).reshape(80, 8 * m)
        ax.imshow(grid, cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=9), ax.axis("off")
    rows = torch.cat([known[:10], torch.where(mask.bool(), torch.tensor(-1.0), known[:10]), filled[:10], mean_fill[:10]])
    grid = rows.reshape(4, 10, 8, 8).permute(0, 2, 1, 3).reshape(32, 80)
    axes[2].imshow(grid, cmap="gray", vmin=-1, vmax=1)
    axes[2].set_title("held-out / lower half hidden / RePaint / mean fill", fontsize=8), axes[2].axis("off")
    guide.save(fig, guide.picture(args, "41_where_diffusion_wins.png"))
    return figures


# run on one thread (the CPU seconds quoted are one thread's), torch's setting restored
main = guide.on_one_thread(run)


if __name__ == "__main__":
    main()
