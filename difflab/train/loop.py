"""The training loop, one for every objective: short and explicit.

:func:`fit` trains an objective (:mod:`difflab.train.objective`: a ``module``, ``draw`` and a
per-example ``loss``). One optimizer step:

1. draw the batch: the example indices (one random permutation of the data per epoch) and the
   objective's random draws (noise levels, noise, label dropout, augmentation) are functions of
   (seed, step) alone, so resuming from a checkpoint continues bit-identically on the CPU;
2. forward and backward in ``grad_accum`` micro-batches, under bf16/fp16 autocast if asked,
   with the auxiliary losses the module's layers record (:mod:`difflab.nn.aux`) added;
3. clip the gradient norm, stop with :class:`TrainingDivergedError` if the loss or the norm
   is not finite (before the update, so the weights and the last checkpoint stay good);
4. AdamW step at the scheduled learning rate (:func:`lr_at`), the objective's ``after_step``,
   EMA update;
5. log the loss (by noise level when the batch has a ``"sigma"``), checkpoint atomically every
   ``checkpoint_every`` steps after checking the whole state is finite (:func:`write_checkpoint`:
   if it is not, nothing is written and the run rolls back to the last good checkpoint);
6. on Ctrl-C or SIGTERM, checkpoint the step just taken and stop (:mod:`difflab.train.interrupt`).

The run folder is locked for the run's life and cleaned of a crash's debris on start
(:mod:`difflab.train.run_folder`).

The module's own randomness (dropout) uses torch's global generator: it is seeded from
``config.seed`` inside :func:`torch.random.fork_rng` (the caller's RNG is left untouched) and
its state is checkpointed.

``TrainConfig(parallel="ddp" | "fsdp")`` spreads each step over the processes of a ``torchrun``
launch (:mod:`difflab.train.distributed`): the global batch is drawn as above, each rank trains
on its slice, and the parameters match one process up to the order of floating-point sums.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from difflab.config import check_types, from_dict
from difflab.core import sample_seed
from difflab.data.provenance import provenance
from difflab.io.checkpoint import (checkpoint_path, load_checkpoint, load_model_state, non_finite,
                                   optimizer_state_from_tensors, optimizer_state_to_tensors, save_checkpoint, strip_prefix)
from difflab.nn.aux import AUX_LOSS, clear_aux_losses, collect_aux_loss
from difflab.perf.fast import autocast
from difflab.perf.fp8 import fp8_layers, swap_fp8_training
from difflab.progress import progress_bar

from .distributed import PARALLELS, Parallel, full_tensor
from .ema import EMA
from .interrupt import TrainingInterrupted, graceful_stop
from .run_folder import LOG_NAME, locked_run, truncate_log
from .losses import NOISE_LEVELS, WEIGHTINGS, SigmaBinnedLoss
from .objective import objective_name, param_groups, split_loss, trainable_parameters

PRECISIONS = ("fp32", "bf16", "fp16")
LOSSES = ("mse", "hybrid")  # the diffusion objective's losses: losses.diffusion_loss; vlb.hybrid_loss (learned variance)
LR_SCHEDULES = ("constant", "cosine", "one_cycle")
ONE_CYCLE_DIV, ONE_CYCLE_FINAL_DIV = 25.0, 1e4  # torch.optim.lr_scheduler.OneCycleLR's div_factor, final_div_factor
CHECKPOINT_KIND = "difflab.train"
# Config fields that may change when resuming without changing the math of the steps taken
# (``steps`` only with the constant schedule: cosine and one-cycle decay over the run's steps).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "progress", "parallel")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10_000                # total optimizer steps; a resumed run continues up to this
    batch_size: int = 64               # examples per optimizer step
    grad_accum: int = 1                # micro-batches per step (batch_size / grad_accum examples each)
    lr: float = 1e-4                   # AdamW learning rate at the top of the schedule
    lr_schedule: str = "constant"      # "constant", "cosine" or "one_cycle" (see lr_at)
    warmup_steps: int = 0              # constant/cosine: linear warmup; one_cycle: the rising phase
    weight_decay: float = 0.0          # AdamW decoupled weight decay, on every parameter
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0      # max global gradient norm; None: no clipping (norm still logged)
    ema_decay: float | None = 0.9999   # EMA decay, warmed up as min(decay, (1 + t) / (10 + t)); None: no EMA
    precision: str = "fp32"            # "fp32", "bf16" (autocast, CPU or CUDA), "fp16" (autocast + GradScaler, CUDA only)
    fp8: bool = False                  # linears and 1x1 convs in FP8, delayed scaling (perf.fp8); with fp32 or bf16
    # the diffusion objective's settings (objectives/diffusion.py; train() builds it from them)
    cfg_dropout: float = 0.0           # probability of replacing a class label by the null class (Ho & Salimans 2022)
    weighting: str = "simple"          # loss weighting: "simple", "min_snr", "edm" (see losses.loss_weight)
    min_snr_gamma: float = 5.0         # gamma of min-SNR weighting (Hang et al. 2023)
    loss: str = "mse"                  # "mse": losses.diffusion_loss; "hybrid": + vlb_weight * L_vlb (vlb.hybrid_loss; learned variance)
    vlb_weight: float = 0.001          # lambda of the hybrid loss (Nichol & Dhariwal 2021, eq. 16)
    aux_loss_weight: float = 1.0       # weight of the auxiliary losses layers record (difflab.nn.aux; MoE load balancing)
    noise_level: str | None = None     # training sigma distribution (losses.NOISE_LEVELS); None: by frame
    noise_level_kwargs: dict = field(default_factory=dict)  # e.g. {"p_mean": -1.2, "p_std": 1.2}
    # the loop's bookkeeping
    checkpoint_every: int = 1000       # steps between checkpoints (one is also written at the end); 0: end only
    log_every: int = 100               # steps between log lines (loss, by noise level when there is one)
    seed: int = 0                      # seeds data order, the objective's draws and the module's own RNG
    progress: bool = True              # tqdm progress bar
    parallel: str = "none"             # "none", "ddp" or "fsdp" over torchrun's processes (train/distributed.py)

    def __post_init__(self):
        check_types(TrainConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "TrainConfig")
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        for name in ("warmup_steps", "checkpoint_every", "log_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} must be a finite number > 0")
        for name in ("weight_decay", "adam_eps", "min_snr_gamma", "vlb_weight", "aux_loss_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number >= 0")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip={self.grad_clip} must be a finite number > 0 or None (no clipping)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {list(PRECISIONS)}")
        if self.fp8 and self.precision == "fp16":
            raise ValueError("fp8=True combines with precision 'fp32' or 'bf16', not 'fp16': FP8's per-tensor gradient "
                             "scaling replaces fp16's loss scaling (GradScaler), whose backoffs would make the delayed "
                             "scales stale")
        if self.fp8 and self.parallel != "none":
            raise ValueError(f"fp8=True trains in one process (parallel='none'), not parallel={self.parallel!r}: "
                             "the FP8 amax histories are not all-reduced across processes")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {list(LR_SCHEDULES)}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1] or None (no EMA)")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} must be one of {list(WEIGHTINGS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} must be one of {list(LOSSES)}")
        if not self.vlb_weight >= 0:
            raise ValueError(f"vlb_weight={self.vlb_weight} must be non-negative")
        if self.noise_level is not None and self.noise_level not in NOISE_LEVELS:
            raise ValueError(f"noise_level={self.noise_level!r} must be one of {sorted(NOISE_LEVELS)} or None")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of grad_accum={self.grad_accum}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        if self.parallel not in PARALLELS:
            raise ValueError(f"parallel={self.parallel!r} must be one of {list(PARALLELS)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict, section: str = "train") -> "TrainConfig":
        """The config of a JSON dict; an unknown key is a :class:`difflab.config.ConfigError`
        naming it and the closest valid key (:func:`difflab.config.from_dict`)."""
        return from_dict(cls, d, section)

    @classmethod
    def from_checkpoint(cls, d: dict) -> "TrainConfig":
        """The config recorded in a training checkpoint, of this or an older version: keys this
        version does not know are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in d.items() if k in names}, "checkpoint train_config")


