"""Chapter 8: the VAE encoder and decoder that define the latent space.

Trains the same small KL autoencoder (16x16x1 digits <-> 4x4x4 latents) with three KL weights and
prints, for each, the held-out reconstruction error, the spread of the latents and the KL per
latent element: the trade-off between faithful reconstructions and a regular latent space. Then
the scaling factor (Stable Diffusion's 0.18215 is 1 / std of its latents): what an unscaled
latent would do to the noise schedule. Last, a walk between two digits in latent space, decoded,
beside the same walk in pixel space.
``python examples/guide/08_vae.py [--fast --out DIR]`` (full: 47 s of CPU time on one thread, measured
on the shared, loaded 2-core machine, the autoencoders then cached; --fast: 21 s).
"""
from __future__ import annotations

import math

import torch

import _arch as arch
import _guide as guide

BOUNDS = {
    "recon_mse_kl_1e_5": (0.0, 0.15),          # held-out MSE per pixel (data in [-1, 1])
    "latent_std_kl_1e_5": (0.5, 50.0),
    "latent_std_kl_0_1": (0.2, 1.5),           # a strong KL pulls the latents toward N(0, 1)
    "kl_per_element_ratio": (2.0, 1e4),        # KL per element, weak over strong weight
    "scaled_latent_std": (0.98, 1.02),         # after scaling_factor = 1 / std: unit variance
}
KL_WEIGHTS = (1e-5, 1e-3, 1e-1)


def name(w: float) -> str:
    return f"{w:g}".replace(".", "_").replace("-0", "-").replace("e-", "e_")


@torch.no_grad()
def measure(vae, images, judge, labels, seed: int) -> dict:
    """Held-out reconstruction MSE (decoding the posterior mean), judge accuracy on the
    reconstructions, the std of raw latents z ~ q(z | x), and the KL to N(0, I) per latent element."""
    post = vae.encode(images)
    recon = vae.decode(post.mode()).clamp(-1, 1)
    z = post.sample(torch.Generator().manual_seed(seed))
    return {"recon_mse": float(((recon - images) ** 2).mean()), "judge": judge.accuracy(recon, labels),
            "latent_std": float(z.std()), "kl_per_element": float(post.kl().mean() / z[0].numel()), "recon": recon}


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    held, held_labels = arch.digits16("test")
    held, held_labels = held[:300], held_labels[:300]

    # 1. Three KL weights, the same budget.
    vaes = {w: arch.digits_vae(args.fast, kl_weight=w, seed=args.seed) for w in KL_WEIGHTS}
    stats = {w: measure(v, held, world["judge"], held_labels, args.seed) for w, v in vaes.items()}

    # 2. The scaling factor of the middle one (the one the other chapters use).
    vae = vaes[1e-3]
    scaled = vae.encode_latents(held, torch.Generator().manual_seed(args.seed)).detach()
    raw_std = stats[1e-3]["latent_std"]
    # Unscaled, a latent of std s under noise sigma has SNR s^2 / sigma^2: every log-SNR moves by 2 log s.
    shift = 2 * math.log(raw_std)

    # 3. Interpolation between two held-out digits: in latent space (decoded) and in pixel space.
    a, b = held[0:1], held[5:6]
    with torch.no_grad():
        za, zb = vae.encode(a).mode(), vae.encode(b).mode()
        ts = torch.linspace(0, 1, 7)
        latent_walk = torch.cat([vae.decode((1 - t) * za + t * zb) for t in ts]).clamp(-1, 1)
    pixel_walk = torch.cat([(1 - t) * a + t * b for t in ts])

    figures = {}
    for w, s in stats.items():
        figures.update({f"recon_mse_kl_{name(w)}": s["recon_mse"], f"judge_recon_kl_{name(w)}": s["judge"],
                        f"latent_std_kl_{name(w)}": s["latent_std"], f"kl_per_element_kl_{name(w)}": s["kl_per_element"]})
    figures.update({
        "kl_per_element_ratio": stats[KL_WEIGHTS[0]]["kl_per_element"] / stats[KL_WEIGHTS[-1]]["kl_per_element"],
        "compression_ratio": held[0].numel() / scaled[0].numel(),
        "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor,
        "scaled_latent_std": float(scaled.std()), "log_snr_shift_unscaled": shift,
        "sd_latent_std_implied": 1 / 0.18215,
    })
    figures = guide.report(figures)

    # 4. The picture: reconstructions per KL weight, the latent histograms, the two walks.
    plt = guide.pyplot()
    fig = plt.figure(figsize=(13, 5.5))
    show = 8
    rows = [("held-out", held[:show])] + [(f"KL weight {w:g}", stats[w]["recon"][:show]) for w in KL_WEIGHTS]
    for r, (label, imgs) in enumerate(rows):
        ax = fig.add_subplot(6, 2, 2 * r + 1)
        ax.imshow(torch.cat(list(imgs[:, 0]), dim=1), cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([]), ax.set_yticks([]), ax.set_ylabel(label, fontsize=7, rotation=0, ha="right")
    for r, (label, walk) in enumerate((("latent walk", latent_walk), ("pixel walk", pixel_walk))):
        ax = fig.add_subplot(6, 2, 2 * (4 + r) + 1)
        ax.imshow(torch.cat(list(walk[:, 0]), dim=1), cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([]), ax.set_yticks([]), ax.set_ylabel(label, fontsize=7, rotation=0, ha="right")
    ax = fig.add_subplot(1, 2, 2)
    with torch.no_grad():
        for w in KL_WEIGHTS:
            z = vaes[w].encode(held).mode().flatten()
            ax.hist(z.numpy(), bins=60, histtype="step", density=True, label=f"KL {w:g}: std {stats[w]['latent_std']:.2f}")
    xs = torch.linspace(-4, 4, 200)
    ax.plot(xs, torch.exp(-xs ** 2 / 2) / math.sqrt(2 * math.pi), "k:", label="N(0, 1)")
    ax.set(xlabel="latent value (posterior mean, unscaled)", ylabel="density", title="latents per KL weight", xlim=(-6, 6))
    ax.legend(fontsize=7)
    guide.save(fig, guide.picture(args, "08_vae.png"))
    return figures


if __name__ == "__main__":
    main()
