"""Chapter 5: the U-Net as a diffusion backbone.

Counts the parameters of the guide's digits U-Net level by level, follows the shape of the
activations through it with forward hooks, then asks what the skip connections are for: the same
U-Net is trained twice with the same budget, once as it is and once with every skip zeroed (forward
pre-hooks on the up blocks), and both are scored by their held-out denoising error per noise level
and by the digits judge.
``python examples/guide/05_unet.py [--fast --out DIR]`` (full: 45 s of CPU time on one thread, the two
200-step trainings included; --fast: 14 s).
"""
from __future__ import annotations

import dataclasses

import torch

import _arch as arch
import _guide as guide
from difflab.nn.unet import UNet, UNetConfig
from difflab.pipelines import generate

BOUNDS = {
    "params_total": (273_009, 273_009),          # the guide's digits U-Net (16 wide): exact for the config
    "params_down_level_0": (15_888, 15_888),
    "params_up_level_1": (119_392, 119_392),
    "bottleneck_side": (4, 4),                   # 8x8 digits, two levels: the middle works at 4x4
    "bottleneck_channels": (32, 32),
    "skip_error_sigma_1": (0.05, 0.3),           # held-out x0 error at sigma 1 with skips
    "noskip_over_skip_sigma_1": (1.2, 1e3),      # without skips every detail must pass the 4x4 bottleneck
    "skip_accuracy": (0.1, 1.0),
}
SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def level_params(unet: UNet) -> dict:
    """Parameters per part: the embeddings, each down level (its ResBlocks, attention, downsampler),
    the middle, each up level (deepest first in the net, named by level), the output head."""
    c = unet.config
    parts = {"embeddings": arch.count(unet.time_embed) + (arch.count(unet.label_embed) if unet.label_embed is not None else 0),
             "input_conv": arch.count(unet.input_conv)}
    i, n = 0, len(c.channel_mult)
    for level in range(n):
        k = c.num_res_blocks + (level != n - 1)
        parts[f"down_level_{level}"] = sum(arch.count(b) for b in unet.down[i:i + k])
        i += k
    parts["middle"] = arch.count(unet.middle)
    for j in range(n):
        level = n - 1 - j
        blocks = unet.up[j * (c.num_res_blocks + 1):(j + 1) * (c.num_res_blocks + 1)]
        parts[f"up_level_{level}"] = sum(arch.count(b) for b in blocks)
    parts["out"] = arch.count(unet.out)
    return parts


def trace_shapes(unet: UNet, x: torch.Tensor, labels: torch.Tensor) -> list[tuple[str, tuple]]:
    """``(block name, output shape)`` for every block, from forward hooks on one forward pass."""
    seen, handles = [], []
    named = [("input_conv", unet.input_conv)] + [(f"down.{i}", b) for i, b in enumerate(unet.down)] + \
            [("middle", unet.middle)] + [(f"up.{i}", b) for i, b in enumerate(unet.up)] + [("out", unet.out)]
    for name, module in named:
        handles.append(module.register_forward_hook(lambda m, a, out, name=name: seen.append((name, tuple(out.shape)))))
    with torch.no_grad():
        unet(x, torch.zeros(len(x)), class_labels=labels)
    for h in handles:
        h.remove()
    return seen


def cut_skips(unet: UNet, shapes: list[tuple[str, tuple]]) -> list:
    """Zero the skip half of every up block's input (forward pre-hooks); returns the hook handles.
    Up block k concatenates the k-th skip from the end: the output of input_conv or a down block."""
    skip_channels = [s[1] for name, s in shapes if name == "input_conv" or name.startswith("down.")]
    handles = []
    for k, block in enumerate(unet.up):
        n = skip_channels[-(k + 1)]

        def zero_skip(module, args, n=n):
            h = args[0].clone()
            h[:, -n:] = 0
            return (h, *args[1:])
        handles.append(block.register_forward_pre_hook(zero_skip))
    return handles