class TrainingDivergedError(RuntimeError):
    """Training stopped being finite at ``step``: the loss or gradient norm (the update of ``step``
    was not applied) or, before a checkpoint, the parameters, EMA or optimizer state (``bad``
    names them; nothing was written). ``checkpoint`` is the last good checkpoint, of step
    ``good_step``; when the weights in memory were not finite the run was rolled back to it."""

    def __init__(self, step: int, loss: float, grad_norm: float, checkpoint: str | None, *, bad: list[str] = (),
                 good_step: int | None = None, rolled_back: bool = False):
        self.step, self.loss, self.grad_norm, self.checkpoint = step, loss, grad_norm, checkpoint
        self.bad, self.good_step, self.rolled_back = list(bad), good_step, rolled_back
        if self.bad:
            shown = ", ".join(self.bad[:3]) + (f" and {len(self.bad) - 3} more" if len(self.bad) > 3 else "")
            what = f"after step {step} these tensors are not finite: {shown}; no checkpoint was written"
        else:
            what = f"at step {step}: loss={loss}, grad_norm={grad_norm}; the update was not applied"
        if checkpoint:
            last = f"the last good checkpoint is {checkpoint} (step {good_step})"
            last += f"; rolled back to step {good_step}" if rolled_back else ""
        else:
            last = "no checkpoint was written yet"
        super().__init__(f"training diverged {what}; {last}. Lower the learning rate (or clip gradients) and resume")


