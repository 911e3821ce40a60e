"""Judging stick-figure motions: an action classifier and the metrics of motion generation.

- :class:`MotionJudge`: a 1-D convolutional action classifier over frames, trained on real clips
  (:mod:`difflab.data.stick_figures`); its penultimate features stand in for the motion encoder
  MDM's evaluation uses (Guo et al. 2022; Tevet et al. 2023, Section 4.1).
- On those features: :func:`frechet` (FID), :func:`diversity` (mean distance between randomly
  paired motions) and :func:`multimodality` (mean distance between motions of the same action),
  MDM's metrics, computed for generated and real motions alike.
- Physical plausibility: :func:`bone_length_drift` (a rigid skeleton keeps its bone lengths) and
  :func:`foot_skate_ratio` (feet on the ground should not slide; Karunratanakul et al. 2023,
  "Guided Motion Diffusion", Section 5), both read beside the real data's values.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.stick_figures import FEET, bone_lengths, canonicalize, check_motions
from ..train import Classification, TrainConfig, fit
from .frechet import frechet_distance_features


@dataclass(frozen=True)
class MotionJudgeConfig:
    joints: int = 17
    width: int = 64          # channels of the first convolution; then 2x
    feature_dim: int = 64    # penultimate features (FID, diversity, multimodality)
    num_classes: int = 8
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    jitter: float = 0.02     # training augmentation: Gaussian noise on the inputs, metres
    seed: int = 0


def motion_inputs(motions: torch.Tensor) -> torch.Tensor:
    """(N, F, J, 3) positions -> (N, 3 J + 3, F): each frame's pose relative to the root's ground
    position and the root's velocity, after :func:`~difflab.data.stick_figures.canonicalize`."""
    m = canonicalize(check_motions(motions).float())
    ground = m[:, :, :1].clone()
    ground[..., 1] = 0
    pose = (m - ground).flatten(2)
    vel = F.pad(m[:, 1:, 0] - m[:, :-1, 0], (0, 0, 1, 0))
    return torch.cat([pose, vel * 10], dim=2).transpose(1, 2)


