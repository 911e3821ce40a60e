"""Fast paths for difflab's networks, on by one switch: ``optimize(net, precision="bf16", compile="full")``.

What each switch does (every one falls back cleanly on the CPU; see docs/performance.md):

- ``precision``: cast the weights to bf16 / fp16 and the network input ``x`` with them; the output
  comes back as float32, the sampler's precision (Micikevicius et al. 2018, "Mixed Precision
  Training", keep fp32 master weights when training: use ``precision="fp32"`` plus
  :func:`autocast` there).
- ``channels_last``: NHWC weights and input, the layout cuDNN's and Triton's convolutions like.
- ``compile``: ``torch.compile``, either of the whole network (``"full"``) or *regionally*
  (``"regional"``): each repeated block (ResBlock, attention, spatial transformer: the modules
  with a ``checkpoint`` attribute) is compiled on its own, so blocks of the same shape share one
  compiled graph and a resolution change recompiles blocks, never the whole network.
- ``cuda_graphs``: :class:`CUDAGraphed` records the network call for a fixed input shape once
  and replays it (one launch instead of hundreds); a passthrough on the CPU.
- ``fp8``: :class:`FP8Linear` runs ``nn.Linear`` through ``torch._scaled_mm`` with per-tensor
  scaling (Micikevicius et al. 2022, "FP8 Formats for Deep Learning", Section 4) on GPUs with
  compute capability >= 8.9 (Ada, Hopper); elsewhere the linears are left as they are.
- ``gradient_checkpointing`` and ``attention_slice``: the memory switches of
  :mod:`difflab.perf.memory`.

- ``fuse_qkv``: the SD transformer's attention projects q, k, v with one matmul (``to_qkv``;
  ``to_kv`` for cross-attention), see :meth:`~difflab.nn.transformer.Attention.fuse_projections`;
  the ADM U-Net's ``SelfAttention`` has a single ``qkv`` matmul already. The state dict keeps its
  keys. Every attention calls ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
  on CUDA, a flash kernel on the CPU). GroupNorm + SiLU: ``torch.compile``
(inductor) already fuses the statistics, the normalization, the affine and the SiLU into one
kernel (``cpp_fused_native_group_norm_silu_0`` in its CPU output; a Triton reduction on CUDA), so
no hand-written kernel is added; eager mode runs them as two kernels.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..nn.transformer import Attention
from .memory import enable_attention_slicing, set_gradient_checkpointing
from .runtime import PRECISIONS, autocast, blocks, device_of, dtype_of

COMPILE_MODES = (False, "regional", "full")


# ----------------------------------------------------------------------------------------------
# The switch


@dataclass(frozen=True)
class FastConfig:
    """The fast paths :func:`optimize` applies; the defaults suit inference on a GPU."""

    precision: str = "bf16"                 # weights and compute: "fp32", "bf16", "fp16"
    channels_last: bool = True              # NHWC weights and input
    compile: bool | str = False             # False, "regional" (per block) or "full"
    compile_mode: str | None = None         # torch.compile mode: None, "max-autotune-no-cudagraphs", ...
    dynamic: bool | None = None             # torch.compile dynamic=: None lets torch mark shapes dynamic on a change
    cuda_graphs: bool = False               # record and replay the call per input shape (CUDA only)
    fp8: bool = False                       # FP8 linears (CUDA capability >= 8.9 only)
    fp8_pattern: str | None = None          # regex on module names of the linears to swap (None: all)
    fuse_qkv: bool = True                   # one matmul for q, k, v (state-dict keys unchanged)
    gradient_checkpointing: bool | None = None  # None: leave as it is
    attention_slice: int | None = None      # queries per attention chunk (inference memory; None: off)

    def __post_init__(self):
        dtype_of(self.precision)
        if self.compile not in COMPILE_MODES and self.compile is not True:
            raise ValueError(f"compile={self.compile!r} must be one of {list(COMPILE_MODES)}")
        if self.compile is True:
            object.__setattr__(self, "compile", "full")
        if self.attention_slice is not None and self.attention_slice < 1:
            raise ValueError(f"attention_slice={self.attention_slice} must be a positive number of queries or None")
        if self.attention_slice is not None and self.gradient_checkpointing:
            raise ValueError("attention_slice is an inference switch; it cannot be combined with gradient_checkpointing "
                             "(the recomputation in backward would not slice)")


def optimize(model: nn.Module, config: FastConfig | None = None, **overrides) -> nn.Module:
    """Apply the fast paths of ``config`` (or of ``FastConfig(**overrides)``) to a network, in place.

    Returns the network itself, or a :class:`CUDAGraphed` wrapper of it when ``cuda_graphs``
    (a passthrough on the CPU). Call it after ``.to(device)`` and after attaching adapters
    (LoRA, IP-Adapter). The ``state_dict`` keys are unchanged, so checkpoints load either way;
    with ``fuse_qkv`` the parameters ``to_q/to_k/to_v`` become one ``to_qkv`` (or ``to_kv``).
    See the module docstring.
    """
    config = dataclasses.replace(config or FastConfig(), **overrides)
    if getattr(model, "difflab_fast", None) is not None:
        raise ValueError("this network was already optimized; build a fresh one to change its fast paths")
    device = device_of(model)

    # 1. Structure: fused projections (before the cast and the FP8 swap, which then apply to them)
    if config.fuse_qkv:
        fuse_projections(model)

    # Memory switches
    if config.gradient_checkpointing is not None:
        set_gradient_checkpointing(model, config.gradient_checkpointing)
    if config.attention_slice is not None:
        enable_attention_slicing(model, config.attention_slice)

    # 2. Precision and memory format: weights now, the input and output through hooks
    dtype = dtype_of(config.precision)
    if dtype != torch.float32:
        model.to(dtype)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    model.difflab_fast = config
    if dtype != torch.float32 or config.channels_last:
        model.register_forward_pre_hook(_fast_input, with_kwargs=True)
        model.register_forward_hook(_fast_output)

    # 3. FP8 linears where the GPU has FP8 tensor cores (after the cast: frozen FP8 weights stay FP8)
    if config.fp8:
        if fp8_supported(device):
            swap_fp8_linear(model, config.fp8_pattern, inference=not model.training)
        else:
            warnings.warn(f"fp8=True ignored on {device}: FP8 matmuls need a CUDA GPU of compute capability >= 8.9 "
                          f"(Ada, Hopper); the linears run in {config.precision}", stacklevel=2)

    # 4. Compilation
    if config.compile == "regional":
        compile_regional(model, dynamic=config.dynamic, mode=config.compile_mode)
    elif config.compile == "full":
        model.compile(dynamic=config.dynamic, mode=config.compile_mode)

    # 5. CUDA graphs
    return CUDAGraphed(model) if config.cuda_graphs else model


def fuse_projections(model: nn.Module) -> list[str]:
    """Fuse the q/k/v projections of every SD-transformer :class:`~difflab.nn.transformer.Attention`
    of ``model`` (not its subclasses, e.g. IP-Adapter layers, nor projections wrapped by LoRA);
    returns the names of the fused modules. The state dict keeps its keys."""
    return [name for name, m in model.named_modules() if type(m) is Attention and m.fuse_projections()]


def _fast_input(module, args, kwargs):
    """Forward pre-hook of :func:`optimize`: ``x`` (the first argument) to the network's dtype and layout."""
    config = module.difflab_fast
    if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
        return None
    x = args[0].to(dtype_of(config.precision))
    if config.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *args[1:]), kwargs