@dataclass
class TrainState:
    step: int                                   # optimizer steps completed
    objective: object                           # what fit trained (its .module holds the weights)
    optimizer: torch.optim.Optimizer
    ema: EMA | None                             # None when config.ema_decay is None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    history: list = field(default_factory=list)  # log entries (dicts), one every log_every steps
    checkpoint: str | None = None               # path of the last checkpoint written or resumed from
    checkpoint_step: int | None = None          # the step it holds
    parallel: Parallel = field(default_factory=Parallel)  # DDP/FSDP over processes; default one process
    base_lrs: list = field(default_factory=list)  # each optimizer group's lr at the top of the schedule

    @property
    def module(self) -> torch.nn.Module:
        return self.objective.module

    @property
    def denoiser(self):
        """The diffusion objective's denoiser (None for objectives without one)."""
        return getattr(self.objective, "denoiser", None)


# ----------------------------------------------------------------------------------------------
# Data and the random draws of one step


def as_rows(data: dict) -> dict[str, torch.Tensor]:
    """Check that ``data`` maps names to tensors with one row per example (N, ...), N >= 1."""
    if not isinstance(data, dict) or not data:
        raise ValueError(f"data must be a non-empty dict of per-example tensors (N, ...), got {type(data).__name__}")
    n = None
    for name, value in data.items():
        if not torch.is_tensor(value) or value.ndim < 1 or len(value) == 0 or (n is not None and len(value) != n):
            raise ValueError(f"data[{name!r}] must be a tensor with one row per example ({n or 'N'}, ...), got "
                             f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}")
        n = len(value)
    return data


def stream_seed(seed: int, stream: int, i: int) -> int:
    """Seed of item ``i`` of random stream ``stream``: 0 the objective's draws of step i, 1 the data
    order of epoch i, 2 the module's own RNG of rank i."""
    return sample_seed(sample_seed(seed, stream), i)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the module's own RNG on ``rank`` from ``step``: ``seed`` itself for rank 0 at step 0."""
    return seed if rank == step == 0 else sample_seed(stream_seed(seed, 2, rank), step)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Example indices of ``step``: the run walks through one random permutation of the N
    examples per epoch, permutation e drawn from (seed, e); a batch may span two epochs."""
    k = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, out = k // n, torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(seed, 1, e)))
        mask = epochs == e
        out[mask] = perm[k[mask] % n]
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of the objective's draws at 0-based ``step``."""
    return torch.Generator().manual_seed(stream_seed(seed, 0, step))


