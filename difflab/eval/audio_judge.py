"""The audio judge: a small CNN on log-mel spectrograms, trained on the embedded clips
(:mod:`difflab.data.audio`), used to score generated audio. Its accuracy on clips asked for class
c measures class fidelity; the Frechet distance in its penultimate features is an analogue of
FAD (the Frechet Audio Distance, Kilgour et al. 2019, with this net in place of VGGish).

It has the digits judge's interface (``prepare``, ``embed``, ``head``, ``accuracy``, ``features``),
so :func:`difflab.eval.judge_report` and :class:`difflab.eval.JudgeFeatures` take it as they are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.audio import AudioFrontEnd, mel_image
from ..train import Classification, TrainConfig, fit
from ..train.objectives.classification import random_shift
from .frechet import frechet_distance_features


@dataclass(frozen=True)
class AudioJudgeConfig:
    width: int = 16          # channels of the first conv; then 2x and 4x
    feature_dim: int = 64    # penultimate features (the Frechet distance's)
    num_classes: int = 10
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


class AudioJudge(nn.Module):
    """log-mel image (1, n_mels, frames) -> conv3x3-relu-maxpool2 -> conv3x3-relu-maxpool2 ->
    conv3x3-relu -> mean and standard deviation over time -> linear(feature_dim)-relu = features -> linear = logits.
    Input: mono clips (N, 1, L) in [-1, 1] at the front end's sample rate."""

    def __init__(self, config: AudioJudgeConfig = AudioJudgeConfig(), front_end: AudioFrontEnd = AudioFrontEnd()):
        super().__init__()
        self.config, self.front_end = config, front_end
        w = config.width
        g = torch.Generator().manual_seed(config.seed)
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * w * (front_end.n_mels // 4), config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        with torch.no_grad():  # PyTorch's default init, drawn from the judge's own generator
            for layer in (self.conv1, self.conv2, self.conv3, self.fc, self.head):
                bound = layer.weight[0].numel() ** -0.5
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
        self.train_seconds: float | None = None

    def prepare(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips (N, 1, L) -> log-mel images (N, 1, n_mels, frames) in [-1, 1]; images pass through."""
        if clips.ndim == 4:
            return clips.float()
        return mel_image(clips.float(), self.front_end)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        h = torch.cat([h.mean(-1), h.std(-1)], 1)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.prepare(images)))

    @torch.no_grad()
    def logits(self, clips: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self(clips[i:i + batch_size]) for i in range(0, len(clips), batch_size)])

    def accuracy(self, clips: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.logits(clips).argmax(1) == torch.as_tensor(labels)).float().mean().item()

    def per_class_accuracy(self, clips: torch.Tensor, labels: torch.Tensor) -> list[float]:
        hit = self.logits(clips).argmax(1) == torch.as_tensor(labels)
        return [hit[labels == c].float().mean().item() for c in range(self.config.num_classes)]

    @torch.no_grad()
    def features(self, clips: torch.Tensor) -> torch.Tensor:
        return self.embed(self.prepare(clips))

    def frechet(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """The FAD analogue: Frechet distance between Gaussians fitted to the two sets' features."""
        return frechet_distance_features(self.features(a), self.features(b))

    @classmethod
    def fit(cls, clips: torch.Tensor, labels: torch.Tensor, config: AudioJudgeConfig = AudioJudgeConfig(),
            front_end: AudioFrontEnd = AudioFrontEnd(), progress: bool = False) -> "AudioJudge":
        """Cross-entropy on the log-mel images of ``clips`` with random shifts of up to 2 bins/frames
        (:class:`difflab.train.Classification` through :func:`difflab.train.fit`), AdamW, one-cycle."""
        judge = cls(config, front_end)
        x = judge.prepare(clips)
        steps = config.epochs * -(-len(x) // config.batch_size)
        tc = TrainConfig(steps=steps, batch_size=config.batch_size, lr=config.lr, lr_schedule="one_cycle",
                         warmup_steps=round(0.3 * steps), weight_decay=1e-4, grad_clip=None, ema_decay=None,
                         log_every=0, seed=config.seed, progress=progress)
        start = time.process_time()
        fit(Classification(judge, augment=lambda xb, g: random_shift(xb, 2, g)), {"x": x, "y": torch.as_tensor(labels)}, tc)
        judge.train_seconds = time.process_time() - start
        return judge.eval()


__all__ = ["AudioJudge", "AudioJudgeConfig"]
