"""Memory: gradient checkpointing, attention slicing, CPU offload, and a memory estimator.

- :func:`set_gradient_checkpointing`: recompute each block's activations in the backward pass
  (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"); the blocks already
  support it (their ``checkpoint`` attribute), this is the switch.
- :func:`enable_attention_slicing`: attention computed for ``slice_size`` queries at a time, so
  an unfused attention holds a (slice, L) score matrix instead of (N, L).
- VAE tiling is a per-call switch of :class:`difflab.nn.AutoencoderKL`: ``decode(z, tiled=True)``.
- :func:`offload`: keep an idle component's weights on the CPU and move them to the GPU only
  while it runs.
- :func:`estimate_memory`: parameters, gradients, optimizer states and activations of a training
  step (or inference call), the activations counted from what autograd saves;
  :func:`measure_peak` measures the same step (``torch.cuda.max_memory_allocated`` on CUDA,
  the profiler's allocation events on the CPU).
"""
from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..nn.dit import MOE_PRESETS as MOE_DIT_PRESETS
from ..nn.dit import PRESETS as DIT_PRESETS
from ..nn.dit import DiT, DiTConfig
from ..nn.unet import PRESETS, UNet, UNetConfig
from ..nn.unet_sd import PRESETS as SD_PRESETS
from ..nn.unet_sd import UNetSD, UNetSDConfig
from .runtime import autocast, blocks, device_of, dtype_of

# ----------------------------------------------------------------------------------------------
# Gradient checkpointing


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Per-block gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").

    Turns it on or off for every module with a ``checkpoint`` attribute (difflab's blocks);
    returns how many blocks were set. Raises if the network has none."""
    n = 0
    for m in model.modules():
        if hasattr(m, "checkpoint"):
            m.checkpoint = bool(enabled)
            n += 1
    if not n:
        raise ValueError(f"{type(model).__name__} has no blocks that support gradient checkpointing")
    return n


# ----------------------------------------------------------------------------------------------
# Attention slicing


def sliced_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *, slice_size: int,
                     enable_gqa=False):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1), ``slice_size`` queries at a time.

    The same values as ``F.scaled_dot_product_attention`` (each query's row is independent of
    the others'), with a score matrix of (slice, L) instead of (N, L). The mask is sliced along
    the query axis when it has one."""
    if is_causal:
        raise ValueError("sliced_attention takes is_causal=False only (difflab's U-Nets use no causal attention); "
                         "pass an explicit attn_mask instead")
    n = q.shape[-2]
    outs = []
    for i in range(0, n, slice_size):
        m = attn_mask
        if m is not None and m.ndim >= 2 and m.shape[-2] == n and n > 1:
            m = m[..., i:i + slice_size, :]
        outs.append(F.scaled_dot_product_attention(q[..., i:i + slice_size, :], k, v, attn_mask=m, dropout_p=dropout_p,
                                                   scale=scale, enable_gqa=enable_gqa))
    return torch.cat(outs, dim=-2)


class _SlicedAttentionMode(TorchFunctionMode):
    """Reroute every ``F.scaled_dot_product_attention`` call to :func:`sliced_attention`."""

    def __init__(self, slice_size: int):
        super().__init__()
        self.slice_size = slice_size

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].shape[-2] > self.slice_size:
            return sliced_attention(*args, **kwargs, slice_size=self.slice_size)
        return func(*args, **kwargs)


def enable_attention_slicing(model: nn.Module, slice_size: int) -> None:
    """Slice every attention of ``model`` (any module calling ``F.scaled_dot_product_attention``)
    into chunks of ``slice_size`` queries, through forward hooks on ``model``. For inference:
    not with gradient checkpointing, whose recomputation would not slice."""
    if slice_size < 1:
        raise ValueError(f"slice_size={slice_size} must be a positive number of queries")
    if any(getattr(m, "checkpoint", False) for m in model.modules()):
        raise ValueError("attention slicing cannot be combined with gradient checkpointing; turn checkpointing off first")
    disable_attention_slicing(model)
    mode = _SlicedAttentionMode(slice_size)

    def enter(module, args):
        mode.__enter__()

    def leave(module, args, output):
        mode.__exit__(None, None, None)

    model.difflab_attention_slicing = (model.register_forward_pre_hook(enter),
                                       model.register_forward_hook(leave, always_call=True))


