"""Data parallelism over processes with PyTorch's own DDP (Li et al. 2020, "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training") and FSDP (Zhao et al. 2023, "PyTorch FSDP";
the per-parameter ``fully_shard`` of torch >= 2.4), launched with ``torchrun``.

The global batch of step s is drawn exactly as in one process (indices, sigmas, noise and the
label-dropout mask are functions of (seed, s)); rank r of W takes the contiguous slice
``[r B/W, (r + 1) B/W)`` and splits it into ``grad_accum`` micro-batches. Each rank normalizes
its loss by its own B/W examples and DDP/FSDP average the gradients over the W ranks:

    (1/W) sum_r sum_{i in r} grad l_i / (B/W) = sum_i grad l_i / B,

the single-process gradient, up to the order of the floating-point sums.

- ``ddp``: every rank holds the whole net, optimizer and EMA; gradients are all-reduced once per
  optimizer step (``no_sync`` during the first ``grad_accum - 1`` micro-batches). The EMA is
  updated identically on every rank.
- ``fsdp``: ``fully_shard`` on every element of an ``nn.ModuleList`` (a U-Net's or a transformer's
  blocks), then on the root; parameters, gradients, AdamW moments and the EMA shadows are DTensors
  sharded along dim 0, each rank updating its own shard of the EMA.

Checkpoints stay difflab's single safetensors file with full (unsharded) tensors: every rank takes
part in gathering them, rank 0 writes. So a run resumes at any world size, with or without DDP or
FSDP; loading shards the full tensors again. The net's own RNG (dropout) differs per rank; each
rank's RNG state is saved (``rng.torch`` for rank 0, ``rng.torch.rank{r}`` for the others).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from .objective import objective_name


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's sharded tensor). torch.distributed.tensor is not imported
    here (it costs a second at every start, the CLI's included); none exists before FSDP imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)

PARALLELS = ("none", "ddp", "fsdp")


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl on CUDA, gloo on the CPU; CUDA processes use
    ``cuda:LOCAL_RANK``. Returns the device to train on. Without torchrun's variables (a plain
    ``python`` run) no group is made. Calling it again is harmless."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_available() and not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), device_id=device if cuda else None)
    return device


def local_slice(batch_size: int, grad_accum: int, rank: int, world_size: int) -> slice:
    """The examples of the global batch that ``rank`` of ``world_size`` trains on."""
    if batch_size % (world_size * grad_accum):
        raise ValueError(f"batch_size={batch_size} must be divisible by world_size * grad_accum = {world_size} * {grad_accum}: "
                         f"each of the {world_size} processes takes an equal contiguous slice of the global batch and "
                         f"splits it into {grad_accum} micro-batches")
    n = batch_size // world_size
    return slice(rank * n, (rank + 1) * n)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (an all-gather, every rank must call it); other tensors as they are."""
    return t.full_tensor() if is_dtensor(t) else t


