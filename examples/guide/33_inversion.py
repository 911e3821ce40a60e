"""Chapter 33: inversion for editing: from a real image back to the noise that makes it, then
sampling back under another condition.

Inverts held-out digits with the guide's class-conditional digits model under their own class,
two ways: deterministic DDIM inversion (Song et al. 2021; Mokady et al. 2023, Section 3) and
edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024). Prints the reconstruction error
against the number of steps, then edits the class (label y -> (y + 5) mod 10, e.g. 3 -> 8) by
sampling back under the new label: the judge's accuracy for the new class and the pixel distance
to the source, against a fresh sample of the new class.
``python examples/guide/33_inversion.py [--fast --out DIR]`` (33 CPU s on one thread, 100 digits, the model cached).
"""
from __future__ import annotations

import torch

import _editing as ed
import _guide as guide
from difflab.guidance.cfg import ClassifierFreeGuidance
from difflab.pipelines.edit import psnr
from difflab.samplers import invert_ddim, invert_ddpm, sample_ddim, sample_ddpm

BOUNDS = {
    "ddim_recon_psnr_db_10": (15.0, 35.0),       # DDIM inversion then DDIM back, same label, 10 steps
    "ddim_recon_psnr_db_20": (18.0, 45.0),       # more steps, smaller error
    "ddpm_recon_psnr_db": (20.0, 60.0),          # edit-friendly: only the last step's error is left
    "edit_ddim_accuracy": (0.3, 1.0),            # judge reads the new class
    "edit_ddim_cfg_accuracy": (0.6, 1.0),
    "edit_ddpm_cfg_accuracy": (0.6, 1.0),
    "fresh_accuracy": (0.3, 1.0),                # a new sample of the target class, from fresh noise
    "edit_ddim_cfg_distance": (0.2, 0.7),       # mean squared distance to the source digit
    "edit_ddpm_cfg_distance": (0.2, 0.7),
    "fresh_distance": (0.5, 1.5),
}


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    denoiser, _ = guide.digits_model(args.fast)
    n = 32 if args.fast else 100
    source, y = world["held"][:n], world["held_labels"][:n]
    target = (y + 5) % 10
    null = {"class_labels": ed.labels(n)}
    own, new = {"class_labels": y}, {"class_labels": target}
    guidance = 3.0
    cfg = ClassifierFreeGuidance(denoiser, guidance, null)
    figures = {}

    # 1. Reconstruction: invert under the source label, sample back under it (guidance 1).
    with torch.no_grad():
        for steps in ((10, 20) if args.fast else (10, 20, 40, 80)):
            sigmas = ed.grid(denoiser, steps)
            latent = invert_ddim(denoiser, source, sigmas, extra_args=own)
            back = sample_ddim(denoiser, latent, sigmas, extra_args=own)
            figures[f"ddim_recon_psnr_db_{steps}"] = float(psnr(back.clamp(-1, 1), source).mean())
        steps = 20 if args.fast else 50
        sigmas = ed.grid(denoiser, steps)
        x_first, maps = invert_ddpm(denoiser, source, sigmas, noise=ed.noise_for(args.seed, n), extra_args=own)
        back = sample_ddpm(denoiser, x_first, sigmas, noise=iter(maps).__next__, extra_args=own)
        figures["ddpm_recon_psnr_db"] = float(psnr(back.clamp(-1, 1), source).mean())

        # 2. Editing: the same inversions, sampled back under the target label.
        latent = invert_ddim(denoiser, source, sigmas, extra_args=own)
        edits = {
            "edit_ddim": sample_ddim(denoiser, latent, sigmas, extra_args=new),
            "edit_ddim_cfg": sample_ddim(cfg, latent, sigmas, extra_args=new),
            "edit_ddpm": sample_ddpm(denoiser, x_first, sigmas, noise=iter(maps).__next__, extra_args=new),
            "edit_ddpm_cfg": sample_ddpm(cfg, x_first, sigmas, noise=iter(maps).__next__, extra_args=new),
        }
        noise = ed.noise_for(args.seed + 1, n)
        edits["fresh"] = sample_ddim(cfg, noise() * float(denoiser.prior_std(sigmas[0])), sigmas, extra_args=new)
    judge = world["judge"]
    for name, images in edits.items():
        images = edits[name] = images.clamp(-1, 1)
        figures[f"{name}_accuracy"] = judge.accuracy(images, target)
        figures[f"{name}_distance"] = float(((images - source) ** 2).mean())
    figures = guide.report(figures)

    plt = guide.pyplot()
    fig = plt.figure(figsize=(9, 5))
    order = torch.tensor([int((y == c).nonzero()[0]) for c in range(10) if bool((y == c).any())])  # one source per class
    show = lambda x: x[order]
    ed.draw_rows(fig, [("source", show(source)), ("DDPM-inv back", show(back)), ("DDIM edit", show(edits["edit_ddim"])),
                       (f"DDIM edit\ncfg {guidance:g}", show(edits["edit_ddim_cfg"])),
                       (f"DDPM-inv edit\ncfg {guidance:g}", show(edits["edit_ddpm_cfg"])),
                       ("fresh sample\nof the target", show(edits["fresh"]))], len(order))
    fig.suptitle("class edits y -> (y + 5) mod 10", fontsize=9)
    guide.save(fig, guide.picture(args, "33_inversion.png"))
    return figures


main = guide.on_one_thread(run)  # small convolutions: one thread is faster than two contending ones

if __name__ == "__main__":
    main()
