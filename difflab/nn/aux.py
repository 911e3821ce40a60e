"""Auxiliary losses that layers record during their forward: the seam between networks and the loop.

Some layers carry a training term of their own that is not a function of the objective's output:
the load-balancing loss of a mixture-of-experts router (Fedus et al. 2022, "Switch Transformers",
eq. 4; :class:`difflab.nn.moe.MoEFeedForward`) is the example. The protocol is one attribute:

- a module that has such a term sets ``self.aux_loss`` in its ``forward`` to a scalar (0-dim)
  tensor, still attached to the graph, already multiplied by the layer's own coefficient
  (Switch's alpha); ``None`` means "nothing this forward". A module called several times in
  one loss keeps the value of its last call.

:func:`difflab.train.fit` clears every ``aux_loss`` before each micro-batch's forward and adds
``TrainConfig.aux_loss_weight * collect_aux_loss(objective.module)`` to the micro-batch's mean
loss; the term is logged as ``"aux_loss"``. A network without such a module trains bit for bit
as before: :func:`collect_aux_loss` returns None and nothing is added. Networks outside the
objective's ``module`` (a frozen teacher) are not collected.
"""
from __future__ import annotations

import torch
from torch import nn

AUX_LOSS = "aux_loss"  # the attribute, and the name of the term in the training log


def aux_losses(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified name: aux_loss}`` of ``module`` and its submodules whose ``aux_loss`` is a tensor
    (the root's name is ``""``). Each must be a scalar: anything else is an error naming the module."""
    found = {}
    for name, m in module.named_modules():
        value = m.__dict__.get(AUX_LOSS)
        if value is None:
            continue
        if not torch.is_tensor(value) or value.ndim != 0:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{type(m).__name__} {name or '(root)'}: aux_loss must be a scalar (0-dim) tensor or None, "
                             f"got {shape}")
        found[name] = value
    return found


def collect_aux_loss(module: nn.Module) -> torch.Tensor | None:
    """The sum of the ``aux_loss`` recorded in ``module`` (see the module doc), or None when none is."""
    values = list(aux_losses(module).values())
    if not values:
        return None
    total = values[0].float()
    for v in values[1:]:
        total = total + v.float()
    return total


def clear_aux_losses(module: nn.Module) -> None:
    """Set every recorded ``aux_loss`` in ``module`` back to None (before a new forward)."""
    for m in module.modules():
        if m.__dict__.get(AUX_LOSS) is not None:
            m.__dict__[AUX_LOSS] = None


__all__ = ["AUX_LOSS", "aux_losses", "collect_aux_loss", "clear_aux_losses"]
