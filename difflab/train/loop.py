"""The training loop: short and explicit.

One optimizer step:

1. draw the batch: example indices, sigmas, noise and the label-dropout mask are functions of
   (seed, step) alone, so resuming from a checkpoint continues bit-identically on the CPU;
2. forward and backward in ``grad_accum`` micro-batches, under bf16/fp16 autocast if asked;
3. clip the gradient norm, stop with :class:`TrainingDivergedError` if the loss or the norm
   is not finite (before the update, so the weights and the last checkpoint stay good);
4. AdamW step with linear LR warmup, EMA update;
5. log the loss by noise level, checkpoint atomically every ``checkpoint_every`` steps.

The network's own randomness (dropout) uses torch's global generator: it is seeded from
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
from tqdm.auto import tqdm

from difflab.core import Denoiser, sample_seed
from difflab.perf.fast import autocast
from difflab.io.checkpoint import (checkpoint_path, load_checkpoint, load_model_state, optimizer_state_from_tensors,
                                   optimizer_state_to_tensors, save_checkpoint, strip_prefix)

from .distributed import PARALLELS, Parallel, full_tensor
from .ema import EMA
from .losses import NOISE_LEVELS, WEIGHTINGS, SigmaBinnedLoss, diffusion_loss, draw_sigmas
from .vlb import hybrid_loss

PRECISIONS = ("fp32", "bf16", "fp16")
LOSSES = ("mse", "hybrid")  # losses.diffusion_loss; vlb.hybrid_loss (improved DDPM, learned variance)
CHECKPOINT_KIND = "difflab.train"
# Config fields that may change when resuming without changing the math of the steps taken.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "progress", "parallel")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10_000                # total optimizer steps; a resumed run continues up to this
    batch_size: int = 64               # examples per optimizer step
    grad_accum: int = 1                # micro-batches per step (batch_size / grad_accum examples each)
    lr: float = 1e-4                   # AdamW learning rate after warmup
    warmup_steps: int = 0              # linear LR warmup: lr * min(1, (step + 1) / warmup_steps)
    weight_decay: float = 0.0          # AdamW decoupled weight decay, on every parameter
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0      # max global gradient norm; None: no clipping (norm still logged)
    ema_decay: float = 0.9999          # EMA decay, warmed up as min(decay, (1 + t) / (10 + t))
    precision: str = "fp32"            # "fp32", "bf16" (autocast, CPU or CUDA), "fp16" (autocast + GradScaler, CUDA only)
    cfg_dropout: float = 0.0           # probability of replacing a class label by the null class (Ho & Salimans 2022)
    weighting: str = "simple"          # loss weighting: "simple", "min_snr", "edm" (see losses.loss_weight)
    min_snr_gamma: float = 5.0         # gamma of min-SNR weighting (Hang et al. 2023)
    loss: str = "mse"                  # "mse": losses.diffusion_loss; "hybrid": + vlb_weight * L_vlb (vlb.hybrid_loss; learned variance)
    vlb_weight: float = 0.001          # lambda of the hybrid loss (Nichol & Dhariwal 2021, eq. 16)
    noise_level: str | None = None     # training sigma distribution (losses.NOISE_LEVELS); None: by frame
    noise_level_kwargs: dict = field(default_factory=dict)  # e.g. {"p_mean": -1.2, "p_std": 1.2}
    checkpoint_every: int = 1000       # steps between checkpoints (one is also written at the end); 0: end only
    log_every: int = 100               # steps between log lines (loss by noise level)
    seed: int = 0                      # seeds data order, sigmas, noise, label dropout and the net's own RNG
    progress: bool = True              # tqdm progress bar
    parallel: str = "none"             # "none", "ddp" or "fsdp" over torchrun's processes (train/distributed.py)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {list(PRECISIONS)}")
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
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm stopped being finite; the update of ``step`` was not applied."""

    def __init__(self, step: int, loss: float, grad_norm: float, checkpoint: str | None):
        self.step, self.loss, self.grad_norm, self.checkpoint = step, loss, grad_norm, checkpoint
        last = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"training diverged at step {step}: loss={loss}, grad_norm={grad_norm}; "
                         f"the update was not applied and {last}")


