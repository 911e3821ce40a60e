"""How much faster the demos' training runs on both cores than on one: the factor that turns a demo's
one-thread CPU seconds into its wall time on the quiet 2-core machine.

The issues budget each demo at "15 minutes on the 2-core CPU", i.e. 900 wall seconds with torch's
default two threads. Demo figures are measured in one-thread process CPU seconds (a shared machine
makes wall time meaningless, and one thread is the conservative case); this script measures, per
demo network, ``factor = one-thread CPU s / two-thread wall s`` for the same training steps, each in
its own process through :func:`difflab.train.train` on random data of the demo's shapes, and prints
the one-thread CPU budget that 900 wall seconds allow. Run it on a quiet machine:

    python bench/demo_threads.py [--steps 40] [--demos video points depth slots]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BUDGET_WALL_S = 900.0


def build(demo: str):
    """(denoiser, data, TrainConfig, train()'s keyword arguments) of ``demo``'s network, data of its shapes."""
    from difflab.io.spec import build_denoiser, make_spec
    if demo == "video":
        from difflab.demos import video
        from difflab.nn.motion import freeze_spatial
        route = video.motion_modules(False)
        clips, labels, cond, null_cond = video.training_data(400, 0.0)
        den = build_denoiser(route.spec, seed=0)
        freeze_spatial(den.net)
        return den, (clips, labels, cond), route.train, {"spec": route.spec, "null_cond": null_cond}
    if demo == "points":
        from difflab.demos import shapes3d
        spec = shapes3d.points_spec()
        data = (torch.randn(400, shapes3d.NUM_POINTS, 3), torch.randint(0, 10, (400,)))
        return build_denoiser(spec, seed=0), data, shapes3d.POINTS_TRAIN, {"spec": spec}
    if demo == "depth":
        from difflab.demos import depth
        spec = make_spec("unet", depth.UNET, depth.DIFFUSION)
        data = (torch.randn(400, 4, depth.SIZE, depth.SIZE), torch.randint(0, depth.MAX_OBJECTS, (400,)))
        return build_denoiser(spec, seed=0), data, depth.TRAIN, {"spec": spec}
    if demo == "slots":
        from difflab.demos import slots
        images = torch.rand(400, 3, slots.SIZE, slots.SIZE)
        return slots.slot_denoiser(mixture_hint=slots.MIXTURE_HINT), (images, None, {"image": images}), slots.TRAIN, {}
    raise ValueError(f"demo={demo!r} is unknown; choose one of video, points, depth, slots")


def time_steps(demo: str, threads: int, steps: int) -> dict:
    """Train ``steps`` steps of ``demo``'s network on ``threads`` threads (in this process); wall and CPU s."""
    from difflab.train import train
    torch.set_num_threads(threads)
    den, data, config, kwargs = build(demo)
    config = dataclasses.replace(config, steps=steps, progress=False, checkpoint_every=0, log_every=10 ** 9)
    t, c = time.time(), time.process_time()
    train(den, data, config, Path(tempfile.mkdtemp()), **kwargs)
    return {"wall": time.time() - t, "cpu": time.process_time() - c}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--demos", nargs="+", default=["video", "points", "depth", "slots"])
    p.add_argument("--child", nargs=2, metavar=("DEMO", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(time_steps(args.child[0], int(args.child[1]), args.steps)))
        return
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"{'demo':8} {'1-thread CPU s':>15} {'2-thread wall s':>16} {'factor':>7} {'1-thread CPU s in 900 wall s':>29}")
    for demo in args.demos:
        runs = {}
        for threads in (1, 2):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", demo, str(threads)],
                                 capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            runs[threads] = json.loads(out.stdout.strip().splitlines()[-1])
        factor = runs[1]["cpu"] / runs[2]["wall"]
        print(f"{demo:8} {runs[1]['cpu']:15.1f} {runs[2]['wall']:16.1f} {factor:7.2f} {BUDGET_WALL_S * factor:29.0f}")


if __name__ == "__main__":
    main()
