"""Chapter 7: latent diffusion (Stable Diffusion's recipe, at the scale of the digits).

Takes the guide's small KL autoencoder (16x16x1 digits <-> 4x4x4 latents, chapter 8), encodes the
training digits once, trains a class-conditional U-Net on the scaled latents, samples latents and
decodes them. Prints the compression, the autoencoder's reconstruction error, the cost of one
network evaluation in pixel space and in latent space (FLOPs counted by PyTorch, and time), and
the judge's accuracy on the decoded samples.
``python examples/guide/07_latent_diffusion.py [--fast --out DIR]`` (full: 31 s of CPU time on one thread
with chapter 8's autoencoder cached, measured on the shared, loaded 2-core machine; --fast: 10 s).
"""
from __future__ import annotations


import torch
from torch.utils.flop_counter import FlopCounterMode

import _arch as arch
import _guide as guide
from difflab.io.spec import build_denoiser
from difflab.nn.unet import UNet, UNetConfig
from difflab.pipelines import generate
from difflab.train import TrainConfig, train

BOUNDS = {
    "compression_ratio": (4.0, 4.0),                 # 16 x 16 x 1 pixels / 4 x 4 x 4 latents
    "latent_std": (0.98, 1.02),                      # scaled to unit variance
    "recon_mse": (0.0, 0.15),                        # held-out, per pixel, data in [-1, 1]
    "flops_ratio_pixel_over_latent": (10.0, 20.0),   # 16x fewer positions, the same widths
    "judge_accuracy": (0.2, 1.0),                    # decoded samples read as the class asked
}


def latent_spec(in_channels: int) -> dict:
    """The guide's digits U-Net (16 wide, two levels, attention at the second, 10 classes) on
    ``in_channels`` channels: the same network for latents (4) and for pixels (1)."""
    spec = guide.digits_spec()
    spec["unet"] = {**spec["unet"], "in_channels": in_channels}
    return spec


