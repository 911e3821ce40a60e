"""Class labels of the scenes (:mod:`difflab.data.scenes`) for a class-conditional model: what a
scene is conditioned on.

- ``"count"``: label = count - 1 (``max_objects`` classes): how many objects, not which;
- ``"object_set"``: one label per (count, colour set) combination, the scenes' objects having
  distinct colours: with 6 colours and 1-3 objects, 6 + 15 + 20 = 41 classes. The model is told
  which colours to paint, so a fragment of a colour not asked for is off its distribution.

Object sets are numbered by count, then by their sorted colour tuple in lexicographic order
(:func:`itertools.combinations`), so a label decodes back to its set (:func:`object_set_of`).
"""
from __future__ import annotations

import functools
from itertools import combinations

import torch

from .scenes import COLOURS

CONDITIONS = ("count", "object_set")


@functools.lru_cache(maxsize=8)
def object_sets(max_objects: int) -> tuple[tuple[int, ...], ...]:
    """Every colour set of 1..``max_objects`` objects (sorted tuples of colour indices), in label order."""
    if not 1 <= max_objects <= len(COLOURS):
        raise ValueError(f"max_objects={max_objects} must be in 1..{len(COLOURS)}")
    return tuple(s for k in range(1, max_objects + 1) for s in combinations(range(len(COLOURS)), k))


def num_labels(condition: str, max_objects: int) -> int:
    """The number of classes of ``condition`` (the U-Net's ``num_classes``)."""
    check_condition(condition)
    return max_objects if condition == "count" else len(object_sets(max_objects))


def check_condition(condition: str) -> None:
    if condition not in CONDITIONS:
        raise ValueError(f"condition={condition!r} is unknown; choose one of {list(CONDITIONS)}")


def scene_labels(counts: torch.Tensor, colours: torch.Tensor, condition: str, max_objects: int) -> torch.Tensor:
    """(N,) long labels of scenes given their counts (N,) and colour indices (N, max_objects), -1 padded."""
    check_condition(condition)
    if condition == "count":
        return counts.long() - 1
    index = {s: i for i, s in enumerate(object_sets(max_objects))}
    return torch.tensor([index[tuple(sorted(c for c in row if c >= 0))] for row in colours.tolist()], dtype=torch.long)


def object_set_of(label: int, condition: str, max_objects: int) -> tuple[int, tuple[int, ...] | None]:
    """(count, sorted colour indices) asked by a label; the colours are None under ``"count"``."""
    check_condition(condition)
    if not 0 <= label < num_labels(condition, max_objects):
        raise ValueError(f"label={label} is outside 0..{num_labels(condition, max_objects) - 1}")
    if condition == "count":
        return label + 1, None
    colours = object_sets(max_objects)[label]
    return len(colours), colours


def labels_asking(count: int, n: int, condition: str, max_objects: int) -> torch.Tensor:
    """``n`` labels asking for ``count`` objects: under ``"object_set"`` the sets of that count in
    turn (every set once before any twice), deterministically."""
    check_condition(condition)
    if condition == "count":
        return torch.full((n,), count - 1, dtype=torch.long)
    ids = [i for i, s in enumerate(object_sets(max_objects)) if len(s) == count]
    return torch.tensor([ids[j % len(ids)] for j in range(n)], dtype=torch.long)


__all__ = ["CONDITIONS", "object_sets", "num_labels", "check_condition", "scene_labels", "object_set_of", "labels_asking"]