def _fast_output(module, args, output):
    """Forward hook of :func:`optimize`: a low-precision output comes back as float32."""
    if torch.is_tensor(output) and output.dtype in (torch.bfloat16, torch.float16):
        return output.float()
    return None


# ----------------------------------------------------------------------------------------------
# Regional compilation


def compile_regional(model: nn.Module, *, dynamic: bool | None = None, mode: str | None = None,
                     predicate=None) -> list[str]:
    """``torch.compile`` each block of :func:`blocks` in place; returns their names.

    Blocks of one class and shape share a compiled graph, so compile time grows with the
    number of distinct blocks, not with depth. Dynamo's per-code-object recompile limit (8) is
    raised to 64 because a U-Net has more distinct block shapes than that.
    """
    found = blocks(model, predicate)
    if not found:
        raise ValueError("no blocks to compile regionally: the network has no module with a 'checkpoint' attribute; "
                         "pass predicate= or use compile='full'")
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for _, m in found:
        m.compile(dynamic=dynamic, mode=mode)
    return [name for name, _ in found]


# ----------------------------------------------------------------------------------------------
# CUDA graphs


class CUDAGraphed(nn.Module):
    """Record ``module(*args, **kwargs)`` as a CUDA graph per input signature and replay it.

    A sampling loop calls the network with the same shapes at every step; replaying a recorded
    graph removes the launch cost of its hundreds of kernels. The first call with a new
    signature (tensor shapes, dtypes, devices, strides and every non-tensor argument) warms up
    on a side stream and records; later calls copy the inputs into the recorded buffers and
    replay. Outputs are cloned, so a multistep sampler may keep them. Tensor arguments on the
    CPU are moved to the module's device first (a recorded graph cannot read host memory).

    Passthrough (plain eager calls) when the module is not on a CUDA device (``note`` says
    so) and whenever gradients are enabled: graphs are for inference loops. Attributes other
    than the wrapped module's (``config``, ...) are read from the module, and ``state_dict``
    is the module's own.
    """

    def __init__(self, module: nn.Module, *, warmup: int = 2):
        super().__init__()
        self.module = module
        self.warmup = warmup
        self.graphs: dict = {}
        self._pool = None
        self.device = device_of(module)
        self.enabled = self.device.type == "cuda" and torch.cuda.is_available()
        self.note = None if self.enabled else f"CUDA graphs need a CUDA device; {type(module).__name__} on {device_of(module)} runs eagerly"

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None:  # not built yet (copy, unpickling)
                raise
            return getattr(module, name)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if not self.enabled or torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        # a graph cannot read host memory: CPU tensors (a timestep, say) go to the module's device first
        leaves = [v.to(self.device) if torch.is_tensor(v) and v.device.type == "cpu" else v for v in leaves]
        key = (spec, tuple((tuple(v.shape), v.dtype, v.device, v.stride()) if torch.is_tensor(v) else ("value", repr(v))
                           for v in leaves))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._record(leaves, spec)
        graph, static_inputs, static_output = entry
        for static, new in zip(static_inputs, leaves):
            if static is not None:
                static.copy_(new)
        graph.replay()
        return pytree.tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, static_output)

    def _record(self, leaves, spec):
        static_inputs = [v.clone() if torch.is_tensor(v) else None for v in leaves]
        args, kwargs = pytree.tree_unflatten([s if s is not None else v for s, v in zip(static_inputs, leaves)], spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.module(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = self.module(*args, **kwargs)
        self._pool = graph.pool()
        return graph, static_inputs, static_output


# ----------------------------------------------------------------------------------------------
# FP8 linears

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_supported(device) -> bool:
    """True on a CUDA device of compute capability >= 8.9 (FP8 tensor cores: Ada, Hopper, later)."""
    device = torch.device(device)
    return device.type == "cuda" and _cuda_fp8(device.index)


@functools.lru_cache(maxsize=None)
def _cuda_fp8(index: int | None) -> bool:
    return E4M3 is not None and torch.cuda.is_available() and torch.cuda.get_device_capability(index) >= (8, 9)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaling to float8 e4m3 (Micikevicius et al. 2022, Section 4): ``s = amax|x| / 448``,
    ``x_q = fp8(x / s)``, so ``x ~ s * x_q`` with the largest magnitude at the top of the range.
    Returns ``(x_q, s)``, ``s`` a float32 scalar tensor."""
    if E4M3 is None:
        raise RuntimeError("this torch has no float8_e4m3fn")
    s = x.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    return (x.detach().float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), s


def fp8_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``(a_scale * a_q) @ (b_scale * b_q).T`` for (M, K) and (N, K) float8 operands through
    ``torch._scaled_mm`` (FP8 tensor cores on Hopper; a reference kernel on the CPU)."""
    return torch._scaled_mm(a_q, b_q.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


def fp8_matmul_emulated(a_q, a_scale, b_q, b_scale, out_dtype) -> torch.Tensor:
    """The same product in float32 from the dequantized operands: the reference for :func:`fp8_matmul`."""
    return ((a_q.float() * a_scale) @ (b_q.float() * b_scale).t()).to(out_dtype)


class _FP8Linear(torch.autograd.Function):
    """``y = x W^T (+ b)`` with both operands quantized per tensor to e4m3 in the forward pass;
    the backward pass uses the unquantized x and W (a straight-through estimator)."""

    @staticmethod
    def forward(ctx, x2d, weight, w_q, w_scale):
        ctx.save_for_backward(x2d, weight)
        x_q, x_scale = quantize_fp8(x2d)
        if w_q is None:
            w_q, w_scale = quantize_fp8(weight)
        return fp8_matmul(x_q, x_scale, w_q, w_scale, x2d.dtype)

    @staticmethod
    def backward(ctx, grad):
        x2d, weight = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), (grad.t() @ x2d.to(grad.dtype)).to(weight.dtype), None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               w_q: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with FP8 operands (per-tensor scaling); ``w_q, w_scale`` a pre-quantized weight."""
    y = _FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight, w_q, w_scale).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmul runs in FP8 on GPUs that have FP8 tensor cores.

    Made from an ``nn.Linear`` in place by :func:`swap_fp8_linear` (same parameters, same
    ``state_dict``), after the module is on its device: ``fp8_enabled`` records whether that
    device has FP8 matmuls. Falls back to ``F.linear`` when it has not, or when the shapes are not
    multiples of 16 (cuBLASLt's requirement), e.g. a time embedding at batch 2. ``freeze()``
    quantizes the weight once for inference (non-persistent buffers).
    """

    fp8_enabled = False

    def freeze(self) -> "FP8Linear":
        w_q, w_scale = quantize_fp8(self.weight)
        self.register_buffer("w_q", w_q, persistent=False)
        self.register_buffer("w_scale", w_scale, persistent=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if (not (self.fp8_enabled and x.is_cuda) or x.dtype not in PRECISIONS.values()
                or self.in_features % 16 or self.out_features % 16 or rows % 16):
            return F.linear(x, self.weight, self.bias)
        w_q, w_scale = getattr(self, "w_q", None), getattr(self, "w_scale", None)
        return fp8_linear(x, self.weight, self.bias, w_q, w_scale)


def swap_fp8_linear(model: nn.Module, pattern: str | None = None, *, inference: bool = False) -> list[str]:
    """Turn the ``nn.Linear`` modules whose name matches ``pattern`` (``re.search``; None: all)
    into :class:`FP8Linear` in place (frozen when ``inference``); returns their names."""
    names = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and (pattern is None or re.search(pattern, name)):
            m.__class__ = FP8Linear
            m.fp8_enabled = fp8_supported(m.weight.device)
            if inference:
                m.freeze()
            names.append(name)
    return names


__all__ = ["PRECISIONS", "FastConfig", "optimize", "fuse_projections", "autocast", "dtype_of", "device_of", "blocks", "compile_regional",
           "CUDAGraphed", "fp8_supported", "quantize_fp8", "fp8_matmul", "fp8_matmul_emulated", "fp8_linear",
           "FP8Linear", "swap_fp8_linear"]
