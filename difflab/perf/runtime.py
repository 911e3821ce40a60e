"""Where and in what precision a network runs: the vocabulary :mod:`difflab.perf.fast` and
:mod:`difflab.perf.memory` share (precision names, autocast, a module's device, its repeated blocks)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(precision: str, device="cuda"):
    """Autocast to bf16 / fp16 on ``device`` (a torch.device or its type); a no-op for fp32.

    Mixed-precision training (Micikevicius et al. 2018): weights stay fp32, matmuls and
    convolutions run in the lower precision, reductions such as normalizations in fp32.
    """
    dtype = dtype_of(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU when it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def blocks(model: nn.Module, predicate=None) -> list[tuple[str, nn.Module]]:
    """The outermost repeated blocks of ``model``: modules for which ``predicate(module)`` holds
    (default: difflab's blocks, the modules with a ``checkpoint`` attribute), not counting
    blocks nested inside another one. ``(name, module)`` pairs in ``named_modules`` order."""
    predicate = predicate or (lambda m: hasattr(m, "checkpoint"))
    found, inside = [], []
    for name, m in model.named_modules():
        if m is model or any(name.startswith(p + ".") for p in inside):
            continue
        if predicate(m):
            found.append((name, m))
            inside.append(name)
    return found


__all__ = ["PRECISIONS", "dtype_of", "autocast", "device_of", "blocks"]