def draw_step(objective, data: dict, config: TrainConfig, step: int) -> dict:
    """The whole batch of 0-based ``step``: the data's rows of :func:`batch_indices`, with the
    objective's draws from :func:`step_generator` merged over them."""
    idx = batch_indices(len(next(iter(data.values()))), config.batch_size, step, config.seed)
    rows = {k: v[idx.to(v.device)] for k, v in data.items()}
    drawn = objective.draw(rows, step_generator(config.seed, step))
    batch = {**rows, **drawn}
    for name, value in batch.items():
        if value is not None and (not torch.is_tensor(value) or value.ndim < 1 or len(value) != config.batch_size):
            raise ValueError(f"{objective_name(objective)}.draw: batch[{name!r}] must be a ({config.batch_size}, ...) tensor "
                             f"or None, got {tuple(getattr(value, 'shape', ())) or type(value).__name__}")
    return batch


# ----------------------------------------------------------------------------------------------
# One step


def accumulate_gradients(objective, batch: dict, config: TrainConfig, scaler=None, no_sync=None,
                         loss_fn: Callable | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward over ``config.grad_accum`` micro-batches, accumulating the gradient
    of mean(per-example loss) over the whole batch into ``.grad``; returns the (B,) losses and
    the objective's other per-example terms. ``no_sync``: a context-manager factory (DDP's
    ``no_sync``) entered for every micro-batch but the last, so gradients are reduced across
    processes once per step. ``loss_fn``: what computes the loss (default ``objective.loss``;
    under DDP its wrapper).

    Auxiliary losses that layers of ``objective.module`` record in their forward
    (:mod:`difflab.nn.aux`, e.g. a mixture-of-experts router's load balancing) are added, times
    ``config.aux_loss_weight``, to each micro-batch's mean loss, and returned as the term
    ``"aux_loss"`` (the micro-batch's value for each of its examples); without them nothing changes."""
    device = next(objective.module.parameters()).device
    loss_fn = loss_fn or objective.loss
    batch = {k: (v.to(device) if v is not None else None) for k, v in batch.items()}
    B = len(next(v for v in batch.values() if v is not None))
    m = B // config.grad_accum
    losses, terms = [], {}
    for i in range(config.grad_accum):
        micro = {k: (v[i * m:(i + 1) * m] if v is not None else None) for k, v in batch.items()}
        clear_aux_losses(objective.module)
        with no_sync() if no_sync is not None and i < config.grad_accum - 1 else contextlib.nullcontext():
            with autocast(config.precision, device):
                loss, extra = split_loss(loss_fn(micro))
            if loss.shape != (m,):
                raise ValueError(f"{objective_name(objective)}.loss must return one loss per example ({m},), "
                                 f"got shape {tuple(loss.shape)}")
            total = loss.sum() / B
            aux = collect_aux_loss(objective.module)
            if aux is not None:  # a micro-batch's term, weighted by its share of the batch
                total = total + config.aux_loss_weight * aux * (m / B)
                extra = {**extra, AUX_LOSS: aux.detach().expand(m)}
            (scaler.scale(total) if scaler is not None else total).backward()
        losses.append(loss.detach())
        for k, v in extra.items():
            terms.setdefault(k, []).append(v.detach())
    return torch.cat(losses), {k: torch.cat(v) for k, v in terms.items()}


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of 0-based ``step`` (W = ``warmup_steps``, S = ``steps``):

    - ``"constant"``: linear warmup from lr/W to lr, then lr;
    - ``"cosine"``: the same warmup, then lr (1 + cos(pi p)) / 2, p = (step - W) / (S - W)
      (Loshchilov & Hutter 2017, SGDR without restarts; ``CosineAnnealingLR`` when W = 0);
    - ``"one_cycle"``: torch's ``OneCycleLR`` (Smith & Topin 2019) with pct_start = W / S:
      cosine from lr/25 up to lr over steps 0..W-1, then down to lr/25/1e4 at step S - 1."""
    lr, w, s = config.lr, config.warmup_steps, config.steps
    if config.lr_schedule == "one_cycle":
        initial = lr / ONE_CYCLE_DIV
        up_end, down_end = float(w) - 1, float(s) - 1
        if step <= up_end:
            start, end, pct = initial, lr, step / up_end if up_end > 0 else 1.0
        else:
            span = down_end - up_end
            start, end, pct = lr, initial / ONE_CYCLE_FINAL_DIV, (step - up_end) / span if span > 0 else 1.0
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    if w > 0 and step < w:
        return lr * (step + 1) / w
    if config.lr_schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(s - w, 1))))
    return lr


def make_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over parameter ``groups``, fused where torch supports it, else foreach."""
    kw = dict(lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


def optimizer_step(state: TrainState, batch: dict, config: TrainConfig, lr: float) -> tuple[torch.Tensor, dict, float]:
    """Steps 2-4 of the module doc for one batch: returns the (B,) losses, the objective's other
    per-example terms and the gradient norm. Raises :class:`TrainingDivergedError` (before any
    update) when the loss or the norm is not finite."""
    objective, scaler, optimizer, par = state.objective, state.scaler, state.optimizer, state.parallel
    for group, base in zip(optimizer.param_groups, state.base_lrs):  # every group follows the schedule
        group["lr"] = lr if base == config.lr else base * (lr / config.lr if config.lr else 1.0)
    # DDP/FSDP: this rank's slice of the global batch; the losses of the whole batch come back
    losses, terms = accumulate_gradients(objective, par.local(batch), config, scaler, no_sync=par.no_sync, loss_fn=par.loss)
    losses, terms = par.gather(losses), {k: par.gather(v) for k, v in terms.items()}
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, config.grad_clip or math.inf)))
    loss = float(losses.mean())
    # fp16: a non-finite gradient is an overflow; GradScaler skips that update and lowers its scale.
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and scaler is None):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(state.step + 1, loss, grad_norm, state.checkpoint, good_step=state.checkpoint_step)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if callable(getattr(objective, "after_step", None)):
        objective.after_step()
    if state.ema is not None:
        state.ema.update(objective.module)
    state.step += 1
    return losses, terms, grad_norm