@torch.no_grad()
def x0_error(denoiser, images, labels, seed: int) -> list[float]:
    """Mean squared error of D(x0 + sigma eps, sigma) against x0, per sigma of ``SIGMAS``."""
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return [float(((denoiser(images + s * eps, torch.full((len(images),), s), class_labels=labels) - images) ** 2).mean())
            for s in SIGMAS]


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    spec = guide.digits_spec()
    unet = UNet(UNetConfig.from_dict(spec["unet"]))

    # 1. Parameters per level, and how the count grows with width.
    parts = level_params(unet)
    widths = {w: arch.count(UNet(dataclasses.replace(unet.config, model_channels=w))) for w in (8, 16, 32)}

    # 2. The shapes through the network.
    shapes = trace_shapes(unet, world["train"][:2], world["train_labels"][:2])
    middle = dict(shapes)["middle"]
    print("block          output shape")
    for name, shape in shapes:
        print(f"  {name:12s} {shape}")

    # 3. Skips or no skips, same budget.
    steps = 30 if args.fast else 200
    held, held_labels = world["held"][:256], world["held_labels"][:256]
    models = {"skip": arch.train_digits(spec, steps, args.seed, world),
              "noskip": arch.train_digits(spec, steps, args.seed, world, prepare=lambda d: cut_skips(d.net, shapes))}
    errors = {k: x0_error(d, held, held_labels, args.seed) for k, d in models.items()}
    asked = torch.arange(10).repeat_interleave(4 if args.fast else 30)
    samples = {k: generate(d, asked.tolist(), shape=(1, 8, 8), steps=10 if args.fast else 25, guidance_scale=2.0,
                           seed=args.seed, progress=False)
               for k, d in models.items()}
    judged = {k: guide.judge_samples(world, s, asked) for k, s in samples.items()}
    i01, i1 = SIGMAS.index(0.1), SIGMAS.index(1.0)
    figures = guide.report({
        "params_total": arch.count(unet), **{f"params_{k}": v for k, v in parts.items()},
        **{f"params_width_{w}": v for w, v in widths.items()},
        "bottleneck_side": middle[-1], "bottleneck_channels": middle[1], "train_steps": steps,
        "skip_error_small_sigma": errors["skip"][i01], "noskip_error_small_sigma": errors["noskip"][i01],
        "skip_error_sigma_1": errors["skip"][i1], "noskip_error_sigma_1": errors["noskip"][i1],
        "noskip_over_skip_sigma_1": errors["noskip"][i1] / errors["skip"][i1],
        "skip_accuracy": judged["skip"]["accuracy"], "noskip_accuracy": judged["noskip"]["accuracy"],
        "skip_frechet": judged["skip"]["frechet"], "noskip_frechet": judged["noskip"]["frechet"],
    })

    # 4. The picture: resolution and channels along the network, error per sigma, samples.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.4, 1.2, 0.6, 0.6]})
    ax = axes[0]
    names = [n for n, _ in shapes[:-1]]
    ax.bar(range(len(names)), [s[1] for _, s in shapes[:-1]], color=["C0" if s[-1] == 8 else "C1" for _, s in shapes[:-1]])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set(ylabel="channels", title="digits U-Net: channels per block\n(blue 8x8, orange 4x4)")
    ax = axes[1]
    for k, label in (("skip", "with skips"), ("noskip", "skips zeroed")):
        ax.loglog(SIGMAS, errors[k], "o-", label=f"{label} (judge {judged[k]['accuracy']:.0%})")
    ax.loglog(SIGMAS, [s * s for s in SIGMAS], ":", color="gray", label="error of D = x (sigma^2)")
    ax.set(xlabel="sigma", ylabel="held-out MSE of x0", title=f"same budget: {steps} steps", ylim=(1e-3, 1.0))
    ax.legend(fontsize=7)
    for col, k in enumerate(("skip", "noskip")):
        grid = samples[k].reshape(10, -1, 8, 8)[:, :4].permute(0, 2, 1, 3).reshape(80, -1)
        ax = axes[2 + col]
        ax.imshow(grid, cmap="gray", vmin=-1, vmax=1), ax.set_xticks([]), ax.set_yticks([])
        ax.set_title("with skips" if k == "skip" else "skips zeroed", fontsize=8)
    guide.save(fig, guide.picture(args, "05_unet.png"))
    return figures


if __name__ == "__main__":
    main()
