"""Chapter 42: bringing the computational cost down, measured as cost versus quality.

Samples the guide's digits model with fewer DDIM steps (50, 20, 10, 5), with better solvers at few
steps (DPM-Solver++ 2M, UniPC), under bf16 autocast and (with ``--compile 1``) compiled with torch.compile, and
prints for each the judge accuracy, the Frechet distance to the held-out digits and the samples per
CPU second. Distillation and latent space are quoted in the chapter from BENCHMARKS.md.
``python examples/guide/42_cost.py [--fast --out DIR] [--compile 1]`` (about 18 CPU s with the cached
model; the compile row adds about 40 CPU s, 14.5 of them compiling, on one thread).
"""
from __future__ import annotations

import copy
import time

import torch

import _guide as guide
from difflab.perf import optimize
from difflab.perf.fast import autocast
from difflab.pipelines import generate

BOUNDS = {
    "ddim_20_accuracy": (0.5, 1.0),            # the 80-step model reads as the digit asked most of the time
    "ddim_5_frechet_over_20": (1.0, 20.0),      # 5 DDIM steps are worse than 20
    "dpmpp_2m_5_frechet_over_ddim_5": (0.0, 1.0),  # DPM-Solver++ 2M beats DDIM at 5 steps
    "unipc_5_frechet_over_ddim_5": (0.0, 1.0),  # so does UniPC
    "bf16_frechet_over_fp32": (0.7, 1.4),       # bf16 autocast barely moves the figures
}


def measure(world, denoiser, asked, seed, *, sampler="ddim", steps=20, precision="fp32") -> dict:
    """Accuracy, Frechet distance and samples per CPU second of one setting."""
    t = time.process_time()
    with autocast(precision, "cpu"):
        x = generate(denoiser, asked.tolist(), shape=(1, 8, 8), sampler=sampler, steps=steps, seed=seed,
                     batch_size=len(asked), progress=False)
    cpu = time.process_time() - t
    judged = guide.judge_samples(world, x.float(), asked)
    return {"accuracy": judged["accuracy"], "frechet": judged["frechet"], "per_s": len(asked) / cpu, "nfe": steps}


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__, compile=(int, 0, "1: add a torch.compile row (its compile time counted apart)"))
    world = guide.digits_world()
    denoiser, _ = guide.digits_model(args.fast)
    asked = torch.arange(100 if args.fast else 200) % 10
    settings = ([("ddim", 20), ("ddim", 5), ("dpmpp_2m", 5), ("unipc", 5)] if args.fast else
                [("ddim", 50), ("ddim", 20), ("ddim", 10), ("ddim", 5), ("dpmpp_2m", 10), ("dpmpp_2m", 5),
                 ("unipc", 10), ("unipc", 5)])
    rows = {f"{s}_{n}": measure(world, denoiser, asked, args.seed, sampler=s, steps=n) for s, n in settings}
    rows["ddim_20_bf16"] = measure(world, denoiser, asked, args.seed, precision="bf16")
    if args.compile:  # torch.compile of the whole network; its compile time is its own row
        compiled = copy.deepcopy(denoiser)
        try:
            optimize(compiled.net, precision="fp32", channels_last=False, fuse_qkv=False, compile="full")
            first = measure(world, compiled, asked, args.seed)  # the first run compiles (same shapes as the timed one)
            rows["ddim_20_compiled"] = measure(world, compiled, asked, args.seed)
            rows["ddim_20_compiled"]["compile_cpu_s"] = len(asked) / first["per_s"] - len(asked) / rows["ddim_20_compiled"]["per_s"]
        except Exception as e:  # no C++ compiler, an unsupported op: say so
            print(f"torch.compile failed on this CPU: {type(e).__name__}: {str(e)[:200]}")

    print(f"{'setting':<18} {'NFE':>4} {'accuracy':>9} {'Frechet':>8} {'samples/CPU s':>14}")
    for name, r in rows.items():
        print(f"{name:<18} {r['nfe']:>4} {r['accuracy']:>9.1%} {r['frechet']:>8.2f} {r['per_s']:>14.1f}")
    figures = {f"{name}_{k}": r[k] for name, r in rows.items() for k in ("accuracy", "frechet", "per_s")}
    figures.update(frechet_floor=guide.judge_samples(world, world["train"][:len(asked)], asked)["frechet_floor"],
                   ddim_5_frechet_over_20=rows["ddim_5"]["frechet"] / rows["ddim_20"]["frechet"],
                   dpmpp_2m_5_frechet_over_ddim_5=rows["dpmpp_2m_5"]["frechet"] / rows["ddim_5"]["frechet"],
                   unipc_5_frechet_over_ddim_5=rows["unipc_5"]["frechet"] / rows["ddim_5"]["frechet"],
                   speedup_5_over_20_steps=rows["ddim_5"]["per_s"] / rows["ddim_20"]["per_s"],
                   bf16_frechet_over_fp32=rows["ddim_20_bf16"]["frechet"] / rows["ddim_20"]["frechet"])
    if "ddim_20_compiled" in rows:
        figures["compile_cpu_s"] = rows["ddim_20_compiled"]["compile_cpu_s"]
    figures = guide.report(figures)

    # The picture: Frechet distance against samples per CPU second, one point per setting.
    plt = guide.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        family = name.split("_")[0]
        marker = {"ddim": "o", "dpmpp": "s", "unipc": "^"}[family]
        ax.scatter(r["per_s"], r["frechet"], marker=marker, s=40)
        ax.annotate(name, (r["per_s"], r["frechet"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(figures["frechet_floor"], color="gray", ls="--", lw=0.8)
    ax.text(ax.get_xlim()[0], figures["frechet_floor"], " floor (training digits)", fontsize=7, va="bottom")
    ax.set(xscale="log", xlabel="samples per CPU second (log)", ylabel="Frechet distance (judge features)",
           title="Cost versus quality on the guide's digits model")
    guide.save(fig, guide.picture(args, "42_cost.png"))
    return figures


# run on one thread (the CPU seconds quoted are one thread's), torch's setting restored
main = guide.on_one_thread(run)


if __name__ == "__main__":
    main()
