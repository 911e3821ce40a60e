"""FP8 training with delayed per-tensor scaling: ``swap_fp8_training(net)``.

The recipe of Micikevicius et al. 2022 ("FP8 Formats for Deep Learning", Sections 3-4) as NVIDIA
Transformer Engine's ``DelayedScaling`` runs it:

- **formats**: E4M3 (3 mantissa bits, max 448) for the forward operands, the input ``x`` and the
  weight ``W``; E5M2 (2 mantissa bits, max 57344) for the gradient ``dy`` in the backward pass;
- **per-tensor scales**: ``x_q = fp8(clamp(x * s))``, ``x ~ x_q / s``; each FP8 layer keeps one
  scale for x, one for W and one for dy;
- **delayed scaling**: each tensor's amax (max |value|) is recorded into a history of its last H
  amaxes, and the scale the *next* call uses is ``s = (fp8_max / max(history)) / 2^margin``
  (TE's ``amax_compute_algo="max"``), so a call never waits for its own amax before quantizing.
  The history is updated per call (per micro-batch; a training step with ``grad_accum=1`` is one
  call), x and W in the forward pass, dy in the backward pass. A zero or non-finite amax keeps
  the previous scale (TE's rule);
- **the first call** (the history is all zero: a fresh layer, or a weight that is still all
  zero) uses just-in-time scaling, ``s`` from the current amax, then records it: step 0 never
  overflows;
- **saturation**: ``x * s`` is clamped to the format's max before the cast, so a value above the
  scaled range (an outlier newer than the history) saturates to ``max / s`` instead of becoming
  inf or NaN; a non-finite input stays non-finite (NaN), so the training loop's divergence check
  still sees it;
- **master weights stay fp32**: the optimizer sees the fp32 ``weight``; W is quantized from it on
  every call and its gradient is taken straight through the quantization (d x_q/s / dx = 1);
  the bias and its gradient stay in full precision.

The product runs in higher precision: on a CUDA GPU with FP8 tensor cores (capability >= 8.9)
through ``torch._scaled_mm`` (:func:`difflab.perf.fast.fp8_matmul`) when every dimension is a
multiple of 16, elsewhere on the dequantized operands in float32
(:func:`~difflab.perf.fast.fp8_matmul_emulated`): the same arithmetic, so the CPU tests cover it.

The scaling state lives in two buffers of each layer, ``fp8_amax_history`` (3, H) and
``fp8_scale`` (3,), rows ``X, W, G``: they are in the ``state_dict``, so training checkpoints hold
them and a resumed run continues bit-identically. ``difflab.io.spec.load_denoiser`` drops them
(``difflab.io.checkpoint.TRAINING_BUFFERS``): a trained checkpoint samples as the plain fp32
network.

Inference in FP8 (weights and activations): the same layers in eval mode record nothing; the
activations use their frozen (last recorded) scale, the weight is scaled from its own amax
(just-in-time: exact for a frozen weight, and right for EMA weights copied in). On a GPU,
:class:`difflab.perf.fast.FP8Linear` (``optimize(net, fp8=True)``) is the inference-only path.

Limits: the amaxes are not all-reduced over processes (FP8 training is one process; ``TrainConfig``
refuses ``parallel`` with ``fp8``); under gradient checkpointing the recomputed forward records
its amaxes a second time.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..io.checkpoint import TRAINING_BUFFERS
from .fast import E4M3, fp8_matmul, fp8_matmul_emulated, fp8_supported

E5M2 = getattr(torch, "float8_e5m2", None)
FORMATS = {"e4m3": (E4M3, 448.0), "e5m2": (E5M2, 57344.0)}  # dtype, largest finite value
X, W, G = 0, 1, 2                                   # rows of fp8_amax_history, entries of fp8_scale
HISTORY, SCALE = TRAINING_BUFFERS                   # the buffer names
HISTORY_LEN = 16                                    # H; TE's default is 1024, a long run's choice


# ----------------------------------------------------------------------------------------------
# Scaling


def quantize(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """``fp8(clamp(x * scale, -max, max))`` in format ``fmt`` ("e4m3" or "e5m2"): saturating,
    a non-finite value becomes NaN (both formats keep NaN)."""
    dtype, fmax = FORMATS[fmt]
    v = (x.detach().float() * scale).nan_to_num(nan=math.nan, posinf=math.nan, neginf=math.nan)
    return v.clamp(-fmax, fmax).to(dtype)


def scale_from(amax: torch.Tensor, fmt: str, margin: int, previous: torch.Tensor) -> torch.Tensor:
    """``(fp8_max / amax) / 2^margin`` (Micikevicius et al. 2022, Section 4; TE's
    ``_default_sf_compute``); ``previous`` where amax is zero or not finite."""
    s = FORMATS[fmt][1] / amax / 2.0 ** margin
    return torch.where((amax > 0) & torch.isfinite(amax), s, previous)


@torch.no_grad()
def scale_for_call(x: torch.Tensor, history: torch.Tensor, scale: torch.Tensor, fmt: str, margin: int,
                   record: bool) -> torch.Tensor:
    """The scale this call quantizes ``x`` with: the delayed ``scale``, or just-in-time from
    amax(x) while ``history`` is all zero. With ``record``, amax(x) enters the history (newest
    first, the oldest drops out) and ``scale`` becomes the scale of the next call, in place."""
    amax = x.detach().abs().amax().float()
    now = torch.where(history.amax() > 0, scale, scale_from(amax, fmt, margin, scale))
    if record:
        history.copy_(torch.roll(history, 1))
        history[0] = amax
        scale.copy_(scale_from(history.amax(), fmt, margin, now))
    return now


# ----------------------------------------------------------------------------------------------
# The linear


def _matmul(a_q, a_scale, b_q, b_scale, out_dtype, scaled_mm: bool) -> torch.Tensor:
    """``(a_q / a_scale) @ (b_q / b_scale).T`` in float32 or on FP8 tensor cores; autocast off."""
    inv_a, inv_b = a_scale.reciprocal(), b_scale.reciprocal()
    with torch.autocast(a_q.device.type, enabled=False):
        if scaled_mm and not (a_q.shape[0] % 16 or a_q.shape[1] % 16 or b_q.shape[0] % 16):
            return fp8_matmul(a_q, inv_a, b_q, inv_b, out_dtype)
        return fp8_matmul_emulated(a_q, inv_a, b_q, inv_b, out_dtype)


class _FP8TrainMatmul(torch.autograd.Function):
    """``x W^T`` from E4M3 operands; the backward pass quantizes dy to E5M2 and returns
    ``dx = dy W`` and ``dW = dy^T x`` from the quantized operands (straight through to fp32 W)."""

    @staticmethod
    def forward(ctx, x2d, weight, x_q, s_x, w_q, s_w, history, scale, margin, record, scaled_mm):
        ctx.save_for_backward(x_q, s_x, w_q, s_w)
        ctx.state, ctx.margin, ctx.record, ctx.scaled_mm = (history, scale), margin, record, scaled_mm
        ctx.dtypes = x2d.dtype, weight.dtype
        return _matmul(x_q, s_x, w_q, s_w, x2d.dtype, scaled_mm)

    @staticmethod
    def backward(ctx, dy):
        x_q, s_x, w_q, s_w = ctx.saved_tensors
        history, scale = ctx.state
        s_g = scale_for_call(dy, history[G], scale[G], "e5m2", ctx.margin, ctx.record)
        g_q = quantize(dy, s_g, "e5m2")
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dy (M, N) @ W (N, K)
            dx = _matmul(g_q, s_g, w_q.t().contiguous(), s_w, ctx.dtypes[0], ctx.scaled_mm)
        if ctx.needs_input_grad[1]:  # dy^T (N, M) @ x (M, K)
            dw = _matmul(g_q.t().contiguous(), s_g, x_q.t().contiguous(), s_x, ctx.dtypes[1], ctx.scaled_mm)
        return dx, dw, None, None, None, None, None, None, None, None, None


def fp8_train_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, history: torch.Tensor,
                     scale: torch.Tensor, *, margin: int = 0, training: bool = True,
                     scaled_mm: bool | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with E4M3 x and W and an E5M2 gradient, delayed scaling from
    ``history`` (3, H) and ``scale`` (3,) (rows :data:`X`, :data:`W`, :data:`G`), updated in place
    when ``training``; see the module doc. ``scaled_mm``: use ``torch._scaled_mm`` (None: where
    the device has FP8 tensor cores)."""
    if scaled_mm is None:
        scaled_mm = fp8_supported(x.device)
    x2d = x.reshape(-1, x.shape[-1])
    s_x = scale_for_call(x2d, history[X], scale[X], "e4m3", margin, training)
    if training:
        s_w = scale_for_call(weight, history[W], scale[W], "e4m3", margin, True)
    else:  # a frozen weight: its own amax
        s_w = scale_from(weight.detach().abs().amax().float(), "e4m3", margin, scale[W])
    x_q, w_q = quantize(x2d, s_x, "e4m3"), quantize(weight, s_w, "e4m3")
    y = _FP8TrainMatmul.apply(x2d, weight, x_q, s_x, w_q, s_w, history, scale, margin, training, scaled_mm)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class FP8TrainLinear(nn.Linear):
    """An ``nn.Linear`` trained in FP8 (see the module doc); made in place by :func:`swap_fp8_training`."""

    fp8_margin = 0
    fp8_scaled_mm: bool | None = None  # None: torch._scaled_mm where the device has FP8 tensor cores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_train_linear(x, self.weight, self.bias, getattr(self, HISTORY), getattr(self, SCALE),
                                margin=self.fp8_margin, training=self.training, scaled_mm=self.fp8_scaled_mm)