# ----------------------------------------------------------------------------------------------
# Checkpoints


def training_checkpoint(state: TrainState, config: TrainConfig, *, spec: dict | None, metadata: dict | None,
                        **extra_meta) -> tuple[dict, dict]:
    """(tensors, metadata) of a training checkpoint; see :func:`fit`."""
    module, par = state.module, state.parallel
    device = next(module.parameters()).device
    # DDP/FSDP: every rank calls this (FSDP gathers its shards); rank 0 gets the full tensors and writes them
    optim_tensors, optim_meta = optimizer_state_to_tensors(par.full_optimizer_state(state.optimizer), prefix="optim.")
    tensors = {f"model.{k}": v for k, v in par.full_state(module.state_dict()).items()}
    if state.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in par.full_state(state.ema.state_dict()).items()})
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    tensors.update(par.other_rng_states(device))
    meta = {
        "kind": CHECKPOINT_KIND,
        "step": state.step,
        "objective": objective_name(state.objective),
        "train_config": config.to_dict(),
        "net_class": type(module).__name__,
        "spec": spec,
        "ema": {"decay": state.ema.decay, "num_updates": state.ema.num_updates} if state.ema is not None else None,
        "optimizer": optim_meta,
        "grad_scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "metadata": metadata or {},
        "torch_version": torch.__version__,
        "world_size": par.world_size,
        **extra_meta,
    }
    return tensors, meta