def fsdp_units(net: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one, innermost first: the elements of every ``nn.ModuleList``
    that are not lists themselves and have parameters (a U-Net's ResBlocks and attention layers,
    a transformer's blocks). The root is sharded last and keeps the rest."""
    units = [child for m in net.modules() if isinstance(m, nn.ModuleList) for child in m
             if not isinstance(child, nn.ModuleList) and any(True for _ in child.parameters())]
    ids = {id(u) for u in units}
    return [m for m in reversed(list(net.modules())) if id(m) in ids]  # children before their parents


class ObjectiveLoss(nn.Module):
    """An objective's ``loss(batch)`` as the forward of a module holding ``objective.module``, so
    that DDP wraps the whole loss computation (whatever networks the objective calls inside it)."""

    def __init__(self, objective):
        super().__init__()
        self.module = objective.module
        self.objective = [objective]  # a list: not a submodule (a frozen teacher stays out of DDP)

    def forward(self, batch: dict):
        return self.objective[0].loss(batch)


class Parallel:
    """How one training step is spread over processes; ``Parallel()`` is a single process, whose
    every method is the identity (the single-process loop stays bit-identical).

    ``Parallel.setup(objective, config)`` joins torchrun's process group, checks the batch and
    wraps the objective: DDP around :class:`ObjectiveLoss` (``self.loss`` computes the loss
    through it; ``objective.module`` stays bare, for checkpoints and EMA), FSDP by sharding
    ``objective.module`` in place (``self.loss`` is None: the objective's own loss is called).
    """

    def __init__(self, mode: str = "none", rank: int = 0, world_size: int = 1, batch_slice: slice | None = None,
                 loss: nn.Module | None = None, net: nn.Module | None = None):
        self.mode, self.rank, self.world_size, self.batch_slice = mode, rank, world_size, batch_slice
        self.loss = loss  # DDP: the DDP-wrapped ObjectiveLoss
        self.net = net    # FSDP: the sharded module (sharded in place)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, progress and checkpoints."""
        return self.rank == 0

    @classmethod
    def setup(cls, objective, config) -> "Parallel":
        """Build the parallel state of ``config.parallel`` for ``objective`` (before its optimizer)."""
        mode = config.parallel
        if mode == "none":
            return cls()
        if not dist.is_available():
            raise RuntimeError(f"parallel={mode!r} needs torch.distributed, which this torch build lacks")
        init_distributed()
        if not dist.is_initialized():
            raise RuntimeError(f"parallel={mode!r} needs a process group: launch with torchrun (it sets RANK, WORLD_SIZE, "
                               "MASTER_ADDR, MASTER_PORT) or call torch.distributed.init_process_group first")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        batch_slice = local_slice(config.batch_size, config.grad_accum, rank, world_size)
        net = objective.module
        device = next(net.parameters()).device
        if mode == "ddp":
            ddp = nn.parallel.DistributedDataParallel(ObjectiveLoss(objective),
                                                      device_ids=[device.index] if device.type == "cuda" else None)
            return cls(mode, rank, world_size, batch_slice, loss=ddp)
        if config.precision == "fp16":
            raise ValueError("precision='fp16' with parallel='fsdp' is not supported (GradScaler's inf check would see only "
                             "each rank's shard); use 'bf16', which needs no loss scaling")
        if isinstance(net, (nn.ModuleDict, nn.ModuleList)):
            raise ValueError(f"parallel='fsdp' shards a module whose forward the objective {objective_name(objective)!r} "
                             f"calls; its module is a {type(net).__name__}: use 'ddp'")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # fully_shard keeps each rank's own values: start all ranks from rank 0's, as DDP does
            for t in net.state_dict().values():
                dist.broadcast(t, src=0)
        mesh = init_device_mesh(device.type, (world_size,))
        for unit in fsdp_units(net):
            fully_shard(unit, mesh=mesh)
        fully_shard(net, mesh=mesh)
        return cls(mode, rank, world_size, batch_slice, net=net)

    # ------------------------------------------------------------------------------------------
    # One step

    def local(self, batch: dict) -> dict:
        """This rank's contiguous slice of the global batch."""
        if self.batch_slice is None:
            return batch
        return {k: (v[self.batch_slice] if v is not None else None) for k, v in batch.items()}

    @property
    def no_sync(self):
        """A context-manager factory for micro-batches whose gradients are not yet reduced, or None."""
        if self.mode == "ddp":
            return self.loss.no_sync
        if self.mode == "fsdp":
            return self._fsdp_no_sync
        return None

    @contextlib.contextmanager
    def _fsdp_no_sync(self):
        self.net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.net.set_requires_gradient_sync(True)

    def gather(self, losses: torch.Tensor) -> torch.Tensor:
        """The (B,) per-example losses of the global batch, in its order, on every rank."""
        if self.world_size == 1:
            return losses
        parts = [torch.empty_like(losses) for _ in range(self.world_size)]
        dist.all_gather(parts, losses.contiguous())
        return torch.cat(parts)

    # ------------------------------------------------------------------------------------------
    # Full (unsharded) state for checkpoints; every rank must call these, in the same order

    def full_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with DTensors gathered to whole CPU tensors (kept on rank 0 only)."""
        if self.mode != "fsdp":
            return state
        out = {}
        for k, v in state.items():
            v = full_tensor(v)
            if self.is_main:
                out[k] = v.detach().cpu() if is_dtensor(state[k]) else v
        return out

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` with its moments gathered whole (index-keyed, as in one process)."""
        sd = optimizer.state_dict()
        if self.mode != "fsdp":
            return sd
        return {"state": {i: self.full_state(s) for i, s in sd["state"].items()}, "param_groups": sd["param_groups"]}

    def shard(self, full: dict[str, torch.Tensor], like: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """The inverse of :meth:`full_state`: ``full[prefix + k]`` cut into this rank's shard
        wherever ``like[k]`` is a DTensor of the same shape; other entries unchanged."""
        if self.mode != "fsdp":
            return full
        from torch.distributed.tensor import distribute_tensor

        out = dict(full)
        for k, ref in like.items():
            v = full.get(prefix + k)
            if is_dtensor(ref) and v is not None and v.shape == ref.shape:
                # src_data_rank=None: every rank holds the whole tensor and keeps its own shard, no communication
                out[prefix + k] = distribute_tensor(v.to(ref.device, ref.dtype), ref.device_mesh, ref.placements,
                                                    src_data_rank=None)
        return out

    def shard_optimizer_state(self, sd: dict, optimizer: torch.optim.Optimizer) -> dict:
        """A full ``optimizer.state_dict()`` cut to the shards of this rank's parameters."""
        if self.mode != "fsdp":
            return sd
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {i: self.shard(s, {k: params[int(i)] for k in s}) for i, s in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"]}

    def rng_key(self, name: str) -> str:
        """Checkpoint key of this rank's RNG state: ``rng.torch`` on rank 0, ``rng.torch.rank{r}`` elsewhere."""
        return name if self.rank == 0 else f"{name}.rank{self.rank}"

    def other_rng_states(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The RNG states of ranks 1..W-1 under their :meth:`rng_key` (on rank 0; empty elsewhere)."""
        if self.world_size == 1:
            return {}
        mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        states = [None] * self.world_size
        dist.all_gather_object(states, mine)
        out = {}
        for r, (cpu, cuda) in enumerate(states[1:], start=1):
            out[f"rng.torch.rank{r}"] = cpu
            if cuda is not None:
                out[f"rng.cuda.rank{r}"] = cuda
        return out if self.is_main else {}

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Drop the DDP wrapper (its gradient hooks on the module's parameters go with it)."""
        self.loss = None


__all__ = ["PARALLELS", "init_distributed", "local_slice", "full_tensor", "fsdp_units", "ObjectiveLoss", "Parallel"]