class FP8TrainConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` trained in FP8: a linear over the channels of every pixel."""

    fp8_margin = 0
    fp8_scaled_mm: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_train_linear(x.movedim(1, -1), self.weight.flatten(1), self.bias, getattr(self, HISTORY),
                             getattr(self, SCALE), margin=self.fp8_margin, training=self.training,
                             scaled_mm=self.fp8_scaled_mm)
        return y.movedim(-1, 1)


FP8_LAYERS = (FP8TrainLinear, FP8TrainConv2d)


def is_pointwise_conv(m: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` that is a linear over channels: 1x1 kernel, stride 1, no padding, one group."""
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
            and m.padding in ((0, 0), "valid", "same"))


def swap_fp8_training(model: nn.Module, pattern: str | None = None, *, history_len: int = HISTORY_LEN,
                      margin: int = 0) -> list[str]:
    """Turn every plain ``nn.Linear`` and 1x1 ``nn.Conv2d`` of ``model`` whose name matches
    ``pattern`` (``re.search``; None: all) into :class:`FP8TrainLinear` / :class:`FP8TrainConv2d`
    in place, with a fresh scaling state (``history_len`` amaxes, ``margin``); returns their names.
    Parameters and their keys are unchanged; the state dict gains the two FP8 buffers per layer.
    Layers already swapped are left as they are."""
    if E4M3 is None or E5M2 is None:
        raise RuntimeError(f"FP8 training needs torch.float8_e4m3fn and float8_e5m2; torch {torch.__version__} lacks them")
    if not (isinstance(history_len, int) and history_len >= 1):
        raise ValueError(f"history_len={history_len!r} must be an integer >= 1")
    if not (isinstance(margin, int) and margin >= 0):
        raise ValueError(f"margin={margin!r} must be an integer >= 0")
    names = []
    for name, m in model.named_modules():
        if pattern is not None and not re.search(pattern, name):
            continue
        if type(m) is nn.Linear or is_pointwise_conv(m):
            m.__class__ = FP8TrainLinear if type(m) is nn.Linear else FP8TrainConv2d
            m.register_buffer(HISTORY, torch.zeros(3, history_len, device=m.weight.device))
            m.register_buffer(SCALE, torch.ones(3, device=m.weight.device))
            m.fp8_margin = margin
            names.append(name)
    return names


def fp8_layers(model: nn.Module) -> list[str]:
    """Names of the FP8 training layers of ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, FP8_LAYERS)]


__all__ = ["E5M2", "FORMATS", "X", "W", "G", "HISTORY_LEN", "quantize", "scale_from", "scale_for_call", "fp8_train_linear",
           "FP8TrainLinear", "FP8TrainConv2d", "FP8_LAYERS", "is_pointwise_conv", "swap_fp8_training", "fp8_layers"]
