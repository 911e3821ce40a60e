"""Chapter 17: outpainting, extending an image past its borders.

Two experiments with the guide's digits model (8x8, run unconditionally) and RePaint's replacement
(Lugmayr et al. 2022) on a canvas padded by ``difflab.pipelines.outpaint.extend_canvas``:

1. Extend: the left 8x4 half of a held-out digit is padded by 4 columns on the right and the
   model fills them. The judge reads the completed digit against the original's class; the seam
   (the step between columns 4 and 5) is compared with the original's step there, for the
   outpainted digit and for a fill that never saw the known half.
2. Tiles: a strip 8 x 20 grown from a real digit by four overlapping 8x8 windows, each sharing
   4 columns with the last (the model only ever sees 8x8). Prints the jump at the tiles' seams
   against the jump inside each window.
``python examples/guide/17_outpainting.py [--fast --out DIR]`` (26 s of CPU time on one thread).
"""
from __future__ import annotations

import torch

import _editing as ed
import _guide as guide
from difflab.guidance.inpaint import sample_repaint
from difflab.pipelines.outpaint import extend_canvas
from difflab.samplers import get_sampler

BOUNDS = {
    "kept_region_max_error": (0.0, 0.0),        # the known half comes back exactly
    "accuracy_outpaint": (0.4, 1.0),            # judge: completed digit = original's class
    "accuracy_independent": (0.05, 0.7),        # right half drawn without seeing the left
    "seam_error_outpaint": (0.2, 0.8),          # |(x5 - x4) - (t5 - t4)|: the step across the seam vs the truth's
    "seam_error_independent": (0.3, 1.2),       # an unaware fill gets the step across the seam wrong more often
    "seam_jump_real": (0.5, 0.9),               # mean |col 5 - col 4| in real digits
    "tile_seam_jump": (0.3, 2.0),               # mean |step| across the tiles' seams in the strip
    "tile_inner_jump": (0.3, 1.0),              # mean |step| between neighbour columns elsewhere
}


def seam_jump(images: torch.Tensor, col: int) -> float:
    """Mean absolute difference between columns ``col - 1`` and ``col`` (0-based): how abruptly the
    image changes across a vertical seam there."""
    return float((images[..., col] - images[..., col - 1]).abs().mean())


def seam_error(images: torch.Tensor, truth: torch.Tensor, col: int) -> float:
    """Mean absolute error of the step across the seam before ``col`` against the true image's
    step there: 0 when every stroke crosses the seam as it did in the original."""
    step = images[..., col] - images[..., col - 1]
    return float((step - (truth[..., col] - truth[..., col - 1])).abs().mean())


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    denoiser, _ = guide.digits_model(args.fast)
    n, steps, resample = (40, 20, 2) if args.fast else (200, 50, 3)
    truth, truth_labels = world["held"][:n], world["held_labels"][:n]
    sigmas = ed.grid(denoiser, steps)
    ddpm = get_sampler("ddpm")
    prior = float(denoiser.prior_std(sigmas[0]))

    def fill(known: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
        b = len(known)
        noise = ed.noise_for(seed, b)
        with torch.no_grad():
            return sample_repaint(denoiser, noise() * prior, sigmas, known=known, mask=mask, sampler=ddpm,
                                  resample=resample, jump_length=5, noise=noise,
                                  extra_args={"class_labels": ed.labels(b)}).clamp(-1, 1)

    # 1. Extend the left half by 4 columns (the pipeline's canvas: padded with mid-grey, mask = border).
    canvas, mask = extend_canvas(truth[..., :4], left=0, right=4, top=0, bottom=0)
    extended = fill(canvas, mask, args.seed)
    noise = ed.noise_for(args.seed + 1, n)
    with torch.no_grad():
        free = ddpm(denoiser, noise() * prior, sigmas, extra_args={"class_labels": ed.labels(n)}, noise=noise).clamp(-1, 1)
    independent = torch.cat([truth[..., :4], free[..., 4:]], dim=-1)

    # 2. A strip grown by overlapping tiles: each new 8x8 window keeps the last 4 columns it overlaps.
    m = 8 if args.fast else 40
    strip = truth[:m]
    for k in range(3):
        window, wmask = extend_canvas(strip[..., -4:], left=0, right=4, top=0, bottom=0)
        strip = torch.cat([strip, fill(window, wmask, args.seed + 10 + k)[..., 4:]], dim=-1)
    seams = [8, 12, 16]  # first new column of each tile
    inner = [c for c in range(1, strip.shape[-1]) if c not in seams]

    judge = world["judge"]
    figures = guide.report({
        "kept_region_max_error": float((extended[..., :4] - truth[..., :4]).abs().max()),
        "accuracy_outpaint": judge.accuracy(extended, truth_labels),
        "accuracy_independent": judge.accuracy(independent, truth_labels),
        "seam_error_outpaint": seam_error(extended, truth, 4),
        "seam_error_independent": seam_error(independent, truth, 4),
        "seam_jump_real": seam_jump(truth, 4),
        "seam_jump_outpaint": seam_jump(extended, 4),
        "tile_seam_jump": sum(seam_jump(strip, c) for c in seams) / len(seams),
        "tile_inner_jump": sum(seam_jump(strip, c) for c in inner) / len(inner),
    })

    plt = guide.pyplot()
    fig = plt.figure(figsize=(10, 7.5))
    cols = 10
    ed.draw_rows(fig, [("original", truth), ("known 8x4", canvas), ("outpainted", extended),
                       ("unaware fill", independent)], cols, total_rows=7)
    for r in range(3):
        ax = fig.add_subplot(7, 1, 5 + r)
        ax.imshow(strip[r, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
        for c in seams:
            ax.axvline(c - 0.5, color="red", lw=0.6, alpha=0.6)
        ax.set_xticks([]), ax.set_yticks([])
        if r == 0:
            ax.set_title("strips grown by overlapping 8x8 tiles (red: tile seams)", fontsize=8)
    guide.save(fig, guide.picture(args, "17_outpainting.png"))
    return figures


if __name__ == "__main__":
    main()