def flops(module, *inputs, **kw) -> int:
    """FLOPs of one call, counted by ``torch.utils.flop_counter``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs, **kw)
    return counter.get_total_flops()


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    images, labels = arch.digits16("train")
    held, held_labels = arch.digits16("test")

    # 1. The autoencoder, its reconstructions, the scaled latents of the training set.
    vae = arch.digits_vae(args.fast, seed=args.seed)
    with torch.no_grad():
        recon = vae.decode(vae.encode(held).mode()).clamp(-1, 1)
        latents = vae.encode_latents(images, torch.Generator().manual_seed(args.seed))

    # 2. A class-conditional U-Net on the latents.
    spec = latent_spec(latents.shape[1])
    denoiser = build_denoiser(spec, seed=args.seed)
    steps = 40 if args.fast else 400
    config = TrainConfig(steps=steps, batch_size=64, lr=2e-3, warmup_steps=min(50, steps // 4), ema_decay=0.995,
                         cfg_dropout=0.1, checkpoint_every=0, log_every=steps, progress=False, seed=args.seed)
    with arch.Timer() as fit_time:
        state = train(denoiser, (latents, labels), config, None)
    state.ema.copy_to(denoiser.net)
    denoiser.eval()

    # 3. Sample latents, decode, judge.
    asked = torch.arange(10).repeat_interleave(4 if args.fast else 30)
    sample_steps = 10 if args.fast else 25
    z = generate(denoiser, asked.tolist(), shape=tuple(latents.shape[1:]), steps=sample_steps, guidance_scale=2.0,
                 seed=args.seed, clamp=False, progress=False)
    with torch.no_grad():
        samples = vae.decode_latents(z).clamp(-1, 1)
    judged = guide.judge_samples(world, samples, asked)

    # 4. Cost per sample: the same U-Net on 16x16 pixels against 4x4x4 latents, plus one decode.
    pixel_net = UNet(UNetConfig.from_dict(latent_spec(1)["unet"]))
    latent_net = denoiser.net
    b = 16
    t, y = torch.zeros(b), torch.zeros(b, dtype=torch.long)
    f_pixel = flops(pixel_net, torch.zeros(b, 1, 16, 16), t, class_labels=y) / b
    f_latent = flops(latent_net, torch.zeros(b, 4, 4, 4), t, class_labels=y) / b
    f_decode = flops(vae.decode, torch.zeros(b, 4, 4, 4)) / b
    with torch.no_grad():
        ms_pixel = 1e3 * arch.best_time(lambda: pixel_net(torch.zeros(64, 1, 16, 16), torch.zeros(64), class_labels=torch.zeros(64, dtype=torch.long))) / 64
        ms_latent = 1e3 * arch.best_time(lambda: latent_net(torch.zeros(64, 4, 4, 4), torch.zeros(64), class_labels=torch.zeros(64, dtype=torch.long))) / 64
    n_eval = 2 * sample_steps  # classifier-free guidance: two evaluations per step
    figures = guide.report({
        "compression_ratio": images[0].numel() / latents[0].numel(),
        "latent_std": float(latents.std()), "scaling_factor": vae.config.scaling_factor,
        "recon_mse": float(((recon - held) ** 2).mean()), "recon_judge_accuracy": world["judge"].accuracy(recon, held_labels),
        "unet_params": arch.count(latent_net), "vae_params": arch.count(vae),
        "mflops_per_eval_pixel": f_pixel / 1e6, "mflops_per_eval_latent": f_latent / 1e6,
        "mflops_decode": f_decode / 1e6, "flops_ratio_pixel_over_latent": f_pixel / f_latent,
        "flops_ratio_per_sample": n_eval * f_pixel / (n_eval * f_latent + f_decode),
        "ms_per_eval_pixel": ms_pixel, "ms_per_eval_latent": ms_latent,
        "train_steps": steps, "train_cpu_s": fit_time.cpu, "sample_steps": sample_steps,
        "judge_accuracy": judged["accuracy"], "frechet": judged["frechet"], "frechet_floor": judged["frechet_floor"],
    })

    # 5. The picture: digits, their latents, reconstructions; decoded samples; cost bars.
    plt = guide.pyplot()
    fig = plt.figure(figsize=(14, 4.6))
    gs = fig.add_gridspec(4, 3, width_ratios=[1.2, 1.3, 0.9])
    rows = (("16x16 digit", held[:8, 0]), ("latent ch. 0 (4x4)", vae.encode_latents(held[:8], sample=False)[:, 0].detach()),
            ("reconstruction", recon[:8, 0]))
    for r, (label, imgs) in enumerate(rows):
        ax = fig.add_subplot(gs[r, 0])
        big = torch.nn.functional.interpolate(imgs[:, None], size=16, mode="nearest")[:, 0] if imgs.shape[-1] == 4 else imgs
        ax.imshow(torch.cat(list(big), dim=1), cmap="gray" if r != 1 else "coolwarm")
        ax.set_xticks([]), ax.set_yticks([]), ax.set_ylabel(label, fontsize=7, rotation=0, ha="right")
    ax = fig.add_subplot(gs[:, 1])
    grid = samples.reshape(10, -1, 16, 16)[:, :4].permute(1, 2, 0, 3).reshape(64, 160)
    ax.imshow(grid, cmap="gray", vmin=-1, vmax=1), ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"decoded latent samples, classes 0-9 (judge {judged['accuracy']:.0%})", fontsize=9)
    ax = fig.add_subplot(gs[:, 2])
    ax.bar(["pixel U-Net\n16x16x1", "latent U-Net\n4x4x4", "VAE decode\n(once)"], [f_pixel / 1e6, f_latent / 1e6, f_decode / 1e6],
           color=["C3", "C0", "C2"])
    ax.set(ylabel="MFLOPs per sample", title="cost of one network evaluation")
    guide.save(fig, guide.picture(args, "07_latent_diffusion.png"))
    return figures


if __name__ == "__main__":
    main()
