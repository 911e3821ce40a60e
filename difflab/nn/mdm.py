"""MDM, the Human Motion Diffusion Model (Tevet et al. 2023, Section 3 and Figure 2): a
transformer encoder over the frames of a motion that predicts the clean motion.

A network, not a denoiser: ``net(x_in, t, class_labels=None)`` maps a network-scale motion
(B, frames, joints, features) and a (B,) float time to the raw prediction, shaped like ``x_in``
(MDM pairs it with ``prediction="x0"``). Layout:

- every frame's pose (joints x features) is projected linearly to ``d_model`` and given a
  sinusoidal position (its frame index);
- the time (sinusoidal, through an MLP) plus the action's embedding is one extra token, z_tk,
  put before the frames (MDM's encoder-only variant); the action table has one more row, the
  null class ``num_classes``, which classifier-free guidance uses (their Section 3, "we train
  our model with classifier-free guidance", 10% of labels dropped);
- ``depth`` pre-norm transformer encoder layers (GELU) over the 1 + frames tokens;
- the frame tokens are projected back to poses; the z_tk token is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import JSONConfig
from .layers import TimestepMLP, check_class_labels, timestep_embedding


@dataclass(frozen=True)
class MDMConfig(JSONConfig):
    """Everything that shapes an MDM; JSON-safe for checkpoints."""

    frames: int = 32                 # the clip length it is trained on (one sample is (frames, joints, features))
    joints: int = 17
    features: int = 3                # per joint: xyz positions
    num_classes: int | None = 8      # actions; None: unconditional. Label num_classes is the null class
    d_model: int = 128
    depth: int = 4
    heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.1

    def __post_init__(self):
        bad = [f"{k}={getattr(self, k)!r}" for k in ("frames", "joints", "features", "d_model", "depth", "heads", "ff_mult")
               if not (isinstance(getattr(self, k), int) and not isinstance(getattr(self, k), bool) and getattr(self, k) >= 1)]
        if self.num_classes is not None and not (isinstance(self.num_classes, int) and self.num_classes >= 1):
            bad.append(f"num_classes={self.num_classes!r}")
        if bad:
            raise ValueError(f"MDMConfig sizes must be positive integers (num_classes may be None): {', '.join(bad)}")
        if self.d_model % self.heads:
            raise ValueError(f"MDMConfig d_model={self.d_model} must be divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MDMConfig dropout={self.dropout} must be in [0, 1)")

    @property
    def null_class(self) -> int | None:
        return self.num_classes


def frame_positions(frames: int, dim: int) -> torch.Tensor:
    """(frames, dim) sinusoidal positions of Vaswani et al. 2017 (Section 3.5)."""
    return timestep_embedding(torch.arange(frames), dim)


class MDM(nn.Module):
    """Tevet et al. 2023's transformer encoder; see the module doc."""

    def __init__(self, config: MDMConfig = MDMConfig()):
        super().__init__()
        self.config = c = config
        pose = c.joints * c.features
        self.pose_in = nn.Linear(pose, c.d_model)
        self.time_embed = TimestepMLP(c.d_model, c.d_model)
        self.class_embed = nn.Embedding(c.num_classes + 1, c.d_model) if c.num_classes is not None else None
        layer = nn.TransformerEncoderLayer(c.d_model, c.heads, c.ff_mult * c.d_model, c.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.d_model)
        self.pose_out = nn.Linear(c.d_model, pose)
        self.register_buffer("positions", frame_positions(c.frames + 1, c.d_model), persistent=False)

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if x_in.ndim != 4 or x_in.shape[2:] != (c.joints, c.features) or x_in.shape[1] > c.frames:
            raise ValueError(f"MDM input must be (B, frames <= {c.frames}, {c.joints}, {c.features}), got {tuple(x_in.shape)}")
        b, f = x_in.shape[:2]
        check_class_labels(class_labels, b, c.num_classes, "MDM")
        t = torch.as_tensor(t, device=x_in.device).float().reshape(-1).expand(b)
        token = self.time_embed(timestep_embedding(t, c.d_model).to(x_in.dtype))
        if self.class_embed is not None:
            labels = class_labels if class_labels is not None else torch.full((b,), c.num_classes, device=x_in.device)
            token = token + self.class_embed(labels.long())
        h = self.pose_in(x_in.reshape(b, f, -1))
        h = torch.cat([token[:, None], h], dim=1) + self.positions[:f + 1].to(h.dtype)
        h = self.norm(self.encoder(h))
        return self.pose_out(h[:, 1:]).reshape(x_in.shape)


def motion_shape(config: MDMConfig, meta: dict) -> tuple:
    """(frames, joints, features): one sample of a denoiser around an MDM."""
    return (int(config.frames), int(config.joints), int(config.features))


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


__all__ = ["MDM", "MDMConfig", "frame_positions", "motion_shape", "parameter_count"]