@dataclass
class TrainState:
    step: int                                   # optimizer steps completed
    denoiser: Denoiser
    optimizer: torch.optim.Optimizer
    ema: EMA
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    history: list = field(default_factory=list)  # log entries (dicts), one every log_every steps
    checkpoint: str | None = None               # path of the last checkpoint written or resumed from
    parallel: Parallel = field(default_factory=Parallel)  # DDP/FSDP over processes; default one process


# ----------------------------------------------------------------------------------------------
# Data and the random draws of one step


BATCH_KEYS = ("x0", "sigma", "noise")  # every other key of a batch is a keyword of the net (class_labels, cond)


def as_dataset(data) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(images, labels, cond)`` from ``images`` (N, ...) float, ``(images, labels)`` with labels
    (N,) long or None, or ``(images, labels, cond)`` with ``cond`` a dict of per-example tensors
    (N, ...) that reach the net as keywords (e.g. ``{"input_ids": ...}`` for a text-conditioned
    net); ``cond`` is ``{}`` for the first two forms."""
    parts = (data,) if torch.is_tensor(data) else tuple(data)
    if len(parts) not in (1, 2, 3):
        raise ValueError(f"data must be images, (images, labels) or (images, labels, cond); got {len(parts)} parts")
    images, labels, cond = (*parts, None, None)[:3]
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim < 2:
        raise ValueError("data must be a float tensor (N, ...), a pair (images, labels) or a triple (images, labels, cond)")
    if labels is not None:
        if not torch.is_tensor(labels) or labels.dtype != torch.long or labels.shape != (len(images),):
            raise ValueError(f"labels must be a long tensor of shape ({len(images)},), got "
                             f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    cond = dict(cond or {})
    for name, value in cond.items():
        if name in BATCH_KEYS or name == "class_labels":
            raise ValueError(f"cond key {name!r} is reserved; pass labels as the second element of data")
        if not torch.is_tensor(value) or value.ndim < 1 or len(value) != len(images):
            raise ValueError(f"cond[{name!r}] must be a tensor with one row per example ({len(images)}, ...), got "
                             f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}")
    return images, labels, cond


def _stream_seed(seed: int, stream: int, i: int) -> int:
    return sample_seed(sample_seed(seed, stream), i)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the net's own RNG on ``rank`` from ``step``: ``seed`` itself for rank 0 at step 0."""
    return seed if rank == step == 0 else sample_seed(_stream_seed(seed, 2, rank), step)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Example indices of ``step``: the run walks through one random permutation of the N
    examples per epoch, permutation e drawn from (seed, e); a batch may span two epochs."""
    k = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, out = k // n, torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_stream_seed(seed, 1, e)))
        mask = epochs == e
        out[mask] = perm[k[mask] % n]
    return out


def draw_batch(images, labels, frame, config: TrainConfig, step: int, *, null_class: int | None = None,
               cond: dict | None = None, null_cond: dict | None = None) -> dict:
    """The batch of 0-based ``step``: x0, sigma (float32), noise and class_labels (or None), on
    the CPU (or the data's device), drawn from a generator seeded with (seed, step).

    ``cond`` (per-example tensors, see :func:`as_dataset`) adds one key per entry, its rows of
    the batch. ``cfg_dropout`` replaces the label by ``null_class`` and each ``cond[k]`` row by
    ``null_cond[k]`` (one example's value, e.g. the empty prompt's token ids), in the same
    examples; the drop mask is one draw after the noise, as without ``cond``."""
    cond = cond or {}
    g = torch.Generator().manual_seed(_stream_seed(config.seed, 0, step))
    idx = batch_indices(len(images), config.batch_size, step, config.seed)
    x0 = images[idx.to(images.device)].float()
    sigma = draw_sigmas(frame, config.batch_size, g, config.noise_level, **config.noise_level_kwargs).float()
    noise = torch.randn(x0.shape, generator=g)
    drop = None
    if config.cfg_dropout > 0 and (labels is not None or cond):
        if labels is not None and null_class is None:
            raise ValueError("cfg_dropout > 0 needs null_class, the label that means 'no class'")
        missing = sorted(set(cond) - set(null_cond or {}))
        if missing:
            raise ValueError(f"cfg_dropout > 0 needs null_cond values for the cond keys {missing} (e.g. the empty prompt's)")
        drop = torch.rand(config.batch_size, generator=g) < config.cfg_dropout
    y = None
    if labels is not None:
        y = labels[idx.to(labels.device)]
        if drop is not None:
            y = torch.where(drop.to(y.device), torch.full_like(y, null_class), y)
    batch = {"x0": x0, "sigma": sigma, "noise": noise, "class_labels": y}
    for name, value in cond.items():
        rows = value[idx.to(value.device)]
        if drop is not None:
            null = torch.as_tensor(null_cond[name], dtype=value.dtype, device=value.device)
            keep = drop.to(value.device).reshape(-1, *([1] * (rows.ndim - 1)))
            rows = torch.where(keep, null.expand_as(rows), rows)
        batch[name] = rows
    return batch


# ----------------------------------------------------------------------------------------------
# One step


def accumulate_gradients(denoiser: Denoiser, batch: dict, config: TrainConfig, scaler=None, no_sync=None) -> torch.Tensor:
    """Forward and backward over ``config.grad_accum`` micro-batches, accumulating the gradient
    of mean(per-example loss) over the whole batch into ``.grad``; returns the (B,) losses.
    ``no_sync``: a context-manager factory (DDP's ``no_sync``) entered for every micro-batch but
    the last, so gradients are reduced across processes once per step."""
    device = next(denoiser.parameters()).device
    batch = {k: (v.to(device) if v is not None else None) for k, v in batch.items()}
    B = batch["x0"].shape[0]
    m = B // config.grad_accum
    losses = []
    for i in range(config.grad_accum):
        sl = slice(i * m, (i + 1) * m)
        extra = {k: v[sl] for k, v in batch.items() if k not in BATCH_KEYS and v is not None}  # class_labels, cond
        with no_sync() if no_sync is not None and i < config.grad_accum - 1 else contextlib.nullcontext():
            with autocast(config.precision, device):
                if config.loss == "hybrid":
                    loss = hybrid_loss(denoiser, batch["x0"][sl], batch["sigma"][sl], batch["noise"][sl], extra_args=extra,
                                       vlb_weight=config.vlb_weight, weighting=config.weighting, min_snr_gamma=config.min_snr_gamma)
                else:
                    loss = diffusion_loss(denoiser, batch["x0"][sl], batch["sigma"][sl], batch["noise"][sl], extra_args=extra,
                                          weighting=config.weighting, min_snr_gamma=config.min_snr_gamma)
            total = loss.sum() / B
            (scaler.scale(total) if scaler is not None else total).backward()
        losses.append(loss.detach())
    return torch.cat(losses)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of 0-based ``step``: linear warmup from lr/warmup_steps to lr."""
    return config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else config.lr


def make_optimizer(net: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019), fused where torch supports it, else foreach."""
    kw = dict(lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(net.parameters(), fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(net.parameters(), foreach=True, **kw)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def training_checkpoint(state: TrainState, config: TrainConfig, *, spec: dict | None, null_class: int | None,
                        metadata: dict | None) -> tuple[dict, dict]:
    """(tensors, metadata) of a training checkpoint; see docs in :func:`train`."""
    net, device, par = state.denoiser.net, next(state.denoiser.parameters()).device, state.parallel
    # DDP/FSDP: every rank calls this (FSDP gathers its shards); rank 0 gets the full tensors and writes them
    optim_tensors, optim_meta = optimizer_state_to_tensors(par.full_optimizer_state(state.optimizer), prefix="optim.")
    tensors = {f"model.{k}": v for k, v in par.full_state(net.state_dict()).items()}
    tensors.update({f"ema.{k}": v for k, v in par.full_state(state.ema.state_dict()).items()})
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    tensors.update(par.other_rng_states(device))
    d = state.denoiser
    meta = {
        "kind": CHECKPOINT_KIND,
        "step": state.step,
        "train_config": config.to_dict(),
        "net_class": type(net).__name__,
        "spec": spec,
        "denoiser": {"frame": type(d.frame).__name__, "prediction": d.prediction, "sigma_data": d.sigma_data},
        "null_class": null_class,
        "ema": {"decay": state.ema.decay, "num_updates": state.ema.num_updates},
        "optimizer": optim_meta,
        "grad_scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "metadata": metadata or {},
        "torch_version": torch.__version__,
        "world_size": par.world_size,
    }
    return tensors, meta


def restore_training_state(state: TrainState, config: TrainConfig, path) -> None:
    """Load model, EMA, optimizer, grad scaler, RNG state and step from a training checkpoint
    (written at any world size: its tensors are whole; FSDP cuts them into this rank's shards)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a training checkpoint (kind={meta.get('kind')!r})")
    saved = TrainConfig.from_dict(meta["train_config"])
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        warnings.warn(f"resuming {path} with a changed config ({', '.join(changed)}): the run will not match an uninterrupted one")
    net, device, par = state.denoiser.net, next(state.denoiser.parameters()).device, state.parallel
    load_model_state(net, par.shard(tensors, net.state_dict(), prefix="model."), prefix="model.")
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
        _seed_net_rng(device, _rank_seed(config.seed, par.rank, int(meta["step"])))
    state.step = int(meta["step"])
    state.checkpoint = str(path)


# ----------------------------------------------------------------------------------------------
# The loop


def _resolve_null_class(net, labels, config: TrainConfig, null_class: int | None) -> int | None:
    if labels is None or config.cfg_dropout == 0:
        return null_class
    if null_class is None:
        cfg = getattr(net, "config", None)
        null_class = getattr(cfg, "null_class", getattr(cfg, "num_classes", None))
    if null_class is None:
        raise ValueError("cfg_dropout > 0 needs the null class index: pass null_class= or give the net a config.num_classes")
    return int(null_class)


def train(denoiser: Denoiser, data, config: TrainConfig, out_dir, *, spec: dict | None = None,
          null_class: int | None = None, metadata: dict | None = None, resume: bool = True,
          callback: Callable[[dict], None] | None = None, null_cond: dict | None = None) -> TrainState:
    """Train ``denoiser.net`` on ``data`` for ``config.steps`` optimizer steps; see the module doc.

    ``data``: images (N, ...) float in [-1, 1], or ``(images, labels)`` with labels (N,) long or
    None; labels reach the net as ``class_labels=``. ``cfg_dropout`` replaces a label by
    ``null_class`` (default ``net.config.null_class``, else ``net.config.num_classes``).
    ``(images, labels, cond)``: ``cond`` maps keyword names to per-example tensors (N, ...)
    that reach the net as those keywords (e.g. caption token ids); ``cfg_dropout`` replaces a
    dropped example's rows by ``null_cond[name]`` (see :func:`draw_batch`). Training runs on the device of the
    net's parameters. ``spec`` (the model spec of :mod:`difflab.io.spec`, ``{"unet": ..., "diffusion":
    ...}``, which rebuilds the denoiser) and ``metadata`` (anything JSON) go into the checkpoint.

    Checkpoints go to ``out_dir/checkpoint.safetensors`` (+ ``checkpoint.json``), overwritten
    atomically every ``checkpoint_every`` steps and at the end; with ``resume`` an existing one
    is continued (``resume=False`` starts afresh and overwrites it). Tensors: ``model.*`` (the
    net), ``ema.*`` (EMA weights, same keys), ``optim.*`` (AdamW), ``rng.torch`` (``rng.cuda``).
    ``callback(dict(step=, loss=, grad_norm=, lr=, state=))`` runs after every step. A log entry
    (mean loss, loss by sigma bin, grad norm, lr) is appended to ``state.history`` and to
    ``out_dir/log.jsonl`` every ``log_every`` steps.

    ``config.parallel="ddp"`` or ``"fsdp"``: run under ``torchrun``, one process per device, each
    with the same arguments (the net on ``cuda:LOCAL_RANK``, see
    :func:`difflab.train.distributed.init_distributed`). Rank 0 alone writes the log, the progress
    bar and the checkpoint; ``out_dir`` must be on a file system every rank sees. With FSDP the
    net is sharded in place: after training, sample from the checkpoint.
    """
    # 1. Check inputs
    images, labels, cond = as_dataset(data)
    net = denoiser.net
    device = next(denoiser.parameters()).device
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs CUDA (torch.amp.GradScaler); use 'bf16' on the CPU")
    null_class = _resolve_null_class(net, labels, config, null_class)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(out_dir)
    was_training = denoiser.training
    denoiser.train()
    parallel = Parallel.setup(denoiser, config)  # DDP wraps the net, FSDP shards it: before the optimizer

    # 2. Optimizer, EMA, grad scaler
    state = TrainState(step=0, denoiser=denoiser, optimizer=make_optimizer(net, config), ema=EMA(net, config.ema_decay),
                       scaler=torch.amp.GradScaler("cuda") if config.precision == "fp16" else None, parallel=parallel)

    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    bar = tqdm(total=config.steps, disable=not (config.progress and parallel.is_main), desc="train", dynamic_ncols=True)
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            _run(state, images, labels, config, path, bar, spec=spec, null_class=null_class,
                 metadata=metadata, resume=resume, callback=callback, cond=cond, null_cond=null_cond)
        parallel.barrier()  # the last checkpoint is written when train returns on any rank
    finally:
        bar.close()
        parallel.close()
        denoiser.train(was_training)
    return state


def optimizer_step(state: TrainState, batch: dict, config: TrainConfig, lr: float) -> tuple[torch.Tensor, float]:
    """Steps 2-4 of the module doc for one batch: returns the (B,) losses and the gradient norm.
    Raises :class:`TrainingDivergedError` (before any update) when they are not finite."""
    net, scaler, optimizer, par = state.denoiser.net, state.scaler, state.optimizer, state.parallel
    for group in optimizer.param_groups:
        group["lr"] = lr
    # DDP/FSDP: this rank's slice of the global batch; the losses of the whole batch come back
    losses = accumulate_gradients(par.denoiser or state.denoiser, par.local(batch), config, scaler, no_sync=par.no_sync)
    losses = par.gather(losses)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip or math.inf)))
    loss = float(losses.mean())
    # fp16: a non-finite gradient is an overflow; GradScaler skips that update and lowers its scale.
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and scaler is None):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(state.step + 1, loss, grad_norm, state.checkpoint)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.ema.update(net)
    state.step += 1
    return losses, grad_norm


