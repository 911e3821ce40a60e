"""The point-cloud judge: a PointNet classifier (Qi et al. 2017, "PointNet", Section 4.2: a shared
per-point MLP, a symmetric max-pool, an MLP on the pooled feature) trained on the procedural
shapes (:mod:`difflab.data.shapes3d`), used to score generated clouds. Its accuracy on clouds asked
for class c measures class fidelity; the Frechet distance in its pooled features is an analogue
of the Frechet point-cloud distance (Shu et al. 2019, FPD, with this net in place of theirs).

Max-pooling makes it invariant to the order of the points and lets it read clouds of any size.
It is trained with random yaw rotations, a small jitter and a random point count per batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..train import Classification, TrainConfig, fit
from .frechet import frechet_distance_features


@dataclass(frozen=True)
class PointJudgeConfig:
    widths: tuple = (64, 128, 256)   # the shared per-point MLP
    feature_dim: int = 128           # features after the pooled MLP (the Frechet distance's)
    num_classes: int = 10
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    jitter: float = 0.01             # std of the training jitter, in the unit ball's units
    seed: int = 0


def augment_clouds(x: torch.Tensor, g: torch.Generator, jitter: float = 0.01) -> torch.Tensor:
    """A random yaw (about z) per cloud and Gaussian jitter of std ``jitter``."""
    b = len(x)
    yaw = 2 * math.pi * torch.rand(b, generator=g)
    c, s = yaw.cos(), yaw.sin()
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = c, -s, s, c, 1.0
    return x @ rot.transpose(1, 2) + jitter * torch.randn(x.shape, generator=g)


class PointJudge(nn.Module):
    """clouds (B, N, 3) -> per-point MLP (1x1 convolutions, ReLU) -> max over points -> linear
    (feature_dim)-ReLU = features -> linear = logits."""

    def __init__(self, config: PointJudgeConfig = PointJudgeConfig()):
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(config.seed)
        dims = (3,) + tuple(config.widths)
        self.mlp = nn.ModuleList(nn.Conv1d(a, b, 1) for a, b in zip(dims, dims[1:]))
        self.fc = nn.Linear(dims[-1], config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        with torch.no_grad():  # PyTorch's default init, drawn from the judge's own generator
            for layer in (*self.mlp, self.fc, self.head):
                bound = layer.weight[0].numel() ** -0.5
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
        self.train_seconds: float | None = None

    @staticmethod
    def prepare(clouds: torch.Tensor) -> torch.Tensor:
        if clouds.ndim != 3 or clouds.shape[-1] != 3:
            raise ValueError(f"the point judge takes clouds (B, N, 3), got shape {tuple(clouds.shape)}")
        return clouds.float()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)
        for layer in self.mlp:
            h = F.relu(layer(h))
        return F.relu(self.fc(h.amax(-1)))

    def forward(self, clouds: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.prepare(clouds)))

    @torch.no_grad()
    def logits(self, clouds: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        return torch.cat([self(clouds[i:i + batch_size]) for i in range(0, len(clouds), batch_size)])

    def accuracy(self, clouds: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.logits(clouds).argmax(1) == torch.as_tensor(labels)).float().mean().item()

    def per_class_accuracy(self, clouds: torch.Tensor, labels: torch.Tensor) -> list[float]:
        labels = torch.as_tensor(labels)
        hit = self.logits(clouds).argmax(1) == labels
        return [hit[labels == c].float().mean().item() for c in range(self.config.num_classes)]

    @torch.no_grad()
    def features(self, clouds: torch.Tensor) -> torch.Tensor:
        return self.embed(self.prepare(clouds))

    def frechet(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """The FPD analogue: Frechet distance between Gaussians fitted to the two sets' features."""
        return frechet_distance_features(self.features(a), self.features(b))

    @classmethod
    def fit(cls, clouds: torch.Tensor, labels: torch.Tensor, config: PointJudgeConfig = PointJudgeConfig(),
            progress: bool = False) -> "PointJudge":
        """Cross-entropy on augmented clouds (:func:`augment_clouds`) through :func:`difflab.train.fit`,
        AdamW, one-cycle; ``train_seconds`` records the CPU seconds it took."""
        judge = cls(config)
        x = PointJudge.prepare(clouds)
        steps = config.epochs * -(-len(x) // config.batch_size)
        tc = TrainConfig(steps=steps, batch_size=config.batch_size, lr=config.lr, lr_schedule="one_cycle",
                         warmup_steps=round(0.3 * steps), weight_decay=1e-4, grad_clip=None, ema_decay=None,
                         log_every=0, seed=config.seed, progress=progress)
        start = time.process_time()
        fit(Classification(judge, augment=lambda xb, g: augment_clouds(xb, g, config.jitter)),
            {"x": x, "y": torch.as_tensor(labels)}, tc)
        judge.train_seconds = time.process_time() - start
        return judge.eval()


__all__ = ["PointJudge", "PointJudgeConfig", "augment_clouds"]
