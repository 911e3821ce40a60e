"""Module surgery by name (STYLE.md, rule 9): find a network's modules by name pattern and put
another module in place of one, without touching the network's code.

Every adapter is built from these steps: LoRA (:mod:`.lora`) wraps the linears and convolutions
a pattern names, IP-Adapter (:mod:`.ip_adapter`) replaces cross-attention layers, and attention
guidance (:mod:`difflab.guidance.attention`) hooks self-attention layers chosen the same way.
"""
from __future__ import annotations

import fnmatch
import re

from torch import nn


def matches(name: str, pattern: str) -> bool:
    """``"re:<regex>"``: the regex matches the whole name. Otherwise a shell glob (``fnmatch``,
    ``*`` crosses dots) matching the whole name or a dotted tail of it, so ``"to_q"`` matches
    ``"...attn1.to_q"`` (PEFT's suffix rule) and ``"attn1.*"`` every layer inside an ``attn1``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def patterns_of(target) -> list[str]:
    """``target`` (one pattern or a sequence of them) as a non-empty list."""
    patterns = [target] if isinstance(target, str) else list(target)
    if not patterns:
        raise ValueError("target must name at least one pattern")
    return patterns


def select(candidates, target, what: str, hint: str = "") -> list[str]:
    """The names of ``candidates`` (names, or a ``{name: module}`` dict) matching any pattern of
    ``target`` (see :func:`matches`), in their order. A pattern that matches none is a ValueError
    naming it, ``what`` was looked for, some candidates and ``hint``."""
    names = list(candidates)
    chosen = set()
    for p in patterns_of(target):
        hits = [n for n in names if matches(n, p)]
        if not hits:
            some = ", ".join(names[:8])
            raise ValueError(f"target pattern {p!r} matches no {what} (some are: {some}{' ...' if len(names) > 8 else ''})"
                             + hint)
        chosen.update(hits)
    return [n for n in names if n in chosen]


def outermost(model: nn.Module, predicate) -> dict[str, nn.Module]:
    """``{name: module}`` of the modules for which ``predicate(module)`` holds, in
    ``named_modules`` order, not counting those nested inside another such module."""
    out, inside = {}, []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if predicate(m):
            inside.append(name + ".")
            out[name] = m
    return out


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``model``'s submodule at the dotted ``name``."""
    if not name:
        raise ValueError("the model itself is a single layer: put it inside a container to replace it")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


__all__ = ["matches", "patterns_of", "select", "outermost", "replace_module"]
