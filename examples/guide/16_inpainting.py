"""Chapter 16: inpainting with a diffusion model that was never trained to inpaint (RePaint).

Hides half of each held-out digit (the bottom half, or the right half) and lets the guide's digits
model, run unconditionally, fill it: first by pasting the known half onto an unconditional
sample at the end (no inpainting at all), then by RePaint's replacement after every step
(Lugmayr et al. 2022, Algorithm 1), then with RePaint's resampling jumps. Prints the judge's
accuracy of the completed digit against the original's class, the error on the kept pixels (0),
and the filled half's error against the truth.
``python examples/guide/16_inpainting.py [--fast --out DIR]`` (30 s of CPU time on one thread).
"""
from __future__ import annotations

import torch

import _editing as ed
import _guide as guide
from difflab.guidance.inpaint import sample_repaint
from difflab.samplers import get_sampler

BOUNDS = {
    "kept_region_max_error": (0.0, 0.0),       # RePaint's last step puts the known pixels back exactly
    "accuracy_half_only": (0.2, 0.8),          # the judge on the kept half alone (hidden half blank)
    "accuracy_paste": (0.1, 0.8),              # unconditional sample, known half pasted at the end
    "accuracy_repaint": (0.3, 1.0),            # replacement after every step
    "accuracy_repaint_resample": (0.25, 1.0),   # with resampling jumps
    "fill_error_paste": (0.3, 2.0),            # mean squared error of the filled half vs the truth
    "fill_error_repaint": (0.0, 1.0),
}


def masks(n: int) -> torch.Tensor:
    """(n, 1, 8, 8) masks, 1 = fill: the bottom half for even samples, the right half for odd ones."""
    m = torch.zeros(n, 1, 8, 8)
    m[0::2, :, 4:, :] = 1
    m[1::2, :, :, 4:] = 1
    return m


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    denoiser, _ = guide.digits_model(args.fast)
    n, steps, (resample, jump) = (32, 20, (3, 4)) if args.fast else (200, 50, (5, 5))
    truth, truth_labels = world["held"][:n], world["held_labels"][:n]
    mask = masks(n)
    sigmas = ed.grid(denoiser, steps)
    ddpm = get_sampler("ddpm")
    extra = {"class_labels": ed.labels(n)}  # unconditional: the class must come from the kept half

    def run(mode: str) -> torch.Tensor:
        noise = ed.noise_for(args.seed, n)
        x = noise() * float(denoiser.prior_std(sigmas[0]))
        with torch.no_grad():
            if mode == "paste":
                out = ddpm(denoiser, x, sigmas, extra_args=extra, noise=noise)
                return torch.where(mask.bool(), out, truth).clamp(-1, 1)
            u, j = (1, 1) if mode == "repaint" else (resample, jump)
            return sample_repaint(denoiser, x, sigmas, known=truth, mask=mask, sampler=ddpm, resample=u,
                                  jump_length=j, noise=noise, extra_args=extra).clamp(-1, 1)

    out = {mode: run(mode) for mode in ("paste", "repaint", "resample")}
    half_only = torch.where(mask.bool(), torch.full_like(truth, -1.0), truth)
    judge = world["judge"]
    fill = mask.bool()

    def fill_error(x):
        return float(((x - truth)[fill] ** 2).mean())

    figures = guide.report({
        "kept_region_max_error": max(float((o - truth)[~fill].abs().max()) for o in out.values()),
        "accuracy_half_only": judge.accuracy(half_only, truth_labels),
        "accuracy_paste": judge.accuracy(out["paste"], truth_labels),
        "accuracy_repaint": judge.accuracy(out["repaint"], truth_labels),
        "accuracy_repaint_resample": judge.accuracy(out["resample"], truth_labels),
        "fill_error_paste": fill_error(out["paste"]),
        "fill_error_repaint": fill_error(out["repaint"]),
        "fill_error_repaint_resample": fill_error(out["resample"]),
    })

    plt = guide.pyplot()
    fig = plt.figure(figsize=(9, 4.2))
    cols = 12
    ed.draw_rows(fig, [("original", truth), ("kept half", half_only), ("paste at end", out["paste"]),
                       ("RePaint", out["repaint"]), (f"RePaint U={resample}", out["resample"])], cols)
    guide.save(fig, guide.picture(args, "16_inpainting.png"))
    return figures


if __name__ == "__main__":
    main()