def disable_attention_slicing(model: nn.Module) -> None:
    """Undo :func:`enable_attention_slicing` (a no-op when it is off)."""
    for handle in getattr(model, "difflab_attention_slicing", ()):
        handle.remove()
    model.difflab_attention_slicing = ()


# ----------------------------------------------------------------------------------------------
# CPU offload


class Offloaded:
    """The hooks of :func:`offload`; ``remove()`` leaves the module on the CPU without them."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, device
        # (owner, "_parameters" or "_buffers", name, the CPU tensor): swapped for device copies during a call
        self.host = [(m, kind, name, t) for m in module.modules() for kind in ("_parameters", "_buffers")
                     for name, t in getattr(m, kind).items() if t is not None]
        self.handles = (module.register_forward_pre_hook(self._load, with_kwargs=True),
                        module.register_forward_hook(self._unload, always_call=True))

    def _load(self, module, args, kwargs):
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            raise RuntimeError("offload is for inference: the weights are not copied back; run under torch.no_grad() "
                               "or freeze the module (requires_grad_(False))")
        for owner, kind, name, t in self.host:
            moved = t.detach().to(self.device, non_blocking=True)
            getattr(owner, kind)[name] = nn.Parameter(moved, t.requires_grad) if kind == "_parameters" else moved
        move = lambda v: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v  # noqa: E731
        return pytree.tree_map(move, args), pytree.tree_map(move, kwargs)

    def _unload(self, module, args, output):
        for owner, kind, name, t in self.host:
            getattr(owner, kind)[name] = t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def offload(module: nn.Module, device, *, pin_memory: bool = True) -> Offloaded | None:
    """Keep ``module``'s weights on the CPU and move them to ``device`` only while it runs
    (inference; e.g. a text encoder or a VAE idle during sampling). Inputs are moved to
    ``device``; the output stays there. The device copy is dropped after each call (weights do
    not change in inference), so nothing is copied back.

    Returns the hooks (``.remove()`` to undo), or None when ``device`` is the CPU: then it is a
    no-op and the module runs where it is.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return None
    module.to("cpu")
    if pin_memory and torch.cuda.is_available():
        for t in itertools.chain(module.parameters(), module.buffers()):
            t.data = t.data.pin_memory()
    return Offloaded(module, device)


def offload_blocks(net: nn.Module, device, blocks) -> list[Offloaded | None]:
    """Sequential CPU offload (diffusers' ``enable_sequential_cpu_offload``, by block): each module of
    ``blocks`` (inside ``net``) keeps its weights on the CPU and has them on ``device`` only while it
    runs (:func:`offload`); every other parameter and buffer of ``net`` (embeddings, final layers)
    moves to ``device`` now. The peak is then those layers, one block and the activations. Inference only."""
    device = torch.device(device)
    inside = {id(t) for b in blocks for t in itertools.chain(b.parameters(), b.buffers())}
    for m in net.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in list(getattr(m, kind).items()):
                if t is not None and id(t) not in inside:
                    moved = t.detach().to(device)
                    getattr(m, kind)[name] = nn.Parameter(moved, t.requires_grad) if kind == "_parameters" else moved
    return [offload(b, device) for b in blocks]


# ----------------------------------------------------------------------------------------------
# Networks and their inputs