def _seed_net_rng(device: torch.device, seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _run(state: TrainState, images, labels, config: TrainConfig, path: Path, bar, *, spec, null_class, metadata,
         resume, callback, cond=None, null_cond=None) -> None:
    device, par = next(state.denoiser.parameters()).device, state.parallel
    # 3. Resume, or seed the net's own RNG (dropout), per rank
    if resume and path.exists():
        restore_training_state(state, config, path)
    else:
        _seed_net_rng(device, _rank_seed(config.seed, par.rank, 0))
    bar.update(state.step)

    # 4. The loop
    bins, losses_since, t0 = SigmaBinnedLoss(), [], time.perf_counter()
    while state.step < config.steps:
        batch = draw_batch(images, labels, state.denoiser.frame, config, state.step, null_class=null_class,
                           cond=cond, null_cond=null_cond)
        lr = lr_at(config, state.step)
        losses, grad_norm = optimizer_step(state, batch, config, lr)

        # 5. Log, checkpoint
        loss = float(losses.mean())
        bins.add(batch["sigma"], losses)
        losses_since.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(1)
        if config.log_every and state.step % config.log_every == 0:
            entry = {"step": state.step, "loss": sum(losses_since) / len(losses_since), "grad_norm": grad_norm, "lr": lr,
                     "steps_per_s": len(losses_since) / (time.perf_counter() - t0), "loss_by_sigma": bins.means()}
            state.history.append(entry)
            if par.is_main:
                with open(path.parent / "log.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
            if config.progress and par.is_main:
                bar.write(f"step {state.step}: loss {entry['loss']:.4f}; by sigma "
                          + " ".join(f"{k}: {v:.4f}" for k, v in entry["loss_by_sigma"].items()))
            bins.reset()
            losses_since, t0 = [], time.perf_counter()
        if (config.checkpoint_every and state.step % config.checkpoint_every == 0) or state.step == config.steps:
            tensors, meta = training_checkpoint(state, config, spec=spec, null_class=null_class, metadata=metadata)
            state.checkpoint = str(save_checkpoint(path, tensors, meta) if par.is_main else path)
        if callback is not None:
            callback({"step": state.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "state": state})


__all__ = ["TrainConfig", "TrainState", "TrainingDivergedError", "train", "as_dataset", "batch_indices", "draw_batch",
           "autocast", "accumulate_gradients", "optimizer_step", "lr_at", "make_optimizer", "training_checkpoint", "restore_training_state"]