class MotionJudge(nn.Module):
    """conv5-relu -> conv5/2-relu -> conv3-relu -> mean and max over time -> linear(feature_dim)-relu
    = features -> linear = logits. Input: motions (N, F, J, 3) in metres, or :func:`motion_inputs`."""

    def __init__(self, config: MotionJudgeConfig = MotionJudgeConfig()):
        super().__init__()
        self.config = c = config
        w = c.width
        g = torch.Generator().manual_seed(c.seed)
        self.conv1 = nn.Conv1d(3 * c.joints + 3, w, 5, padding=2)
        self.conv2 = nn.Conv1d(w, 2 * w, 5, stride=2, padding=2)
        self.conv3 = nn.Conv1d(2 * w, 2 * w, 3, padding=1)
        self.fc = nn.Linear(4 * w, c.feature_dim)
        self.head = nn.Linear(c.feature_dim, c.num_classes)
        with torch.no_grad():  # PyTorch's default init, from the judge's own generator
            for layer in (self.conv1, self.conv2, self.conv3, self.fc, self.head):
                bound = layer.weight[0].numel() ** -0.5
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
        self.train_seconds: float | None = None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if x.ndim == 3 else motion_inputs(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return F.relu(self.fc(torch.cat([h.mean(-1), h.amax(-1)], 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.prepare(x)))

    @torch.no_grad()
    def logits(self, motions: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self(motions[i:i + batch_size]) for i in range(0, len(motions), batch_size)])

    def predict(self, motions: torch.Tensor) -> torch.Tensor:
        return self.logits(motions).argmax(1)

    def accuracy(self, motions: torch.Tensor, labels) -> float:
        return (self.predict(motions) == torch.as_tensor(labels)).float().mean().item()

    def per_class_accuracy(self, motions: torch.Tensor, labels) -> list[float]:
        labels = torch.as_tensor(labels)
        hit = self.predict(motions) == labels
        return [hit[labels == c].float().mean().item() if bool((labels == c).any()) else float("nan")
                for c in range(self.config.num_classes)]

    @torch.no_grad()
    def features(self, motions: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embed(self.prepare(motions[i:i + 256])) for i in range(0, len(motions), 256)])

    @classmethod
    def fit(cls, motions: torch.Tensor, labels, config: MotionJudgeConfig = MotionJudgeConfig(),
            progress: bool = False) -> MotionJudge:
        """Cross-entropy on real clips with Gaussian jitter (:class:`difflab.train.Classification`
        through :func:`difflab.train.fit`), AdamW, one-cycle."""
        judge = cls(config)
        x = motion_inputs(motions)
        steps = config.epochs * -(-len(x) // config.batch_size)
        tc = TrainConfig(steps=steps, batch_size=config.batch_size, lr=config.lr, lr_schedule="one_cycle",
                         warmup_steps=round(0.3 * steps), weight_decay=1e-4, grad_clip=None, ema_decay=None,
                         log_every=0, seed=config.seed, progress=progress)
        start = time.process_time()
        jitter = lambda xb, g: xb + config.jitter * torch.randn(xb.shape, generator=g)
        fit(Classification(judge, augment=jitter), {"x": x, "y": torch.as_tensor(labels)}, tc)
        judge.train_seconds = time.process_time() - start
        return judge.eval()


# ----------------------------------------------------------------------------------------------
# MDM's metrics on judge features


def frechet(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID: the Frechet distance between Gaussians fitted to two sets of judge features."""
    return frechet_distance_features(features_a, features_b)


def diversity(features: torch.Tensor, pairs: int = 200, seed: int = 0) -> float:
    """Mean distance between ``pairs`` random pairs of motions (Guo et al. 2020; MDM's Diversity, S_d = 200)."""
    g = torch.Generator().manual_seed(seed)
    n = len(features)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 motions, got {n}")
    i, j = torch.randint(0, n, (2, pairs), generator=g)
    j = torch.where(i == j, (j + 1) % n, j)
    return float((features[i] - features[j]).norm(dim=1).mean())


def multimodality(features: torch.Tensor, labels, pairs: int = 20, seed: int = 0) -> float:
    """Mean distance between ``pairs`` random pairs of motions of the same action, averaged over the
    actions with two motions or more (MDM's MultiModality, S_l pairs per action)."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    per_action = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero()[:, 0]
        if len(idx) < 2:
            continue
        i, j = torch.randint(0, len(idx), (2, pairs), generator=g)
        j = torch.where(i == j, (j + 1) % len(idx), j)
        per_action.append((features[idx[i]] - features[idx[j]]).norm(dim=1).mean())
    if not per_action:
        raise ValueError("multimodality needs an action with at least 2 motions")
    return float(torch.stack(per_action).mean())


# ----------------------------------------------------------------------------------------------
# Physical plausibility


def bone_length_drift(motions: torch.Tensor) -> float:
    """Mean over clips and bones of std_t(length) / mean_t(length): 0 for a rigid skeleton."""
    lengths = bone_lengths(check_motions(motions).float())
    return float((lengths.std(1) / lengths.mean(1).clamp(min=1e-6)).mean())


def foot_skate_ratio(motions: torch.Tensor, height: float = 0.05, distance: float = 0.025) -> float:
    """The fraction of frame steps in which a foot near the ground (below ``height`` metres at both
    ends) slides more than ``distance`` metres horizontally (GMD's foot-skating ratio)."""
    feet = check_motions(motions).float()[:, :, list(FEET)]
    low = (feet[:, :-1, :, 1] < height) & (feet[:, 1:, :, 1] < height)
    slide = (feet[:, 1:, :, [0, 2]] - feet[:, :-1, :, [0, 2]]).norm(dim=-1) > distance
    return float((low & slide).any(-1).float().mean())


def motion_metrics(judge: MotionJudge, motions: torch.Tensor, labels, reference: torch.Tensor, *, seed: int = 0) -> dict:
    """Action accuracy, FID against ``reference`` motions, diversity, multimodality, bone-length
    drift and foot-skate ratio of ``motions`` (metres) asked to show ``labels``."""
    feats, ref = judge.features(motions), judge.features(reference)
    return {"accuracy": judge.accuracy(motions, labels), "fid": frechet(feats, ref), "diversity": diversity(feats, seed=seed),
            "multimodality": multimodality(feats, labels, seed=seed), "bone_drift": bone_length_drift(motions),
            "foot_skate": foot_skate_ratio(motions)}


__all__ = ["MotionJudge", "MotionJudgeConfig", "bone_length_drift", "diversity", "foot_skate_ratio", "frechet",
           "motion_inputs", "motion_metrics", "multimodality"]
