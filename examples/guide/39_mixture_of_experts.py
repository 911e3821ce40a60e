"""Chapter 39: mixture-of-experts diffusion models (DiT-MoE; Switch / top-k routing).

Builds the digits DiT (``digits-small``: 4 blocks, width 64) dense and as a mixture of experts (8
experts per block, top-2, each expert half as wide: the dense model's active compute), counts
their total and active parameters, trains both the same number of steps on the digits, judges 100
samples of each, and reads how the MoE's router splits the noise levels between its experts
(``routing_by_sigma``).
``python examples/guide/39_mixture_of_experts.py [--fast --out DIR]`` (full: 44 CPU s with one torch thread on the quiet 2-core CPU, both trainings included).
"""
from __future__ import annotations

import time

import torch

import _guide as guide
from difflab.io.spec import make_spec
from difflab.nn.dit import MOE_PRESETS, PRESETS
from difflab.nn.moe import active_parameters, routing_by_sigma, total_parameters
from difflab.pipelines import SampleOptions, generate

DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "zero_terminal_snr": False, "prediction": "v"}
SIGMAS = [0.05, 0.2, 1.0, 5.0, 20.0]

BOUNDS = {
    "dense_params": (328_000, 331_000),          # exact counts of the digits-small DiT (0.329 M)
    "moe_total_params": (740_000, 752_000),      # 0.746 M in all ...
    "moe_active_params": (345_000, 351_000),     # ... 0.348 M through which a token goes
    "active_over_dense": (1.0, 1.1),             # equal active compute, plus the routers
    "dense_accuracy": (0.0, 1.0),                # 30 steps: the --fast run only shows both train
    "moe_accuracy": (0.0, 1.0),
    "moe_block0_load_max": (0.125, 0.5),         # the most loaded expert's mean share: balanced (1/8 = even)
}


def total_variation(load: torch.Tensor) -> torch.Tensor:
    """Per sigma, half the L1 distance between that sigma's load over the experts and the mean load."""
    return 0.5 * (load - load.mean(0, keepdim=True)).abs().sum(1)


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    t0, c0 = time.time(), time.process_time()
    world = guide.digits_world()
    steps = 30 if args.fast else 400
    specs = {"dense": make_spec("dit", PRESETS["digits-small"], DIFFUSION),
             "moe": make_spec("moe-dit", MOE_PRESETS["digits-small"], DIFFUSION)}
    models, cpu = {}, {}
    for name, spec in specs.items():
        c = time.process_time()
        models[name], _ = guide.digits_model(args.fast, steps=steps, spec=spec, seed=args.seed)
        cpu[name] = time.process_time() - c

    # 1. Parameters: all of them, and those one token goes through.
    figures = {"dense_params": total_parameters(models["dense"].net),
               "moe_total_params": total_parameters(models["moe"].net),
               "moe_active_params": active_parameters(models["moe"].net)}
    figures["active_over_dense"] = figures["moe_active_params"] / figures["dense_params"]

    # 2. Both sampled the same way, read by the digits judge.
    per = 2 if args.fast else 10
    asked = torch.arange(10).repeat_interleave(per)
    opts = SampleOptions(sampler="ddim", steps=10 if args.fast else 30, guidance_scale=1.5, seed=args.seed, progress=False)
    samples = {}
    for name, denoiser in models.items():
        samples[name] = generate(denoiser, asked, shape=(1, 8, 8), options=opts)
        scores = guide.judge_samples(world, samples[name], asked)
        figures[f"{name}_accuracy"] = scores["accuracy"]
        figures[f"{name}_frechet"] = scores["frechet"]
    figures["frechet_floor"] = scores["frechet_floor"]

    # 3. Routing by noise level: the load of every block's experts at five sigmas, on held-out digits.
    n = 40 if args.fast else 200
    route = routing_by_sigma(models["moe"], world["held"][:n], SIGMAS, class_labels=world["held_labels"][:n],
                             generator=torch.Generator().manual_seed(args.seed))
    loads = route["load"]
    names = sorted(loads)
    figures["moe_block0_load_max"] = float(loads[names[0]].mean(0).max())
    for i, name in enumerate(names):
        figures[f"block{i}_tv_low_sigma"] = float(total_variation(loads[name])[0])
        figures[f"block{i}_tv_high_sigma"] = float(total_variation(loads[name])[-1])
    figures["dense_train_cpu_seconds"], figures["moe_train_cpu_seconds"] = cpu["dense"], cpu["moe"]
    guide.report(figures)

    # 4. The picture: both models' digits, and block 0's and the last block's load per sigma.
    plt = guide.pyplot()
    fig = plt.figure(figsize=(12, 5.5))
    for col, name in enumerate(("dense", "moe")):
        ax = fig.add_subplot(1, 4, col + 1)
        grid = torch.cat([samples[name][c * per:(c + 1) * per][:2] for c in range(10)])  # 2 per class
        tiles = grid.reshape(10, 2, 8, 8).permute(0, 2, 1, 3).reshape(80, 16)
        ax.imshow(tiles, cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{name}: {figures[f'{name}_accuracy']:.0%} read right", fontsize=9)
    for col, name in enumerate((names[0], names[-1])):
        ax = fig.add_subplot(1, 4, col + 3)
        im = ax.imshow(loads[name].numpy(), cmap="viridis", vmin=0, vmax=0.5, aspect="auto")
        ax.set_yticks(range(len(SIGMAS)), [f"{s:g}" for s in SIGMAS])
        ax.set(xlabel="expert", ylabel="sigma", title=f"{name.split('.mlp')[0]}: load per sigma")
    fig.colorbar(im, ax=ax, fraction=0.05)
    guide.save(fig, guide.picture(args, "39_mixture_of_experts.png"))
    guide.print_time(t0, c0)
    return figures


# one thread: on a shared CPU two threads spin and cost far more CPU time
main = guide.on_one_thread(run)


if __name__ == "__main__":
    main()