def restore_training_state(state: TrainState, config: TrainConfig, path) -> None:
    """Load module, EMA, optimizer, grad scaler, RNG state and step from a training checkpoint
    (written at any world size: its tensors are whole; FSDP cuts them into this rank's shards)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a training checkpoint (kind={meta.get('kind')!r})")
    saved = TrainConfig.from_checkpoint(meta["train_config"])
    free = [n for n in RESUMABLE_CHANGES if not (n == "steps" and config.lr_schedule != "constant")]  # a decay spans the steps
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in free and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        warnings.warn(f"resuming {path} with a changed config ({', '.join(changed)}): the run will not match an uninterrupted one")
    module, par = state.module, state.parallel
    device = next(module.parameters()).device
    load_model_state(module, par.shard(tensors, module.state_dict(), prefix="model."), prefix="model.")
    if state.ema is not None and meta.get("ema"):
        ema = par.shard({k: v.to(device) for k, v in strip_prefix(tensors, "ema.").items()}, state.ema.shadow)
        state.ema.load_state_dict(ema, meta["ema"]["num_updates"])
    optim = optimizer_state_from_tensors(tensors, meta["optimizer"])
    state.optimizer.load_state_dict(par.shard_optimizer_state(optim, state.optimizer))
    if state.scaler is not None and meta.get("grad_scaler"):
        state.scaler.load_state_dict(meta["grad_scaler"])
    if par.rng_key("rng.torch") in tensors:
        torch.set_rng_state(tensors[par.rng_key("rng.torch")])
        if device.type == "cuda" and par.rng_key("rng.cuda") in tensors:
            torch.cuda.set_rng_state(tensors[par.rng_key("rng.cuda")], device)
    else:  # a rank the saving run did not have
        _seed_module_rng(device, _rank_seed(config.seed, par.rank, int(meta["step"])))
    state.step = int(meta["step"])
    state.checkpoint, state.checkpoint_step = str(path), state.step


def non_finite_state(state: TrainState, tensors: dict | None = None) -> list[str]:
    """Names of the parameters, EMA weights and optimizer moments that hold NaN or infinity:
    of ``tensors`` (a :func:`training_checkpoint`'s) when given, else of the state in memory."""
    if tensors is None:
        tensors = {f"model.{k}": full_tensor(v) for k, v in state.module.state_dict().items()}
        if state.ema is not None:
            tensors.update({f"ema.{k}": full_tensor(v) for k, v in state.ema.state_dict().items()})
        for i, s in state.optimizer.state.items():
            tensors.update({f"optim.state.{i}.{k}": full_tensor(v) for k, v in s.items() if torch.is_tensor(v)})
    return non_finite({k: v for k, v in tensors.items() if not k.startswith("rng.")})


def roll_back(state: TrainState, config: TrainConfig) -> bool:
    """Reload the last good checkpoint into ``state`` when the weights in memory are not finite;
    True when it did."""
    if state.checkpoint is None or not any(non_finite_state(state)):
        return False
    restore_training_state(state, config, state.checkpoint)
    return True


def write_checkpoint(state: TrainState, config: TrainConfig, path: Path, **kw) -> None:
    """Write the training checkpoint of ``state`` to ``path`` (rank 0), after checking that every
    parameter, EMA weight and optimizer moment is finite: if one is not, the previous checkpoint
    is kept, the run is rolled back to it and :class:`TrainingDivergedError` names the tensors."""
    tensors, meta = training_checkpoint(state, config, **kw)
    par = state.parallel
    bad = non_finite_state(state, tensors) if par.is_main else []
    if par.world_size > 1:  # every rank must agree to stop
        any_bad = par.gather(torch.tensor([float(len(bad))], device=next(state.module.parameters()).device))
        bad = bad or (["(on rank 0)"] if float(any_bad.sum()) > 0 else [])
    if bad:
        step = state.step
        rolled_back = roll_back(state, config)
        raise TrainingDivergedError(step, math.nan, math.nan, state.checkpoint, bad=bad, good_step=state.checkpoint_step,
                                    rolled_back=rolled_back)
    state.checkpoint = str(save_checkpoint(path, tensors, meta) if par.is_main else path)
    state.checkpoint_step = state.step


# ----------------------------------------------------------------------------------------------
# The loop


def fit(objective, data: dict, config: TrainConfig, out_dir=None, *, metadata: dict | None = None, resume: bool = True,
        callback: Callable[[dict], None] | None = None, spec: dict | None = None, data_source=None,
        **extra_meta) -> TrainState:
    """Train ``objective.module`` on ``data`` for ``config.steps`` optimizer steps; see the module
    doc and :mod:`difflab.train.objective` for what an objective is.

    ``data``: a dict of per-example tensors (N, ...); each step takes the rows of
    :func:`batch_indices` and hands them to ``objective.draw``. Training runs on the device of
    the module's parameters; the module is in train mode during the run, then as it was.

    ``out_dir=None`` trains in memory: no checkpoint, no log file. Otherwise checkpoints go to
    ``out_dir/checkpoint.safetensors`` (+ ``checkpoint.json``), overwritten atomically every
    ``checkpoint_every`` steps and at the end; with ``resume`` an existing one is continued
    (``resume=False`` starts afresh and overwrites it). Tensors: ``model.*`` (the module's state
    dict), ``ema.*`` (EMA weights, same keys), ``optim.*`` (AdamW), ``rng.torch`` (``rng.cuda``);
    metadata: the step, the objective's name, the config, ``spec`` (what rebuilds the module),
    ``metadata`` (anything JSON), ``extra_meta`` (more top-level JSON entries) and
    ``data_provenance``: :func:`difflab.data.provenance.provenance` of ``data`` (a SHA-256 of the
    training tensors) with ``data_source`` (``"digits"``, the image folder, or a dict) when given.
    ``callback(dict(step=, loss=, grad_norm=, lr=, state=))`` runs after every step. A log entry
    (mean loss, the objective's other terms, loss by sigma bin, grad norm, lr, seconds) is
    appended to ``state.history`` (and ``out_dir/log.jsonl``) every ``log_every`` steps.

    ``config.parallel="ddp"`` or ``"fsdp"``: run under ``torchrun``, one process per device, each
    with the same arguments (the module on ``cuda:LOCAL_RANK``, see
    :func:`difflab.train.distributed.init_distributed`). Rank 0 alone writes the log, the progress
    bar and the checkpoint; ``out_dir`` must be on a file system every rank sees. With FSDP the
    module is sharded in place: after training, sample from the checkpoint.
    """
    # 1. Check inputs
    data = as_rows(data)
    extra_meta["data_provenance"] = provenance(data, data_source)
    module = objective.module
    device = next(module.parameters()).device
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs CUDA (torch.amp.GradScaler); use 'bf16' on the CPU")
    path = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = checkpoint_path(out_dir)
    prepare_module(module, config)
    was_training = module.training
    module.train()
    parallel = Parallel.setup(objective, config)  # DDP wraps the loss, FSDP shards the module: before the optimizer

    # 2. Optimizer, EMA, grad scaler
    groups = param_groups(objective, config)
    state = TrainState(step=0, objective=objective, optimizer=make_optimizer(groups, config),
                       ema=EMA(module, config.ema_decay) if config.ema_decay is not None else None,
                       scaler=torch.amp.GradScaler("cuda") if config.precision == "fp16" else None, parallel=parallel,
                       base_lrs=[g["lr"] for g in groups])

    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    bar = progress_bar(config.steps, desc=objective_name(objective), unit="step",
                       disable=not (config.progress and parallel.is_main))
    try:
        # the run folder's lock, held by rank 0; Ctrl-C / SIGTERM stop after a step (one process only)
        with locked_run(path, enabled=path is not None and parallel.is_main), \
                graceful_stop(enabled=parallel.world_size == 1) as stop, torch.random.fork_rng(devices=cuda_devices):
            _run(state, data, config, path, bar, stop, spec=spec, metadata=metadata, resume=resume, callback=callback,
                 extra_meta=extra_meta)
        parallel.barrier()  # the last checkpoint is written when fit returns on any rank
    finally:
        bar.close()
        parallel.close()
        module.train(was_training)
    return state


def prepare_module(module: torch.nn.Module, config: TrainConfig) -> None:
    """The changes to the module itself that ``config`` asks for, made in place before the optimizer,
    the EMA and DDP/FSDP see it: ``fp8`` swaps its linears and 1x1 convs for FP8 training layers
    (:func:`difflab.perf.fp8.swap_fp8_training`; their scaling state joins the state dict, so
    checkpoints and resume carry it). The module keeps the swap after the run."""
    if config.fp8:
        swap_fp8_training(module)
        if not fp8_layers(module):
            raise ValueError(f"fp8=True: {type(module).__name__} has no nn.Linear or 1x1 nn.Conv2d to train in FP8")


def _seed_module_rng(device: torch.device, seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


class _Log:
    """The running log between two entries: losses, the objective's terms, by noise level."""

    def __init__(self):
        self.bins, self.losses, self.terms, self.t0 = SigmaBinnedLoss(), [], {}, time.perf_counter()
        self.start = self.t0

    def add(self, batch: dict, losses: torch.Tensor, terms: dict) -> None:
        self.losses.append(float(losses.mean()))
        if batch.get("sigma") is not None:
            self.bins.add(batch["sigma"], losses)
        for k, v in terms.items():
            self.terms.setdefault(k, []).append(float(v.mean()))

    def entry(self, step: int, grad_norm: float, lr: float) -> dict:
        now = time.perf_counter()
        entry = {"step": step, "loss": sum(self.losses) / len(self.losses), "grad_norm": grad_norm, "lr": lr,
                 "steps_per_s": len(self.losses) / (now - self.t0), "seconds": now - self.start}
        entry.update({k: sum(v) / len(v) for k, v in self.terms.items()})
        if self.bins.counts.sum() > 0:
            entry["loss_by_sigma"] = self.bins.means()
        self.bins.reset()
        self.losses, self.terms, self.t0 = [], {}, now
        return entry


def _run(state: TrainState, data: dict, config: TrainConfig, path: Path | None, bar, stop, *, spec, metadata, resume,
         callback, extra_meta) -> None:
    device, par = next(state.module.parameters()).device, state.parallel
    # 3. Resume, or seed the module's own RNG (dropout), per rank; the log keeps the steps taken
    if path is not None and resume and path.exists():
        restore_training_state(state, config, path)
    else:
        _seed_module_rng(device, _rank_seed(config.seed, par.rank, 0))
    log_file = path.parent / LOG_NAME if path is not None and par.is_main else None
    if log_file is not None:
        truncate_log(log_file, state.step)
    bar.update(state.step)

    # 4. The loop
    log = _Log()
    save = dict(spec=spec, metadata=metadata, **extra_meta)
    while state.step < config.steps:
        batch = draw_step(state.objective, data, config, state.step)
        lr = lr_at(config, state.step)
        try:
            losses, terms, grad_norm = optimizer_step(state, batch, config, lr)
        except TrainingDivergedError as e:
            if roll_back(state, config):
                raise TrainingDivergedError(e.step, e.loss, e.grad_norm, state.checkpoint, good_step=state.checkpoint_step,
                                            rolled_back=True) from None
            raise

        # 5. Log, checkpoint
        loss = float(losses.mean())
        log.add(batch, losses, terms)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(1)
        if config.log_every and state.step % config.log_every == 0:
            entry = log.entry(state.step, grad_norm, lr)
            state.history.append(entry)
            if log_file is not None:
                with open(log_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
            if config.progress and par.is_main:
                by_sigma = entry.get("loss_by_sigma")
                bar.write(f"step {state.step}: loss {entry['loss']:.4f}" + ("; by sigma " + " ".join(
                    f"{k}: {v:.4f}" for k, v in by_sigma.items()) if by_sigma else ""))
        last = state.step == config.steps
        if path is not None and ((config.checkpoint_every and state.step % config.checkpoint_every == 0) or last):
            write_checkpoint(state, config, path, **save)
        if callback is not None:
            callback({"step": state.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "state": state})
        if stop and not last:  # Ctrl-C or SIGTERM during this step: save it and stop
            if path is not None and state.checkpoint_step != state.step:
                write_checkpoint(state, config, path, **save)
            raise TrainingInterrupted(state.step, state.checkpoint if path is not None else None, stop.signum)


__all__ = ["TrainConfig", "TrainState", "TrainingDivergedError", "TrainingInterrupted", "fit", "write_checkpoint",
           "non_finite_state", "roll_back", "as_rows", "batch_indices", "step_generator",
           "draw_step", "stream_seed", "accumulate_gradients", "optimizer_step", "lr_at", "make_optimizer",
           "training_checkpoint", "restore_training_state", "prepare_module", "trainable_parameters", "LR_SCHEDULES", "LOSSES",
           "PRECISIONS", "CHECKPOINT_KIND"]
