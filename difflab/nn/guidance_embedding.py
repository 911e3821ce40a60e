"""A network that takes the guidance scale as an input, for guided distillation (Meng et al.
2023, "On Distillation of Guided Diffusion Models", section 4.1: the student x^(z_t, w) gets "a
Fourier embedding of w, incorporated into the backbone the same way as the time step").

:class:`GuidanceEmbedding` wraps a network ``net(x_in, t, **cond)`` whose time embedding is a
submodule (the ADM U-Net's ``time_embed``, the SD U-Net's ``time_embedding``): a forward hook adds
``MLP(sinusoidal(w))`` to that submodule's output, so the scale conditions every block exactly as
the time does. The MLP's last layer starts at zero: before training the wrapped network computes
what it did, at every w. The wrapped network's own keys are unchanged (``net.*``), so a teacher's
weights load into it as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import timestep_embedding, zero_


class GuidanceEmbedding(nn.Module):
    """``forward(x_in, t, guidance_scale=w, **cond)``: ``net(x_in, t, **cond)`` with the embedding
    of the guidance scale ``w`` (a float or a (B,) tensor) added to the output of ``net``'s
    submodule ``embed``. The embedding is ``Linear-SiLU-Linear`` on the sinusoidal embedding
    (:func:`~difflab.nn.layers.timestep_embedding`) of ``w_scale * w`` with ``features``
    channels, to ``dim`` channels (default: the out_features of the last ``nn.Linear`` in ``embed``)."""

    takes_guidance_scale = True  # pipelines pass the scale as an input instead of guiding (difflab.guidance.GuidanceInput)

    def __init__(self, net: nn.Module, embed: str = "time_embed", *, dim: int | None = None, features: int = 64,
                 w_scale: float = 100.0):
        super().__init__()
        try:
            target = net.get_submodule(embed)
        except AttributeError:
            raise ValueError(f"{type(net).__name__} has no submodule {embed!r} to add the guidance embedding to; name "
                             "the module that makes its time embedding (embed=)") from None
        if dim is None:
            linears = [m for m in target.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"cannot tell the width of {embed!r} (no nn.Linear in it): pass dim=")
            dim = linears[-1].out_features
        self.net, self.embed, self.features, self.w_scale = net, embed, features, w_scale
        self.guidance_embed = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), zero_(nn.Linear(dim, dim)))
        self._w = None  # the scale of the call in progress, read by the hook
        target.register_forward_hook(self._add_guidance)

    def _add_guidance(self, module, args, output):
        if self._w is None:
            return output
        w = self._w.to(output.device)
        emb = timestep_embedding(self.w_scale * w, self.features).to(self.guidance_embed[0].weight.dtype)
        return output + self.guidance_embed(emb).to(output.dtype)

    @property
    def config(self):
        """The wrapped network's config (its classes, channels, ...)."""
        return getattr(self.net, "config", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, guidance_scale=None, **cond) -> torch.Tensor:
        if guidance_scale is None:
            raise ValueError("this network takes the guidance scale as an input: pass guidance_scale= (1 = conditional)")
        w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device)
        w = w.expand(x.shape[0]) if w.ndim == 0 else w.reshape(-1)
        if w.shape != (x.shape[0],):
            raise ValueError(f"guidance_scale must be a number or have shape ({x.shape[0]},), got {tuple(w.shape)}")
        self._w = w
        try:
            return self.net(x, t, **cond)
        finally:
            self._w = None


__all__ = ["GuidanceEmbedding"]
