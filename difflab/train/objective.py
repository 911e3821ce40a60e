"""The objective contract: what :func:`difflab.train.fit`, the one training loop, is given.

An objective is a small plain object (no base class) with:

- ``module: nn.Module``: what trains. Its parameters with ``requires_grad`` go to the
  optimizer; EMA and checkpoints hold its state dict. Several trained modules go in one
  ``nn.ModuleDict`` (DreamBooth's U-Net and text encoder). A frozen network (a distillation
  teacher, textual inversion's U-Net) is an attribute outside ``module``: it is neither
  optimized, averaged nor checkpointed.
- ``draw(batch, generator) -> dict``: the step's random draws (noise levels, noise, label
  dropout, augmentation) made on the CPU, for the WHOLE batch, from the loop's generator seeded
  with (seed, step). ``batch`` holds the step's rows of the data (``(B, ...)`` tensors, on the
  data's device); the returned dict is merged over it (its keys replace the data's). Every value
  is a ``(B, ...)`` tensor or None, so the loop can slice it into micro-batches and DDP ranks:
  the results depend neither on ``grad_accum`` nor on the number of processes.
- ``loss(batch) -> Tensor (b,)``: per-example losses of a (micro-)batch, on the module's device,
  under the loop's autocast. Or a dict with ``"loss"`` (b,) and other per-example terms
  (b,) that the log averages too (DreamBooth's ``"instance"`` and ``"prior"``).

and optionally:

- ``param_groups(config) -> list[dict]``: the optimizer's parameter groups (default
  :func:`param_groups`: one group of the trainable parameters at ``config.lr``). A group's
  ``"lr"`` is its rate at the top of the schedule (the schedule scales every group alike).
- ``after_step()``: runs after every optimizer step, before the EMA update (textual
  inversion's :meth:`~difflab.train.objectives.dreambooth.RowsOnly.restore`).
- ``name``: recorded in the checkpoint's metadata and shown by the progress bar.

Layers of ``module`` may record an auxiliary loss in their forward (a mixture-of-experts
router's load balancing): the loop adds it, times ``TrainConfig.aux_loss_weight``, and logs it
as ``"aux_loss"`` (:mod:`difflab.nn.aux`); the objective does nothing for it.

The loop knows nothing of sigmas except for its log: when the drawn batch has a ``"sigma"``
key the loss is also logged by noise level (:class:`difflab.train.losses.SigmaBinnedLoss`).
A new training method is a new objective class handed to ``fit``; the loop is not edited.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Objective(Protocol):
    """For documentation and ``isinstance`` checks; objectives need not inherit from it."""

    module: nn.Module

    def draw(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor | None]:
        ...

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        ...


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` with ``requires_grad``, each once."""
    return [p for p in module.parameters() if p.requires_grad]


def param_groups(objective, config) -> list[dict]:
    """The objective's optimizer groups: ``objective.param_groups(config)``, or one group of
    ``module``'s trainable parameters at ``config.lr``. Every group gets an ``"lr"``."""
    make = getattr(objective, "param_groups", None)
    groups = make(config) if callable(make) else [{"params": trainable_parameters(objective.module)}]
    groups = [{**g, "params": list(g["params"])} for g in groups if len(list(g["params"]))]
    if not groups:
        raise ValueError(f"nothing to train: {type(objective.module).__name__} has no parameter with requires_grad")
    for g in groups:
        g.setdefault("lr", config.lr)
    return groups


def split_loss(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(losses (b,), other per-example terms)`` of what ``objective.loss`` returned."""
    if isinstance(out, dict):
        return out["loss"], {k: v for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.ndim == 1}
    return out, {}


def objective_name(objective) -> str:
    return str(getattr(objective, "name", None) or type(objective).__name__)


__all__ = ["Objective", "trainable_parameters", "param_groups", "split_loss", "objective_name"]