def resolve_network(spec, device=None) -> nn.Module:
    """A network from a module (returned as it is), a ``UNetConfig`` / ``UNetSDConfig`` /
    ``DiTConfig`` or a preset name: ``difflab.nn.PRESETS`` (``"cifar10"``, ...), ``"sd1"`` /
    ``"sd2"``, ``"sd:<name>"`` for any ``difflab.nn.unet_sd.PRESETS`` entry, a DiT preset
    (``"DiT-S/2"`` ... ``"DiT-XL/8"``), ``"dit:<name>"`` for any ``difflab.nn.dit.PRESETS`` entry or
    ``"moe-dit:<name>"`` for any ``difflab.nn.dit.MOE_PRESETS`` entry (the mixture-of-experts DiT).
    Built on ``device``."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        spec = _preset(spec)
    with torch.device(device or "cpu"):
        if isinstance(spec, UNetConfig):
            return UNet(spec)
        if isinstance(spec, UNetSDConfig):
            return UNetSD(spec)
        if isinstance(spec, DiTConfig):
            return DiT(spec)
    raise TypeError(f"expected a network, a UNetConfig, a UNetSDConfig, a DiTConfig or a preset name, got {type(spec).__name__}")


def _preset(name: str):
    """The config a preset name of :func:`resolve_network` names; a ValueError listing them otherwise."""
    for prefix, table in (("sd:", SD_PRESETS), ("dit:", DIT_PRESETS), ("moe-dit:", MOE_DIT_PRESETS)):
        if name.startswith(prefix):
            if name[len(prefix):] not in table:
                raise ValueError(f"unknown {prefix[:-1]} preset {name[len(prefix):]!r}; choose one of {sorted(table)}")
            return table[name[len(prefix):]]
    for table in (PRESETS, SD_PRESETS, DIT_PRESETS):
        if name in table:
            return table[name]
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}, "
                     f"{sorted(n for n in SD_PRESETS if n not in PRESETS)}, sd:<{'|'.join(sorted(SD_PRESETS))}>, "
                     f"{sorted(n for n in DIT_PRESETS if n not in PRESETS)}, dit:<name> or moe-dit:<name>")


def example_inputs(net: nn.Module, batch_size: int, image_size: int, *, context_len: int = 77, device=None,
                   dtype=torch.float32, generator: torch.Generator | None = None):
    """``(x, t, cond)`` for one call ``net(x, t, **cond)`` of a difflab U-Net or DiT: random x
    (B, C, H, W), times in [0, 1000), class labels / text context (and SDXL's pooled text and time
    ids) when the network takes them."""
    c = net.config
    device = torch.device(device) if device is not None else device_of(net)
    g = generator or torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, c.in_channels, image_size, image_size, generator=g).to(device, dtype)
    t = (torch.rand(batch_size, generator=g) * 999).to(device)
    cond = {}
    if isinstance(c, UNetSDConfig):
        cond["context"] = torch.randn(batch_size, context_len, c.cross_attention_dim, generator=g).to(device, dtype)
        if c.addition_embed_type == "text_time":  # SDXL: 6 time ids, the rest is the pooled text; the refiner
            # (one encoder, pooled as wide as its context) takes 5
            refiner = c.projection_class_embeddings_input_dim - 5 * c.addition_time_embed_dim == c.cross_attention_dim
            ids = 5 if refiner else 6
            pooled = c.projection_class_embeddings_input_dim - ids * c.addition_time_embed_dim
            cond["text_embeds"] = torch.randn(batch_size, pooled, generator=g).to(device, dtype)
            cond["time_ids"] = torch.full((batch_size, ids), float(image_size * 8), device=device)
    elif isinstance(c, (UNetConfig, DiTConfig)):
        if c.num_classes is not None:
            cond["class_labels"] = torch.randint(0, c.num_classes, (batch_size,), generator=g).to(device)
        if getattr(c, "context_dim", None) is not None:
            cond["context"] = torch.randn(batch_size, context_len, c.context_dim, generator=g).to(device, dtype)
    else:
        raise TypeError(f"example_inputs knows difflab's UNet, UNetSD and DiT, not {type(net).__name__}")
    return x, t, cond


def step_loss(net: nn.Module, x, t, cond) -> torch.Tensor:
    """The loss of one training step as the estimator and the measurement run it: the mean
    squared error of the output against a standard-normal target (DDPM's "simple" loss)."""
    out = net(x, t, **cond)
    target = torch.randn(out.shape, device=out.device, generator=None)
    return (out.float() - target).square().mean()


def make_optimizer(net: nn.Module, name: str | None):
    """AdamW (fused where torch has it), SGD with momentum, or None."""
    if name in (None, "none"):
        return None
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        try:
            return cls(net.parameters(), lr=1e-4, fused=True)
        except (RuntimeError, ValueError):
            return cls(net.parameters(), lr=1e-4, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    raise ValueError(f"optimizer={name!r} must be 'adamw', 'adam', 'sgd' or 'none'")


OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0, None: 0}  # fp32 tensors per parameter


# ----------------------------------------------------------------------------------------------
# The estimator


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _probe_saved(net, batch_size, image_size, precision, device, context_len) -> tuple[int, dict]:
    """Bytes of the distinct storages autograd saves in one training forward (parameters
    excluded; autocast's low-precision weight copies included), and their split by block.
    Inputs of checkpointed blocks, which checkpointing keeps for the recomputation, count too."""
    exclude = {_storage_key(t) for t in itertools.chain(net.parameters(), net.buffers())}
    saved, owner, stack = {}, {}, []

    def keep(t, who):
        k = _storage_key(t)
        if k and k not in exclude and k not in saved:
            saved[k], owner[k] = t.untyped_storage().nbytes(), who

    def pack(t):
        keep(t, stack[-1] if stack else None)
        return t

    def leave(m, args, out):
        stack.pop()

    def enter(m, args, name):
        stack.append(name)
        if getattr(m, "checkpoint", False) and torch.is_grad_enabled():
            for a in args:
                if torch.is_tensor(a):
                    keep(a, None)

    handles = []
    for name, m in blocks(net):
        handles.append(m.register_forward_pre_hook(lambda m, args, name=name: enter(m, args, name)))
        handles.append(m.register_forward_hook(leave, always_call=True))
    x, t, cond = example_inputs(net, batch_size, image_size, context_len=context_len, device=device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, device):
            loss = step_loss(net, x, t, cond)
        del loss
    finally:
        for h in handles:
            h.remove()
    per_block = {}
    for k, b in saved.items():
        per_block[owner[k]] = per_block.get(owner[k], 0) + b
    return sum(saved.values()), per_block


class _LiveBytes(TorchDispatchMode):
    """The peak bytes of the storages created inside the mode that are alive at the same time."""

    def __init__(self, exclude=()):
        super().__init__()
        self.exclude, self.refs, self.size, self.live, self.peak = set(exclude), {}, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                k = _storage_key(t)
                if not k or k in self.exclude:
                    continue
                if k not in self.refs:
                    self.refs[k], self.size[k] = 0, t.untyped_storage().nbytes()
                    self.live += self.size[k]
                    self.peak = max(self.peak, self.live)
                self.refs[k] += 1
                weakref.finalize(t, self._release, k)
        return out

    def _release(self, k):
        self.refs[k] -= 1
        if not self.refs[k]:
            self.live -= self.size.pop(k)
            del self.refs[k]


def _probe_inference(net, batch_size, image_size, device, context_len) -> int:
    """Peak bytes alive at once during one inference call (weights and inputs excluded)."""
    x, t, cond = example_inputs(net, batch_size, image_size, context_len=context_len, device=device,
                                dtype=next(net.parameters()).dtype)
    exclude = {_storage_key(v) for v in itertools.chain(net.parameters(), net.buffers(), [x, t], cond.values())}
    with torch.no_grad(), _LiveBytes(exclude) as live:
        out = net(x, t, **cond)
    del out
    return live.peak


def _linear(f, batch_size: int) -> int:
    """Extrapolate a quantity affine in the batch size from its values at batch 1 and 2."""
    a1, a2 = f(1), f(2)
    return max(0, round(a1 + (batch_size - 1) * (a2 - a1)))


def estimate_memory(model_or_config, batch_size: int, image_size: int, *, precision: str = "fp32",
                    optimizer: str | None = "adamw", training: bool = True, gradient_checkpointing: bool = False,
                    ema: bool = False, context_len: int = 77, device=None) -> dict:
    """Predict the peak memory of a training step (or an inference call) in bytes.

    Returns ``dict(parameters, gradients, optimizer, ema, activations, total)``:

    - parameters: fp32 master weights when training (``precision`` is autocast's), weights
      in ``precision`` for inference; gradients: one fp32 value per trainable weight;
      optimizer: AdamW's two moments (SGD's momentum) in fp32 plus a 4-byte step per tensor;
      ema: an fp32 copy of the weights when ``ema`` (difflab's ``train`` keeps one);
    - activations, training: the distinct storages autograd saves for the backward pass in one
      forward under autocast, parameters excluded (``saved_tensors_hooks``), measured at batch
      1 and 2 and extrapolated linearly to ``batch_size``. With gradient checkpointing: what
      is saved outside the checkpointed blocks, their inputs, and the largest block's saved
      tensors, rematerialized during its backward;
    - activations, inference: the peak of the tensors alive at once during one call (a
      dispatch mode tracks every storage the call creates until it is freed);
    - total: the predicted peak, ``parameters + optimizer + ema + max(activations, gradients)``:
      the backward pass frees activations as it allocates gradients, so the peak comes at its
      start (every activation, no gradient yet) or at the optimizer step (every gradient, no
      activation), not both (inference: ``parameters + activations``).

    The probe runs the network (built from a config or preset name on ``device``, default the
    model's device or the CPU) at batch 1 and 2 and the real ``image_size``; autocast behaves
    differently on the CPU and on CUDA, so probe on the device you will train on.
    """
    dtype = dtype_of(precision)
    net = resolve_network(model_or_config, device)
    device = device_of(net)
    if device.type == "meta":
        raise ValueError("estimate_memory runs the network at batch 1 and 2: build it on a real device, not meta")
    trainable = [p for p in net.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in net.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    was_training = net.training
    flags = {m: m.checkpoint for m in net.modules() if hasattr(m, "checkpoint")}
    try:
        if training:
            net.train()
            # the largest block's saved tensors, counted without checkpointing
            for m in flags:
                m.checkpoint = False
            per_block = [_probe_saved(net, b, image_size, precision, device, context_len)[1] for b in (1, 2)]
            for m in flags:
                m.checkpoint = gradient_checkpointing
            activations = _linear(lambda b: _probe_saved(net, b, image_size, precision, device, context_len)[0], batch_size)
            if gradient_checkpointing and flags:
                names = [k for k in per_block[0] if k is not None]
                activations += max((_linear(lambda b: per_block[b - 1][k], batch_size) for k in names), default=0)
        else:
            if next(net.parameters()).dtype != dtype:
                if net is model_or_config:
                    raise ValueError(f"pass a config, or a network already in {precision}, to estimate inference in {precision}")
                net.to(dtype)  # built here from a config: ours to cast
            net.eval()
            activations = _linear(lambda b: _probe_inference(net, b, image_size, device, context_len), batch_size)
    finally:
        net.train(was_training)
        for m, flag in flags.items():
            m.checkpoint = flag

    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r} must be one of {[k for k in OPTIMIZER_STATES if k]}")
    est = {
        "parameters": n_params * (4 if training else dtype.itemsize),
        "gradients": n_trainable * 4 if training else 0,
        "optimizer": (OPTIMIZER_STATES[optimizer] * n_trainable * 4 + 4 * len(trainable) * (optimizer in ("adamw", "adam")))
        if training else 0,
        "ema": n_params * 4 if ema else 0,
        "activations": activations,
    }
    # the backward pass frees the activations as it allocates the gradients: the peak is at its
    # start (all activations, no gradients) or at the optimizer step (all gradients, no activations)
    est["total"] = est["parameters"] + est["optimizer"] + est["ema"] + max(est["activations"], est["gradients"])
    return est


# ----------------------------------------------------------------------------------------------
# The measurement


def measure_peak(net: nn.Module, batch_size: int, image_size: int, *, precision: str = "fp32",
                 optimizer: str | None = "adamw", training: bool = True, context_len: int = 77) -> dict:
    """Measure the peak memory of one training step (forward, backward, optimizer step) or one
    inference call of ``net`` on its device, in the steady state: a first step creates the
    optimizer's moments, the second is measured. Returns ``dict(peak=bytes, method=str)``.

    CUDA: ``torch.cuda.max_memory_allocated`` over the step (every live allocation of the
    caching allocator). CPU: the bytes alive before the step, counted exactly (weights,
    buffers, optimizer states, inputs), plus the peak of the running sum of the CPU
    allocator's allocations and frees during the step (``torch.profiler`` with
    ``profile_memory=True``); process RSS is too noisy to use.
    """
    device = device_of(net)
    dtype = torch.float32 if training else next(net.parameters()).dtype
    x, t, cond = example_inputs(net, batch_size, image_size, context_len=context_len, device=device, dtype=dtype)
    opt = make_optimizer(net, optimizer) if training else None
    was_training = net.training
    net.train(training)

    def step():
        if not training:
            with torch.no_grad():
                return net(x, t, **cond)
        with autocast(precision, device):
            loss = step_loss(net, x, t, cond)
        loss.backward()
        if opt is not None:
            opt.step()
        net.zero_grad(set_to_none=True)

    try:
        dtype_of(precision)
        if training:
            step()  # the optimizer's states now exist
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = step()
            torch.cuda.synchronize(device)
            del out
            return {"peak": torch.cuda.max_memory_allocated(device), "method": "torch.cuda.max_memory_allocated"}
        if device.type != "cpu":
            raise ValueError(f"measure_peak measures on CUDA or the CPU, not {device.type}")
        alive = {}
        state = [v for s in (opt.state.values() if opt is not None else ()) for v in s.values() if torch.is_tensor(v)]
        for v in itertools.chain(net.parameters(), net.buffers(), state, [x, t], cond.values()):
            alive[_storage_key(v)] = v.untyped_storage().nbytes()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out = step()
            del out
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                         and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
        running = itertools.accumulate((e.nbytes() for e in events), initial=0)
        return {"peak": sum(alive.values()) + max(running),
                "method": "bytes alive before the step + peak of the CPU allocator's running total (torch.profiler)"}
    finally:
        net.train(was_training)
        net.zero_grad(set_to_none=True)


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def format_estimate(est: dict, measured: dict | None = None) -> str:
    """The estimate as a table, with the measured peak and the error when given."""
    rows = [(k, format_bytes(est[k])) for k in ("parameters", "gradients", "optimizer", "ema", "activations", "total")]
    if measured is not None:
        err = (est["total"] - measured["peak"]) / measured["peak"]
        rows += [("measured peak", format_bytes(measured["peak"])), ("predicted - measured", f"{err:+.1%}")]
    w = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{w}}  {v:>12}" for k, v in rows]
    if measured is not None:
        lines.append(f"  (measured: {measured['method']})")
    return "\n".join(lines)


__all__ = ["set_gradient_checkpointing", "sliced_attention", "enable_attention_slicing", "disable_attention_slicing",
           "offload", "offload_blocks", "Offloaded", "resolve_network", "example_inputs", "step_loss", "make_optimizer", "estimate_memory",
           "measure_peak", "format_bytes", "format_estimate"]

