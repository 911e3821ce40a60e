"""Train the digits U-Net over several processes with DDP or FSDP, launched by torchrun.

One machine, 2 processes (CPU: gloo; one GPU each: nccl)::

    torchrun --nproc_per_node=2 examples/train_ddp.py --out runs/ddp --steps 500
    torchrun --nproc_per_node=2 examples/train_ddp.py --out runs/fsdp --parallel fsdp --precision bf16

Two machines with 8 GPUs each (run on both; node 0's address and a free port)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        examples/train_ddp.py --out /shared/runs/ddp

``--batch-size`` is the global batch; it must be divisible by (number of processes) x
``--grad-accum``. Rerun the same command (at any number of processes) to resume from ``--out``.
See docs/distributed.md.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.distributed as dist

from difflab.data import load_digits
from difflab.demos.digits import DEMO_SPEC, DEMO_TRAIN
from difflab.io.spec import build_denoiser
from difflab.train import train
from difflab.train.distributed import PARALLELS, init_distributed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run directory (checkpoint, log); on a file system every node sees")
    p.add_argument("--parallel", default="ddp", choices=PARALLELS)
    p.add_argument("--steps", type=int, default=DEMO_TRAIN.steps)
    p.add_argument("--batch-size", type=int, default=DEMO_TRAIN.batch_size, help="global batch, over all processes")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process and step")
    p.add_argument("--lr", type=float, default=DEMO_TRAIN.lr)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--checkpoint-every", type=int, default=DEMO_TRAIN.checkpoint_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="nccl or gloo (default: nccl on CUDA, gloo on the CPU)")
    args = p.parse_args(argv)

    # 1. Join the process group torchrun set up; this process's device is cuda:LOCAL_RANK (or the CPU)
    device = init_distributed(args.backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.parallel == "none" and dist.is_initialized() and dist.get_world_size() > 1:
        raise SystemExit("--parallel none under torchrun would train the same run in every process; use ddp or fsdp")
    if device.type == "cpu":
        torch.set_num_threads(1)  # processes share the cores

    # 2. Data and model: the same on every rank (the global batch of each step is drawn from (seed, step))
    images, labels = load_digits(split="train")
    denoiser = build_denoiser(DEMO_SPEC).to(device)
    config = dataclasses.replace(DEMO_TRAIN, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                 lr=args.lr, precision=args.precision, checkpoint_every=args.checkpoint_every,
                                 seed=args.seed, parallel=args.parallel)

    # 3. Train: rank 0 logs and writes the checkpoint
    state = train(denoiser, (images, labels), config, args.out, spec=DEMO_SPEC, metadata={"data": "digits", "size": 8})
    if rank == 0:
        print(f"done at step {state.step} with {dist.get_world_size() if dist.is_initialized() else 1} process(es); "
              f"checkpoint: {state.checkpoint}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
