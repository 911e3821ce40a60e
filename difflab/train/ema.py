"""Exponential moving average of model weights (Polyak & Juditsky 1992), as used to sample from
diffusion models since Ho et al. 2020 (appendix B) and Song & Ermon 2020.

Update number t (0-based) uses the decay ``min(decay, (1 + t) / (10 + t))``: the warmup of
TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, also used by guided-diffusion and
Stable Diffusion's LitEma, so early averages are not dominated by the random initialization
(0.1 at t = 0, 0.5 at t = 8, 0.9 at t = 80, 0.99 at t = 890).
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Float32 shadow copies of a model's state (parameters and floating buffers), keyed like
    ``model.state_dict()``; integer buffers are copied as they are.

    ``ema.update(model)`` after every optimizer step; ``ema.copy_to(model)`` to sample with the
    average; ``state_dict()`` has the model's own keys, so it loads into a fresh model directly.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1]")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        with torch.no_grad():
            self.shadow = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                           for k, v in model.state_dict().items()}

    def decay_at(self, t: int) -> float:
        """The decay of update number t (0-based): min(decay, (1 + t) / (10 + t))."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * weights, with d = decay_at(num_updates)."""
        d = self.decay_at(self.num_updates)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v.detach().to(s.dtype), 1.0 - d)
            else:
                s.copy_(v)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        model.load_state_dict(self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like the model's state dict. ``num_updates`` is separate."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int | None = None) -> None:
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        for k, s in self.shadow.items():
            if state[k].shape != s.shape:
                raise ValueError(f"EMA state {k!r} has shape {tuple(state[k].shape)}, the model's is {tuple(s.shape)}")
            s.copy_(state[k])
        if num_updates is not None:
            self.num_updates = int(num_updates)
